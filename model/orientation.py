"""Canonical axial orientation: every volume reaches the network the same way up.

The network was trained on axial slices shown as radiologists read them: array (z, y, x) with
x toward the patient's left, y toward posterior and z toward superior (ITK/DICOM "LPS", an
identity direction matrix). Files arrive in any orientation: NIfTI from many tools is stored
RAS (x and y flipped), sagittal or coronal acquisitions have their slice axis in-plane. Slicing
the array as stored would hand the network upside-down or sideways slices.

`to_canonical` finds, for each world axis, the image axis closest to it (a permutation and
sign flips; oblique volumes go to the nearest axis-aligned frame, no resampling), and returns
the reoriented volume with a `Reorientation` that maps every canonical-grid array back to the
input grid exactly (pure transposes and flips of the voxel array: no interpolation, so
round trips are bit-exact).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .io import Volume

# Through-plane spacing (mm) above which a non-axial acquisition is worth a warning: its axial
# slices are then interpolated from thick sagittal/coronal sections.
COARSE_THROUGH_PLANE_MM = 3.0
# Tilt (degrees) of the slice normal from the patient's inferior-superior axis above which the
# slices are worth a warning: gantry-tilted CT (often 15-30 degrees) and oblique MR planning.
# An in-plane rotation leaves the slices axial and is not warned about.
OBLIQUE_TILT_DEG = 10.0
_AXIS_NAMES = ("x (left-right)", "y (anterior-posterior)", "z (inferior-superior)")


@dataclass(frozen=True)
class Reorientation:
    """How the input grid maps onto the canonical grid.

    Canonical image axis j (x, y, z) is input image axis ``source_axis[j]``, reversed when
    ``flip[j]``. Arrays here are (z, y, x), so array axis a = 2 - image axis.
    """

    source_axis: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.source_axis == (0, 1, 2) and not any(self.flip)

    @property
    def keeps_slices(self) -> bool:
        """True when the input's slice axis (z) is also the canonical slice axis."""
        return self.source_axis[2] == 2

    def _array_perm(self) -> tuple[int, int, int]:
        # canonical array axis a (image axis 2 - a) takes input array axis 2 - source_axis[2 - a]
        return tuple(2 - self.source_axis[2 - a] for a in range(3))

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """(z, y, x) input-grid array (optionally with leading axes) -> canonical grid (a view)."""
        lead = array.ndim - 3
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self._array_perm()))
        flips = tuple(lead + (2 - j) for j in range(3) if self.flip[j])
        return np.flip(out, flips) if flips else out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """The inverse of `to_canonical`: canonical (z, y, x) array -> input grid (a view)."""
        lead = array.ndim - 3
        flips = tuple(lead + (2 - j) for j in range(3) if self.flip[j])
        out = np.flip(array, flips) if flips else array
        inverse = np.argsort(self._array_perm())
        return np.transpose(out, tuple(range(lead)) + tuple(lead + int(a) for a in inverse))

    def index_to_input(self, index_zyx, canonical_shape_zyx) -> tuple[float, float, float]:
        """A (fractional) canonical voxel index (z, y, x) -> the same voxel's input index (z, y, x)."""
        c_xyz = [float(v) for v in index_zyx][::-1]
        size_xyz = list(canonical_shape_zyx)[::-1]
        out_xyz = [0.0, 0.0, 0.0]
        for j in range(3):
            out_xyz[self.source_axis[j]] = size_xyz[j] - 1 - c_xyz[j] if self.flip[j] else c_xyz[j]
        return tuple(out_xyz[::-1])

    def index_to_canonical(self, index_zyx, input_shape_zyx) -> tuple[float, float, float]:
        """The inverse of `index_to_input`: an input voxel index (z, y, x) -> canonical (z, y, x)."""
        in_xyz = [float(v) for v in index_zyx][::-1]
        size_xyz = list(input_shape_zyx)[::-1]
        out_xyz = [0.0, 0.0, 0.0]
        for j in range(3):
            src = self.source_axis[j]
            out_xyz[j] = size_xyz[src] - 1 - in_xyz[src] if self.flip[j] else in_xyz[src]
        return tuple(out_xyz[::-1])

    def describe(self) -> str:
        if self.is_identity:
            return "already axial LPS"
        parts = []
        for j in range(3):
            src = "xyz"[self.source_axis[j]]
            parts.append(f"{'-' if self.flip[j] else '+'}{src}")
        return "canonical (x, y, z) = input (" + ", ".join(parts) + ")"


IDENTITY = Reorientation((0, 1, 2), (False, False, False))  # the input is already canonical


def find_reorientation(direction: np.ndarray) -> Reorientation:
    """The axis permutation and flips bringing the image axes closest to LPS world axes.

    direction: 3 x 3 ITK matrix, column c = image axis c in LPS world. Among the 6
    permutations the one with the largest product of |cosines| wins, so oblique volumes go to
    their nearest axis-aligned frame and ties cannot assign two image axes to one world axis.
    """
    d = np.asarray(direction, float).reshape(3, 3)
    best, best_score = (0, 1, 2), -1.0
    for perm in itertools.permutations(range(3)):
        score = float(np.prod([abs(d[j, perm[j]]) for j in range(3)]))  # world axis j <- image axis perm[j]
        if score > best_score + 1e-12:
            best, best_score = perm, score
    flip = tuple(bool(d[j, best[j]] < 0) for j in range(3))
    return Reorientation(tuple(int(p) for p in best), flip)


def slice_tilt_deg(direction: np.ndarray, r: Reorientation) -> float:
    """Angle (degrees) between the canonical slice normal and the world z (inferior-superior) axis.

    direction: 3 x 3 ITK matrix (columns = image axes in LPS world); r: its `find_reorientation`.
    """
    normal = np.asarray(direction, float).reshape(3, 3)[:, r.source_axis[2]]
    cos = abs(normal[2]) / max(float(np.linalg.norm(normal)), 1e-12)
    return float(np.degrees(np.arccos(min(1.0, cos))))


def canonical_reorientation(volume: Volume) -> Reorientation:
    """The reorientation `to_canonical` applies to `volume`: `find_reorientation`'s, except
    IDENTITY for a single sagittal or coronal slice (segmented in its own plane)."""
    r = find_reorientation(volume.direction)
    return IDENTITY if _single_plane_slice(volume, r) else r


def _single_plane_slice(volume: Volume, r: Reorientation) -> bool:
    """One sagittal or coronal slice: axial "slices" across it would be rows of one pixel."""
    return volume.shape[0] == 1 and not r.keeps_slices


def to_canonical(volume: Volume) -> tuple[Volume, Reorientation, list[str]]:
    """-> (the volume on the canonical axial grid, the mapping back, warnings).

    The canonical volume describes the same voxels at the same world positions: its direction
    is the input's with columns permuted and negated, its origin the world position of the
    voxel that becomes index (0, 0, 0).
    """
    r = find_reorientation(volume.direction)
    d = np.asarray(volume.direction, float)
    warnings: list[str] = []
    if _single_plane_slice(volume, r):
        plane = "sagittal" if list(r.source_axis).index(2) == 0 else "coronal"
        warnings.append(f"a single {plane} slice: segmented in its own plane, as stored; the model learnt axial "
                        "slices, so treat the result as unverified")
        return volume, IDENTITY, warnings
    tilt = slice_tilt_deg(d, r)
    if tilt > OBLIQUE_TILT_DEG:
        warnings.append(
            f"the slices are tilted {tilt:.0f}° from axial (gantry tilt or an oblique acquisition); they are "
            "segmented as acquired, not resampled, so the model sees oblique sections; the mask keeps the "
            "input's exact geometry")
    if r.is_identity:
        return volume, r, warnings
    size_xyz = volume.shape[::-1]
    spacing = tuple(volume.spacing_mm[r.source_axis[j]] for j in range(3))
    direction = np.stack([(-1.0 if r.flip[j] else 1.0) * d[:, r.source_axis[j]] for j in range(3)], axis=1)
    corner = np.zeros(3)  # input index (x, y, z) of the canonical voxel (0, 0, 0)
    for j in range(3):
        if r.flip[j]:
            corner[r.source_axis[j]] = size_xyz[r.source_axis[j]] - 1
    origin = np.asarray(volume.origin_mm) + (corner * np.asarray(volume.spacing_mm)) @ d.T
    array = np.ascontiguousarray(r.to_canonical(volume.array))
    metadata = dict(volume.metadata)
    metadata["reoriented_from"] = r.describe()
    canonical = Volume(array, spacing, tuple(origin), direction, volume.modality, volume.path, metadata)
    if not r.keeps_slices:
        thick = volume.spacing_mm[2]
        warnings.append(
            # the world axis of the input's slice stacking: the canonical axis its slice axis becomes
            f"the volume was acquired along {_AXIS_NAMES[list(r.source_axis).index(2)]}; it is segmented in axial slices "
            f"taken across its {thick:g} mm sections"
            + (" (coarse: expect jagged outlines along the original slice direction)" if max(spacing[:2]) > COARSE_THROUGH_PLANE_MM else "")
        )
    return canonical, r, warnings
