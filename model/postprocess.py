"""From a binary mask to lesions: 3D connected components, minimum size in mm³, lesion table.

Also the overlap measures used by evaluation (Dice, per-lesion detection).
All arrays are (z, y, x); spacings are (x, y, z) mm, as in Volume (ITK's order). Elsewhere a
spacing in (z, y, x) order says so in its name (the 3D classifier's patches, the detector's
work grid).
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import OutputError
from .io import OutputSet, Volume
from .parallel import thread_map

__all__ = [
    "label_components", "dilate_ellipsoid", "candidate_shell", "keep_only", "remove_small_lesions", "lesion_table", "write_lesion_table",
    "lesion_table_bytes", "flat_lesion_row", "dice", "lesion_detection", "CSV_COLUMNS",
]

# Column order of the CSV lesion table (the JSON rows keep the centroids as 3-element lists).
CSV_COLUMNS = (
    "lesion_id", "voxels", "volume_mm3", "longest_axial_diameter_mm", "short_axis_diameter_mm",
    "mean_axial_diameter_mm",
    "centroid_z", "centroid_y", "centroid_x", "centroid_lps_x_mm", "centroid_lps_y_mm", "centroid_lps_z_mm",
    "slice_start", "slice_end", "mean_intensity", "mean_probability", "max_probability",
)

_STRUCTURES = {6: 1, 18: 2, 26: 3}  # connectivity → rank of ndimage.generate_binary_structure
LABEL_UINT16_MAX = int(np.iinfo(np.uint16).max)  # label_components' ids fit uint16 up to this
EDT_SLAB_SLICES = 32  # slices per distance transform in dilate_ellipsoid (memory, not speed)
ELLIPSOID_EDT_MAX_RADIUS = 50  # voxels; a 3 mm shell reaches 50 voxels only below 0.06 mm spacing
_HULL_ABOVE = 64  # more boundary pixels than this in a slice: reduce them to the convex hull first


# -- sparse volumes --------------------------------------------------------------------------------
# Lesions fill a tiny part of a scan (a 300 x 512 x 512 CT: ~10^4 of 8 x 10^7 voxels, all inside
# ~10 % of it). Labelling, boxes and relabelling run inside the box around them, not over the scan.
def foreground_box(array: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest (z, y, x) box holding every non-zero voxel of a 3D array; None when all are zero."""
    z = np.flatnonzero(array.any(axis=(1, 2)))
    if not len(z):
        return None
    slab = array[z[0] : z[-1] + 1]
    y = np.flatnonzero(slab.any(axis=(0, 2)))
    x = np.flatnonzero(slab.any(axis=(0, 1)))
    return slice(int(z[0]), int(z[-1]) + 1), slice(int(y[0]), int(y[-1]) + 1), slice(int(x[0]), int(x[-1]) + 1)


def find_objects(labels: np.ndarray) -> list[tuple[slice, ...] | None]:
    """`ndimage.find_objects` of a 3D label array (the same boxes), searched inside its foreground box."""
    box = foreground_box(labels)
    if box is None:
        return []
    return [None if o is None else tuple(slice(a.start + b.start, a.stop + b.start) for a, b in zip(o, box))
            for o in ndimage.find_objects(labels[box])]


def relabel(labels: np.ndarray, lut: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """``lut[labels]`` (lut[0] must be 0), looked up at the foreground voxels only.

    in_place: overwrite `labels` (its dtype must hold lut's values) instead of filling a new
    scan-sized array, whose first touch can cost more than the lookup itself (0.1-0.6 s for a
    300 x 512 x 512 int32 array on 2 cores, varying from run to run)."""
    out = labels if in_place else np.zeros(labels.shape, lut.dtype)
    box = foreground_box(labels)
    if box is not None:
        inner = labels[box]
        fg = inner != 0
        out[box][fg] = lut[inner[fg]]
    return out


def label_components(
    mask: np.ndarray, spacing_mm, *, min_lesion_mm3: float = 0.0, connectivity: int = 26
) -> tuple[np.ndarray, int]:
    """3D connected components of a mask, small ones removed, largest first.

    Args:
        mask: (z, y, x) bool or integer array; non-zero is foreground.
        spacing_mm: voxel size (x, y, z) in mm.
        min_lesion_mm3: components with a smaller volume (mm³) are dropped.
        connectivity: 26 (default: faces, edges and corners, so a lesion continues across
            slices even when it shifts diagonally), 18 or 6.

    Returns:
        (labels, n): (z, y, x) with 0 for background and 1..n in descending volume order
        (ties: the component met first in z, y, x scan order comes first), and n. uint16 when
        the components found number at most LABEL_UINT16_MAX, else int32: a scan-sized int32
        array is twice the memory, and its first touch costs more than the labelling itself.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (z, y, x), got shape {mask.shape}")
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    structure = ndimage.generate_binary_structure(3, _STRUCTURES[connectivity])
    foreground = mask if mask.dtype == bool else mask != 0
    box = foreground_box(foreground)
    if box is None:
        return np.zeros(mask.shape, dtype=np.uint16), 0
    # Labelling inside the box numbers components in the same z, y, x scan order as the whole scan.
    try:
        inner = np.zeros(foreground[box].shape, dtype=np.uint16)
        n = ndimage.label(foreground[box], structure=structure, output=inner)
    except RuntimeError:  # more components than uint16 holds
        inner = np.zeros(foreground[box].shape, dtype=np.int32)
        n = ndimage.label(foreground[box], structure=structure, output=inner)
    voxel_mm3 = float(np.prod(spacing_mm))
    counts = np.bincount(inner.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-counts, kind="stable")  # old label - 1, largest first
    order = order[counts[order] * voxel_mm3 >= min_lesion_mm3]
    if not (len(order) == n and np.array_equal(order, np.arange(n))):  # not already in order, or some dropped
        lut = np.zeros(n + 1, dtype=inner.dtype)
        lut[order + 1] = np.arange(1, len(order) + 1)
        fg = inner != 0
        inner[fg] = lut[inner[fg]]
    labels = np.zeros(mask.shape, dtype=inner.dtype)
    labels[box] = inner
    return labels, len(order)


def dilate_ellipsoid(region: np.ndarray, radius_vox) -> np.ndarray:
    """Dilation by an axis-aligned ellipsoid of the given radii (voxels, z y x): the voxels whose
    offset (dz, dy, dx) from some region voxel has (dz/rz)² + (dy/ry)² + (dx/rx)² <= 1.

    Thresholding the distance transform (each axis scaled by 1/radius) gives the same set as a
    binary dilation by that ellipsoid and costs one pass instead of one per structure element:
    half the time on the bench CT's large candidates. Offsets on the ellipsoid come out of the
    transform within 1e-12 of 1, and with radii up to ELLIPSOID_EDT_MAX_RADIUS no offset off it
    is that close. A radius of 0 leaves that axis alone.

    The transform runs on slabs of EDT_SLAB_SLICES slices, each with a halo of the z radius: a
    voxel farther along z than that cannot be within the ellipsoid, so the set is the same, and
    the transform's float64 temporaries (about 60 bytes a voxel) cover a slab, not the region.
    """
    radius = np.maximum(np.asarray(radius_vox, float), 1e-6)
    if not region.any():
        return np.zeros(region.shape, bool)
    if radius.max() > ELLIPSOID_EDT_MAX_RADIUS:
        z, y, x = (np.arange(-int(r), int(r) + 1) / r for r in radius)
        ball = z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2 <= 1.0
        return ndimage.binary_dilation(region, structure=ball)
    halo = int(np.floor(radius[0])) + 1
    out = np.zeros(region.shape, bool)
    for z0 in range(0, region.shape[0], EDT_SLAB_SLICES):
        z1 = min(z0 + EDT_SLAB_SLICES, region.shape[0])
        lo, hi = max(z0 - halo, 0), min(z1 + halo, region.shape[0])
        slab = region[lo:hi]
        if slab.any():
            distance = ndimage.distance_transform_edt(~slab, sampling=1.0 / radius)
            out[z0:z1] = distance[z0 - lo : z1 - lo] <= 1.0 + 1e-12
    return out


def candidate_shell(labels: np.ndarray, lesion_id: int, box: tuple[slice, ...], radius_vox,
                    min_pad: int = 0) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """A candidate and the shell around it, in its box grown by the shell (at least `min_pad`
    voxels) plus one voxel: (that grown box, the candidate's voxels there, its shell: the dilation
    by an ellipsoid of radii `radius_vox` (voxels, z y x), less the candidate). labels: int (z, y,
    x); box: the candidate's find_objects box."""
    pad = [max(int(r), min_pad) + 1 for r in radius_vox]
    big = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, labels.shape))
    region = labels[big] == lesion_id
    return big, region, dilate_ellipsoid(region, radius_vox) & ~region


def keep_only(labels: np.ndarray, n_rows: int, kept: list[dict], *, in_place: bool = False) -> np.ndarray:
    """Labels with only the `kept` rows' lesions, renumbered 1..len(kept) in their order; the kept
    rows' ``lesion_id`` renumbered to match. labels: (z, y, x) lesions 1..n_rows.
    in_place: renumber `labels` itself (the caller's array is spent)."""
    lut = np.zeros(n_rows + 1, dtype=labels.dtype)
    for new_id, row in enumerate(kept, start=1):
        lut[row["lesion_id"]] = new_id
        row["lesion_id"] = new_id
    return relabel(labels, lut, in_place=in_place)


def remove_small_lesions(mask: np.ndarray, spacing_mm, min_lesion_mm3: float) -> np.ndarray:
    """uint8 (z, y, x) copy of ``mask`` without 3D components smaller than ``min_lesion_mm3``."""
    labels, _ = label_components(mask, spacing_mm, min_lesion_mm3=min_lesion_mm3)
    return (labels > 0).astype(np.uint8)


def lesion_table(labels: np.ndarray, volume: Volume, intensity: np.ndarray | None = None,
                 probabilities: np.ndarray | None = None, boxes: list | None = None) -> list[dict]:
    """One row (dict) per labelled component, in label order.

    Args:
        labels: int (z, y, x), 0 = background, same shape as ``volume``.
        volume: gives the geometry (and the intensities when ``intensity`` is None).
        intensity: optional (z, y, x) array for ``mean_intensity`` (e.g. probabilities).
        probabilities: optional (z, y, x) model probabilities: the rows get their mean and
            maximum over the lesion (how sure the model is of it).
        boxes: the labels' `find_objects`, when the caller has them already (a pass over the scan).

    Row keys:
        lesion_id (label value), voxels, volume_mm3,
        longest_axial_diameter_mm: the largest in-plane extent over the lesion's slices: the
            longest distance between two voxel centres in one slice, plus one pixel (half a
            pixel at each end, so a single voxel measures one pixel),
        short_axis_diameter_mm: in the slice of the longest diameter, the longest chord
            perpendicular to it (RECIST / Lung-RADS short axis), plus one pixel,
        mean_axial_diameter_mm: (longest + short axis) / 2, the "mean diameter" that
            Fleischner and Lung-RADS size categories use,
        centroid_voxel_zyx: (z, y, x) fractional voxel index,
        centroid_world_mm: (x, y, z) LPS mm,
        slice_start, slice_end: first and last z index (inclusive),
        mean_intensity,
        mean_probability, max_probability (only with ``probabilities``).
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the volume's {volume.shape}")
    values = volume.array if intensity is None else np.asarray(intensity)
    if values.shape != labels.shape:
        raise ValueError(f"intensity shape {values.shape} differs from the labels' {labels.shape}")
    if probabilities is not None and np.shape(probabilities) != labels.shape:
        raise ValueError(f"probabilities shape {np.shape(probabilities)} differs from the labels' {labels.shape}")
    sx, sy, _ = volume.spacing_mm
    voxel_mm3 = float(np.prod(volume.spacing_mm))

    def row_of(index_box):
        index, box = index_box
        lesion_id = index + 1
        region = labels[box] == lesion_id
        voxels = int(np.count_nonzero(region))
        # centroid from the voxel counts along each axis (no big index arrays)
        centroid = tuple(
            float(np.dot(region.sum(axis=others, dtype=np.int64), np.arange(region.shape[axis])) / voxels) + box[axis].start
            for axis, others in ((0, (1, 2)), (1, (0, 2)), (2, (0, 1)))
        )
        longest, short = _axial_diameters_mm(region, sy, sx)
        row = {
            "lesion_id": lesion_id,
            "voxels": voxels,
            "volume_mm3": float(voxels * voxel_mm3),
            "longest_axial_diameter_mm": longest,
            "short_axis_diameter_mm": short,
            "mean_axial_diameter_mm": (longest + short) / 2.0,
            "centroid_voxel_zyx": tuple(float(c) for c in centroid),
            "centroid_world_mm": tuple(float(c) for c in volume.index_to_world(centroid)),
            "slice_start": int(box[0].start),
            "slice_end": int(box[0].stop - 1),
            "mean_intensity": float(values[box][region].mean(dtype=np.float64)),
        }
        if probabilities is not None:
            inside = np.asarray(probabilities[box])[region]
            row["mean_probability"] = float(inside.mean(dtype=np.float64))
            row["max_probability"] = float(inside.max())
        return row

    boxes = find_objects(labels) if boxes is None else boxes
    return thread_map(row_of, [(i, box) for i, box in enumerate(boxes) if box is not None])


def _axial_diameters_mm(region: np.ndarray, sy: float, sx: float) -> tuple[float, float]:
    """(longest, short axis) in-plane diameters (mm) of a (z, y, x) region.

    longest: max over slices of the longest voxel-centre distance, plus one pixel. Only
    boundary pixels can be the ends of the longest chord, and only those on the convex hull;
    large slices are reduced to their hull before the pairwise distances.
    short: in that slice, the longest chord perpendicular to the longest one, plus one pixel.
    """
    cross = ndimage.generate_binary_structure(2, 1)[None]  # in-plane 4-neighbourhood
    boundary = region & ~ndimage.binary_erosion(region, structure=cross)
    zs, ys, xs = np.nonzero(boundary)  # sorted by z
    points_mm = np.column_stack([ys * sy, xs * sx])
    best, best_z, best_axis = 0.0, None, None
    starts = np.concatenate([[0], np.flatnonzero(np.diff(zs)) + 1])
    for start, points in zip(starts, np.split(points_mm, starts[1:])):  # one slice at a time
        if len(points) == 0:
            continue
        if len(points) > _HULL_ABOVE:
            points = _hull_points(points)
        diff = points[:, None, :] - points[None, :, :]
        d2 = np.einsum("ijk,ijk->ij", diff, diff)
        i, j = np.unravel_index(np.argmax(d2), d2.shape)
        dy, dx = np.abs(diff[i, j])
        if dy == 0 and dx == 0:
            pixel = max(sx, sy)  # a single pixel
        else:
            pixel = sx if dx >= dy else sy  # pixel size along the axis closest to the chord
        length = float(np.sqrt(d2[i, j])) + pixel
        if length > best:
            best, best_z, best_axis = length, int(zs[start]), diff[i, j]
    if best_z is None:
        return 0.0, 0.0
    return best, min(best, _short_axis_mm(region[best_z], sy, sx, best_axis))


def _short_axis_mm(section: np.ndarray, sy: float, sx: float, axis_mm) -> float:
    """The longest chord of a 2D region perpendicular to `axis_mm` (dy, dx), plus one pixel.

    Pixels are grouped into strips one pixel wide across the long axis; a strip's extent
    along the perpendicular is the chord there (its two ends)."""
    norm = float(np.hypot(*axis_mm))
    if norm == 0:
        return min(sx, sy)  # a single pixel: its shorter side
    uy, ux = float(axis_mm[0]) / norm, float(axis_mm[1]) / norm
    ys, xs = np.nonzero(section)
    y_mm, x_mm = ys * sy, xs * sx
    along = y_mm * uy + x_mm * ux
    across = -y_mm * ux + x_mm * uy
    step = sx * abs(ux) + sy * abs(uy)  # about one pixel along the long axis
    strips = np.round(along / step).astype(np.int64)
    strips -= strips.min()
    lo = np.full(strips.max() + 1, np.inf)
    hi = np.full(strips.max() + 1, -np.inf)
    np.minimum.at(lo, strips, across)
    np.maximum.at(hi, strips, across)
    pixel = sx if abs(uy) >= abs(ux) else sy  # the perpendicular runs closest to the other axis
    return float(np.max(hi - lo)) + pixel


def _hull_points(points: np.ndarray) -> np.ndarray:
    """Convex hull vertices of 2D points; the two end points when they are collinear."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        return points[ConvexHull(points).vertices]
    except QhullError:  # collinear (or fewer than 3) points: the ends are the extremes
        order = np.lexsort((points[:, 1], points[:, 0]))
        return points[[order[0], order[-1]]]


def select_labels(labels: np.ndarray, ids) -> np.ndarray:
    """uint8 (z, y, x) mask of the components whose label is in `ids` (what a view shows)."""
    ids = np.asarray(sorted(int(i) for i in ids), dtype=np.int64)
    labels = np.asarray(labels)
    if ids.size == 0:
        return np.zeros(labels.shape, np.uint8)
    lut = np.zeros(int(max(ids.max(), labels.max(initial=0))) + 1, np.uint8)
    lut[ids] = 1
    return lut[labels]


# Organ measures: what "the size" of a structure means to a reader. Vessels: the calibre, the
# largest short-axis diameter of any axial cross-section (axial cuts of the aorta and the cava
# are near-perpendicular to them; on the arch the short axis is still its width). Solid organs
# with a reference length (splenomegaly, hepatomegaly, kidney size): the craniocaudal extent.
# Others (heart, lungs, vertebrae): none, a diameter would not mean anything.
ORGAN_MEASURES = {
    "aorta": "max axial calibre", "inferior_vena_cava": "max axial calibre",
    "spleen": "craniocaudal length", "liver": "craniocaudal length", "kidney": "craniocaudal length",
}


def organ_summary(labels: np.ndarray, volume: Volume, target: str | None = None,
                  probabilities: np.ndarray | None = None) -> dict | None:
    """One structure from labelled components (1 = largest, as label_components numbers them).

    The largest component is the structure (the two largest for paired organs, see
    boltzformer.synth.prompts.PAIRED_TARGETS); the rest are left out as stray islands. `labels`
    must lie on an axial grid (z = slices), e.g. the canonical frame, for the axial measures.

    Returns None when nothing is labelled, else {structure, lesion_ids (the kept labels),
    components_found, volume_mm3, volume_ml, measure (its name or None), measure_mm,
    longest_axial_diameter_mm, slice_start, slice_end, centroid_voxel_zyx, centroid_world_mm,
    mean_intensity, and mean_probability / max_probability with ``probabilities``}. A pair
    found as two components (two kidneys) is measured side by side: ``sides`` holds
    {side ("right", "left": from the world x of each centroid, LPS), volume_mm3, volume_ml,
    measure_mm, longest_axial_diameter_mm}, right first, and the pair's own measure_mm is None
    (a craniocaudal length over both kidneys is no kidney's length); its longest axial diameter
    stays the pair's extent (what a view must show).
    """
    from .synth.prompts import PAIRED_TARGETS

    labels = np.asarray(labels)
    found = int(labels.max(initial=0))
    if found == 0:
        return None
    kept = list(range(1, min(found, 2 if target in PAIRED_TARGETS else 1) + 1))
    region_mask = select_labels(labels, kept).astype(bool)
    (row,) = lesion_table(region_mask.astype(np.int32), volume, probabilities=probabilities)
    measure = ORGAN_MEASURES.get(target or "")
    summary = {
        "structure": (target or "structure").replace("_", " "),
        "lesion_ids": kept,
        "components_found": found,
        "volume_mm3": row["volume_mm3"],
        "volume_ml": row["volume_mm3"] / 1000.0,
        "measure": measure,
        "measure_mm": _organ_measure_mm(region_mask, row, measure, volume.spacing_mm),
        **{k: row[k] for k in ("longest_axial_diameter_mm", "slice_start", "slice_end", "centroid_voxel_zyx",
                               "centroid_world_mm", "mean_intensity", "mean_probability", "max_probability")
           if k in row},
    }
    if len(kept) == 2:
        sides = []
        for lesion_id in kept:
            part = labels == lesion_id
            (part_row,) = lesion_table(part.astype(np.int32), volume)
            sides.append({"x_mm": part_row["centroid_world_mm"][0], "volume_mm3": part_row["volume_mm3"],
                          "volume_ml": part_row["volume_mm3"] / 1000.0,
                          "measure_mm": _organ_measure_mm(part, part_row, measure, volume.spacing_mm),
                          "longest_axial_diameter_mm": part_row["longest_axial_diameter_mm"]})
        sides.sort(key=lambda side: side.pop("x_mm"))  # LPS: x grows to the patient's left
        summary["sides"] = [{"side": name, **side} for name, side in zip(("right", "left"), sides)]
        summary["measure_mm"] = None
    return summary


def _organ_measure_mm(mask: np.ndarray, row: dict, measure: str | None, spacing_mm) -> float | None:
    """The organ's size measure (ORGAN_MEASURES) of a (z, y, x) mask on an axial grid, or None."""
    sx, sy, sz = spacing_mm
    if measure == "max axial calibre":
        return _max_axial_calibre_mm(mask, sy, sx)
    if measure == "craniocaudal length" and mask.shape[0] > 1:  # one slice has no craniocaudal extent
        return (row["slice_end"] - row["slice_start"] + 1) * sz
    return None


def organ_summary_of(result, target: str | None = None) -> dict | None:
    """organ_summary of a boltzformer SegmentationResult: measured on its canonical axial frame,
    slice range and centroid given on the input grid (as in its lesion table)."""
    frame = result.frame if result.frame is not None else result.volume
    reo = result.reorientation
    labels, probabilities = result.labels, result.probabilities
    if labels is None:
        return None
    if reo is not None and not reo.is_identity:
        labels, probabilities = reo.to_canonical(labels), reo.to_canonical(probabilities)
    summary = organ_summary(labels, frame, target, probabilities=probabilities)
    if summary is not None and reo is not None and not reo.is_identity:
        summary["centroid_voxel_zyx"] = reo.index_to_input(summary["centroid_voxel_zyx"], frame.shape)
        z = np.flatnonzero(np.isin(result.labels, summary["lesion_ids"]).any(axis=(1, 2)))
        summary["slice_start"], summary["slice_end"] = int(z[0]), int(z[-1])
    return summary


def _max_axial_calibre_mm(mask: np.ndarray, sy: float, sx: float) -> float:
    """Largest short-axis diameter over the axial cross-sections (2D components) of a mask."""
    best = 0.0
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        sections, n = ndimage.label(mask[z])
        for box, index in zip(ndimage.find_objects(sections), range(1, n + 1)):
            section = (sections[box] == index)[None]
            best = max(best, _axial_diameters_mm(section, sy, sx)[1])
    return best


def write_lesion_table(rows: list[dict], path, *, overwrite: bool = False) -> Path:
    """Write lesion rows to ``.csv`` (flat columns, see CSV_COLUMNS) or ``.json`` (a list), atomically.

    The file is written through :class:`~boltzformer.io.OutputSet`: flushed, fsynced and its
    size checked before it replaces anything, so a full disk is an OutputError ("no space left
    on device") and an existing table is left as it was.

    Raises OutputError for another extension, an existing file without ``overwrite``, a
    folder that is missing or not writable, or a failed write.
    """
    p = Path(os.fspath(path))
    data = lesion_table_bytes(rows, p)
    with OutputSet(overwrite=overwrite) as outputs:
        outputs.add(p, kind="table")
        outputs.write_bytes(p, data)
    return p


def lesion_table_bytes(rows: list[dict], path) -> bytes:
    """The lesion table as UTF-8 bytes in the format ``path``'s extension names (.csv or .json)."""
    p = Path(os.fspath(path))
    ext = p.suffix.lower()
    if ext == ".json":
        text = json.dumps([_jsonable(row) for row in rows], indent=2) + "\n"
    elif ext == ".csv":
        text = _csv_text(rows)
    else:
        raise OutputError(p, "unsupported table format; use .csv or .json")
    return text.encode("utf-8")


def flat_lesion_row(row: dict) -> dict:
    """A lesion_table row as CSV fields: the centroids split into CSV_COLUMNS' scalar columns,
    floats rounded to 4 decimals; other keys kept as they are."""
    flat = {k: v for k, v in row.items() if k not in ("centroid_voxel_zyx", "centroid_world_mm")}
    if "centroid_voxel_zyx" in row:
        flat["centroid_z"], flat["centroid_y"], flat["centroid_x"] = row["centroid_voxel_zyx"]
    if "centroid_world_mm" in row:
        flat["centroid_lps_x_mm"], flat["centroid_lps_y_mm"], flat["centroid_lps_z_mm"] = row["centroid_world_mm"]
    return {k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v) for k, v in flat.items()}


def _csv_text(rows: list[dict]) -> str:
    flat_rows = [flat_lesion_row(row) for row in rows]
    extra = [k for r in flat_rows for k in r if k not in CSV_COLUMNS]
    columns = list(CSV_COLUMNS) + list(dict.fromkeys(extra))
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat_rows)
    return buffer.getvalue()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):  # NaN (no score: a scan thinner than the classifier) is null
        return float(value) if np.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------------------------
# Evaluation measures
# ----------------------------------------------------------------------------------------------
def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap 2|P∩T| / (|P| + |T|) of two masks of the same shape; 1.0 when both are empty."""
    pred, truth = np.asarray(pred) != 0, np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & truth)) / total


def lesion_detection(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing_mm, *, min_lesion_mm3: float = 0.0) -> dict:
    """Per-lesion detection counts (3D components, 26-connectivity).

    A true lesion (component of ``truth_mask``) is detected when any predicted voxel overlaps
    it; a predicted component (of at least ``min_lesion_mm3``) overlapping no true lesion is a
    false positive.

    Returns:
        {"true_lesions": int, "detected": int, "sensitivity": detected / true_lesions (NaN when
        there is no true lesion), "false_positive_components": int,
        "true_lesion_diameters_mm": each true lesion's mean axial diameter (as `lesion_table`'s
        mean_axial_diameter_mm, in the stored slices), "true_lesion_detected": bool for each}
    """
    pred, truth = np.asarray(pred_mask) != 0, np.asarray(truth_mask) != 0
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    truth_labels, n_true = label_components(truth, spacing_mm)
    pred_labels, n_pred = label_components(pred, spacing_mm, min_lesion_mm3=min_lesion_mm3)
    hit = np.unique(truth_labels[pred_labels > 0])
    pred_hitting_truth = int(np.count_nonzero(np.unique(pred_labels[truth])))
    sx, sy = float(spacing_mm[0]), float(spacing_mm[1])
    diameters = [sum(_axial_diameters_mm(truth_labels[box] == i + 1, sy, sx)) / 2.0
                 for i, box in enumerate(find_objects(truth_labels))]
    return {
        "true_lesions": n_true,
        "detected": int(np.count_nonzero(hit)),
        "sensitivity": np.count_nonzero(hit) / n_true if n_true else float("nan"),
        "false_positive_components": n_pred - pred_hitting_truth,
        "true_lesion_diameters_mm": [round(float(d), 3) for d in diameters],
        "true_lesion_detected": [bool(i + 1 in hit) for i in range(n_true)],
    }
