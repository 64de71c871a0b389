"""Gantry tilt: a stack whose slices are offset within their own plane, one step per slice (the
table moves along z while the gantry is tilted), straightened onto an orthogonal grid. DICOM
series (dicom._plan_shear) and NIfTI files with a sheared affine (nifti) both end here.
"""

from __future__ import annotations

import numpy as np

from .volume import Volume


def straighten(volume: Volume, drift_mm: np.ndarray) -> Volume:
    """A sheared stack on the straight grid of its first slice: slice k shifted within its
    plane by -drift_mm[k] (mm along its rows, along its columns), linearly interpolated; what
    comes in from outside the slice is the slice's lowest value (air on CT).

    drift_mm: (n_slices, 2), slice k's in-plane offset (dx, dy) mm, along x (the rows) then y,
    from where a straight stack puts it."""
    from scipy import ndimage

    src = volume.array
    sx, sy = volume.spacing_mm[0], volume.spacing_mm[1]
    out = np.empty_like(src)
    for k, (dx, dy) in enumerate(drift_mm):
        out[k] = as_dtype(ndimage.shift(src[k].astype(np.float32), (dy / sy, dx / sx), order=1, mode="constant",
                                        cval=float(src[k].min())), src.dtype)
    return Volume(out, volume.spacing_mm, volume.origin_mm, volume.direction, volume.modality, volume.path,
                  dict(volume.metadata, straightened_shear=True))


def straightened_note(drift_mm: np.ndarray, length_mm: float) -> str:
    """What a reader says of a stack it straightened, after "its ... is sheared": the tilt angle
    (the last slice's offset over the stack's length along its normal, mm) and where the mask goes."""
    across = float(np.hypot(*drift_mm[-1]))
    angle = float(np.degrees(np.arctan2(across, length_mm))) if length_mm > 0 else 0.0
    return (f"(gantry tilt of {angle:.1f} degrees: the last slice lies {across:.1f} mm across from where a straight "
            "stack would put it); each slice was shifted within its plane onto a straight grid (linear "
            "interpolation, as dcm2niix does), and the mask is written on that grid")


def as_dtype(values: np.ndarray, dtype) -> np.ndarray:
    """Interpolated values back in the stack's dtype: integers rounded and kept in range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype)


def tilt_of(matrix_mm: np.ndarray, atol: float = 1e-3):
    """An affine's 3 x 3 part (columns: mm per voxel step along x, y, z) read as a tilted stack.

    -> (direction (3, 3) with the in-plane axes and the slice normal, spacing_mm (3,), the
    in-plane offset per slice (2,) mm along x and y), or None when the in-plane axes themselves
    are not orthogonal (a shear no tilt explains). In-plane axes off by up to `atol` (cosine;
    0.06 degrees: cosines written to a few decimals) are made orthogonal."""
    sx, sy = np.linalg.norm(matrix_mm[:, 0]), np.linalg.norm(matrix_mm[:, 1])
    if not (sx > 0 and sy > 0):
        return None
    row, col = matrix_mm[:, 0] / sx, matrix_mm[:, 1] / sy
    if abs(float(row @ col)) > atol:
        return None
    col = col - float(row @ col) * row
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    step = matrix_mm[:, 2]
    height = float(step @ normal)
    if abs(height) < 1e-6:
        return None
    if height < 0:  # the slices stack against the right-handed normal: keep their order
        normal, height = -normal, -height
    return np.stack([row, col, normal], axis=1), np.array([sx, sy, height]), np.array([step @ row, step @ col])
