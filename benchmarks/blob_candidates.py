"""How many phantom nodules would a 3D blob detector reach, at how many candidates per volume?

    python benchmarks/blob_candidates.py [--set val] [--count 12] --json benchmarks/results/blob_candidates.json

A feasibility count for a 3D candidate generator (the model card's next step after stage 10),
not part of the product. On each phantom chest of `phantom_chest.py`'s set: a scale-normalised
3D Laplacian of Gaussian of the HU volume (radii 1.5-6 mm, the maximum over scales), its local
maxima inside the phantom's lung mask, and, for each response threshold, the number of maxima
(candidates) and the nodules with a maximum within one voxel of their mask, per size band.
The lung mask is the phantom's own (an oracle): this counts what the blob response can reach,
not what a classical lung mask would let through.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import ndimage

from phantom_chest import phantom_case

RADII_MM = (1.5, 2.5, 4.0, 6.0)
THRESHOLDS = (100, 200, 400, 700, 1000, 1500)
BANDS = ("3-4mm", "4-8mm", "ge8mm")


def band(diameter_mm: float) -> str:
    return "3-4mm" if diameter_mm < 4 else "4-8mm" if diameter_mm < 8 else "ge8mm"


def blob_response(hu: np.ndarray, spacing_xyz) -> np.ndarray:
    """Z x Y x X float32: max over RADII_MM of -sigma² LoG (bright blobs of that radius score high;
    sigma = r / sqrt(3), in mm, so anisotropic voxels get per-axis sigmas)."""
    sx, sy, sz = spacing_xyz
    img = hu.astype(np.float32).clip(-1000, 200)
    best = np.full(img.shape, -np.inf, np.float32)
    for r in RADII_MM:
        s = r / np.sqrt(3)
        np.maximum(best, -(s**2) * ndimage.gaussian_laplace(img, (s / sz, s / sy, s / sx)), out=best)
    return best


def count_case(ph) -> list[dict]:
    best = blob_response(ph.image, ph.spacing_mm)
    lung = ndimage.binary_closing(ph.masks["lung"] > 0, iterations=2)
    peaks = (best == ndimage.maximum_filter(best, size=(3, 5, 5))) & lung & (best > min(THRESHOLDS))
    zz, yy, xx = np.nonzero(peaks)
    response = best[zz, yy, xx]
    hit = ndimage.grey_dilation(ph.nodule_labels, size=(3, 3, 3))[zz, yy, xx]
    rows = []
    for t in THRESHOLDS:
        keep = response > t
        found = set(hit[keep].tolist()) - {0}
        row = {"threshold": t, "candidates": int(keep.sum()), "off_nodule": int((keep & (hit == 0)).sum())}
        for b in BANDS:
            ns = [n for n in ph.nodules if band(n.diameter_mm) == b]
            row[b] = [sum(n.label in found for n in ns), len(ns)]
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="val", choices=("val", "test"))
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--json")
    args = ap.parse_args()
    per_case = []
    for i in range(args.count):
        ph, _ = phantom_case(args.set, i)
        per_case.append(count_case(ph))
    summary = []
    for k, t in enumerate(THRESHOLDS):
        rows = [c[k] for c in per_case]
        s = {"threshold": t, "candidates_per_volume": float(np.mean([r["candidates"] for r in rows]))}
        for b in BANDS:
            s[b] = [sum(r[b][0] for r in rows), sum(r[b][1] for r in rows)]
        summary.append(s)
        print(f"response > {t:5d}: {s['candidates_per_volume']:7.0f} candidates/volume; found "
              + ", ".join(f"{b} {s[b][0]}/{s[b][1]}" for b in BANDS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"set": args.set, "count": args.count, "radii_mm": RADII_MM, "summary": summary,
                       "cases": per_case}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
