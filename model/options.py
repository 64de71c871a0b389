"""What a user gives a segmentation run, checked once for the library, the CLI, the cohort and
the panel: the prompt text, the default smallest lesion kept, whether slices are mirrored and which planes
are segmented.

Imports nothing heavy, so the CLI checks its command line before torch loads.
"""

from __future__ import annotations

from .errors import BoltzformerError, PromptError

DEFAULT_MIN_LESION_MM3 = 5.0  # components smaller than this (mm³) are dropped from masks and tables
# Average each slice with its left-right mirror image (test-time augmentation, a second network
# pass per slice); the rule that decides the default: benchmarks/results/mirror_preregistration.txt
DEFAULT_MIRROR = False
# Which planes the network segments: "axial"; "three" (also the coronal and sagittal slices, the
# median of the three per voxel); "auto" (three on nearly isotropic 3D MR, axial otherwise). See
# boltzformer.planes; the rule that decides the default: benchmarks/results/planes_preregistration.txt
PLANES = ("axial", "three", "auto")
DEFAULT_PLANES = "axial"
MAX_PROMPT_CHARS = 500  # prompts are short phrases ("lung nodule"); a page of text is a mistake


def check_prompt_text(prompt) -> None:
    """Raise PromptError when ``prompt`` is empty (or blank), longer than MAX_PROMPT_CHARS, or not
    text (bytes that are not UTF-8 reach Python's argv as lone surrogates, which no tokenizer reads)."""
    if prompt is None or not str(prompt).strip():
        raise PromptError("the prompt is empty; type what to segment, e.g. \"lung nodule\"")
    try:
        str(prompt).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(prompt).encode("utf-8", "backslashreplace").decode()  # the bad bytes as \udcff
        raise PromptError(f"the prompt '{shown}' is not valid UTF-8 text; check the terminal's or the file's "
                          "encoding") from None
    if len(str(prompt)) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt is {len(str(prompt))} characters long; at most {MAX_PROMPT_CHARS} "
                          "(a short phrase such as \"lung nodule\" works best)")


def check_planes(planes) -> str:
    """Raise BoltzformerError unless ``planes`` is one of PLANES; return it."""
    if planes not in PLANES:
        raise BoltzformerError(f"planes must be one of {', '.join(PLANES)}, got {planes!r}")
    return planes
