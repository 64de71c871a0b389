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


MAX_TABLE_BYTES = 64 * 2**20  # a CSV of scans or cases: 100 000 rows are about 10 MB


def read_table_bytes(path: Path) -> bytes:
    """The bytes of a small text table (cases.csv, a cohort's CSV, a split file); InputError when
    it cannot be read, is not a regular file (a FIFO blocked for ever, /dev/zero filled the memory)
    or is larger than MAX_TABLE_BYTES."""
    try:
        if not path.is_file():
            raise InputError(path, "does not exist" if not os.path.exists(path) else
                             f"is {file_kind(path)}, not a regular file; give a CSV file")
        size = path.stat().st_size
        if size > MAX_TABLE_BYTES:
            raise InputError(path, f"is {size / 2**20:.0f} MB; a table of scans or cases is at most "
                                   f"{MAX_TABLE_BYTES // 2**20} MB (is it the right file?)")
        return path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot be read ({os_problem(exc)})") from None


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
