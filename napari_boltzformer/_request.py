"""What the panel's settings ask for: the `RunRequest` of a run, or a notification saying why
none can start (look here running, no usable image, an empty prompt, NaN voxels), and a warning where a run would
rest on a guess (an image layer with no physical voxel size).

Reads the panel it is given (its Image box, prompt, options and switches); of the plugin it
imports only the layer helpers (_layers), the result roles (_result_layers) and the job's
request type (_job).
"""

from __future__ import annotations

from ._job import RunRequest
from ._layers import ROLE_KEY, geometry_from_layer, layer_array, volume_from_layer
from ._result_layers import RESULT_ROLES

EMPTY_PROMPT = 'the prompt is empty; type what to segment, e.g. "lung nodule"'
NO_IMAGE = "no image layer: open a CT or MRI volume first (File > Open, or File > Open Sample > BoltzFormer)"
NOT_STARTED = "not started: see the message"  # the panel's status line after a refused Run


def build_request(panel) -> RunRequest | None:
    """The run `panel`'s settings describe; None (after a notification) when impossible."""
    from boltzformer.errors import BoltzformerError
    from boltzformer.io import require_finite
    from napari.utils.notifications import show_error, show_warning

    if panel.reviewer.looking:  # it runs the model on the result a run would replace
        show_error("look here is still running; press Run when it ends")
        return None
    prompt = panel.prompt_edit.text().strip()
    layer = panel.image_layer()
    if layer is None:
        unusable = unusable_images(panel.viewer)
        show_error(f"no usable image layer: {'; '.join(unusable)}" if unusable else NO_IMAGE)
        return None
    if not prompt:
        show_error(EMPTY_PROMPT)
        return None
    modality = panel.modality_combo.currentData()
    try:
        volume = volume_from_layer(layer, modality=modality)
        require_finite(volume.array, layer.name)  # as the readers refuse such a file
    except ValueError as exc:
        show_error(f"{layer.name}: {exc}")
        return None
    except BoltzformerError as exc:
        show_error(str(exc))
        return None
    geometry = geometry_from_layer(layer)
    if geometry.get("units") == "pixel":
        spacing = " x ".join(f"{v:g}" for v in volume.spacing_mm)
        show_warning(f"'{layer.name}' has no physical voxel size (its napari units are pixels): sizes and volumes "
                     f"are computed as if its voxels were {spacing} mm. Open the scan with File > Open to keep "
                     "its geometry, or give the layer a scale and units")
    try:
        slices = scope_slices(panel, layer)
    except ValueError as exc:
        show_error(str(exc))
        return None
    options = {
        "window": panel.window_combo.currentData() if panel.window_combo.isEnabled() else None,
        "modality": modality,
        "slices": slices,
        "runs": panel.runs_spin.value(),
        "seed": panel.seed_spin.value(),
        "threshold": panel.threshold(),
        "min_lesion_mm3": panel.min_lesion_spin.value(),
        "return_attention": panel.attention_check.isChecked(),
        "batch_size": panel.batch_size,
        "fp_reduction": panel.fp_check.isChecked(),
        "nodule_detector": panel.detector_check.isChecked(),
        "mirror": panel.mirror_check.isChecked(),
        "planes": panel.planes_combo.currentData(),
        "force_prompt": panel.force_prompt_check.isChecked(),
    }
    return RunRequest(
        volume=volume,
        prompt=prompt,
        device=panel.device_combo.currentData(),
        image_name=layer.name,
        geometry=geometry,
        options=options,
        want_probability=panel.probability_check.isChecked(),
        want_attention=panel.attention_check.isChecked(),
        keep_partial=panel.keep_partial_check.isChecked(),
        image_layer=layer,
        image_data=layer.data,
    )


def scan_changed_during(viewer, request: RunRequest) -> str | None:
    """Why the result of `request` must not be shown (its image layer was closed, or given
    other data or another placement, during the run), else None; an image layer renamed meanwhile
    is followed (request.image_name takes its new name). The result layers are found and labelled
    by that name: it went to whichever layer held the name at the end."""
    layer = request.image_layer
    if layer is None:  # a request made by hand (scripts, tests): its name is all there is
        return None
    if not any(other is layer for other in viewer.layers):
        return f"the image '{request.image_name}' was closed during the run; its result was not shown"
    try:
        same = geometry_from_layer(layer) == request.geometry
    except ValueError:
        same = False
    same = same and (request.image_data is None or layer.data is request.image_data)
    if not same:
        return (f"the image '{layer.name}' was given other data or another placement during the run; its result "
                "was not shown: run again")
    request.image_name = layer.name
    return None


def scope_slices(panel, layer) -> tuple[int, int] | None:
    """The [start, stop) slice range of the panel's scope on `layer`; None: all slices.
    ValueError for "current slice" when the view shows no slice of the layer's first axis (a
    sagittal or coronal view, or 3D): it ran the axial slice at the hidden position instead."""
    from ._view import shown_voxel, slicing_axes

    scope = panel.scope_combo.currentText()
    if layer.ndim == 2 or scope == "all slices":
        return None
    nz = int(layer_array(layer).shape[0])
    if scope == "current slice":
        viewer = panel.viewer
        if viewer.dims.ndisplay != 2 or slicing_axes(viewer, layer) != [0]:
            view = "3D" if viewer.dims.ndisplay != 2 else "another plane"
            raise ValueError(f"Scope 'current slice' segments the axial slice on screen, and the view shows {view}: "
                             "go back to the axial 2D view (napari's dims order), or choose 'all slices' or "
                             "'slice range'")
        z = int(round(float(shown_voxel(viewer, layer, viewer.dims.point)[0])))
        z = min(max(z, 0), nz - 1)
        return (z, z + 1)
    start, stop = sorted((panel.range_start.value(), panel.range_stop.value()))
    return (start, stop + 1)


def _an_image(layer) -> bool:
    """An image layer that is not one of the panel's own results."""
    from napari.layers import Image

    return isinstance(layer, Image) and (layer.metadata or {}).get(ROLE_KEY) not in RESULT_ROLES


def _why_not(layer) -> str | None:
    """Why such an image layer cannot be segmented (None: it can)."""
    if getattr(layer, "rgb", False):
        return "is RGB (a greyscale CT or MRI is needed)"
    if layer.ndim not in (2, 3):
        return f"has {layer.ndim} dimensions (a 2D slice or a 3D volume is needed: pick one time point or channel)"
    return None


def usable_image(layer) -> bool:
    """A greyscale 2D or 3D image layer that is not one of the panel's own results."""
    return _an_image(layer) and _why_not(layer) is None


def unusable_images(viewer) -> list[str]:
    """Why each image layer that `usable_image` leaves out cannot be segmented ("'x' is RGB ...")."""
    return [f"'{layer.name}' {why}" for layer in viewer.layers
            if _an_image(layer) and (why := _why_not(layer)) is not None]
