"""The layers of a run in the viewer: which exist, what a new result puts in them, their order.

A run's layers (mask, probability, uncertainty, attention heatmap) carry its id (RUN_KEY), its
prompt and its source image in their metadata, so a re-run of the same prompt on the same image
updates its layers in place (keeping the user's styling and the mask's colour) and a panel can
find the layers of any run. Ground truth (of the sample data) is drawn as an outline above
everything. No Qt widgets, no tensor math.
"""

from __future__ import annotations

import numpy as np

from ._layers import (
    COLOR_KEY,
    MASK_COLORS,
    PROMPT_KEY,
    ROLE_KEY,
    SOURCE_KEY,
    attention_layer_data,
    labels_layer_data,
    next_mask_color,
    probability_layer_data,
    result_layer_name,
    uncertainty_layer_data,
)

RUN_KEY = "boltzformer_run"  # metadata: id of the run whose result a layer shows
OUTLINED_KEY = "boltzformer_outlined"  # metadata: the panel has drawn this ground truth as an outline
RESULT_ROLES = ("mask", "probability", "uncertainty", "attention")


def result_layers(viewer, prompt: str, source: str) -> dict:
    """The result layers (role -> layer) of `prompt` on image layer `source`."""
    out = {}
    for layer in viewer.layers:
        md = layer.metadata or {}
        if md.get(PROMPT_KEY) == prompt and md.get(SOURCE_KEY) == source and md.get(ROLE_KEY) in RESULT_ROLES:
            out.setdefault(md[ROLE_KEY], layer)
    return out


def follow_renamed_images(viewer, seen: dict, requests) -> dict:
    """Result layers name their image layer (SOURCE_KEY), and a re-run finds and updates them by
    that name: once an image layer was renamed, a re-run added a second set beside the first.
    The image layers renamed since `seen` ({id(layer): (layer, name)}, kept by the caller and
    updated here) give their new name to their result layers and to `requests` (RunRequests).
    Returns `seen` (a panel starts from the names its viewer holds, or missed a rename)."""
    from napari.layers import Image

    renamed = {}
    for key, (layer, name) in list(seen.items()):
        if not any(other is layer for other in viewer.layers):
            del seen[key]
        elif layer.name != name:
            renamed[name] = layer.name
    for layer in viewer.layers:
        if isinstance(layer, Image) and (layer.metadata or {}).get(ROLE_KEY) not in RESULT_ROLES:
            seen[id(layer)] = (layer, layer.name)
    if not renamed:
        return seen
    for layer in viewer.layers:
        md = layer.metadata or {}
        if md.get(ROLE_KEY) in RESULT_ROLES and md.get(SOURCE_KEY) in renamed:
            md[SOURCE_KEY] = renamed[md[SOURCE_KEY]]
    for request in requests:
        request.image_name = renamed.get(request.image_name, request.image_name)
    return seen


def layer_of(viewer, run_id: str | None, role: str):
    """The layer of role `role` showing run `run_id`, or None."""
    for layer in viewer.layers:
        md = layer.metadata or {}
        if md.get(RUN_KEY) == run_id and md.get(ROLE_KEY) == role:
            return layer
    return None


def wanted_layers(viewer, result, request, existing: dict, num_queries: int | None, heat_options: dict) -> dict:
    """role -> (data, kwargs, layer type) of what `result` shows; the mask keeps the colour of
    the layer it replaces, else takes the first colour no layer has."""
    prompt, source, geom = result.prompt, request.image_name, request.geometry
    wanted = {}
    if request.want_probability:
        wanted["probability"] = probability_layer_data(result.probabilities, geom, result_layer_name(prompt, "probability"),
                                                       prompt, source)
    if result.uncertainty is not None:
        wanted["uncertainty"] = uncertainty_layer_data(result.uncertainty, geom, result_layer_name(prompt, "uncertainty"),
                                                       prompt, source)
    if "mask" in existing:
        color = existing["mask"].metadata.get(COLOR_KEY, MASK_COLORS[0])
    else:
        color = next_mask_color(layer.metadata.get(COLOR_KEY) for layer in viewer.layers)
    wanted["mask"] = labels_layer_data(result.mask, geom, name=result_layer_name(prompt), prompt=prompt,
                                       source=source, color=color)
    if request.want_attention and result.attention is not None:
        wanted["attention"] = attention_layer_data(
            result.attention, geom, result_layer_name(prompt, "attention"), prompt, source,
            num_queries=num_queries, **heat_options,
        )
    return wanted


def put_layers(viewer, run_id: str, result, wanted: dict, existing: dict, on_heatmap_visible) -> None:
    """Add the `wanted` layers of run `run_id`, or update the `existing` ones in place.

    A new heatmap layer gets its colour bar and opens on the decoder layer where the search is
    sharpest (AttentionMaps.sharpest_layer); `on_heatmap_visible` is called when it is shown or
    hidden (its legend follows it).
    """
    heatmap = existing.get("attention")
    for role, (data, kwargs, kind) in wanted.items():
        kwargs["metadata"][RUN_KEY] = run_id
        layer = existing.get(role)
        if layer is None:
            ndim_before, last_used_before = viewer.dims.ndim, viewer.dims.last_used
            layer = getattr(viewer, f"add_{kind}")(data, **kwargs)
            if heatmap is not None and heatmap in viewer.layers:  # a layer deleted and made again: under the
                viewer.layers.move(viewer.layers.index(layer), viewer.layers.index(heatmap))  # heatmap, as at first
            if role == "attention":
                _keep_arrow_keys_on_the_slices(viewer, ndim_before, last_used_before)
                layer.colorbar.visible = True
                layer.colorbar.position = "bottom_right"
                layer.events.visible.connect(lambda _=None: on_heatmap_visible())
                axis = viewer.dims.ndim - layer.ndim  # the "decoder layer" axis
                viewer.dims.set_current_step(axis, result.attention.sharpest_layer())
        else:
            _update_layer(layer, data, kwargs)


def _keep_arrow_keys_on_the_slices(viewer, ndim_before: int, last_used_before: int) -> None:
    """The heatmap's "decoder layer" axis comes first, so the viewer's axes shift by one; napari
    leaves `dims.last_used` (the axis the arrow keys step) at its old number, which is now the
    decoder layer's: Left/Right stepped through decoder layers instead of slices."""
    added = viewer.dims.ndim - ndim_before
    if added > 0:
        viewer.dims.last_used = min(last_used_before + added, viewer.dims.ndim - 1)


def outline_ground_truth(viewer):
    """Ground truth (of the samples) as an outline, once: a filled truth hides under the
    mask a run draws, or hides it. The user may fill it again (layer controls, contour 0)."""
    for layer in viewer.layers:
        md = layer.metadata or {}
        if md.get(ROLE_KEY) == "ground truth" and not md.get(OUTLINED_KEY) and hasattr(layer, "contour"):
            layer.contour = 1
            layer.metadata[OUTLINED_KEY] = True


def keep_ground_truth_on_top(viewer):
    layers = viewer.layers
    for layer in [la for la in layers if (la.metadata or {}).get(ROLE_KEY) == "ground truth"]:
        index = layers.index(layer)
        if index != len(layers) - 1:
            layers.move(index, len(layers))


def _update_layer(layer, data, kwargs):
    """Give an existing result layer new data, placement and metadata (keeps user styling)."""
    layer.data = data
    layer.metadata.clear()
    layer.metadata.update(kwargs["metadata"])
    layer.scale = kwargs["scale"]
    layer.translate = kwargs["translate"]
    affine = kwargs.get("affine")
    layer.affine = np.eye(layer.ndim + 1) if affine is None else affine
    if "contrast_limits" in kwargs:
        layer.contrast_limits = kwargs["contrast_limits"]
    elif hasattr(layer, "reset_contrast_limits"):
        layer.reset_contrast_limits()
