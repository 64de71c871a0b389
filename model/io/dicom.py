"""DICOM: series in a folder (`list_dicom_series`, `SeriesInfo`), single files, and the slice
positions of a series checked along the slice normal (gaps, uneven steps, duplicates, odd or
unreadable files are errors unless ``allow_gaps`` resamples onto a uniform grid). Rescale
Slope/Intercept are applied, so CT comes out in Hounsfield units.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, SliceSpacingError, not_utf8, shown_path, why_unnamed
from .formats import DICOM_EXTENSIONS, has_dicom_preamble, refuse_special_files
from .itk import detail, itk_quiet
from .tilt import as_dtype, straighten, straightened_note
from .volume import Volume


# DICOM tags copied into Volume.metadata (no patient identifiers).
_DICOM_TAGS = (
    "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "StudyInstanceUID",
    "StudyDescription", "BodyPartExamined", "Manufacturer", "ManufacturerModelName",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "SliceThickness", "ConvolutionKernel",
    "MagneticFieldStrength", "SequenceName", "PhotometricInterpretation", "ImageType", "NumberOfFrames",
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
    n_images: int = 0  # slices: frames of multi-frame files counted (0: as n_files)
    localizer: bool = False  # its first image is a localizer (scout, topogram)

    @property
    def images(self) -> int:
        return self.n_images or self.n_files

    def label(self, index: int) -> str:
        """Short human description, e.g. ``[0] #3 'Axial 1mm' (120 files, CT)``: the index
        `--series` takes, then the DICOM SeriesNumber."""
        number = f" #{self.series_number}" if self.series_number is not None else ""
        size = (f"{self.images} images in {self.n_files} file{'s' if self.n_files > 1 else ''}"
                if self.images != self.n_files else f"{self.n_files} files")
        scout = ", localizer" if self.localizer else ""
        return f"[{index}]{number} {self.description or '(no description)'!r} ({size}, {self.modality or '?'}{scout})"


def list_dicom_series(folder) -> list[SeriesInfo]:
    """The DICOM series directly inside ``folder`` (not sub-folders), by series number then UID.

    Files of each series are sorted along the slice normal (else by InstanceNumber, else by
    name). A folder holding a FIFO, socket or device is refused (opening one would block).
    """
    folder = os.fspath(folder)
    refuse_special_files(Path(folder))
    global _last_scan
    key, (last_key, last_infos) = _folder_state(folder), _last_scan
    if key is not None and key == last_key:  # the same files as the last scan (napari's stack reader
        return list(last_infos)              # scans the folder, then reads it)
    infos = _scan_series(folder)
    _last_scan = (key, tuple(infos))
    return infos


_last_scan: tuple = (None, ())  # (folder state, its series) of the last scan: one entry, swapped whole


def _folder_state(folder: str):
    """What a scan of `folder` depends on: its path and every entry's name, size and change time
    (ns), or None when it cannot be listed (then it is scanned, and the scan says why)."""
    try:
        with os.scandir(folder) as entries:
            files = frozenset((e.name, e.stat().st_size, e.stat().st_mtime_ns, e.stat().st_ctime_ns) for e in entries)
        return os.path.realpath(folder), files
    except OSError:
        return None


def _scan_series(folder: str) -> list[SeriesInfo]:
    """The series of `folder` (list_dicom_series without the cache), each file's header read by
    pydicom. GDCM's own folder scan is not used: a file with thousands of nested sequences crashes
    the process there (a segfault, not an error), and it re-read the folder once per series. Only
    files that pydicom could read reach GDCM."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as exc:
        raise InputError(folder, f"cannot be scanned for DICOM files ({exc.strerror or exc})") from None
    members: dict[str, list] = {}
    for entry in entries:
        if entry.name.startswith("._") or not _regular(entry):  # ._name: macOS's resource-fork copy
            continue
        ds = _scanned_header(entry.path)
        if ds is not None:
            members.setdefault(str(ds.get("SeriesInstanceUID") or "").strip(), []).append((entry.path, ds))
    infos = []
    for uid, found in members.items():
        files = _stacking_order(found)
        ds = dict(found)[files[0]]
        tags = _tags_of(ds)
        number, frames = tags.get("SeriesNumber"), tags.get("NumberOfFrames")
        infos.append(SeriesInfo(
            uid=uid,
            description=str(tags.get("SeriesDescription", "")),
            n_files=len(files),
            modality=tags.get("Modality"),
            series_number=int(number) if isinstance(number, (int, float)) else None,
            files=tuple(files),
            n_images=len(files) * int(frames) if isinstance(frames, (int, float)) and frames > 1 else 0,
            localizer="LOCALIZER" in _image_type(tags.get("ImageType")),
        ))
    infos.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.uid))
    return infos


def _scanned_header(path: str):
    """The header (pixels not loaded) of a DICOM image file, or None: not DICOM, unreadable (told
    apart later by `_unreadable_dicom_files`), or a DICOM object that holds no image (DICOMDIR,
    a report). A file without the preamble is tried when it begins as a DICOM data set does."""
    try:
        with open(path, "rb") as f:
            start = f.read(132)
    except OSError:
        return None
    if start[128:132] != b"DICM" and start[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x08"):  # group 0002
        return None                                                                   # or 0008 (either byte order)
    try:
        ds = _read_loosely(path)
    except Exception:  # noqa: BLE001 - RecursionError included: not part of any series
        return None
    if "Rows" not in ds or not _holds_image(ds):
        return None
    return ds


def _stacking_order(found: list[tuple[str, object]]) -> list[str]:
    """The files of one series in the order GDCM stacks them: along the first slice's normal when
    every file has ImagePositionPatient and ImageOrientationPatient, else by InstanceNumber when
    every file has one, else by file name (`_plan_slices` checks and re-sorts placed slices)."""
    placed = [(_floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6))
              for _, ds in found]
    if all(p is not None and o is not None for p, o in placed):
        normal = np.cross(placed[0][1][:3], placed[0][1][3:])
        keys = [float(p @ normal) for p, _ in placed]
    else:
        numbers = [_floats([ds.get("InstanceNumber")], 1) for _, ds in found]
        keys = [float(n[0]) for n in numbers] if all(n is not None for n in numbers) else [0.0] * len(found)
    order = sorted(range(len(found)), key=lambda i: (keys[i], os.path.basename(found[i][0])))
    return [found[i][0] for i in order]


def read_dicom_file(p: Path, context: str = "", allow_gaps: bool = False) -> Volume:
    """One DICOM file (one slice, or a multi-frame image) with its position in 3D.

    A single slice keeps its z position and gets the slice thickness (Spacing Between Slices,
    else Slice Thickness) as its z voxel size, so a mask written from it lies where the slice is.
    The frames of an enhanced multi-frame image are checked as a series' slices are (order,
    gaps, duplicates, echoes, shear; see `_plan_slices`) from their per-frame positions.
    """
    header, ds = _read_header(str(p), context)  # truncated pixel data: GDCM would read zeros or garbage
    if not header.holds_image:
        raise InputError(p, f"is a DICOM object that holds no image (a report or presentation state?){context}")
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(p))
    try:
        with itk_quiet() as printed:
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(p, f"cannot be read as DICOM: not a DICOM image or corrupt{detail(exc, printed)}") from None
    image = _as_stack(image, header, int(ds.get("NumberOfFrames") or 1), p)
    tags = _tags_of(ds)  # the header read once serves the checks, the tags and the frames
    volume = Volume.from_sitk(image, path=p, modality=_modality_of(tags.get("Modality")), metadata=tags)
    frames = _frame_headers(ds, p.name, header)
    if frames is not None and len(frames) == volume.shape[0]:
        plan = _plan_slices(frames, p, f"multi-frame image {p.name}", allow_gaps)
        order = [int(label.rsplit(" ", 1)[1]) - 1 for label in plan.files]
        volume = _apply_plan(volume.with_array(np.ascontiguousarray(volume.array[order])), plan)
        notes = plan.warnings
    elif volume.shape[0] == 1:
        notes = _single_slice_geometry(volume, header, p)
    else:
        notes = []
    if notes:
        volume.metadata.setdefault("warnings", []).extend(notes)
    return volume


def _single_slice_geometry(volume: Volume, header: _SliceHeader, p: Path) -> list[str]:
    """One slice: its thickness as z size, and the pixel size and orientation from its header
    (what ITK would have taken for 1 mm or the identity); returns warnings."""
    notes = []
    if header.thickness_mm:
        volume.spacing_mm = (*volume.spacing_mm[:2], header.thickness_mm)
    spacing_xy, said = _pixel_spacing([header], p, f"DICOM file {p.name}")
    if spacing_xy is not None:
        volume.spacing_mm = (*spacing_xy, volume.spacing_mm[2])
    if header.orientation is not None:
        volume.direction, turned = _orthonormal_direction(header.orientation, p, f"DICOM file {p.name}")
        notes.append(turned)
    if header.position is not None:
        volume.origin_mm = tuple(float(v) for v in header.position)
    missing = [name for name, value in (("ImagePositionPatient", header.position),
                                        ("ImageOrientationPatient", header.orientation)) if value is None]
    if missing:  # ITK's defaults stand in: the mask lines up with this file only, not with the patient
        notes.append(f"no {' or '.join(missing)}: placed at the origin, axial, as ITK does; a mask written "
                     "from it lines up with this file but not with the rest of the patient's study")
    return [f"{p}: {n}" for n in (said, *notes) if n]


def _frame_headers(ds, name: str, header: _SliceHeader) -> list[_SliceHeader] | None:
    """One _SliceHeader per frame of an enhanced multi-frame image (labelled '<name> frame k',
    k from 1), from its per-frame and shared functional groups of its dataset `ds`; None for
    other files."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n = int(ds.get("NumberOfFrames") or 1)
    if n < 2 or per_frame is None or len(per_frame) != n:
        return None
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]

    def find(frame, sequence: str, name: str):
        for group in (frame, shared):
            items = group.get(sequence) if group is not None else None
            if items and items[0].get(name) not in (None, ""):
                return items[0].get(name)
        return None

    headers = []
    for k, frame in enumerate(per_frame, start=1):
        spacing = _floats(find(frame, "PixelMeasuresSequence", "PixelSpacing"), 2)
        thickness = _floats([find(frame, "PixelMeasuresSequence", "SpacingBetweenSlices")
                             or find(frame, "PixelMeasuresSequence", "SliceThickness") or 0], 1)
        echo = _floats([find(frame, "MREchoSequence", "EffectiveEchoTime") or "nan"], 1)
        headers.append(_SliceHeader(
            f"{name} frame {k}", header.rows, header.columns,
            _floats(find(frame, "PlanePositionSequence", "ImagePositionPatient"), 3),
            _floats(find(frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            None if spacing is None else tuple(spacing), header.image_type,
            None if echo is None else float(echo[0]), None,
            float(thickness[0]) if thickness is not None and thickness[0] > 0 else header.thickness_mm))
    return headers


def read_dicom_folder(folder: Path, series: str | int | None, allow_gaps: bool = False) -> Volume:
    infos = list_dicom_series(folder)
    if not infos:
        problem = "contains no DICOM series"
        objects = _objects_without_image(folder)
        if objects:  # a SEG, an RT dose, a report: say what it is, not just that no series was found
            problem = "contains no DICOM image: " + "; ".join(f"{name} is of class '{kind}'"
                                                               for name, kind in objects[:4])
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
        chosen = max(infos, key=lambda s: (not s.localizer, s.images))  # first of the largest, scouts last
        if len(infos) > 1:
            others = [s.label(i) for i, s in enumerate(infos) if s is not chosen]
            note = (f"Found {len(infos)} DICOM series; read the largest, {chosen.label(infos.index(chosen))}; "
                    f"the others: {', '.join(others)}.")
    else:
        chosen = _select_series(folder, infos, series)
    label = chosen.label(infos.index(chosen))
    unnamed = [f for f in chosen.files if not_utf8(f)]
    if unnamed:  # SimpleITK cannot take such a name (and aborts on one); the slice cannot be left out
        raise InputError(folder, f"DICOM series {label}: {_names([shown_path(f) for f in unnamed])} "
                                 f"{'has a name that is' if len(unnamed) == 1 else 'have names that are'} "
                                 f"{why_unnamed(unnamed)}, "
                                 "which the DICOM reader cannot open; rename "
                                 f"{'it' if len(unnamed) == 1 else 'them'}")
    found = _unreadable_dicom_files(folder, infos, chosen)
    for file in [f for f, member in found if member][:1]:  # the precise reason, e.g. a truncated slice
        _slice_header(file, f"; it belongs to DICOM series {label} in {folder}, which is incomplete without it")
    unreadable = [f for f, _ in found]
    if unreadable:
        raise InputError(folder, f"DICOM series {label}: {_names(unreadable)} in the folder cannot be read as DICOM "
                                 "(corrupt, truncated or not DICOM), so the series may be incomplete; fix or remove "
                                 f"{'it' if len(unreadable) == 1 else 'them'}")
    warnings: list[str] = _empty_files(folder)
    headers = [_slice_header(f, f"; it is a slice of DICOM series {label} in {folder}") for f in chosen.files]
    headers, left_out = _images_of_series(headers, label, folder)
    warnings += left_out
    if len(headers) == 1:
        volume = read_dicom_file(Path(headers[0].file), f"; it is DICOM series {label} in {folder}", allow_gaps)
        volume.path = os.fspath(folder)
    else:
        plan = _plan_slices(headers, folder, label, allow_gaps)
        warnings += plan.warnings
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(plan.files))
        try:
            with itk_quiet() as printed:  # "Non uniform sampling": checked (and reported) by _plan_slices
                image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(folder, f"DICOM series {label} cannot be read{detail(exc, printed)}") from None
        image = _as_stack(image, headers[0], len(plan.files), folder)
        tags = _tags_of(_read_header(plan.files[0])[1])  # read as its slice header was
        volume = _apply_plan(Volume.from_sitk(image, path=folder, modality=_modality_of(tags.get("Modality")),
                                              metadata=tags), plan)
    volume.metadata["n_series"] = len(infos)
    if note:
        volume.metadata["series_note"] = note
        volume.metadata["series_others"] = others
    if warnings:
        volume.metadata.setdefault("warnings", []).extend(warnings)
    return volume


def _empty_files(folder) -> list[str]:
    """A warning naming the empty files (0 bytes) of a DICOM folder, if any: not DICOM, so left
    out, but an empty IM0006 beside IM0001-IM0005 is more likely a slice lost in a copy."""
    with os.scandir(folder) as entries:
        empty = sorted(e.name for e in entries if not e.name.startswith(".") and _regular(e) and e.stat().st_size == 0)
    if not empty:
        return []
    return [f"{folder}: {_names(empty)} {'is' if len(empty) == 1 else 'are'} empty (0 bytes) and left out: if "
            f"{'it was a slice' if len(empty) == 1 else 'they were slices'} (a copy cut short?), the series is "
            "incomplete"]


def _images_of_series(headers: list[_SliceHeader], label: str, folder) -> tuple[list[_SliceHeader], list[str]]:
    """The slices of a series to stack, and notes on those left out: objects that hold no image
    (a dose report or presentation state sharing the series UID) and localizer (scout) images
    among the slices (ImageType LOCALIZER); a series of localizers only is kept as it is."""
    notes = []
    images = [h for h in headers if h.holds_image]
    if len(images) < len(headers):
        notes.append(f"{folder}: DICOM series {label}: left out "
                     f"{_names([h.file for h in headers if not h.holds_image])}, which hold no image")
    scouts = [h for h in images if h.localizer]
    if scouts and len(scouts) < len(images):
        images = [h for h in images if not h.localizer]
        notes.append(f"{folder}: DICOM series {label}: left out the localizer (scout) image"
                     f"{'s' if len(scouts) > 1 else ''} {_names([h.file for h in scouts])}")
    if not images:
        raise InputError(folder, f"DICOM series {label} holds no image ({_names([h.file for h in headers])})")
    return images, notes


def _as_stack(image: sitk.Image, header: _SliceHeader, n_slices: int, where) -> sitk.Image:
    """``image`` as (columns, rows, n_slices) pixels. GDCM drops an image axis of one pixel:
    a series of 1-row slices came back as (columns, n_slices, 1), its slice axis where the rows
    belong. The pixels are in slice, row, column order all the same; only the shape and the
    geometry (set by the slice plan or the header afterwards) are rebuilt."""
    wanted = (header.columns, header.rows, n_slices)
    if image.GetDimension() == 3 and tuple(image.GetSize()) == wanted:
        return image
    if image.GetDimension() == 2 and n_slices == 1 and tuple(image.GetSize()) == wanted[:2]:
        return image
    array = sitk.GetArrayFromImage(image)
    if array.size != int(np.prod(wanted)):
        raise InputError(where, f"was read as {'x'.join(map(str, image.GetSize()))} pixels where its headers "
                                f"say {'x'.join(map(str, wanted))} (columns x rows x slices); corrupt?")
    out = sitk.GetImageFromArray(array.reshape(wanted[::-1]))
    out.SetOrigin(tuple(image.GetOrigin()) + (0.0,) * (3 - image.GetDimension()))
    return out


def _apply_plan(volume: Volume, plan: _SlicePlan) -> Volume:
    """The planned geometry on a stack read by ITK (its slices in plan order): pixel size,
    direction and origin from the headers (ITK takes 1 mm for a missing PixelSpacing and the
    identity for cosines that are not exactly orthonormal), a sheared stack straightened, and
    the slices resampled onto plan.grid when it has one (allow_gaps)."""
    if plan.pixel_spacing_xy is not None:
        volume.spacing_mm = (*plan.pixel_spacing_xy, volume.spacing_mm[2])
    if plan.direction is not None:
        volume.direction = plan.direction
        volume.origin_mm = tuple(float(v) for v in plan.origin)
    if plan.drift_mm is not None:
        volume = straighten(volume, plan.drift_mm)
    if plan.step is not None:
        if plan.grid is not None:
            volume = _resample_slices(volume, plan)
        volume.spacing_mm = (*volume.spacing_mm[:2], plan.step)
    return volume


def _names(files, limit: int = 4) -> str:
    names = [os.path.basename(f) for f in files]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _regular(entry: os.DirEntry) -> bool:
    """A folder entry that is a file (links followed); False for a link loop or a dangling link."""
    try:
        return entry.is_file()
    except OSError:  # "too many levels of symbolic links"
        return False


def _unreadable_dicom_files(folder: Path, infos: list[SeriesInfo], chosen: SeriesInfo | None = None) -> list[tuple[str, bool]]:
    """Files that look like DICOM (extension or preamble) but belong to no series the scan found:
    those pydicom cannot read, as (path, False), and those pydicom places in ``chosen`` although
    the scan left them out (a slice truncated before its image size), as (path, True). Other
    DICOM objects (DICOMDIR, reports, other series) are skipped."""
    bad = []
    for entry, ds in _dicom_looking(folder, skip={os.path.realpath(f) for s in infos for f in s.files}):
        if ds is None:
            bad.append((entry.path, False))
        elif not _holds_image(ds):
            continue
        elif chosen is not None and str(ds.get("SeriesInstanceUID", "")) == chosen.uid:
            bad.append((entry.path, True))
        elif _cut_before_its_series(ds):  # which series it belongs to cannot be told
            bad.append((entry.path, False))
    return bad


def _objects_without_image(folder: Path) -> list[tuple[str, str]]:
    """(file name, SOP class name) of the DICOM objects in `folder` that hold no image (a
    segmentation, an RT dose or structure set, a report), by name."""
    return [(entry.name, _sop_class(ds).name) for entry, ds in _dicom_looking(folder)
            if ds is not None and not _holds_image(ds)]


def _dicom_looking(folder: Path, skip=frozenset()):
    """(entry, its header by `_read_loosely`, or None when it cannot be read) for each file of
    `folder` that looks like DICOM (extension or preamble), by name; files whose real path is in
    `skip` and macOS's '._name' resource-fork copies are passed over."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not _regular(entry) or entry.name.startswith("._") or os.path.realpath(entry.path) in skip:
            continue
        if not (entry.name.lower().endswith(DICOM_EXTENSIONS) or has_dicom_preamble(Path(entry.path))):
            continue
        try:
            ds = _read_loosely(entry.path)
        except Exception:  # noqa: BLE001 - any parse failure is "cannot be read"
            ds = None
        yield entry, ds


def _read_loosely(path: str):
    """A DICOM file's header (pixels not loaded), as the folder scan reads it: a file without the
    preamble (a raw data set: an RT structure set exported so, say) is read too, when what comes
    out names a SOP class or a series; pydicom's own error otherwise."""
    import pydicom

    with warnings.catch_warnings():  # pydicom's words on a file cut short: ours name it
        warnings.simplefilter("ignore")
        try:  # large values (private headers) are not loaded: a scan reads every file of a folder
            return pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024)
        except Exception:  # noqa: BLE001 - tried again without the preamble, raised again below if need be
            if has_dicom_preamble(Path(path)):
                raise
            ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024, force=True)
    if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
        raise ValueError(f"{path}: not DICOM")
    return ds


def _cut_before_its_series(ds) -> bool:
    """An image file whose data set ends before its SeriesInstanceUID (0020,000E): cut short.
    Not a vendor's private object (Siemens CSA, Philips private data: no image class, a series of
    their own), nor an object that simply lacks the tag but goes on past it."""
    return ("SeriesInstanceUID" not in ds and _holds_image(ds, unknown=False)
            and (len(ds) == 0 or max(int(tag) for tag in ds.keys()) < 0x0020000E))


@dataclass
class _SliceHeader:
    file: str
    rows: int
    columns: int
    position: np.ndarray | None  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray | None  # ImageOrientationPatient (row, column cosines)
    pixel_spacing: tuple | None  # PixelSpacing (between rows = y, between columns = x), mm
    image_type: tuple[str, ...] = ()  # ImageType values, upper case (LOCALIZER: a scout)
    echo_time: float | None = None  # EchoTime (ms): two echoes share their positions
    imager_pixel_spacing: tuple | None = None  # at the detector: the fallback when PixelSpacing is absent
    thickness_mm: float | None = None  # SpacingBetweenSlices, else SliceThickness
    holds_image: bool = True  # False: a report or other non-image object (see _holds_image)

    @property
    def localizer(self) -> bool:
        return "LOCALIZER" in self.image_type


@dataclass
class _SlicePlan:
    files: list[str]
    step: float | None = None  # mm along the normal; None when the slices carry no positions
    positions: np.ndarray | None = None  # sorted, mm along the normal
    grid: np.ndarray | None = None  # positions to resample onto (allow_gaps), else None
    tolerance: float = 0.0
    warnings: list[str] = field(default_factory=list)
    direction: np.ndarray | None = None  # (3, 3) columns row, column, normal (orthonormal)
    origin: np.ndarray | None = None  # the first slice's position (LPS mm)
    drift_mm: np.ndarray | None = None  # (n, 2) sheared stack (gantry tilt): each slice's in-plane
    # offset (along the rows, along the columns) from where an orthogonal stack would put it
    pixel_spacing_xy: tuple | None = None  # the series' (x, y) pixel size when its headers give one


def _slice_header(file: str, context: str = "") -> _SliceHeader:
    """The geometry tags of one slice; InputError naming the file when it is truncated or
    unreadable (``context``, e.g. "; it is a slice of DICOM series ...", ends the message)."""
    return _read_header(file, context)[0]


def _read_header(file: str, context: str = ""):
    """`_slice_header` and the pydicom dataset it was read from (its pixels not loaded)."""
    import pydicom

    try:
        # large values (the pixels) are not loaded; force: files without the preamble are DICOM too
        with warnings.catch_warnings():  # pydicom's own words on a damaged file: our message says it
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(file, defer_size=1024, force=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(file, f"cannot be read as DICOM ({type(exc).__name__}){context}") from None
    if not _holds_image(ds):
        return _SliceHeader(file, 0, 0, None, None, None, holds_image=False), ds
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        if "PixelData" in ds or "FloatPixelData" in ds:
            raise InputError(file, f"has pixel data but no image size (Rows/Columns){context}") from None
        raise InputError(file, f"is truncated or damaged: its header ends before the image size (Rows/Columns)"
                               f"{context}") from None
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
        if min(held, length) < needed:  # a short declared length too: the readers filled the rest with zeros
            raise InputError(file, f"is truncated: its pixel data need {needed} bytes, the file holds "
                                   f"{max(min(held, length), 0)}{context}")
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    imager = _floats(ds.get("ImagerPixelSpacing"), 2)
    image_type = _image_type(ds.get("ImageType"))
    echo = _floats([ds.get("EchoTime")], 1) if ds.get("EchoTime") not in (None, "") else None
    return _SliceHeader(file, rows, columns, position, orientation, None if spacing is None else tuple(spacing),
                        image_type, None if echo is None else float(echo[0]),
                        None if imager is None else tuple(imager), _thickness_of(ds)), ds


def _image_type(value) -> tuple[str, ...]:
    """ImageType's values, upper case ("ORIGINAL", "PRIMARY", "LOCALIZER"); () when absent."""
    if not value:
        return ()
    return tuple(str(v).upper() for v in ([value] if isinstance(value, str) else value))


def _thickness_of(ds) -> float | None:
    """SpacingBetweenSlices, else SliceThickness (mm), when positive."""
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(ds.get(name) or 0)
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return value
    return None


def _holds_image(ds, unknown: bool = True) -> bool:
    """False for DICOM objects that hold no image (structured reports, presentation states, raw
    data, ...), told by their SOP Class; True for images, and (`unknown`) whenever that cannot be
    told: a damaged image must not be skipped as 'not an image', nor a vendor's private class."""
    sop = _sop_class(ds)
    if sop is None:
        return unknown
    return "Image" in sop.name or (unknown and sop.name == str(sop))  # an unknown (private) class


def _sop_class(ds):
    """The SOP Class UID of a data set (its file meta's when the data set has none), or None."""
    import pydicom

    sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return pydicom.uid.UID(str(sop)) if sop else None


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
    spacing_xy, spacing_warning = _pixel_spacing(headers, folder, where)
    if any(h.position is None or h.orientation is None for h in headers):
        thickness = headers[0].thickness_mm
        said = f"{thickness:g} mm apart (its slice thickness)" if thickness else "1 mm apart (no slice thickness either)"
        plan = _SlicePlan(files, step=thickness, pixel_spacing_xy=spacing_xy, warnings=[
            f"{folder}: {where}: slices without ImagePositionPatient/ImageOrientationPatient; stacked by "
            f"InstanceNumber (else file name) and taken as {said}: gaps and the order cannot be checked"])
        plan.warnings += [f"{folder}: {spacing_warning}"] if spacing_warning else []
        return plan
    ref = headers[0].orientation
    tilted = [h for h in headers if np.max(np.abs(h.orientation - ref)) > 1e-4]
    if tilted:
        raise InputError(folder, f"{where}: {_names([h.file for h in tilted])} {'has' if len(tilted) == 1 else 'have'} "
                                 "another orientation (ImageOrientationPatient) than the rest of the series")
    direction, orientation_warning = _orthonormal_direction(ref, folder, where)
    normal = direction[:, 2]
    along = np.array([float(h.position @ normal) for h in headers])
    order = np.argsort(along, kind="stable")
    z = along[order]
    headers = [headers[i] for i in order]
    files = [h.file for h in headers]
    steps = np.diff(z)
    moving = steps[steps > 1e-3]
    if len(moving) == 0:
        raise InputError(folder, f"{where}: all {len(z)} slices lie at the same position ({z[0]:.2f} mm along the "
                                 "slice normal); is this a series of repeated scans?")
    step = _usual_step(moving)
    tol = max(1e-3, 0.02 * step)
    dup = np.flatnonzero(steps <= max(1e-3, 0.1 * step))
    if len(dup):
        echoes = sorted({h.echo_time for h in headers if h.echo_time is not None})
        if len(echoes) > 1:
            raise InputError(folder, f"{where} holds {len(echoes)} echoes (EchoTime {', '.join(f'{e:g}' for e in echoes)} "
                                     "ms) at the same slice positions: one volume per echo is needed; put each echo's "
                                     "files in a folder of their own")
        pairs = "; ".join(f"{z[i]:.2f} mm ({os.path.basename(files[i])}, {os.path.basename(files[i + 1])})" for i in dup[:3])
        more = f" and {len(dup) - 3} more" if len(dup) > 3 else ""
        raise InputError(folder, f"{where}: {len(dup)} duplicate slice position{'s' if len(dup) > 1 else ''} along the "
                                 f"slice normal: {pairs}{more}; remove the copies")
    bad = np.flatnonzero(np.abs(steps - step) > tol)
    plan = _SlicePlan(files, step=step, positions=z, tolerance=tol, direction=direction, origin=headers[0].position,
                      pixel_spacing_xy=spacing_xy)
    plan.warnings += [f"{folder}: {w}" for w in (spacing_warning, orientation_warning) if w]
    _plan_shear(plan, headers, f"{folder}: {where}")
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


def _pixel_spacing(headers: list[_SliceHeader], folder, where: str) -> tuple[tuple | None, str | None]:
    """The series' (x, y) pixel size in mm, and a warning when it is not its PixelSpacing.

    PixelSpacing of the slices that have it (they must agree); without it on any slice the
    detector's ImagerPixelSpacing (a projection's size at the detector, not in the patient),
    else None: ITK then takes 1 mm, and the warning says so.
    """
    spacings = {h.pixel_spacing for h in headers if h.pixel_spacing is not None}
    if len(spacings) > 1 and np.ptp(np.array(sorted(spacings)), axis=0).max() > 1e-4:
        shown = ", ".join("x".join(f"{float(v):g}" for v in sp) for sp in sorted(spacings))
        raise InputError(folder, f"{where}: the slices have different pixel spacings ({shown} mm)")
    if spacings:
        row_mm, col_mm = sorted(spacings)[0]
        return (float(col_mm), float(row_mm)), None
    imager = next((h.imager_pixel_spacing for h in headers if h.imager_pixel_spacing is not None), None)
    if imager is not None:
        return (float(imager[1]), float(imager[0])), (
            f"{where} has no PixelSpacing; its ImagerPixelSpacing ({float(imager[1]):g} x {float(imager[0]):g} mm, "
            "at the detector) was used: sizes and volumes may be off by the magnification")
    return None, (f"{where} has no PixelSpacing (0028,0030): 1 mm pixels assumed, so every size and volume in mm "
                  "is only as right as that guess")


def _orthonormal_direction(orientation: np.ndarray, folder, where: str) -> tuple[np.ndarray, str | None]:
    """(3, 3) columns row, column, normal from ImageOrientationPatient, and a warning when it
    had to be made orthonormal (cosines rounded to a few decimals: up to 1 degree off).

    ITK takes a row and column that are not perpendicular unit vectors for the identity
    (an oblique series would be read as axial); one further off is a damaged header: refused.
    """
    row, col = orientation[:3], orientation[3:]
    norms = np.linalg.norm(row), np.linalg.norm(col)
    off_deg = float(np.degrees(np.arcsin(min(1.0, abs(row @ col) / max(norms[0] * norms[1], 1e-12)))))
    if min(norms) < 0.98 or max(norms) > 1.02 or off_deg > 1.0:
        raise InputError(folder, f"{where}: its ImageOrientationPatient ({', '.join(f'{v:g}' for v in orientation)}) "
                                 f"is not two perpendicular unit vectors (lengths {norms[0]:.3f} and {norms[1]:.3f}, "
                                 f"{off_deg:.1f} degrees off a right angle): the header is damaged")
    row = row / norms[0]
    col = col - (col @ row) * row
    col /= np.linalg.norm(col)
    direction = np.stack([row, col, np.cross(row, col)], axis=1)
    if max(abs(norms[0] - 1), abs(norms[1] - 1)) > 1e-4 or off_deg > 0.01:
        return direction, (f"{where}: its ImageOrientationPatient is {off_deg:.2f} degrees off perpendicular unit "
                           "vectors (cosines rounded?); made orthonormal")
    return direction, None


def _plan_shear(plan: _SlicePlan, headers: list[_SliceHeader], where: str) -> None:
    """A stack whose slices do not lie straight along their normal (gantry tilt: the table moves
    along z while the slices are tilted) is sheared: each slice is offset in its own plane.
    Sets ``plan.drift_mm`` (and a warning) when that offset reaches 0.05 pixels anywhere."""
    row, col = plan.direction[:, 0], plan.direction[:, 1]
    delta = np.array([h.position - plan.origin for h in headers])
    drift = np.stack([delta @ row, delta @ col], axis=1)
    pixel = min(plan.pixel_spacing_xy or (1.0, 1.0))
    if np.abs(drift).max() < max(1e-3, 0.05 * pixel):
        return
    plan.drift_mm = drift
    plan.warnings.append(f"{where}: its slices are sheared "
                         f"{straightened_note(drift, plan.positions[-1] - plan.positions[0])}")


def _usual_step(steps: np.ndarray) -> float:
    """The most common step between neighbouring slices (2 % tolerance); ties: the smaller.

    Not the median: with several gaps the median can be a multiple of the step, or between.
    """
    tol = np.maximum(1e-3, 0.02 * steps)
    ordered = np.sort(steps)  # counts by binary search: an n x n table needed 3 GB for 20 000 slices
    counts = np.searchsorted(ordered, steps + tol, side="right") - np.searchsorted(ordered, steps - tol, side="left")
    best = np.flatnonzero(counts == counts.max())
    seed = best[np.argmin(steps[best])]
    return float(np.median(steps[np.abs(steps - steps[seed]) <= tol[seed]]))


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
            out[j] = as_dtype((1.0 - w) * src[i].astype(np.float64) + w * src[i + 1].astype(np.float64), src.dtype)
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
        raise InputError(folder, f"has no DICOM series [{index}] (the index counts from 0 in this listing; #N is the "
                                 f"DICOM SeriesNumber); available: {listing}")
    matches = [s for s in infos if text.lower() in s.description.lower()] if text else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(repr(s.description) for s in matches)
        raise InputError(folder, f"several DICOM series match {text!r} ({names}); give the index or UID; available: {listing}")
    raise InputError(folder, f"no DICOM series matches {text!r}; available: {listing}")


def _tags_of(ds) -> dict:
    """The tags of `_DICOM_TAGS` a data set holds, as plain Python values."""
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
