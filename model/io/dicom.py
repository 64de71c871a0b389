"""DICOM: series in a folder (`list_dicom_series`, `SeriesInfo`), single files, and the slice
positions of a series checked along the slice normal (gaps, uneven steps, duplicates, odd or
unreadable files are errors unless ``allow_gaps`` resamples onto a uniform grid). Rescale
Slope/Intercept are applied, so CT comes out in Hounsfield units.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, SliceSpacingError
from .formats import DICOM_EXTENSIONS, has_dicom_preamble, refuse_special_files
from .itk import detail, itk_quiet
from .volume import Volume


# DICOM tags copied into Volume.metadata (no patient identifiers).
_DICOM_TAGS = (
    "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "StudyInstanceUID",
    "StudyDescription", "BodyPartExamined", "Manufacturer", "ManufacturerModelName",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "SliceThickness", "ConvolutionKernel",
    "MagneticFieldStrength", "SequenceName", "PhotometricInterpretation",
)


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


def list_dicom_series(folder) -> list[SeriesInfo]:
    """The DICOM series directly inside ``folder`` (not sub-folders), by series number then UID.

    Files of each series are sorted along the slice normal (GDCM's order). A folder holding a
    FIFO, socket or device is refused (GDCM would block opening it).
    """
    folder = os.fspath(folder)
    refuse_special_files(Path(folder))
    try:
        with itk_quiet() as printed:  # "No Series were found" is reported by us
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    except RuntimeError as exc:
        raise InputError(folder, f"cannot be scanned for DICOM files{detail(exc, printed)}") from None
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




def read_dicom_file(p: Path, context: str = "") -> Volume:
    """One DICOM file (one slice, or a multi-frame image) with its position in 3D.

    A single slice keeps its z position and gets the slice thickness (Spacing Between Slices,
    else Slice Thickness) as its z voxel size, so a mask written from it lies where the slice is.
    """
    _slice_header(str(p), context)  # truncated pixel data: GDCM would read zeros or garbage
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(p))
    try:
        with itk_quiet() as printed:
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(p, f"cannot be read as DICOM: not a DICOM image or corrupt{detail(exc, printed)}") from None
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


def read_dicom_folder(folder: Path, series: str | int | None, allow_gaps: bool = False) -> Volume:
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
        volume = read_dicom_file(Path(chosen.files[0]), f"; it is DICOM series {label} in {folder}")
        volume.path = os.fspath(folder)
    else:
        headers = [_slice_header(f, f"; it is a slice of DICOM series {label} in {folder}") for f in chosen.files]
        plan = _plan_slices(headers, folder, label, allow_gaps)
        warnings += plan.warnings
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(plan.files))
        try:
            with itk_quiet() as printed:  # "Non uniform sampling": checked (and reported) by _plan_slices
                image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(folder, f"DICOM series {label} cannot be read{detail(exc, printed)}") from None
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
