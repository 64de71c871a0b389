"""Reading and writing image volumes with their geometry.

A :class:`Volume` is a numpy array in **(z, y, x)** order plus the ITK/DICOM geometry that places
it in the patient: ``spacing_mm`` and ``origin_mm`` in **(x, y, z)** order, LPS world coordinates,
and the 3×3 ITK ``direction`` matrix whose columns are the image axes x, y, z in world
coordinates. A voxel with index (i=x, j=y, k=z) sits at::

    world_lps_mm = origin_mm + direction @ (spacing_mm * (i, j, k))

Readers: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) through SimpleITK,
DICOM series folders (SimpleITK/GDCM; Rescale Slope/Intercept are applied so CT comes out in
Hounsfield units) and single DICOM files. Writers: .nii.gz, .nii, .nrrd, .mha, always atomically
(temporary file in the same folder, then rename).

Everything a user can get wrong raises :class:`~boltzformer.errors.InputError` or
:class:`~boltzformer.errors.OutputError` with a one-line ``"<path>: <problem>"`` message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError

__all__ = [
    "Volume",
    "SeriesInfo",
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
        header = nib.load(str(p)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
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

    Geometry (shape, spacing, origin, direction) is preserved exactly; a volume read from a 2D
    file is written as a 2D image. NRRD and MetaImage are zlib-compressed.

    Raises:
        OutputError: unsupported extension, existing file without ``overwrite``, missing or
            read-only folder, or a write failure (no partial file is left behind).
    """
    p = Path(os.fspath(path))
    ext = _extension(p.name)
    if ext not in OUTPUT_EXTENSIONS:
        raise OutputError(p, f"unsupported output format; use one of {', '.join(OUTPUT_EXTENSIONS)}")
    image = volume.to_sitk()
    with atomic_output(p, overwrite=overwrite) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=ext in (".nrrd", ".mha"))
        except RuntimeError as exc:
            raise OutputError(p, f"could not be written{_detail(exc)}") from None
    return p


def check_output_path(path, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written; returns it as a Path.

    Raises OutputError when it exists (and ``overwrite`` is False), is a folder, or its folder
    is missing or not writable.
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
    if p.exists() and not overwrite:
        raise OutputError(p, "exists; pass --overwrite to replace it")
    return p


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = False) -> Iterator[Path]:
    """Context manager for writing ``path`` atomically.

    Yields a temporary path in the same folder, ``.<name>.tmp-<random><extension>`` (same
    extension, so writers that choose the format by extension still work). When the block ends
    normally the temporary file replaces ``path`` with ``os.replace``; on any exception
    (KeyboardInterrupt included) it is deleted and the exception propagates. OSErrors become
    OutputError. Example::

        with atomic_output("lesions.csv") as tmp:
            tmp.write_text(text)
    """
    p = check_output_path(path, overwrite)
    tmp = p.parent / f".{p.name}.tmp-{secrets.token_hex(4)}{_extension(p.name)}"
    try:
        try:
            yield tmp
            if not tmp.exists():
                raise OutputError(p, "nothing was written")
            os.replace(tmp, p)
        except OSError as exc:
            raise OutputError(p, f"could not be written ({exc.strerror or exc})") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _extension(name: str) -> str:
    """Lower-case extension, keeping a compression suffix: 'a.nii.gz' → '.nii.gz', 'b.csv' → '.csv'."""
    lower = name.lower()
    suffixes = Path(lower).suffixes
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""
