"""napari reader: NIfTI, NRRD, MetaImage, DICOM series folders and single DICOM files, through
boltzformer.io.

`napari_get_reader` only looks at the path (and, for a folder, at the first bytes of a few
files), so it is cheap and never imports torch; what it accepts is the core's one list
(boltzformer.io.INPUT_EXTENSIONS, which napari.yaml's filename patterns repeat and a test
checks) and the core's DICOM check (DICOM_EXTENSIONS, has_dicom_preamble). Reading goes through `boltzformer.io.read_volume`,
the same reader as the command line (NIfTI sform/qform rule, DICOM slice-position checks, single
slices kept in place, FIFOs refused). A file that cannot be read becomes a napari error
notification naming the file and the problem, not a traceback dialog; problems that do not stop
reading (qform/sform disagreement, a voxel size of 0) become warning notifications.

DICOM files chosen together (File > Open Files as Stack) are read as the series they belong to;
a folder of NIfTI files, or an empty one, gets a notification saying what to open instead of
napari's bare "refused the file" (napari offers this plugin for every folder).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_FILES_TO_PROBE = 20  # files of a folder whose DICOM preamble is checked


def napari_get_reader(path):
    """The reader function for `path`, or None when this plugin does not handle it."""
    from boltzformer.io import DICOM_EXTENSIONS, INPUT_EXTENSIONS, extension_of

    if isinstance(path, (list, tuple)):
        if len(path) > 1:  # File > Open Files as Stack: the slices of one DICOM series, read as that series
            dicom = all(isinstance(q, (str, os.PathLike)) and os.fspath(q).lower().endswith(DICOM_EXTENSIONS)
                        and Path(q).is_file() for q in path)
            return read_dicom_files if dicom else None
        if not path:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None

    p = Path(path)
    if p.is_dir():  # DICOM files in it, or in its sub-folders (the core then says which to open)
        if looks_like_dicom_folder(p) or _dicom_in_subfolders(p):
            return read_layers
        # a folder of NIfTI files (`boltzformer sample` makes one) or an empty folder: say what
        # to open rather than leave napari's "refused the file" (napari offers this plugin for
        # every folder, as it reads DICOM folders)
        return refuse_folder if _volume_files(p) is not None else None
    if extension_of(p.name) in INPUT_EXTENSIONS or p.name.lower().endswith(DICOM_EXTENSIONS):
        return read_layers  # a single DICOM file too: its slice in place, rescaled to HU
    return None


def _volume_files(folder: Path) -> list[str] | None:
    """The volume files (NIfTI, NRRD, MetaImage) directly in `folder`; None when it holds
    something else this plugin does not read (a .zarr store, other files: another reader's)."""
    from boltzformer.io import INPUT_EXTENSIONS, extension_of

    try:
        names = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
    except OSError:
        return None
    volumes = [name for name in names if extension_of(name) in INPUT_EXTENSIONS]
    return volumes if volumes or not names else None


def refuse_folder(path):
    """A folder that holds no DICOM: one notification saying what to open instead."""
    from napari.utils.notifications import show_error

    if isinstance(path, (list, tuple)):
        path = path[0]
    volumes = _volume_files(Path(path)) or []
    if not volumes:
        show_error(f"{path}: the folder is empty; open a NIfTI, NRRD or MetaImage file, or a folder of DICOM files")
    else:
        listed = ", ".join(volumes[:4]) + (f" and {len(volumes) - 4} more" if len(volumes) > 4 else "")
        show_error(f"{path}: the folder holds no DICOM series (only a DICOM folder opens as one volume); it holds "
                   f"{len(volumes)} volume file{'s' if len(volumes) > 1 else ''} ({listed}): open "
                   f"{'them' if len(volumes) > 1 else 'it'} with File > Open File(s)")
    return [(None,)]


def looks_like_dicom_folder(folder: Path) -> bool:
    """True when the folder directly holds a .dcm/.ima file or a file with the DICOM preamble."""
    from boltzformer.io import DICOM_EXTENSIONS, has_dicom_preamble

    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return False
    probed = 0
    for entry in entries:
        if not entry.is_file():
            continue
        if entry.name.lower().endswith(DICOM_EXTENSIONS):
            return True
        if probed < _FILES_TO_PROBE:
            probed += 1
            if has_dicom_preamble(entry):
                return True
    return False


def _dicom_in_subfolders(folder: Path) -> bool:
    try:
        subfolders = sorted(entry for entry in folder.iterdir() if entry.is_dir())
    except OSError:
        return False
    return any(looks_like_dicom_folder(sub) for sub in subfolders[:_FILES_TO_PROBE])


def _tilt_deg(volume) -> float:
    from boltzformer.orientation import find_reorientation, slice_tilt_deg

    return slice_tilt_deg(volume.direction, find_reorientation(volume.direction))


def read_dicom_files(paths):
    """Several DICOM files chosen together (File > Open Files as Stack): the series they belong
    to, read from their folder with every check a folder gets. Files of more than one folder
    or series are refused, naming them."""
    from napari.utils.notifications import show_error, show_info

    from boltzformer.errors import BoltzformerError

    try:
        folder, series, note = _series_of_files([Path(q) for q in paths])
    except BoltzformerError as exc:
        show_error(str(exc))
        return [(None,)]
    if note:
        show_info(note)
    return read_layers(folder, series=series)


def _series_of_files(files: list[Path]) -> tuple[Path, str, str | None]:
    """-> (their folder, their series' UID, a note when the series holds more files than were
    chosen); InputError when they are not the slices of one series in one folder."""
    from boltzformer.errors import InputError
    from boltzformer.io import list_dicom_series

    folders = sorted({q.resolve().parent for q in files})
    if len(folders) > 1:
        raise InputError(folders[0], f"the {len(files)} DICOM files chosen lie in {len(folders)} folders "
                                     f"({', '.join(str(f) for f in folders[:3])}); put one series' files in one "
                                     "folder and open that folder")
    folder = folders[0]
    chosen = {os.path.realpath(q) for q in files}
    series = [info for info in list_dicom_series(folder) if chosen & {os.path.realpath(f) for f in info.files}]
    if len(series) != 1:
        said = "none of them is a DICOM image GDCM can read" if not series else f"they belong to {len(series)} series"
        raise InputError(folder, f"the {len(files)} DICOM files chosen are not the slices of one series: {said}; "
                                 "open one series' folder instead")
    info = series[0]
    note = None
    if len(info.files) != len(chosen):
        note = (f"{folder}: {len(chosen)} of the {len(info.files)} files of series {info.description or info.uid!r} "
                "were chosen; the whole series is read, so that its slices are checked for gaps")
    return folder, info.uid, note


def read_layers(path, series: str | None = None):
    """[(array, kwargs, 'image')] for one volume; [(None,)] (napari's 'nothing here') on error."""
    from napari.utils.notifications import show_error, show_info, show_warning

    from boltzformer.errors import BoltzformerError

    from ._layers import FILE_GEOMETRY, GEOMETRY_KEY, image_layer_data, is_shown_flat, label_map_layer_data

    if isinstance(path, (list, tuple)):
        path = path[0]
    try:
        from boltzformer.intensity import looks_like_label_map, stated_modality
        from boltzformer.io import read_volume

        volume = read_volume(path, series=series)
        # a mask (an export, another tool's segmentation) lies over its scan as labels, not as a grey image
        labels = stated_modality(volume) is None and looks_like_label_map(volume.array)
        layer = label_map_layer_data(volume) if labels else image_layer_data(volume)
    except BoltzformerError as exc:
        show_error(str(exc))
        return [(None,)]
    except Exception as exc:  # noqa: BLE001 - a reader must not crash napari; say what failed
        log.exception("reading %s failed", path)
        show_error(f"{path}: could not be read ({type(exc).__name__}: {exc})".splitlines()[0])
        return [(None,)]
    for warning in volume.metadata.get("warnings", []):
        show_warning(warning)
    if labels:
        from boltzformer.review import record_summary

        record = record_summary(path)
        show_info(f"{path}: opened as a labels layer (a mask: few whole values, mostly 0)"
                  + (f"; {record}. The review itself is not reopened: run the prompt on the scan to review "
                     "again" if record else ""))
    if is_shown_flat(layer[1]["metadata"][GEOMETRY_KEY]):
        show_info(f"{path}: a single sagittal or coronal slice, shown flat: the viewer's mm positions are in its "
                  "own plane. Lesion positions in mm and masks saved from it are where the file puts it.")
    elif FILE_GEOMETRY in layer[1]["metadata"][GEOMETRY_KEY]:
        show_info(f"{path}: acquired sagittally or coronally; shown in axial slices (the same voxels, reordered). "
                  "Masks saved from it are written on the file's own grid.")
    tilt = _tilt_deg(volume)
    if tilt > 1.0:  # napari slices a grid turned out of the axial plane as if it were not
        show_warning(f"{path}: its slices are tilted {tilt:.0f} degrees from axial; napari draws them as stored, "
                     "turned in plane only, so the mm positions on the status bar are approximate (the jumps to "
                     "lesions, look here, the masks, heatmaps and files written are exact on the scan's own grid)")
    note = volume.metadata.get("series_note")
    if note and series is None:  # --series is the command line's; here the user picks by folder
        show_info(f"{path}: {note} To open another series, put its files in a folder of their own and open that folder.")
    _say_once_if_one_of_a_series(Path(path), volume)
    return [layer]


_TOLD_FOLDERS: set[str] = set()  # folders whose "one slice of many" note was shown this session


def _say_once_if_one_of_a_series(p: Path, volume) -> None:
    """A single DICOM slice whose folder holds more DICOM files: say once per folder how to
    read the series (choosing its 20 files gives 20 one-slice layers otherwise)."""
    from napari.utils.notifications import show_info

    from boltzformer.io import DICOM_EXTENSIONS

    if p.is_dir() or volume.shape[0] != 1 or not p.name.lower().endswith(DICOM_EXTENSIONS):
        return
    folder = str(p.resolve().parent)
    try:
        siblings = sum(1 for e in os.scandir(folder) if e.name.lower().endswith(DICOM_EXTENSIONS))
    except OSError:
        return
    if siblings > 1 and folder not in _TOLD_FOLDERS:
        _TOLD_FOLDERS.add(folder)
        show_info(f"{p}: opened as a single slice; its folder holds {siblings} DICOM files: open the folder "
                  "(File > Open Folder), or choose its files with File > Open Files as Stack, to read the series "
                  "as one volume")
