"""`Volume`: a (z, y, x) array with its ITK/DICOM geometry, and every conversion of that geometry:
the NIfTI RAS affine, world positions, SimpleITK images, and napari's (z, y, x) affine, layer
transform and plain-data geometry.

Geometry: ``spacing_mm`` and ``origin_mm`` in (x, y, z) order, LPS world coordinates, and the
3×3 ITK ``direction`` whose columns are the image axes x, y, z in world coordinates; voxel
(i=x, j=y, k=z) sits at ``origin_mm + direction @ (spacing_mm * (i, j, k))``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..errors import InputError


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_IDENTITY_ATOL = 1e-6  # a direction this close to the identity is axis-aligned


def require_finite(array: np.ndarray, where) -> None:
    """Raise InputError(where, ...) when a float array holds NaN or infinite voxels.

    The network would turn one such voxel into NaN probabilities for the whole slice, and an
    empty mask with no error. min/max propagate NaN and show ±inf, without a boolean copy of
    the volume; the voxels are counted only when there are some."""
    if np.asarray(array).dtype.kind not in "fc" or array.size == 0:
        return
    if np.isfinite(np.min(array)) and np.isfinite(np.max(array)):
        return
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    raise InputError(where, f"has {bad} NaN or infinite voxels (of {array.size}); fix or mask them first")


@dataclass
class Volume:
    """An image volume with its geometry.

    Attributes:
        array: voxel values, shape (z, y, x).
        spacing_mm: voxel size (x, y, z) in mm.
        origin_mm: world position (x, y, z) of voxel (0, 0, 0), LPS mm (ITK convention).
        direction: (3, 3) ITK direction matrix; column c is image axis c (x, y, z) in LPS world.
        modality: "CT", "MR", or None when the file does not say (see intensity.detect_modality).
        path: the file or folder it was read from, if any.
        metadata: extra facts: ``ndim`` (2 or 3, dimension of the source file), DICOM tags,
            ``series_note`` and ``series_others`` when a DICOM series was chosen among several,
            ``warnings`` (the reader's one-line messages), ``orientation_unknown`` (the file
            gave none), ``straightened_shear`` (a gantry tilt was straightened),
            ``resampled_from_slices`` (a series with gaps, resampled).
    """

    array: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: str | None = None
    path: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D (z, y, x), got shape {self.array.shape}")
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)
        self.origin_mm = tuple(float(o) for o in self.origin_mm)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing_mm) != 3 or len(self.origin_mm) != 3:
            raise ValueError("spacing_mm and origin_mm need 3 values (x, y, z)")
        if not all(math.isfinite(s) and s > 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be positive and finite (x, y, z in mm), got {self.spacing_mm}")
        if not all(math.isfinite(o) for o in self.origin_mm):
            raise ValueError(f"origin_mm must be finite (x, y, z in mm), got {self.origin_mm}")
        # unit columns of a non-degenerate matrix: a rotation, or a layer's shear kept by from_affine_zyx
        if not (np.all(np.isfinite(self.direction))
                and np.allclose(np.linalg.norm(self.direction, axis=0), 1.0, atol=1e-3)
                and abs(np.linalg.det(self.direction)) > 0.05):
            raise ValueError("direction must hold the x, y, z axes' unit vectors in LPS as its columns (a "
                             f"rotation), got {self.direction.tolist()}")
        if self.array.size == 0:
            raise ValueError(f"Volume.array holds no voxel: shape {self.array.shape}")
        if self.array.dtype.kind not in "biuf":
            raise ValueError(f"Volume.array must hold real numbers (bool, integers or floats), got {self.array.dtype}")
        self.path = None if self.path is None else os.fspath(self.path)
        self.metadata = dict(self.metadata or {})

    def __repr__(self) -> str:  # the geometry, not the voxels
        return (f"Volume(shape {self.shape} (z, y, x) {self.array.dtype}, spacing_mm={self.spacing_mm}, "
                f"origin_mm={self.origin_mm}, direction={np.round(self.direction, 4).tolist()}, "
                f"modality={self.modality!r}, path={self.path!r})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return tuple(self.array.shape)

    def with_array(self, array: np.ndarray, **changes) -> "Volume":
        """The same geometry around a new array of the same shape (a mask, probabilities, ...).

        ``changes`` override other fields, e.g. ``modality=None``.
        """
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        changes.setdefault("metadata", dict(self.metadata))
        changes.setdefault("direction", self.direction.copy())
        return dataclasses.replace(self, array=array, **changes)

    # -- geometry -------------------------------------------------------------------------------
    def affine_ras(self) -> np.ndarray:
        """(4, 4) NIfTI-style affine: voxel index (i=x, j=y, k=z, 1) → RAS world mm.

        ITK works in LPS; NIfTI (and nibabel) in RAS, which flips the signs of the first two
        world axes. This equals ``nibabel.load(p).affine`` for a NIfTI written from this volume.
        """
        affine = np.eye(4)
        affine[:3, :3] = LPS_TO_RAS @ self.direction @ np.diag(self.spacing_mm)
        affine[:3, 3] = LPS_TO_RAS @ np.asarray(self.origin_mm)
        return affine

    def index_to_world(self, index_zyx) -> np.ndarray:
        """Voxel index (z, y, x) — shape (3,) or (n, 3), fractional allowed — → LPS mm (x, y, z)."""
        index_xyz = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
        return np.asarray(self.origin_mm) + (index_xyz * np.asarray(self.spacing_mm)) @ self.direction.T

    def is_axis_aligned(self) -> bool:
        """True when the direction is the identity (to 1e-6): no rotation, no flip."""
        return bool(np.allclose(self.direction, np.eye(3), atol=_IDENTITY_ATOL))

    # -- napari: everything in (z, y, x) --------------------------------------------------------
    # napari orders every vector (z, y, x), so spacing and origin are reversed and the direction
    # becomes R = P D P (P the axis reversal); world (z, y, x) is LPS (x, y, z) reversed.
    def affine_zyx(self) -> np.ndarray:
        """(4, 4) affine: voxel index (z, y, x, 1) → world (z, y, x) mm (LPS reversed).

        Inverse of :meth:`from_affine_zyx`.
        """
        affine = np.eye(4)
        affine[:3, :3] = self.direction[::-1, ::-1] * np.asarray(self.spacing_mm)[::-1]
        affine[:3, 3] = np.asarray(self.origin_mm)[::-1]
        return affine

    @classmethod
    def from_affine_zyx(cls, array, affine, *, modality: str | None = None, path=None,
                        metadata: dict | None = None) -> "Volume":
        """A Volume around ``array`` placed by a homogeneous data → world (z, y, x) matrix.

        ``array`` is (z, y, x) with a (4, 4) ``affine``, or one slice (y, x) with a (3, 3) one;
        a slice is embedded in 3D with a thickness of 1 mm at z = 0 and becomes shape (1, y, x).
        Spacing is the length of each matrix column, direction the normalised columns (the
        matrix may carry a shear, which is kept in the direction). ``metadata["ndim"]``
        defaults to the array's dimension.
        """
        array = np.asarray(array)
        ndim = array.ndim
        matrix = np.asarray(affine, float)
        columns, origin = matrix[:ndim, :ndim], matrix[:ndim, ndim]
        if ndim == 2:
            columns = np.block([[np.ones((1, 1)), np.zeros((1, 2))], [np.zeros((2, 1)), columns]])
            origin = np.concatenate([[0.0], origin])
            array = array[None]
        spacing_zyx = np.linalg.norm(columns, axis=0)
        rotation = columns / spacing_zyx
        metadata = dict(metadata or {})
        metadata.setdefault("ndim", ndim)
        return cls(array, spacing_zyx[::-1], origin[::-1], rotation[::-1, ::-1], modality, path, metadata)

    def napari_transform(self, *, layer_ndim: int = 3, cell_voxels=(1.0, 1.0, 1.0),
                         offset_voxels=(0.0, 0.0, 0.0), leading_axes: int = 0) -> dict:
        """napari layer keywords ``scale``, ``translate`` (and ``affine``) placing data here.

        napari applies scale/translate first and the affine after::

            world_zyx = affine_R @ (scale * index_zyx + translate) + affine_origin

        An axis-aligned volume gets scale = spacing (z, y, x), translate = origin and no
        affine; an oblique or flipped one keeps scale = spacing and gets a (4, 4) affine with
        the rotation and the origin, so ``layer.scale`` is the voxel size in mm either way.

        Args:
            layer_ndim: 3, or 2 for a single slice shown as a 2D layer (z dropped).
            cell_voxels: size (z, y, x) of one data element in voxels of this volume (1 for
                full-resolution data, the grid step for coarser maps).
            offset_voxels: where the centre of data element 0 lies, in voxels (z, y, x) from
                the centre of voxel 0.
            leading_axes: extra non-spatial axes in front (scale 1, no offset).
        """
        spacing = np.asarray(self.spacing_mm, float)[::-1]
        origin = np.asarray(self.origin_mm, float)[::-1]
        rotation = self.direction[::-1, ::-1]
        scale = spacing * np.asarray(cell_voxels, float)
        offset = spacing * np.asarray(offset_voxels, float)  # mm, before the rotation
        axis_aligned = self.is_axis_aligned()
        translate = origin + offset if axis_aligned else offset
        affine = None
        if not axis_aligned:
            affine = np.eye(4)
            affine[:3, :3] = rotation
            affine[:3, 3] = origin
        if int(layer_ndim) == 2:
            scale, translate = scale[1:], translate[1:]
            if affine is not None:
                affine = np.delete(np.delete(affine, 0, axis=0), 0, axis=1)
        n = leading_axes
        out = {
            "scale": tuple([1.0] * n + scale.tolist()),
            "translate": tuple([0.0] * n + translate.tolist()),
        }
        if affine is not None:
            full = np.eye(affine.shape[0] + n)
            full[n:, n:] = affine
            out["affine"] = full
        return out

    def sequence(self) -> str | None:
        """The MR sequence the file names (DICOM SeriesDescription, else SequenceName), or None."""
        for key in ("SeriesDescription", "SequenceName"):
            if self.metadata.get(key):
                return str(self.metadata[key])
        return None

    def geometry_dict(self, layer_ndim: int = 3) -> dict:
        """The geometry as plain lists and numbers (JSON-able, e.g. for napari layer metadata).

        Keys: spacing_mm, origin_mm, direction, path, modality, shape (z, y, x), ndim (of the
        layer: 3, or 2 for a single slice), file_ndim (of the source file), sequence; and
        orientation_unknown, only when the file did not say how it lies in the patient.
        Inverse of :meth:`from_geometry_dict`.
        """
        extra = {"orientation_unknown": True} if self.metadata.get("orientation_unknown") else {}
        return {
            "spacing_mm": [float(v) for v in self.spacing_mm],
            "origin_mm": [float(v) for v in self.origin_mm],
            "direction": self.direction.tolist(),
            "path": self.path,
            "modality": self.modality,
            "shape": [int(v) for v in self.shape],
            "ndim": int(layer_ndim),
            "file_ndim": int(self.metadata.get("ndim", 3)),
            "sequence": self.sequence(),
            **extra,
        }

    @classmethod
    def from_geometry_dict(cls, array, geometry: dict, modality: str | None = None) -> "Volume":
        """A Volume around ``array`` (z, y, x) with the geometry of a :meth:`geometry_dict`.

        ``modality`` overrides the dict's; path, file_ndim (as ``metadata["ndim"]``), the
        sequence (as ``metadata["SeriesDescription"]``) and orientation_unknown come from the
        dict, the other metadata do not travel.
        """
        metadata = {"ndim": int(geometry.get("file_ndim", geometry.get("ndim", 3)))}
        if geometry.get("orientation_unknown"):
            metadata["orientation_unknown"] = True
        if geometry.get("sequence"):
            metadata["SeriesDescription"] = str(geometry["sequence"])
        return cls(
            array=array,
            spacing_mm=tuple(float(v) for v in geometry["spacing_mm"]),
            origin_mm=tuple(float(v) for v in geometry["origin_mm"]),
            direction=np.asarray(geometry["direction"], float).reshape(3, 3),
            modality=modality if modality is not None else geometry.get("modality"),
            path=geometry.get("path"),
            metadata=metadata,
        )

    def assumed_orientation(self) -> str:
        """Said of a file whose header gives no orientation: what this volume takes it to be."""
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.direction.ravel().tolist())
        ends = {"L": "left", "R": "right", "P": "posterior", "A": "anterior", "S": "superior", "I": "inferior"}
        towards = ", ".join(f"{axis} towards {ends[c]}" for axis, c in zip("xyz", code))
        return (f"its axes are taken as {code} ({towards}), so left and right, and the side of a kidney or "
                "lung, may be swapped: check against a landmark, or fix the header")

    def same_geometry(self, other: "Volume", atol: float = 1e-5) -> bool:
        """True when shape, spacing, origin and direction agree (to ``atol``)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing_mm, other.spacing_mm, rtol=0, atol=atol)
            and np.allclose(self.origin_mm, other.origin_mm, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )

    # -- SimpleITK ------------------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this geometry.

        A volume read from a 2D file (``metadata["ndim"] == 2``, one slice) becomes a 2D image
        again, but only when that loses nothing: a slice with a z position, a thickness other
        than 1 mm or a tilt (a 2D NIfTI whose affine places it in 3D, one DICOM slice) stays a
        one-slice 3D image. Boolean arrays are stored as uint8, float16 as float32.
        """
        array = self.array
        if array.dtype == bool:
            array = array.astype(np.uint8)
        elif array.dtype == np.float16:
            array = array.astype(np.float32)
        if self.metadata.get("ndim") == 2 and array.shape[0] == 1 and self._is_plain_2d():
            image = sitk.GetImageFromArray(array[0])
            image.SetSpacing(self.spacing_mm[:2])
            image.SetOrigin(self.origin_mm[:2])
            image.SetDirection(self.direction[:2, :2].ravel().tolist())
            return image
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(self.direction.ravel().tolist())  # row-major, as SimpleITK expects
        return image

    def _is_plain_2d(self) -> bool:
        """True when the geometry is what a 2D image implies in 3D: z origin 0, 1 mm, no tilt."""
        d = self.direction
        return (self.origin_mm[2] == 0.0 and self.spacing_mm[2] == 1.0 and d[2, 2] == 1.0
                and not d[2, :2].any() and not d[:2, 2].any())

    @classmethod
    def from_sitk(cls, image: sitk.Image, path=None, modality: str | None = None, metadata: dict | None = None) -> "Volume":
        """A Volume from a SimpleITK image (2D images become one slice, shape (1, y, x)).

        Raises InputError (naming ``path``) for vector/RGB or complex pixels, 4D images and
        NaN/Inf voxels.
        """
        dim = image.GetDimension()
        components = image.GetNumberOfComponentsPerPixel()
        if components > 1:
            raise InputError(path, f"has {components} components per voxel (RGB?); a greyscale volume is needed")
        if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
            raise InputError(path, "has complex-valued voxels; a real-valued greyscale volume is needed")
        if dim == 4 and image.GetSize()[3] == 1:
            image = image[:, :, :, 0]
            dim = 3
        if dim == 4:
            raise InputError(path, f"is 4D ({image.GetSize()[3]} volumes, a time series?); a single 3D volume is needed")
        if dim not in (2, 3):
            raise InputError(path, f"is {dim}D; a 2D image or a 3D volume is needed")
        array = sitk.GetArrayFromImage(image)
        require_finite(array, path)
        spacing, origin = image.GetSpacing(), image.GetOrigin()
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
        if dim == 2:
            array = array[None]
            spacing, origin = (*spacing, 1.0), (*origin, 0.0)
            direction3 = np.eye(3)
            direction3[:2, :2] = direction
            direction = direction3
        metadata = dict(metadata or {})
        metadata.setdefault("ndim", dim)
        return cls(array, spacing, origin, direction, modality, None if path is None else os.fspath(path), metadata)
