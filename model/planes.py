"""Three-plane inference: the slice network also segments a volume's coronal and sagittal slices.

A lesion is a blob in every plane; a vessel running through the axial plane, or a bright fold,
looks like one in that plane only. With ``planes="three"`` the network also segments the coronal
and sagittal slices of the canonical volume, each plane's probabilities are mapped back to the
axial grid, and a voxel's probability is the median of the three (two planes must agree). The
heatmaps stay those of the axial pass. It costs two more sweeps of the network.

``"auto"`` runs three planes only where the extra planes are real images: MR volumes (the MS
FLAIR slices the network learnt from include coronal and sagittal ones) with nearly isotropic
voxels, at least MIN_EXTENT_MM deep in every direction. CT stays axial: the 3D nodule classifier
was trained on the axial pass's candidates (model card). The rule that decided the default:
benchmarks/results/planes_preregistration.txt.

A cut (`PlaneCut`) of the canonical (z, y, x) volume along y (coronal) or x (sagittal) is an
image whose rows run along z, superior at the top, resampled so that rows have the columns'
pixel spacing, and padded to a square with 0 (the normalised background): the network sees the
anatomy in its proportions, as on an axial slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .options import PLANES, check_planes

MIN_EXTENT_MM = 32.0  # shallower than this, a coronal or sagittal cut is a strip, not an image
MAX_ANISOTROPY = 1.5  # auto: through-plane spacing at most this times the in-plane spacing
CUT_PLANES = ("coronal", "sagittal")
__all__ = ["PLANES", "CUT_PLANES", "PlaneCut", "check_planes", "choose", "median_of_three"]


def choose(planes: str, modality: str, shape_zyx, spacing_xyz, warnings: list) -> bool:
    """Whether to run three planes on a canonical volume (or the slice range of it) of
    ``shape_zyx`` voxels of ``spacing_xyz`` mm. Asked for three planes where they cannot run,
    says why in ``warnings`` and runs axial only."""
    check_planes(planes)
    if planes == "axial":
        return False
    extent = [n * s for n, s in zip(shape_zyx, spacing_xyz[::-1])]
    if min(extent) < MIN_EXTENT_MM:
        if planes == "three":
            warnings.append(f"three planes were not run: the volume is {min(extent):.0f} mm deep along one axis, "
                            f"less than the {MIN_EXTENT_MM:g} mm a coronal or sagittal slice needs; axial only")
        return False
    if planes == "auto":
        in_plane = min(spacing_xyz[0], spacing_xyz[1])
        return modality == "MR" and spacing_xyz[2] <= MAX_ANISOTROPY * in_plane
    if spacing_xyz[2] > 2 * min(spacing_xyz[0], spacing_xyz[1]):
        warnings.append(f"three planes on {spacing_xyz[2]:g} mm slices: the coronal and sagittal slices are "
                        f"interpolated from them and blurred along z")
    return True


def median_of_three(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Voxelwise median of three arrays (float32), without sorting: a + b + c - max - min."""
    hi = np.maximum(np.maximum(a, b), c)
    lo = np.minimum(np.minimum(a, b), c)
    return (a + b + c - hi - lo).astype(np.float32, copy=False)


def _resize_rows(images: np.ndarray, rows: int) -> np.ndarray:
    """(n, r, c) -> (n, rows, c) float32, bilinear (antialiased when shrinking)."""
    if images.shape[1] == rows:
        return np.ascontiguousarray(images, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    out = F.interpolate(x, size=(rows, images.shape[2]), mode="bilinear", align_corners=False,
                        antialias=rows < images.shape[1])
    return out[:, 0].numpy()


@dataclass(frozen=True)
class PlaneCut:
    """The coronal or sagittal slices of a canonical (z, y, x) array of ``shape_zyx`` voxels
    of ``spacing_xyz`` mm, as square images (see the module docstring)."""

    plane: str  # "coronal" (cut along y) or "sagittal" (cut along x)
    shape_zyx: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]

    @property
    def n_slices(self) -> int:
        return self.shape_zyx[1] if self.plane == "coronal" else self.shape_zyx[2]

    @property
    def slice_spacing_mm(self) -> float:
        return self.spacing_xyz[1] if self.plane == "coronal" else self.spacing_xyz[0]

    @property
    def columns(self) -> int:
        return self.shape_zyx[2] if self.plane == "coronal" else self.shape_zyx[1]

    @property
    def rows(self) -> int:
        """z resampled to the columns' pixel spacing."""
        column_mm = self.spacing_xyz[0] if self.plane == "coronal" else self.spacing_xyz[1]
        return max(1, int(round(self.shape_zyx[0] * self.spacing_xyz[2] / column_mm)))

    @property
    def side(self) -> int:
        return max(self.rows, self.columns)

    def images(self, volume_zyx: np.ndarray, i0: int, i1: int) -> np.ndarray:
        """Cut slices [i0, i1) of the prepared volume (z, y, x) -> (n, side, side) float32."""
        cut = volume_zyx[:, i0:i1, :].transpose(1, 0, 2) if self.plane == "coronal" \
            else volume_zyx[:, :, i0:i1].transpose(2, 0, 1)  # (n, z, columns)
        cut = _resize_rows(cut[:, ::-1], self.rows)  # superior at the top
        top, left = (self.side - self.rows) // 2, (self.side - self.columns) // 2
        canvas = np.zeros((cut.shape[0], self.side, self.side), np.float32)
        canvas[:, top : top + self.rows, left : left + self.columns] = cut
        return canvas

    def to_axial(self, prob: np.ndarray, out_zyx: np.ndarray, i0: int) -> None:
        """Write cut slices i0.. (probabilities n x side x side) into ``out_zyx`` (z, y, x)."""
        top, left = (self.side - self.rows) // 2, (self.side - self.columns) // 2
        back = _resize_rows(prob[:, top : top + self.rows, left : left + self.columns], self.shape_zyx[0])[:, ::-1]
        i1 = i0 + prob.shape[0]
        if self.plane == "coronal":
            out_zyx[:, i0:i1, :] = back.transpose(1, 0, 2)
        else:
            out_zyx[:, :, i0:i1] = back.transpose(1, 2, 0)
