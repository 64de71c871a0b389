"""User-facing errors.

Everything a user can cause (a bad file, an empty prompt, an existing output) raises
:class:`BoltzformerError` with a one-line message naming the file and the problem. The CLI
prints that line and exits with status 2; the napari plugin shows it as a notification.
"""

from __future__ import annotations

import errno
import os
import sys


class BoltzformerError(Exception):
    """An error caused by the user's input, with a message fit to show as is."""


def shown_path(path: "str | os.PathLike[str]") -> str:
    """A path as it can be printed: bytes of a name that is not valid UTF-8 (an old archive's
    Latin-1, kept by Python as surrogates) shown as escapes ("r\\xe9sum\\xe9.nii.gz"); a terminal,
    a log file or Qt cannot print the surrogates themselves."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    return os.fsencode(text).decode("utf-8", "backslashreplace") if not_utf8(text) else text


def not_utf8(name: "str | os.PathLike[str]") -> bool:
    """Whether a path (as Python decoded it from the file system) holds bytes that are not UTF-8.
    SimpleITK aborts the whole process on such a name (a C++ exception, no Python error)."""
    text = os.fspath(name)
    return not isinstance(text, bytes) and any("\udc80" <= ch <= "\udcff" for ch in text)


def why_unnamed(paths) -> str:
    """Why names that `not_utf8` flags cannot be used, to follow "its name is" / "their names are".
    Usually another encoding; but when their bytes are UTF-8 the fault is the locale: under a C or
    POSIX locale with UTF-8 mode off, Python reads file names as ASCII."""
    import sys

    def utf8_bytes(path) -> bool:
        try:
            os.fsencode(os.fspath(path)).decode("utf-8")
            return True
        except UnicodeError:
            return False

    if sys.getfilesystemencoding().lower().replace("-", "") != "utf8" and all(utf8_bytes(p) for p in paths):
        return ("not ASCII, and this Python reads file names as ASCII (a C or POSIX locale with UTF-8 mode off: "
                "run it with PYTHONUTF8=1 or LANG=C.UTF-8)")
    return "not valid UTF-8 (another encoding, e.g. Latin-1)"


def itk_cannot_name(path) -> bool:
    """Whether the image libraries cannot open `path` on this platform: on Windows, SimpleITK, ITK
    and GDCM open files through the ANSI code page, so a path with characters outside ASCII (a
    user folder 'C:\\Users\\Jürgen') fails there with a misleading 'corrupt' or 'no series'."""
    return sys.platform == "win32" and not os.fspath(path).isascii()


# Windows' MAX_PATH: a path of 260 characters or more fails in programs (and libraries) that are
# not long-path aware, unless the system enables long paths (LongPathsEnabled)
WINDOWS_MAX_PATH = 260


def windows_path_too_long(path, spare: int = 0) -> str | None:
    """On Windows without long paths enabled, why `path` (plus `spare` characters, e.g. for a
    temporary name) is too long for the image libraries; else None. They failed on such paths
    with a 'cannot be read' or 'could not be written' that named no cause."""
    if sys.platform != "win32":
        return None
    length = len(os.fspath(path)) + spare
    if length < WINDOWS_MAX_PATH or _windows_long_paths_enabled():
        return None
    return (f"its path is {length} characters long{' with the temporary name written first' if spare else ''}; "
            f"Windows allows {WINDOWS_MAX_PATH - 1} unless long paths are enabled (LongPathsEnabled in the "
            "registry): move it to a shorter folder (e.g. C:\\scans\\)")


def _windows_long_paths_enabled() -> bool:
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1
    except (ImportError, OSError):  # not Windows, or no such value: not enabled
        return False


ITK_ASCII_ONLY = ("holds characters outside ASCII, which the image libraries (SimpleITK, ITK, GDCM) cannot "
                  "open on Windows; move or rename it to a path of plain letters and digits (e.g. C:\\scans\\)")


class InputError(BoltzformerError):
    """A file or folder that cannot be used: ``"<path>: <problem>"``."""

    def __init__(self, path: "str | os.PathLike[str] | None", problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{shown_path(self.path)}: {problem}")


class SliceSpacingError(InputError):
    """A DICOM series whose slices have gaps or an uneven step along the slice normal.

    ``read_volume(..., allow_gaps=True)`` (``--allow-gaps``) resamples such a series onto a
    uniform grid instead; callers that offer that choice add it to the message.
    """


class OutputError(BoltzformerError):
    """An output that must not or cannot be written: ``"<path>: <problem>"``."""

    def __init__(self, path: "str | os.PathLike[str]", problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{shown_path(self.path)}: {problem}")


class PromptError(BoltzformerError):
    """An empty prompt, or one the model cannot read."""


class WeightsError(BoltzformerError):
    """Weights that cannot be found or loaded."""


def os_problem(exc: OSError) -> str:
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


# said beside every lesion count and volume (the panel's totals, the CLI's summary)
ESTIMATE_NOTE = ("a research model's estimate, not a medical device: review every lesion (held-out accuracy: "
                 "the model card)")

# what a run needs, for the message of a run the machine's memory cannot hold (measured: 300 x 512² CT)
MEMORY_NEEDED = ("a run's peak is about 0.35 GB plus six to seven times the scan's unpacked size, in "
                 "post-processing")


def out_of_memory(exc: BaseException) -> str | None:
    """'machine' when `exc` says the computer's memory ran out (MemoryError, torch's CPU allocator),
    'device' when an accelerator's did (torch.OutOfMemoryError on CUDA; MPS's RuntimeError), else None."""
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        return "machine"
    if type(exc).__name__ == "OutOfMemoryError" or "MPS backend out of memory" in str(exc):
        return "device"
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a batch system's time limit) during a command: handled like Ctrl-C, but the
    command exits 143 (128 + 15), as a shell reports a command SIGTERM killed."""
