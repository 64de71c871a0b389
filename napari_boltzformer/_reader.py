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
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_FILES_TO_PROBE = 20  # files of a folder whose DICOM preamble is checked


def napari_get_reader(path):
    """The reader function for `path`, or None when this plugin does not handle it."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    from boltzformer.io import DICOM_EXTENSIONS, INPUT_EXTENSIONS, extension_of

    p = Path(path)
    if p.is_dir():  # DICOM files in it, or in its sub-folders (the core then says which to open)
        return read_layers if looks_like_dicom_folder(p) or _dicom_in_subfolders(p) else None
    if extension_of(p.name) in INPUT_EXTENSIONS or p.name.lower().endswith(DICOM_EXTENSIONS):
        return read_layers  # a single DICOM file too: its slice in place, rescaled to HU
    return None


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


def read_layers(path):
    """[(array, kwargs, 'image')] for one volume; [(None,)] (napari's 'nothing here') on error."""
    from napari.utils.notifications import show_error, show_info, show_warning

    from boltzformer.errors import BoltzformerError

    from ._layers import FILE_GEOMETRY, GEOMETRY_KEY, image_layer_data

    if isinstance(path, (list, tuple)):
        path = path[0]
    try:
        from boltzformer.io import read_volume

        volume = read_volume(path)
        layer = image_layer_data(volume)
    except BoltzformerError as exc:
        show_error(str(exc))
        return [(None,)]
    except Exception as exc:  # noqa: BLE001 - a reader must not crash napari; say what failed
        log.exception("reading %s failed", path)
        show_error(f"{path}: could not be read ({type(exc).__name__}: {exc})".splitlines()[0])
        return [(None,)]
    for warning in volume.metadata.get("warnings", []):
        show_warning(warning)
    if FILE_GEOMETRY in layer[1]["metadata"][GEOMETRY_KEY]:
        show_info(f"{path}: acquired sagittally or coronally; shown in axial slices (the same voxels, reordered). "
                  "Masks saved from it are written on the file's own grid.")
    tilt = _tilt_deg(volume)
    if tilt > 1.0:  # napari slices a grid turned out of the axial plane as if it were not
        show_warning(f"{path}: its slices are tilted {tilt:.0f} degrees from axial; napari draws them as stored, "
                     "turned in plane only, so the mm positions on the status bar and the jumps to lesions are "
                     "approximate (the masks, heatmaps and files written are exact on the scan's own grid)")
    note = volume.metadata.get("series_note")
    if note:  # --series is the command line's; here the user picks by folder
        show_info(f"{path}: {note} To open another series, put its files in a folder of their own and open that folder.")
    return [layer]
