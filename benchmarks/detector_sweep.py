"""Sweep the 3D nodule detector's classifier threshold on a phantom_chest.py result.

    python benchmarks/detector_sweep.py runs/eval/detector_val.json [--max-fp 1.0] [--json out.json]

phantom_chest.py stores every detector candidate of every phantom as (classifier score, label of
the nodule within one voxel, 0 for none). For each threshold of THRESHOLDS this counts, as the
detector alone keeps them: nodules hit by a kept candidate per size band, and kept candidates on
no nodule per volume. The operating point is the lowest threshold with at most --max-fp of them
per volume (how the shipped detector's threshold was chosen, on validation phantoms only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

THRESHOLDS = tuple(round(0.30 + 0.05 * k, 2) for k in range(14))  # 0.30 ... 0.95


def sweep(cases: list[dict], thresholds=THRESHOLDS) -> list[dict]:
    rows = []
    for t in thresholds:
        small = [0, 0]
        big = [0, 0]
        fps = []
        for c in cases:
            cand = np.asarray(c.get("detector_candidates") or np.zeros((0, 2)), float).reshape(-1, 2)
            kept = cand[np.nan_to_num(cand[:, 0], nan=-1.0) >= t]
            hit = set(kept[:, 1].astype(int).tolist()) - {0}
            fps.append(int((kept[:, 1] == 0).sum()))
            for n in c["nodules"]:
                band = small if n["diameter_mm"] < 4.0 else big
                band[0] += n["label"] in hit
                band[1] += 1
        rows.append({"threshold": t, "sensitivity_3_4mm": small[0] / small[1] if small[1] else None,
                     "found_3_4mm": small, "sensitivity_ge4mm": big[0] / big[1] if big[1] else None,
                     "found_ge4mm": big, "fp_per_volume": float(np.mean(fps)), "fp_max": int(max(fps))})
    return rows


def row_text(row: dict) -> str:
    """'>= 4 mm 25/43, 3-4 mm 1/24, FP/volume 1.05 (max 4)': one sweep row, as the scripts print it."""
    (a, b), (c, d) = row["found_ge4mm"], row["found_3_4mm"]
    return f">= 4 mm {a}/{b}, 3-4 mm {c}/{d}, FP/volume {row['fp_per_volume']:.2f} (max {row['fp_max']})"


def write_json(path: Path | None, source: Path, max_fp: float, result: dict) -> None:
    """A sweep's result beside the file it came from (None: not written)."""
    if path:
        path.write_text(json.dumps({"source": str(source), "max_fp": max_fp, **result}, indent=1) + "\n")


def operating_point(rows: list[dict], max_fp: float) -> dict | None:
    """The lowest threshold with at most max_fp false positives per volume (None if none)."""
    ok = [r for r in rows if r["fp_per_volume"] <= max_fp]
    return min(ok, key=lambda r: r["threshold"]) if ok else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="a phantom_chest.py --json file")
    ap.add_argument("--max-fp", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cases = json.loads(args.result.read_text())["cases"]
    rows = sweep(cases)
    for r in rows:
        print(f"score >= {r['threshold']:.2f}: {row_text(r)}")
    point = operating_point(rows, args.max_fp)
    print("operating point:", point)
    write_json(args.json, args.result, args.max_fp, {"sweep": rows, "operating_point": point})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
