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
DEFAULT_BATCH_CPU, DEFAULT_BATCH_ACCELERATOR = 8, 32  # slices per network batch when none is asked for
MAX_SEED = 2**63 - 1  # seeds travel on as signed 64-bit integers (torch.Generator.manual_seed)
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


def _is_int(value) -> bool:
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    import math
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_run_options(*, prompt, runs, seed, slices, batch_size, threshold, min_lesion_mm3, min_nodule_score,
                      modality, flags: dict) -> str | None:
    """Raise BoltzformerError (PromptError for the prompt) naming the first argument of a
    segmentation run of the wrong type or out of range, before any work; return the modality
    (None for 'auto'). `flags`: the on/off options by name, which must be True or False (a
    string such as "no" would be taken as on)."""
    if prompt is not None and not isinstance(prompt, str):
        raise PromptError(f"the prompt must be one text (str), got {type(prompt).__name__}; segment one prompt "
                          "per call")
    if not _is_int(runs) or runs < 1:
        raise BoltzformerError(f"runs must be a whole number of at least 1, got {runs!r}")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED - (runs - 1):
        raise BoltzformerError(f"seed must be a whole number from 0 to {MAX_SEED - (runs - 1)} (seeds seed to "
                               f"seed + runs - 1 are used), got {seed!r}")
    if slices is not None:
        if not (isinstance(slices, (tuple, list)) and len(slices) == 2 and all(_is_int(v) for v in slices)):
            raise BoltzformerError(f"slices must be (start, stop), two whole numbers, got {slices!r}")
        if slices[0] < 0 or slices[1] < 0:
            raise BoltzformerError(f"slices {tuple(slices)}: slice indices count from 0 (no negative indices)")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise BoltzformerError(f"batch_size must be a whole number of at least 1 (or None: the device's "
                               f"default), got {batch_size!r}")
    check_threshold(threshold, min_lesion_mm3)
    if min_nodule_score is not None and not (_is_real(min_nodule_score) and 0 <= min_nodule_score <= 1):
        raise BoltzformerError(f"min_nodule_score must be between 0 and 1 (or None: the classifier's own), "
                               f"got {min_nodule_score!r}")
    for name, value in flags.items():
        if type(value).__name__ not in ("bool", "bool_"):  # Python's or numpy's bool
            raise BoltzformerError(f"{name} must be True or False, got {value!r}")
    if modality is None or (isinstance(modality, str) and modality.strip().lower() == "auto"):
        return None
    if not isinstance(modality, str) or modality.strip().upper() not in ("CT", "MR", "MRI"):
        raise BoltzformerError(f"modality must be 'CT', 'MR' or 'auto' (None), got {modality!r}")
    return modality.strip()


def check_threshold(threshold, min_lesion_mm3=None) -> None:
    """Raise BoltzformerError unless 0 <= threshold <= 1 and min_lesion_mm3 (if given) >= 0, finite."""
    if not (_is_real(threshold) and 0.0 <= threshold <= 1.0):
        raise BoltzformerError(f"threshold must be between 0 and 1, got {threshold!r}")
    if min_lesion_mm3 is not None and not (_is_real(min_lesion_mm3) and min_lesion_mm3 >= 0):
        raise BoltzformerError(f"min_lesion_mm3 must be a finite number of mm³, 0 or more, got {min_lesion_mm3!r}")
