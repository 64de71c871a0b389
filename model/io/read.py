"""`read_volume`: a path to its reader (NIfTI, NRRD and MetaImage through SimpleITK, DICOM files
and series folders), with the checks that turn a bad input into a one-line InputError.
"""

from __future__ import annotations

import os
from pathlib import Path

import SimpleITK as sitk

from ..errors import ITK_ASCII_ONLY, InputError, itk_cannot_name, not_utf8, why_unnamed
from .dicom import read_dicom_file, read_dicom_folder
from .formats import DICOM_EXTENSIONS, extension_of, file_kind, has_dicom_preamble, INPUT_EXTENSIONS, INPUT_FORMATS, starts_with
from .itk import detail, itk_quiet
from .nifti import apply_nifti_geometry, check_nifti_complete, check_nifti_finite, read_sheared_nifti
from .volume import Volume


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
    if not_utf8(p):
        raise InputError(p, f"its name is {why_unnamed([p])}, which the image readers cannot open; rename it")
    if itk_cannot_name(p.absolute()):
        raise InputError(p, f"its path {ITK_ASCII_ONLY}")
    if not p.exists():
        if p.is_symlink():
            raise InputError(p, f"is a symbolic link to {os.readlink(p)}, which does not exist")
        raise InputError(p, "does not exist")
    if p.is_dir():
        return _checked_spacing(read_dicom_folder(p, series, allow_gaps), p)
    if not p.is_file():  # a FIFO would block the readers for ever, a device is not an image
        raise InputError(p, f"is {file_kind(p)}, not a regular file; give an image file or a DICOM folder")
    ext = extension_of(p.name)
    if ext in INPUT_EXTENSIONS:
        return _checked_spacing(_read_itk_file(p, INPUT_EXTENSIONS[ext]), p)
    if ext in DICOM_EXTENSIONS or has_dicom_preamble(p):
        volume = _checked_spacing(read_dicom_file(p, allow_gaps=allow_gaps), p)
        if series is not None:
            volume.metadata.setdefault("warnings", []).append(
                f"{p}: a series ({series!r}) is chosen in a folder of DICOM files; this is one file, read as it is")
        return volume
    raise InputError(p, f"not a supported format; use {INPUT_FORMATS}")


MAX_VOXEL_MM = 1000.0  # no scanner's voxel is a metre across: a larger one is a corrupt header


def _checked_spacing(volume: Volume, p: Path) -> Volume:
    """`volume`, unless a voxel size is absurd (sizes and volumes would be too: 1e30 mm gave a
    92-digit number of mL)."""
    for axis, mm in zip("xyz", volume.spacing_mm):
        if not mm <= MAX_VOXEL_MM:
            raise InputError(p, f"its voxel size along {axis} is {mm:g} mm; no scan has voxels over "
                                f"{MAX_VOXEL_MM:g} mm: the header is corrupt")
    return volume


def _read_itk_file(p: Path, format_name: str) -> Volume:
    if format_name == "NIfTI" and extension_of(p.name) == ".nii" and starts_with(p, b"\x1f\x8b"):
        raise InputError(p, "is gzip-compressed but named .nii; rename it to .nii.gz")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with itk_quiet() as printed:
            reader.ReadImageInformation()
    except RuntimeError as exc:
        if "orthonormal direction cosines" in str(exc) and format_name == "NIfTI":  # a sheared sform, no qform
            check_nifti_complete(p)
            check_nifti_finite(p)
            return read_sheared_nifti(p)
        if "orthonormal direction cosines" in str(exc):  # a valid file, a geometry ITK cannot hold
            raise InputError(p, "its orientation matrix is sheared (not a rotation and voxel sizes), which ITK "
                                "cannot read; resample it onto an orthonormal grid first") from None
        raise InputError(p, f"cannot be read as {format_name}: not a valid {format_name} file or corrupt"
                            f"{detail(exc, printed)}") from None
    components = reader.GetNumberOfComponents()
    if reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(p, "has complex-valued voxels (raw k-space or phase data?); a real-valued greyscale volume "
                            "is needed")
    if components > 1:  # checked before loading the pixels
        raise InputError(p, f"has {components} components per voxel (RGB or a vector image?); a greyscale volume "
                            "is needed")
    size = reader.GetSize()
    if len(size) >= 4 and any(s > 1 for s in size[3:]):
        extra = " x ".join(str(s) for s in size[3:])
        what = f"{size[3]} volumes, a time series?" if len(size) == 4 else f"{extra} beyond x, y, z: a vector image?"
        raise InputError(p, f"is {len(size)}D ({what}); a single 3D volume is needed")
    if format_name == "NIfTI":
        check_nifti_complete(p)  # ITK silently reads truncated NIfTI files as zeros
        check_nifti_finite(p)  # ... and NaN voxels as zeros
    missing = _missing_data_file(p)
    if missing:
        raise InputError(p, f"its data file {missing} is missing (a .mhd/.nhdr header needs it beside it)")
    try:
        with itk_quiet() as printed:
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(p, f"cannot be read: corrupt or truncated {format_name} file"
                            f"{detail(exc, printed)}") from None
    volume = Volume.from_sitk(image, path=p)
    if format_name == "NIfTI":
        volume = apply_nifti_geometry(volume, p)
    if format_name == "NRRD" and not reader.HasMetaDataKey("NRRD_space"):
        volume.metadata["orientation_unknown"] = True
        volume.metadata.setdefault("warnings", []).append(
            f"{p}: says nothing of how it lies in the patient (no 'space' field); {volume.assumed_orientation()}")
    return volume


def _missing_data_file(p: Path) -> str | None:
    """For a detached header (.mhd, .nhdr), the name of its data file when that file is absent."""
    keys = {".mhd": "elementdatafile", ".nhdr": "data file"}
    key = keys.get(extension_of(p.name))
    if key is None:
        return None
    try:
        with open(p, "r", encoding="utf-8", errors="replace") as f:
            header = f.read(65536)
    except OSError:
        return None
    for line in header.splitlines():
        name, sep, value = line.partition("=" if key == "elementdatafile" else ":")
        value = value.strip()
        if sep and name.strip().lower() == key and value and value.upper() not in ("LOCAL", "LIST") and " " not in value:
            return None if (p.parent / value).exists() else value
    return None
