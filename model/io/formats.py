"""What a path is: the supported file extensions (the one list, with `extension_of`), the DICOM
preamble, and the kinds of file that are refused (FIFOs, sockets, devices: readers would block).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputError, os_problem


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


def named_like_a_file(p: Path) -> bool:
    """True when ``p``'s name ends in an image, DICOM, CSV or JSON extension: an output folder so
    named (`sample out/x.nii.gz`) is a mistake for a file name."""
    ext = extension_of(Path(p).name)
    return ext in INPUT_EXTENSIONS or ext in DICOM_EXTENSIONS or ext in (".csv", ".json")


def file_kind(p: Path) -> str:
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


def refuse_special_files(folder: Path) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise InputError(folder, f"cannot be listed ({os_problem(exc)})") from None
    for entry in entries:
        try:
            regular = entry.is_file() or entry.is_dir()
        except OSError:
            regular = False
        if not regular and os.path.exists(entry.path):
            raise InputError(entry.path, f"is {file_kind(Path(entry.path))} inside the DICOM folder {folder}; "
                                         "move it away (reading it would block)")


def starts_with(p: Path, magic: bytes) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def has_dicom_preamble(p) -> bool:
    """True when the file has the DICOM preamble ("DICM" at byte 128); False when unreadable."""
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def extension_of(name: str) -> str:
    """Lower-case extension, keeping a compression suffix: 'a.nii.gz' → '.nii.gz', 'b.csv' → '.csv'."""
    lower = name.lower()
    suffixes = Path(lower).suffixes
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""
