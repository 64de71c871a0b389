"""A two-stage (cascade) classifier for the 3D nodule detector, on phantom chests.

    python benchmarks/detector_cascade.py hard --data .devdata/fpcand_fine \
        --stage1 runs/fp_fine6k/fp-classifier.safetensors --min-score 0.1 --out .devdata/fpcand_hard
    python -m boltzformer.training.train_fp fit --data .devdata/fpcand_hard --out runs/fp_stage2 --arch fine ...
    python benchmarks/detector_cascade.py record --set val --stage1 S1 --stage2 S2 --json runs/eval/cascade_val.json
    python benchmarks/detector_cascade.py sweep runs/eval/cascade_val.json [--json out.json]

`hard` keeps, of each mined training volume (train_fp's files), every nodule patch and the other
patches that stage 1 scores at least --min-score: stage 2 learns only what stage 1 lets through.
`record` runs the detector's candidate generator with stage 1's gate on phantom chests and stores,
per candidate, (stage-1 score, stage-2 score, label of the nodule within one voxel, 0 for none).
`sweep` keeps a candidate when stage 1 >= MIN_STAGE1 and stage 2 >= t, for each t of
detector_sweep.THRESHOLDS, counted as detector_sweep counts the detector alone.
The rule and its outcome: benchmarks/results/detector_cascade_preregistration.txt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

MIN_STAGE1 = 0.1  # fixed before any measurement (the preregistration)


def hard(data: Path, stage1_path: Path, min_score: float, out: Path) -> None:
    from boltzformer import fp_classifier

    stage1 = fp_classifier.load(stage1_path)
    out.mkdir(parents=True, exist_ok=True)
    kept_neg = total_neg = 0
    t0 = time.perf_counter()
    for f in sorted(data.glob("vol*.npz")):
        if f.name.endswith(".tmp.npz") or (out / f.name).exists():
            continue
        d = np.load(f)
        label = d["label"]
        neg = np.flatnonzero(label == 0)
        x = np.stack([d["ct"][neg], d["mask"][neg].astype(np.uint8) * 255], axis=1).astype(np.float32) / 255.0
        score = stage1.probabilities(x) if len(neg) else np.zeros(0)
        keep = np.sort(np.concatenate([np.flatnonzero(label == 1), neg[score >= min_score]]))
        kept_neg += int((score >= min_score).sum())
        total_neg += len(neg)
        tmp = out / (f.stem + ".tmp.npz")
        np.savez_compressed(tmp, ct=d["ct"][keep], mask=d["mask"][keep], label=label[keep], source=d["source"][keep],
                            candidates=d["candidates"], true_candidates=d["true_candidates"])
        tmp.rename(out / f.name)
        print(f"{f.name}: {len(keep)} patches ({int((label[keep] == 0).sum())} hard negatives of {len(neg)}); "
              f"{kept_neg}/{total_neg} so far, {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def record(set_name: str, count: int, stage1_path: Path, stage2_path: Path) -> list[dict]:
    from scipy import ndimage

    from boltzformer import fp_classifier, nodule_detector
    from phantom_chest import phantom_case

    stage1, stage2 = fp_classifier.load(stage1_path), fp_classifier.load(stage2_path)
    cases = []
    for i in range(count):
        t = time.perf_counter()
        ph, vol = phantom_case(set_name, i)
        cand = nodule_detector.find_candidates(vol, stage1)
        patches = nodule_detector.ball_patches(vol.array, cand.points_zyx, cand.radius_mm, vol.spacing_mm,
                                               stage2.geometry)
        s2 = stage2.probabilities(patches) if len(patches) else np.zeros(0)
        near = ndimage.grey_dilation(ph.nodule_labels, size=(3, 3, 3))
        lab = near[tuple(cand.points_zyx.T)] if len(cand.points_zyx) else np.zeros(0, int)
        cases.append({"case": i, "nodules": [{"diameter_mm": n.diameter_mm, "kind": n.kind, "label": n.label}
                                             for n in ph.nodules],
                      "candidates": [[round(float(a), 4), round(float(b), 4), int(h)]
                                     for a, b, h in zip(np.nan_to_num(cand.score, nan=-1.0), s2, lab)]})
        print(f"{set_name} {i}: {len(ph.nodules)} nodules, {len(lab)} candidates, "
              f"{time.perf_counter() - t:.1f} s", flush=True)
    return cases


def sweep(cases: list[dict], max_fp: float) -> dict:
    from detector_sweep import operating_point, sweep as sweep_scores

    def as_scores(stage2: bool):
        out = []
        for c in cases:
            a = np.asarray(c["candidates"], float).reshape(-1, 3)
            score = np.where(a[:, 0] >= MIN_STAGE1, a[:, 1], -1.0) if stage2 else a[:, 0]
            out.append({"nodules": c["nodules"], "detector_candidates": np.stack([score, a[:, 2]], 1).tolist()})
        return out

    result = {}
    for name, stage2 in (("stage1_alone", False), ("cascade", True)):
        rows = sweep_scores(as_scores(stage2))
        result[name] = {"sweep": rows, "operating_point": operating_point(rows, max_fp)}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hard")
    h.add_argument("--data", type=Path, required=True)
    h.add_argument("--stage1", type=Path, required=True)
    h.add_argument("--min-score", type=float, default=MIN_STAGE1)
    h.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("record")
    r.add_argument("--set", choices=("val", "test"), default="val")
    r.add_argument("--count", type=int, default=20)
    r.add_argument("--stage1", type=Path, required=True)
    r.add_argument("--stage2", type=Path, required=True)
    r.add_argument("--json", type=Path, required=True)
    s = sub.add_parser("sweep")
    s.add_argument("result", type=Path)
    s.add_argument("--max-fp", type=float, default=1.0)
    s.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    if args.command == "hard":
        hard(args.data, args.stage1, args.min_score, args.out)
    elif args.command == "record":
        cases = record(args.set, args.count, args.stage1, args.stage2)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"set": args.set, "stage1": str(args.stage1), "stage2": str(args.stage2),
                                         "min_stage1": MIN_STAGE1, "cases": cases}) + "\n")
    else:
        from detector_sweep import row_text, write_json

        result = sweep(json.loads(args.result.read_text())["cases"], args.max_fp)
        for name, r in result.items():
            for row in r["sweep"]:
                print(f"{name} >= {row['threshold']:.2f}: {row_text(row)}")
            print(f"{name}: operating point {r['operating_point']}")
        write_json(args.json, args.result, args.max_fp, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
