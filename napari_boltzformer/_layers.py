"""Volumes <-> napari layer data: physical placement, display defaults, the result layers.

The geometry is the core's: `boltzformer.io.Volume` converts itself to napari's scale,
translate and affine (`Volume.napari_transform`: world (z, y, x) is LPS reversed, an oblique or
flipped volume gets a 4 x 4 affine and keeps `layer.scale` = the voxel size in mm), to and from a
data -> world matrix (`Volume.from_affine_zyx`) and to and from plain data
(`Volume.geometry_dict` / `from_geometry_dict`). `layer.metadata[GEOMETRY_KEY]` holds that plain
copy (spacing, origin, direction, source path, modality, shape, ndim) so the writer and the
panel restore the source volume exactly; this module only reads it and places layers with it.

This module never imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._windowing import WINDOW_KEY, display_window

GEOMETRY_KEY = "boltzformer_volume"  # Volume.geometry_dict of the source volume
FILE_GEOMETRY = "file_geometry"  # in a geometry dict: the file's own grid, when shown reoriented
ROLE_KEY = "boltzformer_role"  # image | mask | probability | uncertainty | attention | ground truth | label map
GROUND_TRUTH_PREFIX = "ground truth: "  # a sample's mask layer: this, then the prompt it answers
PROMPT_KEY = "boltzformer_prompt"  # the (normalised) prompt of a result layer
SOURCE_KEY = "boltzformer_source"  # name of the image layer a result layer was computed from
COLOR_KEY = "boltzformer_color"  # the colour of a mask layer

# Mask colours, in the order prompts get them: readable on a grey CT/MR slice, the first ones
# away from the heatmap's hues (violet-magenta-orange; magenta comes last). Green is kept for
# the ground truth of the sample data.
MASK_COLORS = ("#30d5ff", "#b4ff3a", "#ffe14d", "#00ffc8", "#4d7cff", "#ff2fd0")
GROUND_TRUTH_COLOR = "#34c759"
# The heatmap is drawn with translucent blending and a colormap that carries its own alpha: 0 is
# fully transparent (the slice shows through untouched) and every other value is a saturated
# hue, so it reads on black lung as well as on white soft tissue or contrast, where additive
# blending (the old inferno heatmap) cannot brighten anything.
ATTENTION_COLORMAP = "boltzformer heat"
ATTENTION_COLORS = (  # (position in the contrast range, RGBA)
    (0.0, (0.0, 0.0, 0.0, 0.0)),
    (0.02, (0.40, 0.05, 1.00, 0.50)),
    (0.5, (1.00, 0.05, 0.45, 0.75)),
    (1.0, (1.00, 0.60, 0.00, 0.95)),
)
ATTENTION_OPACITY = 0.9
# Layer names longer than this are cut in napari's layer list ("multiple scler…sion attention").
MAX_LAYER_NAME = 26


# -- geometry -------------------------------------------------------------------------------
def geometry_from_layer(layer) -> dict:
    """The source geometry (Volume.geometry_dict) of an image or labels layer.

    From `metadata[GEOMETRY_KEY]` when it matches the layer's shape; otherwise derived from the
    layer's own transform (scale, translate, rotate, shear, affine), e.g. for layers opened by
    another reader or drawn by hand.
    """
    from boltzformer.io import Volume

    data_shape = tuple(int(v) for v in layer_array(layer).shape)
    geom = (layer.metadata or {}).get(GEOMETRY_KEY)
    ndim = layer.ndim
    if ndim not in (2, 3) and (geom is None or geometry_shape(geom) != data_shape):
        raise ValueError(f"layer '{layer.name}' has {ndim} dimensions; BoltzFormer needs a 2D slice or a 3D volume")
    matrix = data_to_world_matrix(layer)
    if geom is not None and geometry_shape(geom) == data_shape and (ndim != 3 or placed_by(geom, matrix)):
        return dict(geom)
    geom = Volume.from_affine_zyx(_placeholder(data_shape), matrix).geometry_dict(layer_ndim=ndim)
    # napari's world has no patient axes: a layer this plugin did not place may lie any way round,
    # so the orientation letters drawn from it carry a "?"
    geom["orientation_unknown"] = True
    if only_pixel_units(getattr(layer, "units", ())):
        geom["units"] = "pixel"  # its scale is read as mm (the panel warns); result layers keep pixel units
    return geom


def only_pixel_units(units) -> bool:
    """Whether a layer's napari `units` are all "pixel", napari's default: no physical size given."""
    return bool(units) and all(str(u) == "pixel" for u in units)


def data_to_world_matrix(layer) -> np.ndarray:
    """A layer's data -> world transform as one (ndim + 1) x (ndim + 1) matrix (z, y, x order)."""
    ndim = layer.ndim
    origin = np.asarray(layer.data_to_world(np.zeros(ndim)), float)
    matrix = np.eye(ndim + 1)
    matrix[:ndim, ndim] = origin
    for i in range(ndim):
        matrix[:ndim, i] = np.asarray(layer.data_to_world(np.eye(ndim)[i]), float) - origin
    return matrix


def placed_by(geom: dict, matrix: np.ndarray) -> bool:
    """Whether a 3D layer whose data -> world (z, y, x) matrix (4 x 4) is `matrix` still sits where
    `geom` puts it; one moved, scaled or turned by hand since it was made does not, and is then
    where the viewer shows it, not on the stored grid."""
    return bool(np.allclose(matrix, geometry_volume(geom).affine_zyx(), atol=1e-3))


def geometry_shape(geom: dict) -> tuple:
    """The layer data shape a geometry describes: (z, y, x), or (y, x) for a 2D source."""
    shape = tuple(int(v) for v in geom.get("shape", ()))
    return shape[-2:] if int(geom.get("ndim", 3)) == 2 else shape


def geometry_volume(geom: dict, array_zyx: np.ndarray | None = None, modality: str | None = None):
    """The core Volume a geometry describes, around `array_zyx` (3D); None: no voxels, only
    the geometry (a read-only placeholder of its shape that allocates nothing)."""
    from boltzformer.io import Volume

    array = _placeholder(geom["shape"]) if array_zyx is None else array_zyx
    return Volume.from_geometry_dict(array, geom, modality=modality)


def _placeholder(shape) -> np.ndarray:
    return np.broadcast_to(np.uint8(0), tuple(int(v) for v in shape))


def layer_array(layer) -> np.ndarray:
    """The full-resolution data of a layer as an array (level 0 of a multiscale layer)."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


def volume_from_layer(layer, modality: str | None = None):
    """A boltzformer Volume (z, y, x) from an image layer; a 2D layer becomes one slice."""
    geom = geometry_from_layer(layer)
    array = np.asarray(layer_array(layer))
    if array.ndim == 2:
        array = array[None]
    if is_shown_flat(geom) and geometry_shape(geom[FILE_GEOMETRY]) == array.shape:
        geom = geom[FILE_GEOMETRY]  # the same voxels where the patient is: lesion positions in mm are true
    return geometry_volume(geom, array, modality=modality)


def mask_array(array: np.ndarray) -> np.ndarray:
    """A labels layer's data as a mask volume holds it: bool as uint8, other types as they are."""
    return array.astype(np.uint8) if array.dtype == bool else array


def mask_volume(array: np.ndarray, geom: dict):
    """A mask Volume (z, y, x) of a labels layer's data (2D or 3D) with `geom`'s geometry; on
    the file's own grid when the layer shows it reoriented (``geom["file_geometry"]``, see
    `image_layer_data`): the same voxels, in the file's axis order."""
    array = mask_array(array)
    array = array[None] if array.ndim == 2 else array
    file_geom = geom.get(FILE_GEOMETRY)
    if file_geom is None:
        return geometry_volume(geom, array)
    from boltzformer.orientation import canonical_reorientation

    reorientation = canonical_reorientation(geometry_volume(file_geom))  # the one to_canonical used
    return geometry_volume(file_geom, np.ascontiguousarray(reorientation.from_canonical(array)))


def to_layer_shape(array_zyx: np.ndarray, geom: dict) -> np.ndarray:
    """A (z, y, x) result as the source layer's data: the one slice of a 2D source."""
    return array_zyx[0] if int(geom.get("ndim", 3)) == 2 else array_zyx


# -- names ----------------------------------------------------------------------------------
def layer_name_for(volume, fallback: str = "volume") -> str:
    from boltzformer.io import INPUT_EXTENSIONS, extension_of

    path = getattr(volume, "path", None)
    if not path:
        return fallback
    name = Path(str(path)).name
    suffix = extension_of(name)
    if suffix in INPUT_EXTENSIONS:  # the file's name without the extension of its format
        return name[: -len(suffix)] or fallback
    return name or fallback


# -- layer data tuples (data, kwargs, layer_type) --------------------------------------------
def image_layer_data(volume, name: str | None = None, window: str | None = None) -> tuple:
    """An Image layer at the volume's physical position; HU kept, contrast from a window.

    A volume acquired sagittally or coronally is shown on its canonical axial grid
    (orientation.to_canonical: the same voxels, axes permuted and flipped, nothing resampled):
    napari slices a layer along its data axes, and cannot draw a grid whose slices are not
    axial (vispy fails on the singular 2D transform). Its geometry keeps the file's grid as
    ``file_geometry``, so masks drawn or found on it are written back on that grid (`mask_volume`)."""
    from boltzformer import intensity

    volume, geom = _shown_axially(volume, intensity.detect_modality(volume))  # the file's own modality wins
    window_name, limits = display_window(volume, window)
    kwargs = {
        "name": name or layer_name_for(volume),
        "colormap": "gray",
        "contrast_limits": limits,
        "metadata": {GEOMETRY_KEY: geom, ROLE_KEY: "image", WINDOW_KEY: [window_name, *limits]},
        "axis_labels": ("z", "y", "x"),
        "units": "mm",
        **volume.napari_transform(),
    }
    return volume.array, kwargs, "image"


def next_mask_color(used) -> str:
    """The first palette colour not in `used` (cycling when all are taken)."""
    used = [str(c).lower() for c in used]
    for color in MASK_COLORS:
        if color.lower() not in used:
            return color
    return MASK_COLORS[len(used) % len(MASK_COLORS)]


def mask_colormap(color: str):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: color})


def _shown_axially(volume, modality: str | None) -> tuple:
    """(the volume napari is given, its geometry dict): a volume acquired sagittally or coronally
    on its canonical axial grid, the file's own grid kept as FILE_GEOMETRY (see image_layer_data)."""
    from boltzformer.orientation import canonical_reorientation, find_reorientation, to_canonical

    file_geom = None
    if not find_reorientation(volume.direction).keeps_slices:
        file_geom = dict(volume.geometry_dict(), modality=modality)
        if canonical_reorientation(volume).keeps_slices:  # one such slice, segmented as stored: shown flat
            volume = shown_flat(volume)
        else:
            volume = to_canonical(volume)[0]
    geom = volume.geometry_dict()
    geom["modality"] = modality
    if file_geom is not None:
        geom[FILE_GEOMETRY] = file_geom
    return volume, geom


def shown_flat(volume):
    """A single sagittal or coronal slice as napari can draw it: its own plane on the screen,
    at its origin (vispy cannot draw a plane turned out of the screen). The core segments it as
    stored (`orientation.canonical_reorientation`); its file geometry places results in 3D."""
    from boltzformer.io import Volume

    return Volume(volume.array, volume.spacing_mm, volume.origin_mm, np.eye(3), volume.modality, volume.path,
                  dict(volume.metadata))


def is_shown_flat(geom: dict) -> bool:
    """True when `geom` is a single sagittal or coronal slice shown flat (`shown_flat`)."""
    from boltzformer.orientation import canonical_reorientation

    file_geom = geom.get(FILE_GEOMETRY)
    return file_geom is not None and canonical_reorientation(geometry_volume(file_geom)).keeps_slices


def label_map_layer_data(volume, name: str | None = None) -> tuple:
    """A Labels layer for a mask or label map read from a file (a BoltzFormer export, another
    tool's segmentation), placed as its scan would be, so that it lies over it; its geometry
    writes it back on the file's grid. Role "label map": nobody's result."""
    volume, geom = _shown_axially(volume, None)
    kwargs = {
        "name": name or layer_name_for(volume, "mask"),
        "metadata": {GEOMETRY_KEY: geom, ROLE_KEY: "label map"},
        "opacity": 0.7,
        "axis_labels": ("z", "y", "x"),
        "units": "mm",
        **volume.napari_transform(),
    }
    return np.asarray(volume.array), kwargs, "labels"


def labels_layer_data(mask: np.ndarray, geom: dict, name: str, prompt: str | None = None, source: str | None = None,
                      color: str = MASK_COLORS[0]) -> tuple:
    """A Labels layer (0/1) on the geometry `geom`, drawn in `color`."""
    metadata = {GEOMETRY_KEY: dict(geom), ROLE_KEY: "mask", COLOR_KEY: color}
    if prompt is not None:
        metadata[PROMPT_KEY] = prompt
    if source is not None:
        metadata[SOURCE_KEY] = source
    kwargs = {
        "name": name,
        "metadata": metadata,
        "colormap": mask_colormap(color),
        "opacity": 0.7,
        **placement_kwargs(geom),
    }
    return to_layer_shape(mask, geom), kwargs, "labels"


def placement_kwargs(geom: dict) -> dict:
    """Axis names, units and the world transform shared by every layer laid over the image."""
    ndim = int(geom.get("ndim", 3))
    return {"axis_labels": ("z", "y", "x")[-ndim:], "units": geom.get("units", "mm"),
            **geometry_volume(geom).napari_transform(layer_ndim=ndim)}


def result_layer_name(prompt: str, role: str | None = None) -> str:
    """A layer name that napari's layer list shows whole: '<prompt> <role>', the prompt
    shortened (its shortest known synonym, else cut at a word) when the two do not fit."""
    suffix = f" {role}" if role else ""
    if len(prompt) + len(suffix) <= MAX_LAYER_NAME:
        return prompt + suffix
    short = _short_synonym(prompt)
    if short is not None and len(short) + len(suffix) <= MAX_LAYER_NAME:
        return short + suffix
    room = MAX_LAYER_NAME - len(suffix) - 1
    words, out = prompt.split(), ""
    for word in words:
        if len(out) + len(word) + (1 if out else 0) > room:
            break
        out = f"{out} {word}" if out else word
    return (out or prompt[:room]) + "…" + suffix


def _short_synonym(prompt: str) -> str | None:
    try:
        from boltzformer.synth.prompts import TARGETS, target_of_prompt
    except ImportError:
        return None
    target = target_of_prompt(prompt)
    if target is None:
        return None
    return min(TARGETS[target].prompts, key=len)


def probability_layer_data(probabilities: np.ndarray, geom: dict, name: str, prompt: str, source: str | None = None) -> tuple:
    kwargs = {
        "name": name,
        "colormap": "magma",
        "contrast_limits": (0.0, 1.0),
        "blending": "additive",
        "opacity": 0.5,
        "visible": False,  # additive layers stacked on the heatmap wash the slice out; one click shows it
        "metadata": {GEOMETRY_KEY: dict(geom), ROLE_KEY: "probability", PROMPT_KEY: prompt, SOURCE_KEY: source},
        **placement_kwargs(geom),
    }
    return to_layer_shape(probabilities, geom), kwargs, "image"


def uncertainty_layer_data(variance: np.ndarray, geom: dict, name: str, prompt: str, source: str | None = None) -> tuple:
    """Per-voxel variance over sampling seeds (at most 0.25 for probabilities in [0, 1])."""
    kwargs = {
        "name": name,
        "colormap": "viridis",
        "blending": "additive",
        "opacity": 0.6,
        "visible": False,
        "metadata": {GEOMETRY_KEY: dict(geom), ROLE_KEY: "uncertainty", PROMPT_KEY: prompt, SOURCE_KEY: source},
        **placement_kwargs(geom),
    }
    return to_layer_shape(variance, geom), kwargs, "image"


def attention_colormap():
    """The heatmap colormap: transparent at 0, violet -> red -> orange with rising alpha."""
    from napari.utils.colormaps import Colormap

    controls = [c for c, _ in ATTENTION_COLORS]
    colors = [rgba for _, rgba in ATTENTION_COLORS]
    return Colormap(colors=colors, controls=controls, name=ATTENTION_COLORMAP)


def attention_contrast(values: str, num_queries: int | None, query: int | None, data: np.ndarray) -> tuple[float, float]:
    """Fixed scales where they mean something: 0..queries (counts), 0..1 (one query), else 0..max."""
    if values == "counts" and query is not None:
        return (0.0, 1.0)
    if values == "counts" and num_queries:
        return (0.0, float(num_queries))
    top = float(np.nanmax(data)) if data.size else 1.0
    return (0.0, top if top > 0 else 1.0)


def attention_legend(values: str, num_queries: int | None, query: int | None, top_fraction: float | None) -> str:
    """What the heatmap colour means, in a few short lines (shown beside its colour bar)."""
    if values == "counts":
        text = (f"sampled by\nquery {query + 1}" if query is not None
                else f"queries (of {num_queries or '?'})\nthat sampled\nthis cell")
    else:  # one scale for every slice of the decoder layer shown (_heatmap.fit_probability_bar)
        text = "sampling\nprobability\n(× uniform;\nbar: 0 to the max\nof this layer)"
    if top_fraction is not None:  # a slice's shown share is on the panel (top_mass: ties, floors)
        text += f"\nhottest cells only\n(≤ ~{top_fraction * 100:.0f} % of the mass)"
    return text


def attention_layer_data(attention, geom: dict, name: str, prompt: str, source: str | None = None,
                         values: str = "counts", num_queries: int | None = None, query: int | None = None,
                         top_fraction: float | None = None) -> tuple:
    """The decoder's sampling heatmaps as one Image layer (L, Z, G, G) on the source volume.

    `attention` is a boltzformer.segmenter.AttentionMaps; `values` picks `counts` (how many
    queries sampled each token; with `query`, 1 where that one query did) or `probabilities`
    (Boltzmann probabilities, uniform = 1); `top_fraction` keeps only the cells holding that
    share of the sampling mass (AttentionMaps.view). Data stay at grid resolution (float16);
    one grid cell covers grid_scale_yx source voxels, so its centre lies (grid_scale - 1) / 2
    voxels from the centre of the first voxel it covers, and the first map is slice
    `attention.slice_start`. With `num_queries`, counts are shown on the fixed scale 0 (no query
    sampled the token, transparent) .. num_queries (every query did), the same for every
    decoder layer and every run.
    """
    data = attention.view(values, query=query, top_fraction=top_fraction)  # L x Z x G x G
    contrast = attention_contrast(values, num_queries, query, data)
    if getattr(attention, "frame", None) is not None:
        # a sagittal/coronal input: the maps lie on the canonical axial slices the model saw
        geom = attention.frame.geometry_dict()
    gy, gx = (float(v) for v in attention.grid_scale_yx)
    placement = geometry_volume(geom).napari_transform(
        layer_ndim=int(geom.get("ndim", 3)),
        cell_voxels=(1.0, gy, gx),
        offset_voxels=(float(attention.slice_start), (gy - 1.0) / 2.0, (gx - 1.0) / 2.0),
        leading_axes=1,
    )
    if int(geom.get("ndim", 3)) == 2:
        data = data[:, 0]
    spatial = ("z", "y", "x")[-int(geom.get("ndim", 3)):]
    kwargs = {
        "name": name,
        "colormap": attention_colormap(),
        "blending": "translucent",
        "opacity": ATTENTION_OPACITY,
        "interpolation2d": "nearest",
        "contrast_limits": contrast,
        "metadata": {
            GEOMETRY_KEY: dict(geom),
            ROLE_KEY: "attention",
            PROMPT_KEY: prompt,
            SOURCE_KEY: source,
            "values": values,
            "query": query,
            "top_fraction": top_fraction,
            "num_queries": num_queries,
            "legend": attention_legend(values, num_queries, query, top_fraction),
            "strides": list(attention.strides),
            "temperatures": [float(t) for t in attention.temperatures],
            "tokens_per_query": list(attention.tokens_per_query),
        },
        "axis_labels": ("decoder layer", *spatial),
        "units": ("pixel", *([geom.get("units", "mm")] * len(spatial))),
        **placement,
    }
    return data, kwargs, "image"
