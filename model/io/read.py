"""`read_volume`: a path to its reader (NIfTI, NRRD and MetaImage through SimpleITK, DICOM files
and series folders), with the checks that turn a bad input into a one-line InputError.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import ITK_ASCII_ONLY, InputError, itk_cannot_name, not_utf8, why_unnamed, windows_path_too_long
from .dicom import read_dicom_file, read_dicom_folder
from .formats import DICOM_EXTENSIONS, extension_of, file_kind, has_dicom_preamble, INPUT_EXTENSIONS, INPUT_FORMATS, starts_with
from .itk import detail, itk_quiet
from .nifti import (GzipCheck, apply_nifti_geometry, check_nifti_complete, check_nifti_finite, load_nifti,
                    nifti_version, read_nifti_by_nibabel)
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
    if (too_long := windows_path_too_long(p.absolute())):
        raise InputError(p, too_long)
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
MIN_VOXEL_MM = 0.001  # nor under a micrometre (micro-CT: about 0.01 mm): a header in metres or scaled


def _checked_spacing(volume: Volume, p: Path) -> Volume:
    """`volume`, unless a voxel size is absurd (sizes and volumes would be too: 1e30 mm gave a
    92-digit number of mL; 1e-6 of the sample's made every lesion vanish under the size filter)."""
    for axis, mm in zip("xyz", volume.spacing_mm):
        if not mm <= MAX_VOXEL_MM:
            raise InputError(p, f"its voxel size along {axis} is {mm:g} mm; no scan has voxels over "
                                f"{MAX_VOXEL_MM:g} mm: the header is corrupt")
        if mm < MIN_VOXEL_MM:
            raise InputError(p, f"its voxel size along {axis} is {mm:g} mm; no scan of a patient has voxels under "
                                f"{MIN_VOXEL_MM:g} mm: the header is corrupt or in other units than mm")
    return volume


def _read_itk_file(p: Path, format_name: str) -> Volume:
    if format_name == "NIfTI" and extension_of(p.name) == ".nii" and starts_with(p, b"\x1f\x8b"):
        raise InputError(p, "is gzip-compressed but named .nii; rename it to .nii.gz")
    if format_name == "NRRD":
        _check_nrrd_dimension(p)  # SimpleITK crashes the process (segfault) on dimension 11 and more
    problem = _data_file_problem(p)  # before ITK opens anything: NRRD's reader opens the data file at once
    if problem:
        raise InputError(p, problem)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with itk_quiet() as printed:
            reader.ReadImageInformation()
    except RuntimeError as exc:
        if format_name == "NIfTI" and ("orthonormal direction cosines" in str(exc)  # a sheared sform, no qform
                                       or nifti_version(p) == 2):
            return _read_by_nibabel(p)
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
    _check_memory_for(p, size, reader.GetPixelID())
    if format_name == "NIfTI":
        check_nifti_complete(p)  # ITK silently reads truncated NIfTI files as zeros
        check_nifti_finite(p)  # ... and NaN voxels as zeros
    gzip_check = GzipCheck(p) if format_name == "NIfTI" and p.name.lower().endswith(".gz") else None
    try:
        with itk_quiet(echo=False) as printed:
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(p, f"cannot be read: corrupt or truncated {format_name} file"
                            f"{detail(exc, printed)}") from None
    finally:
        intact = gzip_check.intact() if gzip_check is not None else True
    if not intact:  # ITK reads a damaged deflate stream or a wrong CRC as garbage or zeros, without a word
        raise InputError(p, GZIP_DAMAGED)
    if "Uncompress failed" in printed.text:  # MetaIO prints it, and returns what it inflated
        raise InputError(p, "is corrupt: its compressed data cannot be inflated (a damaged copy or download)")
    printed.echo()
    n = image.GetDimension()
    direction = np.asarray(image.GetDirection(), float).reshape(n, n)
    if format_name != "NIfTI" and np.isfinite(direction).all() and not np.allclose(direction.T @ direction, np.eye(n),
                                                                                   atol=1e-3):
        raise InputError(p, "its orientation matrix is sheared (not a rotation and voxel sizes); resample it onto "
                            "an orthonormal grid first")  # ITK keeps NRRD/MetaImage shear: masks would be misplaced
    try:
        volume = Volume.from_sitk(image, path=p)
        if format_name == "NIfTI":
            volume = apply_nifti_geometry(volume, p)
    except ValueError as exc:  # NaN or infinite origin, spacing or direction in the header
        raise InputError(p, f"its geometry is invalid ({exc}); the header is corrupt") from None
    if format_name == "NRRD" and not reader.HasMetaDataKey("NRRD_space"):
        volume.metadata["orientation_unknown"] = True
        volume.metadata.setdefault("warnings", []).append(
            f"{p}: says nothing of how it lies in the patient (no 'space' field); {volume.assumed_orientation()}")
    return volume


def _data_file_problem(p: Path) -> str | None:
    """For a detached header (.mhd, .nhdr): what is wrong with its data files (one file, a LIST of
    them, or a numbered pattern "slice%03d.raw 1 40 1"), or None. A FIFO or a device (/dev/zero)
    as data would block the reader for ever or fill the memory."""
    keys = {".mhd": "elementdatafile", ".nhdr": "data file"}
    key = keys.get(extension_of(p.name))
    if key is None:
        return None
    try:
        with open(p, "r", encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 22).splitlines()
    except OSError:
        return None
    for i, line in enumerate(lines):
        name, sep, value = line.partition("=" if key == "elementdatafile" else ":")
        value = value.strip()
        name = name.strip().lower().replace("datafile", "data file") if key == "data file" else name.strip().lower()
        if not (sep and name == key and value) or value.upper() == "LOCAL":
            continue
        parts = value.split()
        if parts[0].upper() == "LIST":
            files = [f.strip() for f in lines[i + 1:] if f.strip()]
        elif len(parts) >= 4 and "%" in parts[0]:
            try:
                start, stop, step = int(parts[1]), int(parts[2]), int(parts[3]) or 1
                numbers = range(start, stop + (1 if step > 0 else -1), step)
                files = [parts[0] % k for k in itertools.islice(numbers, 100_000)]  # a hostile range stays short
            except (ValueError, TypeError):
                return None  # ITK says what is wrong with it
        else:
            files = [value]
        for data in files:
            full = p.parent / data
            if not full.exists():
                return f"its data file {data} is missing (a .mhd/.nhdr header needs it beside it)"
            if not full.is_file():
                return f"its data file {data} is {file_kind(full)}, not a regular file; give a file"
        return None
    return None


def _check_nrrd_dimension(p: Path) -> None:
    """InputError for an NRRD header whose 'dimension' is over 4 (SimpleITK crashes the whole
    process on 11 and more; this project reads 2D and 3D volumes, 4D with one time point)."""
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16).split(b"\n\n", 1)[0].decode("latin-1")
    except OSError:
        return
    for line in head.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "dimension":
            try:
                n = int(value.strip())
            except ValueError:
                raise InputError(p, f"its NRRD dimension {value.strip()!r} is not a number; the header is "
                                    "corrupt") from None
            if not 1 <= n <= 4:
                raise InputError(p, f"is an NRRD of dimension {n}; a 2D or 3D volume is needed")
            return


GZIP_DAMAGED = "is corrupt: its gzip data fail their checksum (a damaged copy or download)"


def _read_by_nibabel(p: Path) -> Volume:
    """`read_nifti_by_nibabel` with the checks ITK's path has: free memory, completeness, finite
    voxels and the gzip checksums (nibabel too reads a damaged deflate stream as data)."""
    try:
        header = load_nifti(p).header
        _check_memory_bytes(p, header.get_data_shape(), np.dtype(header.get_data_dtype()).itemsize)
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - an unreadable header: read_nifti_by_nibabel says so
        pass
    check_nifti_complete(p)
    check_nifti_finite(p)
    gzip_check = GzipCheck(p) if p.name.lower().endswith(".gz") else None
    try:
        volume = read_nifti_by_nibabel(p)
    finally:
        intact = gzip_check.intact() if gzip_check is not None else True
    if not intact:
        raise InputError(p, GZIP_DAMAGED)
    return volume


def _check_memory_for(p: Path, size: tuple[int, ...], pixel_id: int) -> None:
    """`_check_memory_bytes` for an ITK pixel type."""
    bits = re.match(r"(\d+)-bit", sitk.GetPixelIDValueAsString(pixel_id))  # "16-bit signed integer"
    _check_memory_bytes(p, size, int(bits.group(1)) // 8 if bits else 4)


def _check_memory_bytes(p: Path, size: tuple[int, ...], bytes_per_voxel: int) -> None:
    """InputError when reading the image would need more memory than the machine has free (the
    reader and the array it is copied into: about twice its unpacked size); a corrupt or hostile
    header claiming 2048 x 2048 x 1024 voxels otherwise ran until the memory ran out."""
    voxels = int(np.prod([max(int(s), 1) for s in size], dtype=np.float64))
    bytes_needed = 2 * voxels * bytes_per_voxel
    free = available_memory_bytes()
    if free is not None and bytes_needed > free:
        shape = " x ".join(str(int(s)) for s in size)
        raise InputError(p, f"its header gives {shape} voxels: reading it needs about {bytes_needed / 2**30:.1f} GB, "
                            f"and {free / 2**30:.1f} GB of memory are free; crop it (or use a larger machine)")


def available_memory_bytes() -> int | None:
    """Memory the process can still take (psutil's 'available', else /proc/meminfo), or None."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
