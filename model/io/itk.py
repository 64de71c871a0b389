"""SimpleITK's plumbing: its warnings and its C++ libraries' own printing kept off the terminal,
and its error text cut to one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

import SimpleITK as sitk


class NativeOutput:
    """What ITK's C++ code printed during an `itk_quiet` block (MetaIO, say, writes its errors
    straight to the process's stderr before ITK raises)."""

    text: str = ""

    def echo(self) -> None:
        """Write what was printed to stderr (what `itk_quiet` does itself unless told not to)."""
        if self.text:
            os.write(2, self.text.encode("utf-8", "replace"))

    def summary(self) -> str:
        """Its first line, without the library's 'MetaImage: M_Read:' prefixes; may be ""."""
        for line in self.text.splitlines():
            line = re.sub(r"^(\w+:\s*)+(?=\S)", "", line.strip()).rstrip(".")
            if line:
                return line
        return ""


@contextlib.contextmanager
def itk_quiet(echo: bool = True) -> Iterator[NativeOutput]:
    """Silence ITK's own warnings (e.g. 'Non uniform sampling': these readers check and report),
    and capture what its libraries print on file descriptors 1 and 2: kept out of the terminal
    when the call fails (its reason goes into our one-line message, see `detail`), written back
    to stderr when it succeeds (other threads' output of the moment is not lost) unless `echo`
    is False (the caller reads it first: `NativeOutput.echo`)."""
    captured = NativeOutput()
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    with contextlib.ExitStack() as stack:
        saved = []
        try:
            sink = stack.enter_context(tempfile.TemporaryFile())
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
            saved = [(fd, os.dup(fd)) for fd in (1, 2)]
            for fd, _ in saved:
                os.dup2(sink.fileno(), fd)
        except (OSError, ValueError):  # no such descriptors (an embedding GUI): nothing to capture
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            saved = []
        failed = False
        try:
            yield captured
        except BaseException:
            failed = True
            raise
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            if saved:
                sink.seek(0)
                data = sink.read()
                captured.text = data.decode("utf-8", "replace")
                if data and not failed and echo:
                    os.write(2, data)


_ITK_NOISE = re.compile(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\):\s*|sitk::ERROR:\s*|\[\w+\]\s*\w+:\s*)")


def _summarise_itk_error(exc: BaseException) -> str:
    """One short line from SimpleITK's multi-line exception text (no source paths); may be ""."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [
        ln for ln in lines
        if not ln.startswith(("Exception thrown in SimpleITK", "Reason:")) and not re.match(r"^/\S+:\d+:?$", ln)
    ]
    if not lines:
        return ""
    text = _ITK_NOISE.sub("", _ITK_NOISE.sub("", lines[-1]))
    if "Unable to determine ImageIO reader" in text:
        return "content not recognised as an image"
    if "cannot be read" in text.lower() or "could not be" in text.lower():
        return ""  # says nothing our own message does not
    return (text[:117] + "...") if len(text) > 120 else text


def detail(exc: BaseException, printed: NativeOutput | None = None) -> str:
    """`` (summary)`` or "" — to append to a message; from ITK's exception, else from what its
    libraries printed before raising (``printed``, from `itk_quiet`)."""
    text = _summarise_itk_error(exc) or (printed.summary() if printed is not None else "")
    if len(text) > 120:
        text = text[:117] + "..."
    return f" ({text})" if text else ""
