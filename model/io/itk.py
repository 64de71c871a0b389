"""SimpleITK's plumbing: its warnings kept off the terminal, and its error text cut to one line.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import SimpleITK as sitk


@contextlib.contextmanager
def itk_warnings_off() -> Iterator[None]:
    """Silence ITK's own warnings (e.g. 'Non uniform sampling'): these readers check and report."""
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)


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


def detail(exc: BaseException) -> str:
    """`` (summary)`` or "" — to append to a message."""
    text = _summarise_itk_error(exc)
    return f" ({text})" if text else ""
