"""Reading and writing image volumes with their geometry.

A :class:`Volume` is a numpy array in **(z, y, x)** order plus the ITK/DICOM geometry that places
it in the patient: ``spacing_mm`` and ``origin_mm`` in **(x, y, z)** order, LPS world coordinates,
and the 3×3 ITK ``direction`` matrix whose columns are the image axes x, y, z in world
coordinates. A voxel with index (i=x, j=y, k=z) sits at::

    world_lps_mm = origin_mm + direction @ (spacing_mm * (i, j, k))

Readers: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) through SimpleITK,
DICOM series folders (SimpleITK/GDCM; Rescale Slope/Intercept are applied so CT comes out in
Hounsfield units) and single DICOM files. NIfTI geometry follows the NIfTI rule (the sform when
its code is > 0, else the qform); the slice positions of a DICOM series are checked along the
slice normal (gaps, uneven steps, duplicates, odd or unreadable files are errors unless
``allow_gaps`` resamples gaps and uneven steps onto a uniform grid). A single slice keeps its
3D position and thickness. Problems that do not stop reading are one-line strings in
``Volume.metadata["warnings"]``.

Writers: .nii.gz, .nii, .nrrd, .mha, through :class:`OutputSet` (one or several files that are
committed together): each file goes to a hidden temporary file in its folder, is flushed,
fsynced and checked (size, header read back), and only then renamed over the target; a failure
(a full disk included) or SIGINT/SIGTERM during the renames restores what was there before.

Everything a user can get wrong raises :class:`~boltzformer.errors.InputError` or
:class:`~boltzformer.errors.OutputError` with a one-line ``"<path>: <problem>"`` message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import secrets
import signal
import stat
import struct
import sys
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError, SliceSpacingError

__all__ = [
    "Volume",
    "SeriesInfo",
    "OutputSet",
    "read_volume",
    "write_volume",
    "list_dicom_series",
    "check_output_path",
    "atomic_output",
    "has_dicom_preamble",
    "extension_of",
    "INPUT_FORMATS",
    "INPUT_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "OUTPUT_EXTENSIONS",
]

INPUT_FORMATS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), "
    "a DICOM series folder or a single DICOM file (.dcm)"
)
# The one list of what can be read and written: file extension (lower case, see extension_of) ->
# format; DICOM files may also have any name (see has_dicom_preamble).
INPUT_EXTENSIONS = {
    ".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage",
}
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
OUTPUT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

# DICOM tags copied into Volume.metadata (no patient identifiers).
_DICOM_TAGS = (
    "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "StudyInstanceUID",
    "StudyDescription", "BodyPartExamined", "Manufacturer", "ManufacturerModelName",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "SliceThickness", "ConvolutionKernel",
    "MagneticFieldStrength", "SequenceName", "PhotometricInterpretation",
)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_IDENTITY_ATOL = 1e-6  # a direction this close to the identity is axis-aligned


# ----------------------------------------------------------------------------------------------
# Volume
# ----------------------------------------------------------------------------------------------
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
            ``series_note`` when a DICOM series was chosen among several.
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
        if min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")
        self.path = None if self.path is None else os.fspath(self.path)
        self.metadata = dict(self.metadata or {})

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
        affine[:3, :3] = _LPS_TO_RAS @ self.direction @ np.diag(self.spacing_mm)
        affine[:3, 3] = _LPS_TO_RAS @ np.asarray(self.origin_mm)
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
        layer: 3, or 2 for a single slice), file_ndim (of the source file), sequence.
        Inverse of :meth:`from_geometry_dict`.
        """
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
        }

    @classmethod
    def from_geometry_dict(cls, array, geometry: dict, modality: str | None = None) -> "Volume":
        """A Volume around ``array`` (z, y, x) with the geometry of a :meth:`geometry_dict`.

        ``modality`` overrides the dict's; path and file_ndim (as ``metadata["ndim"]``) come
        from the dict, the other metadata do not travel.
        """
        return cls(
            array=array,
            spacing_mm=tuple(float(v) for v in geometry["spacing_mm"]),
            origin_mm=tuple(float(v) for v in geometry["origin_mm"]),
            direction=np.asarray(geometry["direction"], float).reshape(3, 3),
            modality=modality if modality is not None else geometry.get("modality"),
            path=geometry.get("path"),
            metadata={"ndim": int(geometry.get("file_ndim", geometry.get("ndim", 3)))},
        )

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
        if array.dtype.kind == "f":
            bad = array.size - int(np.count_nonzero(np.isfinite(array)))
            if bad:
                raise InputError(path, f"has {bad} NaN or infinite voxels (of {array.size}); fix or mask them first")
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


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series in a folder."""

    uid: str
    description: str
    n_files: int
    modality: str | None
    series_number: int | None = None
    files: tuple[str, ...] = field(default=(), repr=False)

    def label(self, index: int) -> str:
        """Short human description, e.g. ``[0] 'Axial 1mm' (120 files, CT)``."""
        return f"[{index}] {self.description or '(no description)'!r} ({self.n_files} files, {self.modality or '?'})"


def read_volume(path, series: str | int | None = None, *, allow_gaps: bool = False) -> Volume:
    """Read an image file or a DICOM folder into a :class:`Volume`.

    Args:
        path: NIfTI, NRRD, MetaImage or DICOM file, or a folder holding DICOM series.
        series: for a DICOM folder with several series: a 0-based index into
            :func:`list_dicom_series`, a SeriesInstanceUID, or a case-insensitive part of the
            series description. Default: the largest series (explained in
            ``metadata["series_note"]``, the others in ``metadata["series_others"]``).
        allow_gaps: a DICOM series with missing slices or an uneven step along the slice
            normal is resampled onto a uniform grid (linear interpolation between the
            neighbouring slices; slices that fall on the grid are kept as they are) and a
            warning says so. Without it such a series raises SliceSpacingError.

    Problems that do not stop reading (a NIfTI qform and sform that disagree, a voxel size of
    0, a resampled series) are one-line messages in ``metadata["warnings"]``.

    Raises:
        InputError: missing path, a FIFO or other non-regular file, unsupported or corrupt
            file, no or unknown DICOM series, duplicate or unreadable DICOM slices, 4D or RGB
            data, NaN/Inf voxels.
        SliceSpacingError: gaps or uneven slice spacing in a DICOM series (see allow_gaps).
    """
    p = Path(os.fspath(path))
    if not p.exists():
        if p.is_symlink():
            raise InputError(p, f"is a symbolic link to {os.readlink(p)}, which does not exist")
        raise InputError(p, "does not exist")
    if p.is_dir():
        return _read_dicom_folder(p, series, allow_gaps)
    if not p.is_file():  # a FIFO would block the readers for ever, a device is not an image
        raise InputError(p, f"is {_file_kind(p)}, not a regular file; give an image file or a DICOM folder")
    ext = extension_of(p.name)
    if ext in INPUT_EXTENSIONS:
        return _read_itk_file(p, INPUT_EXTENSIONS[ext])
    if ext in DICOM_EXTENSIONS or has_dicom_preamble(p):
        return _read_dicom_file(p)
    raise InputError(p, f"not a supported format; use {INPUT_FORMATS}")


def list_dicom_series(folder) -> list[SeriesInfo]:
    """The DICOM series directly inside ``folder`` (not sub-folders), by series number then UID.

    Files of each series are sorted along the slice normal (GDCM's order). A folder holding a
    FIFO, socket or device is refused (GDCM would block opening it).
    """
    folder = os.fspath(folder)
    _refuse_special_files(Path(folder))
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" is reported by us
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    except RuntimeError as exc:
        raise InputError(folder, f"cannot be scanned for DICOM files{_detail(exc)}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)
    infos = []
    for uid in uids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        tags = _dicom_tags(files[0]) if files else {}
        number = tags.get("SeriesNumber")
        infos.append(SeriesInfo(
            uid=uid,
            description=str(tags.get("SeriesDescription", "")),
            n_files=len(files),
            modality=tags.get("Modality"),
            series_number=int(number) if isinstance(number, (int, float)) else None,
            files=files,
        ))
    infos.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.uid))
    return infos


def _file_kind(p: Path) -> str:
    """'a FIFO (named pipe)', 'a socket', 'a device', ... for a path that is not a regular file."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return "not readable"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _refuse_special_files(folder: Path) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise InputError(folder, f"cannot be listed ({_os_problem(exc)})") from None
    for entry in entries:
        try:
            regular = entry.is_file() or entry.is_dir()
        except OSError:
            regular = False
        if not regular and os.path.exists(entry.path):
            raise InputError(entry.path, f"is {_file_kind(Path(entry.path))} inside the DICOM folder {folder}; "
                                         "move it away (reading it would block)")


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Silence ITK's own warnings (e.g. 'Non uniform sampling'): these readers check and report."""
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)


def _read_itk_file(p: Path, format_name: str) -> Volume:
    if format_name == "NIfTI" and extension_of(p.name) == ".nii" and _starts_with(p, b"\x1f\x8b"):
        raise InputError(p, "is gzip-compressed but named .nii; rename it to .nii.gz")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with _itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(p, f"cannot be read as {format_name}: not a valid {format_name} file or corrupt"
                            f"{_detail(exc)}") from None
    components = reader.GetNumberOfComponents()
    if components > 1:  # checked before loading the pixels
        raise InputError(p, f"has {components} components per voxel (RGB?); a greyscale volume is needed")
    size = reader.GetSize()
    if len(size) >= 4 and any(s > 1 for s in size[3:]):
        raise InputError(p, f"is {len(size)}D ({size[3]} volumes, a time series?); a single 3D volume is needed")
    if format_name == "NIfTI":
        _check_nifti_complete(p)  # ITK silently reads truncated NIfTI files as zeros
        _check_nifti_finite(p)  # ... and NaN voxels as zeros
    missing = _missing_data_file(p)
    if missing:
        raise InputError(p, f"its data file {missing} is missing (a .mhd/.nhdr header needs it beside it)")
    try:
        with _itk_warnings_off():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(p, f"cannot be read: corrupt or truncated {format_name} file"
                            f"{_detail(exc)}") from None
    volume = Volume.from_sitk(image, path=p)
    if format_name == "NIfTI":
        _apply_nifti_geometry(volume, p, image)
    return volume


# -- NIfTI geometry -----------------------------------------------------------------------------
_AXES = "xyz"


def _apply_nifti_geometry(volume: Volume, p: Path, image: sitk.Image) -> None:
    """Place ``volume`` as the NIfTI standard says: sform if sform_code > 0, else qform.

    ITK prefers the qform when both are set (so a file whose sform differs from its qform came
    out where the qform put it) and drops the z position of a 2D file; nibabel, FSL and the
    standard use the sform. Also warns about voxel sizes of 0 (ITK silently uses 1 mm).
    """
    import nibabel as nib

    try:
        with _nibabel_quiet():
            header = nib.load(str(p)).header
    except Exception:  # noqa: BLE001 - nibabel cannot parse what ITK accepted: keep ITK's geometry
        return
    warnings: list[str] = []
    _nifti_geometry(volume, p, header, warnings)
    if warnings:
        volume.metadata.setdefault("warnings", []).extend(warnings)


def _nifti_geometry(volume: Volume, p: Path, header, warnings: list[str]) -> None:
    file_dims = int(header["dim"][0])
    spatial = min(max(file_dims, 1), 3)
    s_code, q_code = int(header["sform_code"]), int(header["qform_code"])
    if s_code > 0:
        affine, source = np.asarray(header.get_sform(), float), "sform"
    elif q_code > 0:
        affine, source = np.asarray(header.get_qform(), float), "qform"
    else:
        affine, source = None, "pixdim"
    if source != "sform":
        pixdim = _raw_pixdim(p)  # nibabel's header has already replaced zeros by 1
        pixdim = np.asarray(header["pixdim"][1:4] if pixdim is None else pixdim, float)
        zero = [_AXES[k] for k in range(spatial) if not (np.isfinite(pixdim[k]) and pixdim[k] != 0)]
        if zero:
            warnings.append(f"{p}: voxel size (pixdim) along {', '.join(zero)} is 0; 1 mm is assumed")
    if affine is None:
        return  # neither transform is set (method 1): ITK's pixdim-only geometry
    if s_code > 0 and q_code > 0:
        qform = np.asarray(header.get_qform(), float)
        corners = np.array([[i, j, k, 1.0] for i in (0, max(volume.shape[2] - 1, 0)) for j in (0, max(volume.shape[1] - 1, 0))
                            for k in (0, max(volume.shape[0] - 1, 0))])
        apart = float(np.max(np.linalg.norm(((qform - affine) @ corners.T)[:3], axis=0)))
        if apart > 0.01:
            warnings.append(f"{p}: its qform and sform disagree (by up to {apart:.1f} mm); the sform is used "
                            f"(sform_code {s_code} > 0, as the NIfTI standard says)")
    matrix = _LPS_TO_RAS @ affine[:3, :3]  # RAS -> LPS (the flip is its own inverse)
    origin = _LPS_TO_RAS @ affine[:3, 3]
    spacing = np.linalg.norm(matrix, axis=0)
    itk_direction = volume.direction
    for k in range(3):
        if not (np.isfinite(spacing[k]) and spacing[k] > 0):  # pixdim 0 in a qform; already warned about
            matrix[:, k], spacing[k] = itk_direction[:, k], 1.0
    direction = matrix / spacing
    if not (np.all(np.isfinite(direction)) and np.allclose(direction.T @ direction, np.eye(3), atol=1e-4)):
        warnings.append(f"{p}: its {source} is sheared (not a rotation and scaling); ITK's nearest geometry is used")
        return
    volume.spacing_mm = tuple(float(v) for v in spacing)
    volume.origin_mm = tuple(float(v) for v in origin)
    volume.direction = direction


def _raw_pixdim(p: Path) -> np.ndarray | None:
    """pixdim[1:4] as stored in a NIfTI-1/-2 header (nibabel turns zeros into 1 as it loads)."""
    import gzip

    try:
        with (gzip.open if p.name.lower().endswith(".gz") else open)(p, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            return np.array(struct.unpack(order + "8f", head[76:108])[1:4], float)
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            return np.array(struct.unpack(order + "8d", head[104:168])[1:4], float)
    return None


@contextlib.contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Keep nibabel from logging the header fixes it makes as it loads a file ('pixdim[1,2,3]
    should be non-zero; setting 0 dims to 1') to stderr: messages here are one line, our own."""
    import logging

    import nibabel.imageglobals as nib_globals

    level = nib_globals.logger.level
    nib_globals.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        nib_globals.logger.setLevel(level)


def _starts_with(p: Path, magic: bytes) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


# -- DICOM ----------------------------------------------------------------------------------------
def _read_dicom_file(p: Path, context: str = "") -> Volume:
    """One DICOM file (one slice, or a multi-frame image) with its position in 3D.

    A single slice keeps its z position and gets the slice thickness (Spacing Between Slices,
    else Slice Thickness) as its z voxel size, so a mask written from it lies where the slice is.
    """
    _slice_header(str(p), context)  # truncated pixel data: GDCM would read zeros or garbage
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(p))
    try:
        with _itk_warnings_off():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(p, f"cannot be read as DICOM: not a DICOM image or corrupt{_detail(exc)}") from None
    tags = _dicom_tags(str(p))
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        thickness = _slice_thickness(str(p))
        if thickness:
            spacing = image.GetSpacing()
            image.SetSpacing((spacing[0], spacing[1], thickness))
    return Volume.from_sitk(image, path=p, modality=_modality_of(tags.get("Modality")), metadata=tags)


def _slice_thickness(file: str) -> float | None:
    import pydicom

    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - GDCM read the pixels; the thickness is a bonus
        return None
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(ds.get(name) or 0)
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return value
    return None


def _read_dicom_folder(folder: Path, series: str | int | None, allow_gaps: bool = False) -> Volume:
    infos = list_dicom_series(folder)
    if not infos:
        problem = "contains no DICOM series"
        unreadable = [f for f, _ in _unreadable_dicom_files(folder, infos)]
        if unreadable:
            problem += f"; {_names(unreadable)} cannot be read as DICOM (corrupt, truncated or not DICOM)"
        subfolders = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if subfolders:
            names = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
            problem += f"; it has sub-folders ({names}): point to the folder that holds the DICOM files"
        raise InputError(folder, problem)
    note = others = None
    if series is None:
        chosen = max(infos, key=lambda s: s.n_files)  # first of the largest
        if len(infos) > 1:
            others = [s.label(i) for i, s in enumerate(infos) if s is not chosen]
            note = (f"Found {len(infos)} DICOM series; read the largest, {chosen.label(infos.index(chosen))}; "
                    f"the others: {', '.join(others)}.")
    else:
        chosen = _select_series(folder, infos, series)
    label = chosen.label(infos.index(chosen))
    found = _unreadable_dicom_files(folder, infos, chosen)
    for file in [f for f, member in found if member][:1]:  # the precise reason, e.g. a truncated slice
        _slice_header(file, f"; it belongs to DICOM series {label} in {folder}, which is incomplete without it")
    unreadable = [f for f, _ in found]
    if unreadable:
        raise InputError(folder, f"DICOM series {label}: {_names(unreadable)} in the folder cannot be read as DICOM "
                                 "(corrupt, truncated or not DICOM), so the series may be incomplete; fix or remove "
                                 f"{'it' if len(unreadable) == 1 else 'them'}")
    warnings: list[str] = []
    if len(chosen.files) == 1:
        volume = _read_dicom_file(Path(chosen.files[0]), f"; it is DICOM series {label} in {folder}")
        volume.path = os.fspath(folder)
    else:
        headers = [_slice_header(f, f"; it is a slice of DICOM series {label} in {folder}") for f in chosen.files]
        plan = _plan_slices(headers, folder, label, allow_gaps)
        warnings += plan.warnings
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(plan.files))
        try:
            with _itk_warnings_off():  # "Non uniform sampling": checked (and reported) by _plan_slices
                image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(folder, f"DICOM series {label} cannot be read{_detail(exc)}") from None
        tags = _dicom_tags(plan.files[0])
        volume = Volume.from_sitk(image, path=folder, modality=_modality_of(tags.get("Modality")), metadata=tags)
        if plan.step is not None:
            if plan.grid is not None:
                volume = _resample_slices(volume, plan)
            volume.spacing_mm = (*volume.spacing_mm[:2], plan.step)
    volume.metadata["n_series"] = len(infos)
    if note:
        volume.metadata["series_note"] = note
        volume.metadata["series_others"] = others
    if warnings:
        volume.metadata.setdefault("warnings", []).extend(warnings)
    return volume


def _names(files, limit: int = 4) -> str:
    names = [os.path.basename(f) for f in files]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _unreadable_dicom_files(folder: Path, infos: list[SeriesInfo], chosen: SeriesInfo | None = None) -> list[tuple[str, bool]]:
    """Files that look like DICOM (extension or preamble) but belong to no series GDCM found:
    those pydicom cannot read either, as (path, False), and those pydicom places in ``chosen``
    although GDCM left them out (a truncated slice), as (path, True). Other DICOM objects
    (DICOMDIR, reports, other series) are skipped."""
    import pydicom

    listed = {os.path.realpath(f) for s in infos for f in s.files}
    bad = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or os.path.realpath(entry.path) in listed:
            continue
        if not (entry.name.lower().endswith(DICOM_EXTENSIONS) or has_dicom_preamble(Path(entry.path))):
            continue
        try:
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - any parse failure is "cannot be read"
            bad.append((entry.path, False))
            continue
        if chosen is not None and str(ds.get("SeriesInstanceUID", "")) == chosen.uid:
            bad.append((entry.path, True))
    return bad


@dataclass
class _SliceHeader:
    file: str
    rows: int
    columns: int
    position: np.ndarray | None  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray | None  # ImageOrientationPatient (row, column cosines)
    pixel_spacing: tuple | None


@dataclass
class _SlicePlan:
    files: list[str]
    step: float | None = None  # mm along the normal; None when the slices carry no positions
    positions: np.ndarray | None = None  # sorted, mm along the normal
    grid: np.ndarray | None = None  # positions to resample onto (allow_gaps), else None
    tolerance: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _slice_header(file: str, context: str = "") -> _SliceHeader:
    """The geometry tags of one slice; InputError naming the file when it is truncated or
    unreadable (``context``, e.g. "; it is a slice of DICOM series ...", ends the message)."""
    import pydicom

    try:
        # large values (the pixels) are not loaded; force: files without the preamble are DICOM too
        ds = pydicom.dcmread(file, defer_size=1024, force=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(file, f"cannot be read as DICOM ({type(exc).__name__}){context}") from None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise InputError(file, f"has no image size (Rows/Columns){context}") from None
    pixels = ds.get_item(0x7FE00010, keep_deferred=True)
    if pixels is None:
        raise InputError(file, f"has no pixel data{context}")
    length = getattr(pixels, "length", None)
    tell = getattr(pixels, "value_tell", None)
    if length is not None and tell is not None and length != 0xFFFFFFFF:  # not encapsulated (compressed)
        held = os.path.getsize(file) - int(tell)
        bits = int(ds.get("BitsAllocated") or 16)
        frames = int(ds.get("NumberOfFrames") or 1)
        needed = rows * columns * int(ds.get("SamplesPerPixel") or 1) * frames * bits // 8
        if held < min(length, needed):
            raise InputError(file, f"is truncated: its pixel data need {needed} bytes, the file holds {max(held, 0)}{context}")
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return _SliceHeader(file, rows, columns, position, orientation, None if spacing is None else tuple(spacing))


def _floats(value, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _plan_slices(headers: list[_SliceHeader], folder: Path, label: str, allow_gaps: bool) -> _SlicePlan:
    """Check a series' slices against each other and sort them along the slice normal.

    Errors (naming the files or positions): slices of another size, orientation or pixel
    spacing; two slices at the same position. Gaps (a step that is a multiple of the series'
    step) and uneven steps raise SliceSpacingError unless ``allow_gaps``, which plans a uniform
    grid from the first to the last slice.
    """
    where = f"DICOM series {label}"
    size = Counter((h.columns, h.rows) for h in headers).most_common(1)[0][0]
    odd = [h for h in headers if (h.columns, h.rows) != size]
    if odd:
        sizes = ", ".join(f"{os.path.basename(h.file)} is {h.columns}x{h.rows}" for h in odd[:4])
        raise InputError(folder, f"{where}: {sizes} pixels, the other slices {size[0]}x{size[1]}; "
                                 f"remove or fix the odd {'slice' if len(odd) == 1 else 'slices'}")
    files = [h.file for h in headers]
    if any(h.position is None or h.orientation is None for h in headers):
        return _SlicePlan(files, warnings=[f"{folder}: {where}: slices without ImagePositionPatient/"
                                           "ImageOrientationPatient; stacked in GDCM's order, spacing not checked"])
    ref = headers[0].orientation
    tilted = [h for h in headers if np.max(np.abs(h.orientation - ref)) > 1e-4]
    if tilted:
        raise InputError(folder, f"{where}: {_names([h.file for h in tilted])} {'has' if len(tilted) == 1 else 'have'} "
                                 "another orientation (ImageOrientationPatient) than the rest of the series")
    spacings = {h.pixel_spacing for h in headers if h.pixel_spacing is not None}
    if len(spacings) > 1 and np.ptp(np.array(sorted(spacings)), axis=0).max() > 1e-4:
        raise InputError(folder, f"{where}: the slices have different pixel spacings ({', '.join(map(str, sorted(spacings)))})")
    normal = np.cross(ref[:3], ref[3:])
    normal /= np.linalg.norm(normal)
    along = np.array([float(h.position @ normal) for h in headers])
    order = np.argsort(along, kind="stable")
    z = along[order]
    files = [files[i] for i in order]
    steps = np.diff(z)
    moving = steps[steps > 1e-3]
    if len(moving) == 0:
        raise InputError(folder, f"{where}: all {len(z)} slices lie at the same position ({z[0]:.2f} mm along the "
                                 "slice normal); is this a series of repeated scans?")
    step = _usual_step(moving)
    tol = max(1e-3, 0.02 * step)
    dup = np.flatnonzero(steps <= max(1e-3, 0.1 * step))
    if len(dup):
        pairs = "; ".join(f"{z[i]:.2f} mm ({os.path.basename(files[i])}, {os.path.basename(files[i + 1])})" for i in dup[:3])
        more = f" and {len(dup) - 3} more" if len(dup) > 3 else ""
        raise InputError(folder, f"{where}: {len(dup)} duplicate slice position{'s' if len(dup) > 1 else ''} along the "
                                 f"slice normal: {pairs}{more}; remove the copies")
    bad = np.flatnonzero(np.abs(steps - step) > tol)
    plan = _SlicePlan(files, step=step, positions=z, tolerance=tol)
    if len(bad) == 0:
        plan.step = float((z[-1] - z[0]) / (len(z) - 1))  # the best uniform step through all of them
        return plan
    problems = []
    for i in bad:
        ratio = steps[i] / step
        if round(ratio) >= 2 and abs(steps[i] - round(ratio) * step) <= tol:
            missing = int(round(ratio)) - 1
            problems.append(f"gap from {z[i]:.2f} to {z[i + 1]:.2f} mm ({missing} slice{'s' if missing > 1 else ''} missing)")
        else:
            problems.append(f"step of {steps[i]:.3g} mm from {z[i]:.2f} to {z[i + 1]:.2f} mm")
    summary = "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
    if not allow_gaps:
        raise SliceSpacingError(folder, f"{where}: slice positions along the slice normal are not evenly spaced "
                                        f"(the usual step is {step:.3g} mm): {summary}")
    n = int(round((z[-1] - z[0]) / step)) + 1
    plan.step = float((z[-1] - z[0]) / (n - 1))
    plan.grid = z[0] + plan.step * np.arange(n)
    kept = sum(1 for g in plan.grid if np.min(np.abs(z - g)) <= tol)
    plan.warnings.append(f"{folder}: {where}: {summary}; resampled onto a uniform grid of {n} slices {plan.step:.4g} mm "
                         f"apart ({kept} of {len(z)} slices kept as they are, {n - kept} interpolated linearly "
                         "between their neighbours)")
    return plan


def _usual_step(steps: np.ndarray) -> float:
    """The most common step between neighbouring slices (2 % tolerance); ties: the smaller.

    Not the median: with several gaps the median can be a multiple of the step, or between.
    """
    tol = np.maximum(1e-3, 0.02 * steps)
    close = np.abs(steps[:, None] - steps[None, :]) <= tol[:, None]
    counts = close.sum(axis=1)
    best = np.flatnonzero(counts == counts.max())
    seed = best[np.argmin(steps[best])]
    return float(np.median(steps[close[seed]]))


def _resample_slices(volume: Volume, plan: _SlicePlan) -> Volume:
    """The volume on ``plan.grid``: slices on the grid copied, the others interpolated linearly."""
    z, grid, src = plan.positions, plan.grid, volume.array
    out = np.empty((len(grid), *src.shape[1:]), dtype=src.dtype)
    for j, g in enumerate(grid):
        i = int(np.clip(np.searchsorted(z, g, side="right") - 1, 0, len(z) - 1))
        if abs(z[i] - g) <= plan.tolerance:
            out[j] = src[i]
        elif i + 1 < len(z) and abs(z[i + 1] - g) <= plan.tolerance:
            out[j] = src[i + 1]
        else:
            w = (g - z[i]) / (z[i + 1] - z[i])
            mixed = (1.0 - w) * src[i].astype(np.float64) + w * src[i + 1].astype(np.float64)
            if np.issubdtype(src.dtype, np.integer):
                info = np.iinfo(src.dtype)
                mixed = np.clip(np.rint(mixed), info.min, info.max)
            out[j] = mixed.astype(src.dtype)
    return Volume(out, volume.spacing_mm, volume.origin_mm, volume.direction, volume.modality, volume.path,
                  dict(volume.metadata, resampled_from_slices=len(z)))


def _select_series(folder: Path, infos: list[SeriesInfo], series: str | int) -> SeriesInfo:
    """Pick a series by 0-based index, exact UID, or case-insensitive description substring."""
    listing = "; ".join(s.label(i) + f" UID {s.uid}" for i, s in enumerate(infos))
    text = str(series).strip()
    for s in infos:
        if s.uid == text:
            return s
    if isinstance(series, (int, np.integer)) or text.isdigit():
        index = int(text)
        if 0 <= index < len(infos):
            return infos[index]
        raise InputError(folder, f"has no DICOM series number {index} (0-based); available: {listing}")
    matches = [s for s in infos if text.lower() in s.description.lower()] if text else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(repr(s.description) for s in matches)
        raise InputError(folder, f"several DICOM series match {text!r} ({names}); give the index or UID; available: {listing}")
    raise InputError(folder, f"no DICOM series matches {text!r}; available: {listing}")


def _dicom_tags(file: str) -> dict:
    """Selected tags of one DICOM file as plain Python values ({} if pydicom cannot read it)."""
    import pydicom

    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - tags are a bonus; the pixels were read by GDCM
        return {}
    tags = {}
    for name in _DICOM_TAGS:
        value = ds.get(name)
        if value is None or value == "":
            continue
        tags[name] = _plain(value)
    return tags


def _plain(value):
    """pydicom value → str / int / float / list of those (JSON-friendly)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _modality_of(tag) -> str | None:
    tag = (str(tag).upper() if tag else "")
    return tag if tag in ("CT", "MR") else None


def has_dicom_preamble(p) -> bool:
    """True when the file has the DICOM preamble ("DICM" at byte 128); False when unreadable."""
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _missing_data_file(p: Path) -> str | None:
    """For a detached header (.mhd, .nhdr), the name of its data file when that file is absent."""
    keys = {".mhd": "elementdatafile", ".nhdr": "data file"}
    key = keys.get(extension_of(p.name))
    if key is None:
        return None
    try:
        with open(p, "r", errors="replace") as f:
            header = f.read(65536)
    except OSError:
        return None
    for line in header.splitlines():
        name, sep, value = line.partition("=" if key == "elementdatafile" else ":")
        value = value.strip()
        if sep and name.strip().lower() == key and value and value.upper() not in ("LOCAL", "LIST") and " " not in value:
            return None if (p.parent / value).exists() else value
    return None


def _check_nifti_complete(p: Path) -> None:
    """Raise InputError when a NIfTI file is cut short (ITK would silently read it as zeros).

    For .nii.gz the gzip trailer (uncompressed size mod 2**32) is compared with the size the
    header promises; only when they differ is the whole stream inflated to check it.
    """
    import nibabel as nib

    try:
        with _nibabel_quiet():
            image = nib.load(str(p))
        # the data offset of the file (the loaded header's own get_data_offset() is reset to 0)
        offset = int(getattr(image.dataobj, "offset", image.header["vox_offset"]))
        header = image.header
        expected = offset + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception:  # noqa: BLE001 - nibabel cannot parse what ITK accepted: check the gzip stream only
        expected = None
    if p.name.lower().endswith(".gz"):
        if expected is not None:
            with open(p, "rb") as f:
                f.seek(-4, os.SEEK_END)
                if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
                    return
        actual = _gzip_payload_size(p)
        if actual is None:
            raise InputError(p, "is truncated or corrupt: its gzip stream ends early or is damaged")
    else:
        actual = p.stat().st_size
    if expected is not None and actual < expected:
        raise InputError(p, f"is truncated: the header promises {expected} bytes, the file holds {actual}")


def _check_nifti_finite(p: Path) -> None:
    """Float NIfTI voxels must be finite (ITK's reader turns NaN into 0 without a word)."""
    import nibabel as nib

    try:
        with _nibabel_quiet():
            img = nib.load(str(p))
    except Exception:  # noqa: BLE001 - nibabel is stricter than ITK about some headers; ITK decides
        return
    if np.dtype(img.get_data_dtype()).kind != "f":
        return
    data = np.asarray(img.dataobj)
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(p, f"has {bad} NaN or infinite voxels (of {data.size}); fix or mask them first")


def _gzip_payload_size(p: Path) -> int | None:
    """Uncompressed size of a (possibly multi-member) gzip file; None when it is cut short or corrupt."""
    size, inflater, in_member = 0, zlib.decompressobj(wbits=31), False
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                if not in_member and not chunk.strip(b"\0"):
                    break  # zero padding after the last member, as gzip tolerates
                in_member = True
                try:
                    size += len(inflater.decompress(chunk))
                except zlib.error:
                    return None
                if inflater.eof:  # a member ended; what follows starts the next one
                    chunk = inflater.unused_data
                    inflater, in_member = zlib.decompressobj(wbits=31), False
                else:
                    chunk = b""
    return None if in_member else size


_ITK_NOISE = re.compile(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\):\s*|sitk::ERROR:\s*|\[\w+\]\s*\w+:\s*)")


def _summarise_itk_error(exc: BaseException) -> str:
    """One short line from SimpleITK's multi-line exception text (no source paths); may be ""."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [
        ln for ln in lines
        if not ln.startswith(("Exception thrown in SimpleITK", "Reason:")) and not re.match(r"^/\S+:\d+:?$", ln)
    ]
    if not lines:
        return ""
    text = _ITK_NOISE.sub("", _ITK_NOISE.sub("", lines[-1]))
    if "Unable to determine ImageIO reader" in text:
        return "content not recognised as an image"
    if "cannot be read" in text.lower() or "could not be" in text.lower():
        return ""  # says nothing our own message does not
    return (text[:117] + "...") if len(text) > 120 else text


def _detail(exc: BaseException) -> str:
    """`` (summary)`` or "" — to append to a message."""
    text = _summarise_itk_error(exc)
    return f" ({text})" if text else ""


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def write_volume(volume: Volume, path, *, overwrite: bool = False) -> Path:
    """Write ``volume`` atomically; the format follows the extension (.nii.gz, .nii, .nrrd, .mha).

    Geometry (shape, spacing, origin, direction) is preserved exactly (NIfTI: qform and sform
    both hold it); a volume read from a 2D file is written as a 2D image when that loses no
    geometry. NRRD and MetaImage are zlib-compressed. The file is checked before it replaces
    anything (see :class:`OutputSet`); to write several files all-or-nothing, use an OutputSet.

    Raises:
        OutputError: unsupported extension, existing file without ``overwrite``, missing or
            read-only folder, or a write failure such as a full disk (no partial file is left
            behind and an existing file is untouched).
    """
    p = Path(os.fspath(path))
    with OutputSet(overwrite=overwrite) as outputs:
        outputs.add(p, kind="volume")
        outputs.write_volume(p, volume)
    return p


def check_output_path(path, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written; returns it as a Path.

    Raises OutputError when it exists (and ``overwrite`` is False) — a symbolic link counts,
    even one whose target is missing —, is a folder, a FIFO, device or other non-regular file
    (never replaced), or its folder is missing or not writable.
    """
    p = Path(os.fspath(path))
    if p.is_dir():
        raise OutputError(p, "is a folder; give a file name")
    parent = p.parent
    if not parent.exists():
        raise OutputError(p, f"folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(p, f"{parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(p, f"folder {parent} is not writable")
    if p.exists() and not p.is_file():
        raise OutputError(p, f"is {_file_kind(p)}, not a regular file; give another output name")
    if p.is_symlink() and not p.exists() and not overwrite:
        raise OutputError(p, f"exists as a symbolic link to {os.readlink(p)}, which is missing; "
                             "pass --overwrite to replace the link")
    if p.exists() and not overwrite:
        raise OutputError(p, "exists; pass --overwrite to replace it")
    return p


_KINDS = {  # kind -> (allowed extensions, what the file is)
    "volume": (OUTPUT_EXTENSIONS, "an image"),
    "table": ((".csv", ".json"), "a lesion table"),
    "npz": ((".npz",), "attention maps"),
    "json": ((".json",), "JSON"),
    "csv": ((".csv",), "a CSV table"),
}


@dataclass
class _Output:
    path: Path
    option: str  # how the user named it ("-o", "--probabilities"); the path itself for library calls
    kind: str | None
    tmp: Path | None = None
    backup: Path | None = None  # the replaced file, kept until the whole set is committed
    placed: bool = False  # renamed into place during commit


class OutputSet:
    """The output files of one run, committed together: afterwards all of them exist, or none.

    1. :meth:`add` every output before the work starts. It checks the extension (``kind``), the
       folder, an existing file (refused without ``overwrite``; a dangling symbolic link counts),
       a FIFO/device (never replaced) and two outputs naming the same file (the message names
       both options).
    2. :meth:`write_volume`, :meth:`write_bytes` or :meth:`temporary` write each output to a
       hidden temporary file in its folder, ``.<name>.tmp-<random><extension>``. Every file is
       flushed and fsynced and then checked: not empty, image headers read back with the right
       size, the data complete (NIfTI/NRRD gzip trailers, MetaImage compressed size). A failed
       write (a full disk: "no space left on device") is an OutputError naming the file.
    3. :meth:`commit` renames them all over their targets. A replaced file is kept (hard link)
       until every rename succeeded; if one fails, or SIGINT/SIGTERM arrives meanwhile, the
       outputs already renamed are taken back and the previous files restored.

    As a context manager, leaving the block normally commits and an exception (KeyboardInterrupt
    included) removes every temporary file::

        with OutputSet(overwrite=args.overwrite) as outputs:
            outputs.add(args.output, "-o", kind="volume")
            outputs.add(args.lesions, "--lesions", kind="table")
            ...  # the long work
            outputs.write_volume("-o", mask)
            outputs.write_bytes("--lesions", text.encode())
    """

    def __init__(self, overwrite: bool = False):
        self.overwrite = bool(overwrite)
        self._outputs: dict[str, _Output] = {}
        self.state = "open"  # open | committed | discarded

    # -- 1. naming -----------------------------------------------------------------------------
    def add(self, path, option: str | None = None, kind: str | None = None) -> Path:
        """Check ``path`` now and reserve it; returns it as a Path. ``option`` names it in
        messages and is the key for the write methods (default: the path itself)."""
        p = Path(os.fspath(path))
        key = option or str(p)
        if key in self._outputs:
            raise ValueError(f"{key} added twice")
        if kind is not None:
            extensions, what = _KINDS[kind]
            ext = extension_of(p.name)
            if ext not in extensions:
                named = f"{option} is {what}" if option else f"{what.capitalize()} is written"
                has = f"'{ext}'" if ext else "no extension"
                if kind == "volume":
                    raise OutputError(p, f"unsupported output format ({has}); {named}: use one of {', '.join(extensions)}")
                raise OutputError(p, f"unsupported output format ({has}); {named}: use {' or '.join(extensions)}")
        check_output_path(p, self.overwrite)
        same = os.path.realpath(p)  # follows links, dangling ones included
        for other in self._outputs.values():
            if os.path.realpath(other.path) == same:
                raise OutputError(p, f"named by both {other.option} and {key}; give each output its own file")
        self._outputs[key] = _Output(p, key, kind)
        return p

    def path(self, option: str) -> Path:
        return self._output(option).path

    def __contains__(self, option: str) -> bool:
        return option in self._outputs

    def _output(self, option) -> _Output:
        key = option if isinstance(option, str) and option in self._outputs else str(os.fspath(option))
        if key not in self._outputs:
            raise KeyError(f"{option} was not added to this OutputSet")
        if self.state != "open":
            raise RuntimeError(f"this OutputSet is already {self.state}")
        return self._outputs[key]

    # -- 2. writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def temporary(self, option) -> Iterator[Path]:
        """Yields the temporary path for any writer; the file is then fsynced and checked.

        OSErrors (a full disk...) become OutputError naming the output; any exception removes
        the temporary file.
        """
        out = self._output(option)
        tmp = self._new_temporary(out)
        try:
            try:
                yield tmp
                if not tmp.exists():
                    raise OutputError(out.path, "nothing was written")
                _fsync_file(tmp)
                if tmp.stat().st_size == 0:
                    raise OutputError(out.path, f"could not be written: {_why_short(tmp, 'the file is empty')}")
            except OSError as exc:
                raise OutputError(out.path, f"could not be written: {_os_problem(exc)}") from None
        except BaseException:
            _remove(tmp)
            out.tmp = None
            raise

    def write_bytes(self, option, data: bytes) -> None:
        """Write ``data`` (a table, JSON) to the output's temporary file, checked."""
        with self.temporary(option) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if tmp.stat().st_size != len(data):
                raise OutputError(self._output(option).path, "could not be written: " + _why_short(
                    tmp, f"{tmp.stat().st_size} of {len(data)} bytes reached the disk"))

    def write_volume(self, option, volume: Volume) -> None:
        """Write ``volume`` in the output's format (by extension) to its temporary file, checked."""
        out = self._output(option)
        ext = extension_of(out.path.name)
        if ext not in OUTPUT_EXTENSIONS:
            raise OutputError(out.path, f"unsupported output format; use one of {', '.join(OUTPUT_EXTENSIONS)}")
        image = volume.to_sitk()
        with self.temporary(option) as tmp:
            try:
                with _c_stderr_hidden():  # the NIfTI library prints "** ERROR: NWAD ..." itself
                    sitk.WriteImage(image, str(tmp), useCompression=ext in (".nrrd", ".mha"))
            except RuntimeError as exc:
                problem = _why_short(tmp, "") if tmp.exists() else ""
                raise OutputError(out.path, f"could not be written{': ' + problem if problem else _detail(exc)}") from None
            _fsync_file(tmp)
            problem = _check_image_file(tmp, ext, image)
            if problem:
                raise OutputError(out.path, f"could not be written: {_why_short(tmp, problem)}")

    def _new_temporary(self, out: _Output) -> Path:
        if out.tmp is not None:
            raise RuntimeError(f"{out.option} was already written")
        out.tmp = out.path.parent / f".{out.path.name}.tmp-{secrets.token_hex(4)}{extension_of(out.path.name)}"
        return out.tmp

    # -- 3. committing -------------------------------------------------------------------------
    def commit(self) -> None:
        """Rename every temporary file over its target, all or none (see the class docstring)."""
        if self.state != "open":
            return
        for out in self._outputs.values():
            if out.tmp is None:
                self.discard()
                raise OutputError(out.path, "nothing was written")
        current = None
        with _signals_deferred() as signalled:
            try:
                for current in self._outputs.values():
                    self._place(current)
                if signalled():
                    raise KeyboardInterrupt
            except BaseException as exc:
                self._undo()
                if isinstance(exc, OSError):
                    raise OutputError(current.path, f"could not be written: {_os_problem(exc)}; "
                                                    "no output of this run was kept") from None
                if not signalled():
                    raise
                # else: the held signal goes to its handler as the block ends (KeyboardInterrupt)
            else:
                self.state = "committed"
        if self.state != "committed":
            raise KeyboardInterrupt  # the signal's handler did not raise: still say it was not committed
        for out in self._outputs.values():
            if out.backup is not None:
                _remove(out.backup)
                out.backup = None
        for folder in {out.path.parent for out in self._outputs.values()}:
            _fsync_folder(folder)

    def _place(self, out: _Output) -> None:
        if os.path.lexists(out.path):
            if not self.overwrite:  # appeared while this run was working
                raise OutputError(out.path, "appeared while this run was working; pass --overwrite to replace it")
            backup = out.path.parent / f".{out.path.name}.old-{secrets.token_hex(4)}"
            try:
                os.link(out.path, backup, follow_symlinks=False)
            except OSError:  # no hard links here: move it aside instead
                os.replace(out.path, backup)
            out.backup = backup
        os.replace(out.tmp, out.path)
        out.placed, out.tmp = True, None

    def discard(self) -> None:
        """Remove every temporary file (nothing was renamed yet)."""
        if self.state != "open":
            return
        with _signals_deferred():
            self._undo()

    def _undo(self) -> None:
        for out in reversed(list(self._outputs.values())):
            if out.placed:
                if out.backup is not None:
                    with contextlib.suppress(OSError):
                        os.replace(out.backup, out.path)
                        out.backup = None
                else:
                    _remove(out.path)
                out.placed = False
            if out.tmp is not None:
                _remove(out.tmp)
                out.tmp = None
            if out.backup is not None:
                _remove(out.backup)
                out.backup = None
        self.state = "discarded"

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = False) -> Iterator[Path]:
    """Context manager for writing one file ``path`` atomically (an OutputSet of one).

    Yields a temporary path in the same folder, ``.<name>.tmp-<random><extension>`` (same
    extension, so writers that choose the format by extension still work). When the block ends
    normally the temporary file is fsynced, checked (not empty) and replaces ``path``; on any
    exception (KeyboardInterrupt included) it is deleted and the exception propagates. OSErrors
    (a full disk: "no space left on device") become OutputError. Example::

        with atomic_output("lesions.csv") as tmp:
            tmp.write_text(text)
    """
    with OutputSet(overwrite=overwrite) as outputs:
        p = outputs.add(path)
        with outputs.temporary(str(p)) as tmp:
            yield tmp


# -- write checks -------------------------------------------------------------------------------
def _os_problem(exc: OSError) -> str:
    """A short lower-case reason for an OSError: 'no space left on device', ..."""
    names = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large for this file system",
        errno.EROFS: "read-only file system",
        errno.EIO: "input/output error (failing disk or network drive?)",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }
    if exc.errno in names:
        return names[exc.errno]
    return str(exc.strerror or exc).rstrip(".").lower() or type(exc).__name__


def _why_short(tmp: Path, fallback: str) -> str:
    """Why a written file came out short: the error the disk gives now for more data (a full
    disk: 'no space left on device'), else ``fallback``."""
    try:
        with open(tmp, "ab") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return _os_problem(exc)
    return fallback or "the file came out incomplete"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable; not every file system can fsync a folder, which is fine."""
    with contextlib.suppress(OSError):
        _fsync_file(folder)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _check_image_file(tmp: Path, ext: str, image: sitk.Image) -> str | None:
    """What is wrong with a freshly written image file, or None: the header must read back
    with the right size and the data must be complete (ITK does not report short writes)."""
    size = tmp.stat().st_size
    if size == 0:
        return "the file is empty"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    try:
        with _itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError:
        return f"its header cannot be read back ({size} bytes written)"
    if tuple(reader.GetSize()) != tuple(image.GetSize()):
        return f"its header reads back as size {tuple(reader.GetSize())}, not {tuple(image.GetSize())}"
    data_bytes = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel() \
        * sitk.GetArrayViewFromImage(image).dtype.itemsize
    if ext in (".nii", ".nii.gz"):
        try:
            _check_nifti_complete(tmp)
        except InputError as exc:
            return exc.problem
        return None
    with open(tmp, "rb") as f:
        head = f.read(1 << 16)
    if ext == ".nrrd":
        end = head.find(b"\n\n")
        if end < 0:
            return "its header is incomplete"
        fields = dict(ln.split(b":", 1) for ln in head[:end].splitlines() if b":" in ln and not ln.startswith(b"#"))
        encoding = fields.get(b"encoding", b"raw").strip().lower()
        if encoding in (b"gzip", b"gz"):
            with open(tmp, "rb") as f:
                f.seek(-4, os.SEEK_END)
                if size - end - 2 < 18 or struct.unpack("<I", f.read(4))[0] != data_bytes % 2**32:
                    return "its compressed data are cut short"
        elif encoding == b"raw" and size - end - 2 < data_bytes:
            return f"it holds {size - end - 2} bytes of data, {data_bytes} were written"
        return None
    if ext == ".mha":
        marker = head.find(b"ElementDataFile = LOCAL")
        if marker < 0:
            return "its header is incomplete"
        header_len = head.index(b"\n", marker) + 1
        fields = dict(ln.split(b" = ", 1) for ln in head[:header_len].splitlines() if b" = " in ln)
        compressed = fields.get(b"CompressedData", b"False").strip() == b"True"
        expected = header_len + (int(fields.get(b"CompressedDataSize", b"0")) if compressed else data_bytes)
        if size < expected:
            return f"it holds {size} bytes, its header promises {expected}"
    return None


@contextlib.contextmanager
def _c_stderr_hidden() -> Iterator[None]:
    """Hide what C libraries print on file descriptor 2 meanwhile (the NIfTI library's own
    '** ERROR: NWAD: wrote only 0 of ... bytes' on a full disk): the write is checked and reported
    in one line by the caller. Left alone where fd 2 cannot be redirected."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[Callable[[], bool]]:
    """Hold SIGINT and SIGTERM while a group of renames (or their undo) runs, so that it is not
    cut in half. Yields ``signalled()``; the held signals go to their previous handlers when the
    block ends (a Python handler is called then and there: Ctrl-C raises KeyboardInterrupt out
    of the block; the default SIGTERM action ends the process after the block). Only in the
    main thread (elsewhere Python handles no signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    held: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler in (signal.SIG_IGN, None):
            continue
        previous[sig] = handler
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield lambda: bool(held)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)  # KeyboardInterrupt for Ctrl-C under Python's default handler
            else:  # SIG_DFL: the default action (ends the process)
                signal.raise_signal(sig)


def extension_of(name: str) -> str:
    """Lower-case extension, keeping a compression suffix: 'a.nii.gz' → '.nii.gz', 'b.csv' → '.csv'."""
    lower = name.lower()
    suffixes = Path(lower).suffixes
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""
