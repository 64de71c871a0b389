"""`boltzformer evaluate DIR`: Dice and lesion-wise detection on a folder of cases.

DIR holds `cases.csv` (columns at least `case_id,prompt`; optional `modality` and any extra
columns, e.g. `target`, `size_band`, which are carried into the per-case results for grouping)
and `<case_id>_image.nii.gz` / `<case_id>_mask.nii.gz`.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import postprocess
from .errors import InputError, PromptError
from .io import read_volume
from .options import DEFAULT_MIRROR, DEFAULT_PLANES


def read_cases(folder: Path) -> list[dict]:
    path = Path(folder) / "cases.csv"
    if not Path(folder).is_dir():
        raise InputError(folder, "not a folder")
    if not path.is_file():
        raise InputError(path, "missing; an evaluation folder needs cases.csv with columns case_id,prompt")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not part of the first column name
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(path, f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    columns = reader.fieldnames or []
    if not rows or not {"case_id", "prompt"} <= set(columns):
        found = ",".join(str(k) for k in columns) or "none"
        what = "and one row" if {"case_id", "prompt"} <= set(columns) else f"(columns found: {found})"
        raise InputError(path, f"needs at least the columns case_id,prompt {what}")
    first_line = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        cid = (row.get("case_id") or "").strip()
        if not cid:
            raise InputError(path, f"line {line}: empty case_id")
        if cid in first_line:
            raise InputError(path, f"line {line}: case_id {cid!r} again (first on line {first_line[cid]}); "
                                   "each case once, or its Dice would count twice")
        first_line[cid] = line
        if row.get("modality") and modality_of(row["modality"]) is None:
            raise InputError(path, f"line {line}: modality {row['modality']!r} of {cid!r} is neither CT nor MR")
    return rows


def read_split(path) -> dict[str, str]:
    """case_id -> split name from a CSV with the columns case_id,split (e.g. train, heldout)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text; save the file as UTF-8") from None
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows or not {"case_id", "split"} <= set(rows[0]):
        raise InputError(path, "needs the columns case_id,split and one row")
    return {r["case_id"]: r["split"] for r in rows}


def modality_of(text: str | None) -> str | None:
    """The modality a cases.csv column names ("MRI (FLAIR)" -> "MR", "CT" -> "CT"), else None."""
    if not text:
        return None
    t = text.upper()
    return "MR" if t.startswith("MR") else "CT" if t.startswith("CT") else None


def evaluate_dir(folder, segmenter, case_ids=None, split: str | None = None, progress: bool = True,
                 seed: int = 0, threshold: float = 0.5, runs: int = 1, split_file=None,
                 mirror: bool = DEFAULT_MIRROR, planes: str = DEFAULT_PLANES) -> dict:
    """Segment every case and compare with its mask. Returns {"cases": [...], means...}.

    ``case_ids``: only these cases; ``split``: only the cases that ``split_file`` (see
    :func:`read_split`) puts in this split.
    """
    folder = Path(folder)
    rows = read_cases(folder)
    if case_ids:
        wanted = set(case_ids)
        rows = [r for r in rows if r["case_id"] in wanted]
    if split:
        if split_file is None:
            raise ValueError("a split needs the split_file that defines it")
        splits = read_split(split_file)
        rows = [r for r in rows if splits.get(r["case_id"]) == split]
    if not rows:
        raise InputError(folder / "cases.csv", f"no cases selected (cases={case_ids}, split={split})")
    results = []
    for n, row in enumerate(rows, 1):
        cid = row["case_id"]
        image = read_volume(folder / f"{cid}_image.nii.gz")
        truth = read_volume(folder / f"{cid}_mask.nii.gz").array > 0
        if truth.shape != image.shape:
            raise InputError(folder / f"{cid}_mask.nii.gz", f"shape {truth.shape} differs from its image {image.shape}")
        t = time.perf_counter()
        try:
            res = segmenter.segment_volume(image, row["prompt"], modality=modality_of(row.get("modality")), seed=seed,
                                           threshold=threshold, runs=runs, mirror=mirror, planes=planes)
        except PromptError as exc:  # the prompt came from cases.csv: say which row
            raise InputError(folder / "cases.csv", f"case {cid!r}: {exc}") from None
        seconds = time.perf_counter() - t
        det = postprocess.lesion_detection(res.mask > 0, truth, image.spacing_mm, min_lesion_mm3=res.min_lesion_mm3)
        extra = {k: v for k, v in row.items() if k not in ("case_id", "prompt", "source_repo_or_package", "license", "notes")}
        results.append({
            "case_id": cid, "prompt": row["prompt"], **extra,
            "dice": postprocess.dice(res.mask > 0, truth), "true_lesions": det["true_lesions"],
            "detected": det["detected"], "sensitivity": det["sensitivity"],
            "false_positive_components": det["false_positive_components"], "seconds": seconds,
        })
        if progress:
            r = results[-1]
            print(f"[{n}/{len(rows)}] {cid:<42} Dice {r['dice']:.3f}  lesions {r['detected']}/{r['true_lesions']}  "
                  f"FP {r['false_positive_components']}  {seconds:.2f} s", file=sys.stderr)
    return summarise(results)


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(cases: list[dict]) -> dict:
    positives = [c for c in cases if c["true_lesions"] > 0]
    negatives = [c for c in cases if c["true_lesions"] == 0]
    out = {
        "cases": cases,
        "n_cases": len(cases),
        "mean_dice": _mean(c["dice"] for c in positives),
        "mean_sensitivity": _mean(c["sensitivity"] for c in positives),
        "false_positives_per_case": _mean(c["false_positive_components"] for c in cases),
        "false_positives_per_lesion_free_case": _mean(c["false_positive_components"] for c in negatives),
        "n_lesion_free": len(negatives),
        "mean_seconds": _mean(c["seconds"] for c in cases),
    }
    for key in ("target", "size_band", "prompt"):
        if cases and key in cases[0]:
            out[f"dice_by_{key}"] = _dice_by(positives, lambda c: c[key])
    # One prompt over several sequences (MS lesions on FLAIR, T2 and T1) is several tasks: a mean
    # over them hides which one fails.
    if cases and "prompt" in cases[0] and "modality" in cases[0]:
        out["dice_by_prompt_and_modality"] = _dice_by(positives, lambda c: f"{c['prompt']} | {c['modality'] or '?'}")
    return out


def _dice_by(cases: list[dict], key) -> dict:
    groups: dict = {}
    for c in cases:
        groups.setdefault(key(c), []).append(c["dice"])
    return {k: {"mean_dice": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def format_table(summary: dict) -> str:
    lines = [f"{'case':<44}{'prompt':<28}{'Dice':>7}{'found':>8}{'sens':>7}{'FP':>5}{'s':>7}"]
    for c in summary["cases"]:
        sens = "" if c["sensitivity"] is None or (isinstance(c["sensitivity"], float) and math.isnan(c["sensitivity"])) \
            else f"{c['sensitivity']:.2f}"
        lines.append(f"{c['case_id'][:43]:<44}{c['prompt'][:27]:<28}{c['dice']:7.3f}{c['detected']:>4}/{c['true_lesions']:<3}"
                     f"{sens:>7}{c['false_positive_components']:>5}{c['seconds']:7.2f}")
    fp_free = (f"{summary['false_positives_per_lesion_free_case']:.3f} (n={summary['n_lesion_free']})"
               if summary["n_lesion_free"] else "– (no lesion-free case)")
    lines.append(f"mean Dice (cases with lesions) {summary['mean_dice']:.3f} | lesion-wise sensitivity "
                 f"{summary['mean_sensitivity']:.3f} | false-positive components per lesion-free case {fp_free} | "
                 f"{summary['n_cases']} cases")
    for key in ("target", "size_band", "prompt_and_modality"):
        if f"dice_by_{key}" in summary:
            parts = ", ".join(f"{k} {v['mean_dice']:.3f} (n={v['n']})" for k, v in summary[f"dice_by_{key}"].items())
            lines.append(f"Dice by {key.replace('_', ' ')}: {parts}")
    return "\n".join(lines)
