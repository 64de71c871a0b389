"""Choose the false-positive filter's thresholds on phantom validation candidates only.

    python benchmarks/phantom_chest.py --set val --candidates runs/phantom_val_candidates.json
    python benchmarks/fp_threshold_sweep.py runs/phantom_val_candidates.json --json benchmarks/results/fp_threshold_sweep.json

Each candidate is a thresholded 3D component of the model's "lung nodule" output on a
validation phantom (seeds 80000+), with its filter features and whether it touches a true
nodule. The rule (see boltzformer.fp_filter.verdict) keeps a candidate when lung_shell >= S and
not (blobness < B and z_continuation > C). Over a grid of (S, B, C) this keeps the rules that
lose no more than `--max-lost` of the true candidates and picks the one with the fewest false
positives left (ties: the loosest rule). The real chest CTs are never part of this choice.

With `--classifier`, the rule's (S, B, C) stay as in boltzformer.fp_filter and the sweep is over
the 3D classifier's threshold T on nodule_score: the lowest T that leaves at most
`--max-fp-per-volume` false positives per volume (the operating point of a CAD system; the
bundled choice is 4, the middle of the LUNA16 FROC range of 1/8 to 8 per scan), or with
`--max-lost` instead, the highest T that still keeps 1 - max-lost of the true candidates the
rule keeps. The chosen T is what goes into resources/fp-classifier.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np


def evaluate(cands: list[dict], s: float, b: float, c: float) -> dict:
    keep = np.array([x["lung_shell"] >= s and not (x["blobness"] < b and x["z_continuation"] > c) for x in cands])
    true = np.array([x["true"] for x in cands])
    cases = len({x["case"] for x in cands}) or 1
    return {"shell": s, "blobness": b, "continuation": c, "true_kept": int((keep & true).sum()), "true": int(true.sum()),
            "fp_left_per_volume": float((keep & ~true).sum() / cases), "fp_before_per_volume": float((~true).sum() / cases)}


def before_classifier(cands: list[dict], nodules: bool = False) -> list[dict]:
    """The candidates fp_filter keeps before its classifier's threshold (fp_filter.verdict with
    no score rule); with `nodules`, also the 3 mm size rule of nodule prompts."""
    from boltzformer import fp_filter as f

    return [x for x in cands if f.verdict(x, min_nodule_score=0.0) == "kept"
            and (not nodules or x["volume_mm3"] >= f.MIN_NODULE_VOLUME_MM3)]


def sweep_classifier(cands: list[dict], max_lost: float, max_fp: float | None = None) -> tuple[dict, list[dict]]:
    base = before_classifier(cands)
    true = np.array([x["true"] for x in base])
    score = np.array([x["nodule_score"] for x in base])
    cases = len({x["case"] for x in cands}) or 1
    rows = []
    for t in np.round(np.arange(0.0, 1.0, 0.01), 2):
        keep = score >= t
        rows.append({"threshold": float(t), "true_kept": int((keep & true).sum()), "true": int(true.sum()),
                     "fp_left_per_volume": float((keep & ~true).sum() / cases),
                     "fp_before_per_volume": float((~true).sum() / cases)})
    if max_fp is not None:
        return min((r for r in rows if r["fp_left_per_volume"] <= max_fp), key=lambda r: r["threshold"]), rows
    ok = [r for r in rows if r["true_kept"] >= (1 - max_lost) * r["true"]]
    return max(ok, key=lambda r: r["threshold"]), rows


def sweep_sensitivity(cands: list[dict], cases: list[dict], max_fp: float) -> tuple[dict, list[dict]]:
    """The 3D classifier's threshold by nodule sensitivity (the default pipeline's other rules as
    they are: lung shell, vessel rule, the 3 mm size rule of nodule prompts). cases: the
    phantom_chest.py --json cases (their nodules); candidates need "nodule_labels". Picks the T
    with the highest sensitivity >= 4 mm among those with at most `max_fp` false positives per
    volume; ties: fewer false positives, then the higher T."""
    big = {(c["case"], n["label"]) for c in cases for n in c["nodules"] if n["diameter_mm"] >= 4.0}
    small = {(c["case"], n["label"]) for c in cases for n in c["nodules"] if n["diameter_mm"] < 4.0}
    base = before_classifier(cands, nodules=True)
    rows = []
    for t in np.round(np.arange(0.0, 1.0, 0.01), 2):
        kept = [x for x in base if x["nodule_score"] >= t]
        hit = {(x["case"], lab) for x in kept for lab in x["nodule_labels"]}
        rows.append({"threshold": float(t), "sensitivity_ge4mm": len(hit & big) / len(big),
                     "found_ge4mm": len(hit & big), "nodules_ge4mm": len(big),
                     "sensitivity_3_4mm": len(hit & small) / len(small) if small else None,
                     "fp_per_volume": sum(not x["nodule_labels"] for x in kept) / len(cases)})
    ok = [r for r in rows if r["fp_per_volume"] <= max_fp + 1e-9]
    best = max(ok, key=lambda r: (r["found_ge4mm"], -r["fp_per_volume"], r["threshold"]))
    return best, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidates", type=Path)
    ap.add_argument("--max-lost", type=float, default=0.02, help="share of true candidates the rule may drop")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--classifier", action="store_true", help="sweep the 3D classifier's threshold instead")
    ap.add_argument("--max-fp-per-volume", type=float, default=None,
                    help="with --classifier: the lowest threshold leaving at most this many false positives per volume")
    ap.add_argument("--cases", type=Path, default=None,
                    help="with --classifier and --max-fp-per-volume: phantom_chest.py's --json of the same run; "
                         "choose by nodule sensitivity >= 4 mm (see sweep_sensitivity)")
    args = ap.parse_args()
    cands = json.loads(args.candidates.read_text())
    if args.classifier and args.cases:
        cases = json.loads(args.cases.read_text())["cases"]
        best, rows = sweep_sensitivity(cands, cases, args.max_fp_per_volume)
        print(json.dumps(best, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"chosen": best, "max_fp_per_volume": args.max_fp_per_volume,
                                             "candidates": len(cands), "grid": rows}, indent=1))
        return
    if args.classifier:
        best, rows = sweep_classifier(cands, args.max_lost, args.max_fp_per_volume)
        print(json.dumps(best, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"chosen": best, "max_lost": args.max_lost,
                                             "max_fp_per_volume": args.max_fp_per_volume, "candidates": len(cands),
                                             "grid": rows}, indent=1))
        return
    grid = itertools.product(np.round(np.arange(0.0, 0.61, 0.05), 2), np.round(np.arange(0.0, 0.61, 0.05), 2),
                             np.round(np.arange(0.0, 1.01, 0.1), 2))
    rows = [evaluate(cands, *g) for g in grid]
    ok = [r for r in rows if r["true_kept"] >= (1 - args.max_lost) * r["true"]]
    best = min(ok, key=lambda r: (r["fp_left_per_volume"], r["shell"], r["blobness"], -r["continuation"]))
    print(json.dumps(best, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"chosen": best, "max_lost": args.max_lost, "candidates": len(cands),
                                         "grid": rows}, indent=1))


if __name__ == "__main__":
    main()
