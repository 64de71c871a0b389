"""User-facing errors.

Everything a user can cause (a bad file, an empty prompt, an existing output) raises
:class:`BoltzformerError` with a one-line message naming the file and the problem. The CLI
prints that line and exits with status 2; the napari plugin shows it as a notification.
"""

from __future__ import annotations

import errno
import os


class BoltzformerError(Exception):
    """An error caused by the user's input, with a message fit to show as is."""


class InputError(BoltzformerError):
    """A file or folder that cannot be used: ``"<path>: <problem>"``."""

    def __init__(self, path: "str | os.PathLike[str] | None", problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")


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
        super().__init__(f"{self.path}: {problem}")


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
