"""Reading and writing image volumes with their geometry.

A :class:`Volume` is a numpy array in **(z, y, x)** order plus the ITK/DICOM geometry that places
it in the patient: ``spacing_mm`` and ``origin_mm`` in **(x, y, z)** order, LPS world coordinates,
and the 3×3 ITK ``direction`` matrix whose columns are the image axes x, y, z in world
coordinates. A voxel with index (i=x, j=y, k=z) sits at::

    world_lps_mm = origin_mm + direction @ (spacing_mm * (i, j, k))

Readers: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) through SimpleITK,
DICOM series folders (SimpleITK/GDCM; Rescale Slope/Intercept are applied so CT comes out in
Hounsfield units) and single DICOM files.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError

__all__ = [
    "Volume",
    "SeriesInfo",
    "OutputSet",
    "read_volume",
    "write_volume",
    "list_dicom_series",
    "check_output_path",
    "atomic_output",
    "INPUT_FORMATS",
    "OUTPUT_EXTENSIONS",
]

INPUT_FORMATS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), "
    "a DICOM series folder or a single DICOM file (.dcm)"
)
_ITK_EXTENSIONS = {
    ".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage",
}
_DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
OUTPUT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

# DICOM tags copied into Volume.metadata (no patient identifiers).
_DICOM_TAGS = (
    "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "StudyInstanceUID",
    "StudyDescription", "BodyPartExamined", "Manufacturer", "ManufacturerModelName",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "SliceThickness", "ConvolutionKernel",
    "MagneticFieldStrength", "SequenceName", "PhotometricInterpretation",
)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


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
        again. Boolean arrays are stored as uint8, float16 as float32.
        """
        array = self.array
        if array.dtype == bool:
            array = array.astype(np.uint8)
        elif array.dtype == np.float16:
            array = array.astype(np.float32)
        if self.metadata.get("ndim") == 2 and array.shape[0] == 1:
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


def read_volume(path, series: str | int | None = None) -> Volume:
    """Read an image file or a DICOM folder into a :class:`Volume`.

    Args:
        path: NIfTI, NRRD, MetaImage or DICOM file, or a folder holding DICOM series.
        series: for a DICOM folder with several series: a 0-based index into
            :func:`list_dicom_series`, a SeriesInstanceUID, or a case-insensitive part of the
            series description. Default: the largest series (explained in
            ``metadata["series_note"]``).

    Raises:
        InputError: missing path, unsupported or corrupt file, no or unknown DICOM series,
            4D or RGB data, NaN/Inf voxels.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise InputError(p, "does not exist")
    if p.is_dir():
        return _read_dicom_folder(p, series)
    ext = _extension(p.name)
    if ext in _ITK_EXTENSIONS:
        return _read_itk_file(p, _ITK_EXTENSIONS[ext])
    if ext in _DICOM_EXTENSIONS or _has_dicom_preamble(p):
        return _read_dicom_file(p)
    raise InputError(p, f"not a supported format; use {INPUT_FORMATS}")


def list_dicom_series(folder) -> list[SeriesInfo]:
    """The DICOM series directly inside ``folder`` (not sub-folders), by series number then UID.

    Files of each series are sorted along the slice normal (GDCM's order).
    """
    folder = os.fspath(folder)
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


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Silence ITK's own warnings (e.g. 'Non uniform sampling'): these readers check and report."""
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)


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


def _read_itk_file(p: Path, format_name: str) -> Volume:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
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
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(p, f"cannot be read: corrupt or truncated {format_name} file"
                            f"{_detail(exc)}") from None
    return Volume.from_sitk(image, path=p)


def _read_dicom_file(p: Path) -> Volume:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(p))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(p, f"cannot be read as DICOM: not a DICOM image or corrupt{_detail(exc)}") from None
    tags = _dicom_tags(str(p))
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image = image[:, :, 0]  # a single slice: treat as the 2D image it is
    return Volume.from_sitk(image, path=p, modality=_modality_of(tags.get("Modality")), metadata=tags)


def _read_dicom_folder(folder: Path, series: str | int | None) -> Volume:
    infos = list_dicom_series(folder)
    if not infos:
        problem = "contains no DICOM series"
        subfolders = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if subfolders:
            names = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
            problem += f"; it has sub-folders ({names}): point to the folder that holds the DICOM files"
        raise InputError(folder, problem)
    note = None
    if series is None:
        chosen = max(infos, key=lambda s: s.n_files)  # first of the largest
        if len(infos) > 1:
            listing = ", ".join(s.label(i) for i, s in enumerate(infos))
            note = (f"Found {len(infos)} DICOM series; read the largest, {chosen.label(infos.index(chosen))}. "
                    f"Choose another with --series (index, UID or part of the description): {listing}.")
    else:
        chosen = _select_series(folder, infos, series)
    if len(chosen.files) == 1:
        volume = _read_dicom_file(Path(chosen.files[0]))
        volume.path = os.fspath(folder)
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(chosen.files))
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(folder, f"DICOM series {chosen.label(infos.index(chosen))} cannot be read"
                                     f"{_detail(exc)}") from None
        tags = _dicom_tags(chosen.files[0])
        volume = Volume.from_sitk(image, path=folder, modality=_modality_of(tags.get("Modality")), metadata=tags)
    volume.metadata["n_series"] = len(infos)
    if note:
        volume.metadata["series_note"] = note
    return volume


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


def _has_dicom_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _missing_data_file(p: Path) -> str | None:
    """For a detached header (.mhd, .nhdr), the name of its data file when that file is absent."""
    keys = {".mhd": "elementdatafile", ".nhdr": "data file"}
    key = keys.get(_extension(p.name))
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
            ext = _extension(p.name)
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
        ext = _extension(out.path.name)
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
        out.tmp = out.path.parent / f".{out.path.name}.tmp-{secrets.token_hex(4)}{_extension(out.path.name)}"
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
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def _extension(name: str) -> str:
    """Lower-case extension, keeping a compression suffix: 'a.nii.gz' → '.nii.gz', 'b.csv' → '.csv'."""
    lower = name.lower()
    suffixes = Path(lower).suffixes
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""
