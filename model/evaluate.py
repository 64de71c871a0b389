"""`boltzformer evaluate DIR`: Dice and lesion-wise detection on a folder of cases.

DIR holds `cases.csv` (columns at least `case_id,prompt`; optional `modality` and any extra
columns, e.g. `target`, `size_band`, which are carried into the per-case results for grouping)
and `<case_id>_image.nii.gz` / `<case_id>_mask.nii.gz`, the mask on its image's voxel grid
(stored in another axis order or direction it is brought onto it; elsewhere it is refused).

The metrics (`summarise`): Dice per case, its mean over the cases with a target; lesions are
3D connected components (26-connected) of the truth; a true lesion is detected when a predicted
voxel touches it. `lesion_sensitivity` pools every true lesion of the cases (detected / lesions),
`mean_case_sensitivity` is the mean of the per-case ratios (a one-lesion slice weighs as much as
a brain with 98 lesions); `lesion_sensitivity_by_size` pools by each true lesion's mean axial
diameter. False positives: predicted components touching no true lesion, per case, and their
mean over the lesion-free cases.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import postprocess
from .errors import InputError, PromptError
from .io import Volume, read_volume
from .io.formats import read_table_bytes
from .options import DEFAULT_MIRROR, DEFAULT_PLANES


def read_cases(folder: Path) -> list[dict]:
    path = Path(folder) / "cases.csv"
    if not Path(folder).is_dir():
        raise InputError(folder, "not a folder")
    if not os.path.lexists(path):
        raise InputError(path, "missing; an evaluation folder needs cases.csv with columns case_id,prompt")
    data = read_table_bytes(path)
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not part of the first column name
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(path, f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:  # e.g. a field over the csv module's limit
        raise InputError(path, f"line {reader.line_num}: not a readable CSV table ({exc})") from None
    columns = reader.fieldnames or []
    if not rows or not {"case_id", "prompt"} <= set(columns):
        found = ",".join(str(k) for k in columns) or "none"
        what = "and one row" if {"case_id", "prompt"} <= set(columns) else f"(columns found: {found})"
        raise InputError(path, f"needs at least the columns case_id,prompt {what}")
    first_line = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        cid = row["case_id"] = (row.get("case_id") or "").strip()  # the id as the file names use it
        if not cid:
            raise InputError(path, f"line {line}: empty case_id")
        if cid in first_line:
            raise InputError(path, f"line {line}: case_id {cid!r} again (first on line {first_line[cid]}); "
                                   "each case once, or its Dice would count twice")
        first_line[cid] = line
        if not (row.get("prompt") or "").strip():  # a blank cell, or a short row ("case7" alone)
            raise InputError(path, f"line {line}: case {cid!r}: the prompt is empty; each case needs the prompt "
                                   "its mask answers")
        if row.get("modality") and modality_of(row["modality"]) is None:
            raise InputError(path, f"line {line}: modality {row['modality']!r} of {cid!r} is neither CT nor MR")
    return rows


def read_split(path) -> dict[str, str]:
    """case_id -> split name from a CSV with the columns case_id,split (e.g. train, heldout).

    Spaces around either are dropped; a case listed twice is refused when the two rows name
    different splits (the row order would decide), and an empty case_id or split too."""
    path = Path(path)
    try:
        text = read_table_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text; save the file as UTF-8") from None
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise InputError(path, f"is not a readable CSV table ({exc})") from None
    if not rows or not {"case_id", "split"} <= set(rows[0]):
        raise InputError(path, "needs the columns case_id,split and one row")
    splits: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        cid, name = (row.get("case_id") or "").strip(), (row.get("split") or "").strip()
        if not cid or not name:
            raise InputError(path, f"line {line}: empty {'case_id' if not cid else 'split'}")
        if cid in splits and splits[cid] != name:
            raise InputError(path, f"line {line}: case {cid!r} in split {name!r}, but line {first_line[cid]} puts it "
                                   f"in {splits[cid]!r}; each case in one split")
        splits[cid] = name
        first_line.setdefault(cid, line)
    return splits


def modality_of(text: str | None) -> str | None:
    """The modality a cases.csv column names ("MRI (FLAIR)" -> "MR", "CT" -> "CT"), else None."""
    if not text:
        return None
    t = text.upper()
    return "MR" if t.startswith("MR") else "CT" if t.startswith("CT") else None


def evaluate_dir(folder, segmenter, case_ids=None, split: str | None = None, progress: bool = True,
                 seed: int = 0, threshold: float = 0.5, runs: int = 1, split_file=None,
                 mirror: bool = DEFAULT_MIRROR, planes: str = DEFAULT_PLANES, warn=None) -> dict:
    """Segment every case and compare with its mask. Returns {"cases": [...], means...}.

    ``case_ids``: only these cases (each must be in cases.csv); ``split``: only the cases that
    ``split_file`` (see :func:`read_split`) puts in this split (its cases missing from cases.csv
    are named through ``warn``, default: stderr).
    """
    folder = Path(folder)
    rows = read_cases(folder)
    warn = warn or (lambda text: print(f"boltzformer: warning: {text}", file=sys.stderr))
    if case_ids:
        wanted = set(case_ids)
        unknown = sorted(wanted - {r["case_id"] for r in rows})
        if unknown:
            raise InputError(folder / "cases.csv", f"has no case {', '.join(repr(c) for c in unknown)} (--cases)")
        rows = [r for r in rows if r["case_id"] in wanted]
    if split:
        if split_file is None:
            raise ValueError("a split needs the split_file that defines it")
        splits = read_split(split_file)
        ids = {r["case_id"] for r in rows}
        if missing := sorted(c for c, name in splits.items() if name == split and c not in ids):
            warn(f"{split_file}: {len(missing)} case(s) of split {split!r} are not in {folder / 'cases.csv'}"
                 f"{' (or not among --cases)' if case_ids else ''}: {', '.join(missing[:5])}"
                 f"{', ...' if len(missing) > 5 else ''}")
        rows = [r for r in rows if splits.get(r["case_id"]) == split]
    if not rows:
        raise InputError(folder / "cases.csv", f"no cases selected (cases={case_ids}, split={split})")
    for row in rows:  # every case's files first: not found after an hour of segmenting the ones before
        for part in ("image", "mask"):
            if not (folder / f"{row['case_id']}_{part}.nii.gz").is_file():
                raise InputError(folder / f"{row['case_id']}_{part}.nii.gz",
                                 f"does not exist or is not a file (case {row['case_id']!r} of cases.csv)")
    results = []
    for n, row in enumerate(rows, 1):
        cid = row["case_id"]
        image = read_volume(folder / f"{cid}_image.nii.gz")
        truth = mask_on_grid(read_volume(folder / f"{cid}_mask.nii.gz"), image)
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
            "true_lesion_diameters_mm": det["true_lesion_diameters_mm"],
            "true_lesion_detected": det["true_lesion_detected"],
        })
        if progress:
            r = results[-1]
            print(f"[{n}/{len(rows)}] {cid:<42} Dice {r['dice']:.3f}  lesions {r['detected']}/{r['true_lesions']}  "
                  f"FP {r['false_positive_components']}  {seconds:.2f} s", file=sys.stderr)
    return summarise(results)


def mask_on_grid(mask: Volume, image: Volume) -> np.ndarray:
    """The mask's voxels (bool (z, y, x)) on its image's grid: as stored when the two headers
    agree, reordered when the mask is the same grid stored in another axis order or direction
    (the same world positions); otherwise an InputError (a voxel-by-voxel comparison would
    score the wrong voxels)."""
    from .orientation import to_canonical

    if mask.same_geometry(image, atol=1e-3):
        return mask.array > 0
    canonical_image, reorientation, _ = to_canonical(image)
    canonical_mask, mask_reorientation, _ = to_canonical(mask)
    if canonical_mask.same_geometry(canonical_image, atol=1e-3):
        return np.ascontiguousarray(reorientation.from_canonical(mask_reorientation.to_canonical(mask.array > 0)))
    where = mask.path or "the mask"
    raise InputError(where, f"does not lie on its image's voxel grid (shape {mask.shape} vs {image.shape}, spacing, "
                            "origin or direction differ); resample it onto the image first")


def _pooled(cases: list[dict]) -> dict:
    lesions = sum(c["true_lesions"] for c in cases)
    detected = sum(c["detected"] for c in cases)
    return {"detected": detected, "lesions": lesions, "sensitivity": detected / lesions if lesions else float("nan")}


# Bands of a true lesion's mean axial diameter (mm) for the pooled sensitivity: [low, high).
LESION_SIZE_BANDS_MM = ((0.0, 3.0), (3.0, 5.0), (5.0, 10.0), (10.0, 20.0), (20.0, math.inf))


def _band_name(low: float, high: float) -> str:
    return f"<{high:g} mm" if low == 0 else f">={low:g} mm" if math.isinf(high) else f"{low:g}-{high:g} mm"


def _sensitivity_by_size(cases: list[dict]) -> dict:
    out = {}
    for low, high in LESION_SIZE_BANDS_MM:
        hits = [hit for c in cases for d, hit in zip(c["true_lesion_diameters_mm"], c["true_lesion_detected"])
                if low <= d < high]
        if hits:
            out[_band_name(low, high)] = {"detected": int(sum(hits)), "lesions": len(hits),
                                          "sensitivity": sum(hits) / len(hits)}
    return out


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(cases: list[dict]) -> dict:
    positives = [c for c in cases if c["true_lesions"] > 0]
    negatives = [c for c in cases if c["true_lesions"] == 0]
    pooled = _pooled(cases)
    out = {
        "cases": cases,
        "n_cases": len(cases),
        "mean_dice": _mean(c["dice"] for c in positives),
        "lesion_sensitivity": pooled["sensitivity"],
        "true_lesions": pooled["lesions"],
        "mean_case_sensitivity": _mean(c["sensitivity"] for c in positives),
        "false_positives_per_case": _mean(c["false_positive_components"] for c in cases),
        "false_positives_per_lesion_free_case": _mean(c["false_positive_components"] for c in negatives),
        "n_lesion_free": len(negatives),
        "mean_seconds": _mean(c["seconds"] for c in cases),
    }
    if cases and all("true_lesion_diameters_mm" in c for c in cases):
        out["lesion_sensitivity_by_size"] = _sensitivity_by_size(cases)
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


def json_bytes(summary: dict) -> bytes:
    """The summary as JSON, NaN (no lesion, no lesion-free case) written as null: bare NaN is
    not JSON, and strict readers (JavaScript's, jq) refuse the file."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (float, np.floating)):
            return float(x) if math.isfinite(x) else None
        if isinstance(x, np.integer):
            return int(x)
        return x

    return json.dumps(clean(summary), indent=2, allow_nan=False).encode()


def format_table(summary: dict) -> str:
    lines = [f"{'case':<44}{'prompt':<28}{'Dice':>7}{'found':>8}{'sens':>7}{'FP':>5}{'s':>7}"]
    for c in summary["cases"]:
        sens = "" if c["sensitivity"] is None or (isinstance(c["sensitivity"], float) and math.isnan(c["sensitivity"])) \
            else f"{c['sensitivity']:.2f}"
        lines.append(f"{c['case_id'][:43]:<44}{c['prompt'][:27]:<28}{c['dice']:7.3f}{c['detected']:>4}/{c['true_lesions']:<3}"
                     f"{sens:>7}{c['false_positive_components']:>5}{c['seconds']:7.2f}")
    fp_free = (f"{summary['false_positives_per_lesion_free_case']:.3f} (n={summary['n_lesion_free']})"
               if summary["n_lesion_free"] else "– (no lesion-free case)")
    lines.append(f"mean Dice (cases with lesions) {summary['mean_dice']:.3f} | lesion sensitivity "
                 f"{summary['lesion_sensitivity']:.3f} ({summary['true_lesions']} lesions; per-case mean "
                 f"{summary['mean_case_sensitivity']:.3f}) | false-positive components per lesion-free case {fp_free} | "
                 f"{summary['n_cases']} cases")
    if summary.get("lesion_sensitivity_by_size"):
        parts = ", ".join(f"{k} {v['detected']}/{v['lesions']}" for k, v in summary["lesion_sensitivity_by_size"].items())
        lines.append(f"lesions found by mean axial diameter: {parts}")
    for key in ("target", "size_band", "prompt_and_modality"):
        if f"dice_by_{key}" in summary:
            parts = ", ".join(f"{k} {v['mean_dice']:.3f} (n={v['n']})" for k, v in summary[f"dice_by_{key}"].items())
            name = "size band (the case's target area)" if key == "size_band" else key.replace("_", " ")
            lines.append(f"Dice by {name}: {parts}")
    return "\n".join(lines)
