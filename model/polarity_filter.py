"""Contrast polarity of MS lesion candidates on MR.

On FLAIR, T2 and PD an MS lesion is brighter than the tissue around it: that is what makes it a
"T2 lesion". A slice model that has seen few real brains also marks structures of the opposite
contrast: on a real 3D FLAIR brain of the training split (open_ms p07) the two putamina, darker
than the white matter around them, were 61 % of the false-positive volume.

Each thresholded 3D component (a candidate) gets ``local_contrast``: its mean intensity minus the
mean of a shell ``SHELL_MM`` wide around it, in the image's own units (voxels at the image's
minimum, the background of a skull-stripped brain or an exported slice, are left out of the
shell). The sequence is not known (a NIfTI file does not say it), so the candidates say it:

- at least MIN_CANDIDATES of them and at least half brighter than their shell: lesions are bright
  on this scan, and the darker candidates are dropped;
- otherwise nothing is dropped. On T1 most lesions are dark and, after contrast, some are bright:
  neither polarity can be ruled out there.

When the file does say the sequence (a DICOM series description, a BIDS file name:
intensity.mr_sequence) and it is T1, nothing is dropped whatever the candidates say.

No threshold here was tuned on data: the sign of the contrast, the shell (the lung filter's), the
majority and the minimum count follow from the reasoning above
(benchmarks/results/ms_polarity_preregistration.txt, written before any held-out measurement).
"""

from __future__ import annotations

import numpy as np

from . import postprocess
from .io import Volume
from .parallel import thread_map
from .synth import prompts as vocab

SHELL_MM = 3.0
MIN_CANDIDATES = 3  # fewer cannot say which polarity the lesions of a scan have
BRIGHT_TARGETS = ("ms_lesion",)
DARKER = "darker than its surroundings (on this scan MS lesions are brighter: FLAIR, T2)"


def applies(prompt: str, modality: str | None) -> bool:
    """MS lesion prompts (known phrasings, or free text naming multiple sclerosis) on MR."""
    if (modality or "").upper() != "MR":
        return False
    target = vocab.target_of_prompt(prompt)
    if target is not None:
        return target in BRIGHT_TARGETS
    text = prompt.lower()
    return "sclerosis" in text or "demyelinat" in text


def local_contrast(labels: np.ndarray, rows: list[dict], volume: Volume, boxes=None) -> np.ndarray:
    """Mean intensity inside each candidate minus the mean of the shell around it (row order).

    labels: int (z, y, x) components 1..n on `volume`'s grid; rows: their lesion-table rows.
    NaN for a candidate with no shell (it fills the image)."""
    image = volume.array
    background = image.min() if image.size else 0
    boxes = postprocess.find_objects(labels) if boxes is None else boxes
    sx, sy, sz = volume.spacing_mm
    depth = 0 if image.shape[0] == 1 else max(1, round(SHELL_MM / sz))  # a single slice: in-plane only
    shell_vox = (depth, max(1, round(SHELL_MM / sy)), max(1, round(SHELL_MM / sx)))

    def contrast(row: dict) -> float:
        lid = row["lesion_id"]
        box = boxes[lid - 1]
        big, region, shell = postprocess.candidate_shell(labels, lid, box, shell_vox)
        local = image[big].astype(np.float32)
        shell &= local > background
        if not shell.any():
            return float("nan")
        return float(local[region].mean() - local[shell].mean())

    return np.array(thread_map(contrast, rows), dtype=float)


def bright_scan(contrast: np.ndarray) -> bool:
    """Whether the candidates say that lesions are bright on this scan (see the module docstring)."""
    known = contrast[np.isfinite(contrast)]
    return len(known) >= MIN_CANDIDATES and np.mean(known > 0) >= 0.5


def dark_scan_warning(rows: list[dict], sequence: str | None) -> str | None:
    """A warning when most of a scan's candidates (rows with ``local_contrast``, at least
    MIN_CANDIDATES) are darker than their surroundings, as on a T1-weighted image, and the file
    does not already say T1 (the segmenter warns then): nothing is dropped there, and a T1 scan
    got a confident table of sulci and fissures without a word."""
    known = np.array([r["local_contrast"] for r in rows if np.isfinite(r.get("local_contrast", np.nan))])
    if sequence == "T1" or len(known) < MIN_CANDIDATES or np.mean(known < 0) <= 0.5:
        return None
    return ("most candidates are darker than the tissue around them, as on a T1-weighted image: MS lesions are "
            "bright on FLAIR and T2, which the model learnt, and on T1 it finds almost none (model card: held-out "
            "Dice by sequence); check the sequence, and treat these candidates as unverified")


def filter_candidates(labels: np.ndarray, rows: list[dict], volume: Volume, in_place: bool = False,
                      sequence: str | None = None):
    """-> (labels with dropped candidates removed and the rest renumbered 1..n, kept rows,
    rejected rows). Every row gains ``local_contrast``; the rejected ones ``fp_verdict``.
    in_place: renumber `labels` itself (the caller's array is spent) instead of a new array.
    sequence: the MR weighting the file states (intensity.mr_sequence), None when it does not."""
    contrast = local_contrast(labels, rows, volume)
    for row, c in zip(rows, contrast):
        row["local_contrast"] = round(float(c), 4)
    if sequence == "T1" or not bright_scan(contrast):
        return labels, rows, []
    kept, rejected = [], []
    for row, c in zip(rows, contrast):
        if c < 0:
            row["fp_verdict"] = DARKER
            rejected.append(row)
        else:
            kept.append(row)
    if not rejected:
        return labels, rows, []
    return postprocess.keep_only(labels, len(rows), kept, in_place=in_place), kept, rejected
