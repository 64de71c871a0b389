"""napari writer: a Labels layer -> NIfTI (.nii.gz / .nii) with the source volume's geometry.

The geometry comes from `metadata["boltzformer_volume"]` (set by this plugin's reader, sample
data and panel) and otherwise from the layer's scale/translate/rotate/shear/affine, turned into
a Volume by the core (Volume.from_affine_zyx). Files are written atomically by boltzformer.io
(temporary file in the same folder, then rename). napari's save dialog has already asked before
replacing a file, so an existing file is overwritten.
"""

from __future__ import annotations

import os

import numpy as np

from ._layers import GEOMETRY_KEY, geometry_shape, mask_array, mask_volume, only_pixel_units, placed_by


class NotWritten(OSError):
    """The writer's refusal, with one line naming the file and the problem. napari shows a
    writer's exception as one error notification; a writer that returned [] after its own
    notification got napari's 'File ... save failed' error as well. (An OSError: npe2 takes a
    ValueError from a writer for 'no writer found'.)"""


def write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer: returns [path] written; raises NotWritten with the reason."""
    from napari.utils.notifications import show_warning

    from boltzformer.errors import BoltzformerError
    from boltzformer.io import extension_of

    path = str(path)
    extension = extension_of(os.path.basename(path))
    if not extension:  # a name typed without one in napari's save dialog, as its own writers do
        path += ".nii.gz"
    elif extension == ".gz":  # macOS's native dialog makes "mask" "mask.gz" under the *.nii.gz filter
        path = path[: -len(".gz")] + ".nii.gz"
    elif extension not in NIFTI_EXTENSIONS:
        raise NotWritten(f"{path}: not written: this writer writes NIfTI; name the file .nii.gz or .nii")
    try:
        if meta.get("multiscale") or type(data).__name__ == "MultiScaleData":
            data = data[0]  # full resolution (np.asarray of multiscale data gives its coarsest level)
        volume, moved = labels_volume(np.asarray(data), meta)
        if moved:
            show_warning(f"{path}: the layer was moved or rescaled after it was made; the file puts the mask where "
                         "the viewer shows it, not on the source scan's grid")
        elif _no_physical_size(meta) and _unplaced(meta, np.ndim(data)):
            spacing = " x ".join(f"{v:g}" for v in volume.spacing_mm)
            show_warning(f"{path}: the layer has no physical voxel size (its napari units are pixels): written with "
                         f"{spacing} mm voxels at the origin, so it lines up with no scan. Segment a scan opened with "
                         "File > Open to keep its geometry")
        from boltzformer.io import write_volume

        written = write_volume(volume, path, overwrite=True)
    except BoltzformerError as exc:
        raise NotWritten(str(exc)) from None
    except ValueError as exc:  # a layer that is not 2D/3D, or other geometry trouble
        raise NotWritten(f"{path}: not written ({exc})") from None
    return [str(written)]


NIFTI_EXTENSIONS = (".nii.gz", ".nii")  # napari.yaml's writer filename_extensions


def _no_physical_size(meta: dict) -> bool:
    """A layer neither placed by this plugin nor given units (napari's default: pixels)."""
    if (meta.get("metadata") or {}).get(GEOMETRY_KEY) is not None:
        return False
    return only_pixel_units(meta.get("units") or ())


def _unplaced(meta: dict, ndim: int) -> bool:
    """True when nothing places the layer (no scale, translate, rotation or affine): its voxels
    are written as 1 mm at the origin. A layer in pixel units given another image's scale and
    translate is where that image is, in its numbers (mm for an image read by this plugin)."""
    try:
        return bool(np.allclose(layer_matrix(ndim, meta), np.eye(ndim + 1)))
    except ValueError:  # a layer that cannot be written: its own message comes
        return False


def labels_volume(data: np.ndarray, meta: dict):
    """-> (a boltzformer Volume of `data`, a labels layer's data, with its source geometry;
    whether the layer was moved since it was made, and so is written where the viewer shows it)."""
    from boltzformer.io import Volume

    geom = (meta.get("metadata") or {}).get(GEOMETRY_KEY)
    if geom is not None and geometry_shape(geom) == tuple(data.shape):
        if data.ndim != 3:
            return mask_volume(data, geom), False
        matrix = layer_matrix(3, meta)
        if placed_by(geom, matrix):
            return mask_volume(data, geom), False
        return Volume.from_affine_zyx(mask_array(data), matrix), True
    # none, or the layer was resized or cropped: its own transform is the truth now
    return Volume.from_affine_zyx(mask_array(data), layer_matrix(data.ndim, meta)), False


def layer_matrix(ndim: int, meta: dict) -> np.ndarray:
    """The data -> world matrix of a layer's state (scale, translate, rotate, shear, affine)."""
    from napari.utils.transforms import Affine

    if ndim not in (2, 3):
        raise ValueError(f"labels with {ndim} dimensions; a 2D slice or a 3D volume is needed")
    data2physical = Affine(
        scale=meta.get("scale", [1.0] * ndim),
        translate=meta.get("translate", [0.0] * ndim),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=ndim,
    )
    physical2world = meta.get("affine")
    matrix = data2physical.affine_matrix
    if physical2world is not None:
        matrix = np.asarray(getattr(physical2world, "affine_matrix", physical2world), float) @ matrix
    columns = matrix[:ndim, :ndim] / np.linalg.norm(matrix[:ndim, :ndim], axis=0)
    if not np.allclose(columns.T @ columns, np.eye(ndim), atol=1e-4):  # NIfTI through ITK: no shear
        raise ValueError("its transform is sheared; a NIfTI file holds rotations and voxel sizes only, so the "
                         "mask would land elsewhere: remove the shear first")
    return matrix
