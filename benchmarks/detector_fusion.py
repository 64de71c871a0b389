"""The 3D nodule detector with the slice model's agreement as a second tier (phantom chests).

    python benchmarks/detector_fusion.py --set val --json runs/eval/fusion_val.json \
        --fine runs/fp_fine6k/fp-classifier.safetensors
    python benchmarks/detector_fusion.py --sweep runs/eval/fusion_val.json [--max-fp 1.0]

Rule under test (benchmarks/results/detector_fusion_preregistration.txt): a candidate is kept when
its classifier score is >= t_hi, or >= t_lo and the slice model's "lung nodule" probability reaches
SLICE_THRESHOLD in the ball of the candidate's LoG radius. Per phantom this records, for every
candidate: (score, slice evidence, label of the nodule within one voxel, 0 for none), for
C1 (the shipped gate and classifier, as the product computes them) and, with --fine, C2 (that
classifier with the gate stored next to it). --sweep counts, per configuration and grid pair,
nodules found by size band and false positives per volume, and picks each one's operating point.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from phantom_chest import phantom_case

SLICE_THRESHOLD = 0.5  # the pipeline's segmentation threshold; not tuned
T_HI = (0.80, 0.85, 0.90, 0.95, 0.99, None)  # None: only candidates the slice model confirms
T_LO = (0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70)


def slice_evidence(prob: np.ndarray, points_zyx: np.ndarray, radius_mm: np.ndarray, spacing_xyz) -> np.ndarray:
    """Max of prob (Z x Y x X) over the ball of radius_mm[i] around points_zyx[i] (the voxel
    itself at least) -> N float."""
    mm = np.array(spacing_xyz, float)[::-1]
    out = np.zeros(len(points_zyx))
    for i, (p, r) in enumerate(zip(np.asarray(points_zyx, int), radius_mm)):
        half = np.floor(r / mm).astype(int)
        lo, hi = np.maximum(p - half, 0), np.minimum(p + half + 1, prob.shape)
        gz, gy, gx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        ball = ((gz - p[0]) * mm[0]) ** 2 + ((gy - p[1]) * mm[1]) ** 2 + ((gx - p[2]) * mm[2]) ** 2 <= r * r
        out[i] = prob[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][ball].max()
    return out


def record(set_name: str, count: int, fine_path: Path | None) -> list[dict]:
    from boltzformer import fp_classifier, nodule_detector
    from boltzformer.segmenter import Segmenter

    seg = Segmenter.from_pretrained(None, device="cpu")
    configs = {"C1": nodule_detector.bundled()}
    if fine_path:
        configs["C2"] = fp_classifier.load(fine_path)
    cases = []
    for i in range(count):
        ph, vol = phantom_case(set_name, i)
        t = time.perf_counter()
        res = seg.segment_volume(vol, "lung nodule", fp_reduction=False)
        near = ndimage.grey_dilation(ph.nodule_labels, size=(3, 3, 3))
        row = {"case": i, "nodules": [{"diameter_mm": n.diameter_mm, "kind": n.kind, "label": n.label}
                                      for n in ph.nodules]}
        for name, clf in configs.items():
            cand = nodule_detector.find_candidates(vol, clf)
            ev = slice_evidence(res.probabilities, cand.points_zyx, cand.radius_mm, vol.spacing_mm)
            lab = near[tuple(cand.points_zyx.T)] if len(cand.points_zyx) else np.zeros(0, int)
            row[name] = [[round(float(s), 4), round(float(e), 4), int(h)]
                         for s, e, h in zip(np.nan_to_num(cand.score, nan=-1.0), ev, lab)]
        cases.append(row)
        print(f"{set_name} {i}: {len(ph.nodules)} nodules, candidates "
              + ", ".join(f"{k} {len(row[k])}" for k in configs) + f", {time.perf_counter() - t:.1f} s", flush=True)
    return cases


def count(cases: list[dict], config: str, t_hi: float | None, t_lo: float) -> dict:
    small, big, fps = [0, 0], [0, 0], []
    for c in cases:
        a = np.asarray(c[config], float).reshape(-1, 3)
        keep = (a[:, 0] >= t_lo) & (a[:, 1] >= SLICE_THRESHOLD)
        if t_hi is not None:
            keep |= a[:, 0] >= t_hi
        hit = set(a[keep, 2].astype(int).tolist()) - {0}
        fps.append(int((a[keep, 2] == 0).sum()))
        for n in c["nodules"]:
            band = small if n["diameter_mm"] < 4.0 else big
            band[0] += n["label"] in hit
            band[1] += 1
    return {"config": config, "t_hi": t_hi, "t_lo": t_lo, "found_ge4mm": big, "found_3_4mm": small,
            "fp_per_volume": float(np.mean(fps)), "fp_max": int(max(fps))}


def sweep(cases: list[dict], max_fp: float) -> dict:
    out = {}
    for config in ("C1", "C2"):
        if config not in cases[0]:
            continue
        base = count(cases, config, 0.8, 2.0)  # t_lo above every score: the classifier alone at 0.8
        rows = [count(cases, config, hi, lo) for hi in T_HI for lo in T_LO if hi is None or lo < hi]
        ok = [r for r in rows if r["fp_per_volume"] <= max_fp]
        best = max(ok, key=lambda r: (r["found_ge4mm"][0], r["found_3_4mm"][0], -r["fp_per_volume"], r["t_lo"]),
                   default=None)
        out[config] = {"classifier_alone_at_0.8": base, "operating_point": best, "grid": rows}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("val", "test"), default="val")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--fine", type=Path, default=None, help="C2's classifier (.safetensors with its .json)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sweep", type=Path, default=None, help="a --json file of this script: sweep it")
    ap.add_argument("--max-fp", type=float, default=1.0)
    args = ap.parse_args()
    if args.sweep:
        from detector_sweep import row_text, write_json

        result = sweep(json.loads(args.sweep.read_text())["cases"], args.max_fp)
        for config, r in result.items():
            print(f"{config}: classifier alone at 0.8: {row_text(r['classifier_alone_at_0.8'])}")
            print(f"{config}: operating point: {r['operating_point']}")
        write_json(args.json, args.sweep, args.max_fp, result)
        return 0
    cases = record(args.set, args.count, args.fine)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"set": args.set, "count": args.count, "fine": str(args.fine),
                                         "slice_threshold": SLICE_THRESHOLD, "cases": cases}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
