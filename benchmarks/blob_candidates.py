"""How many phantom nodules would a 3D blob detector reach, at how many candidates per volume?

    python benchmarks/blob_candidates.py [--set val] [--count 12] --json benchmarks/results/blob_candidates.json

A feasibility count for a 3D candidate generator (the model card's next step after stage 10),
not part of the product. On each phantom chest of `phantom_chest.py`'s set: a scale-normalised
3D Laplacian of Gaussian of the HU volume (radii 1.5-6 mm, the maximum over scales), its local
maxima inside the phantom's lung mask, and, for each response threshold, the number of maxima
(candidates) and the nodules with a maximum within one voxel of their mask, per size band.
Then a Hessian gate on the candidates above GATE_THRESHOLD: blobness = |λ3| / |λ1| of the
Hessian at the candidate's best scale (eigenvalues sorted by magnitude, |λ1| >= |λ2| >= |λ3|;
1 for a sphere, near 0 for a tube), candidates kept above each BLOBNESS value. Last, the bundled
3D classifier scores the gated candidates (its mask channel: a ball of the candidate's best
radius, not a slice-model component as in its training) and keeps those at its threshold.
The lung mask is the phantom's own (an oracle): this counts what the blob response can reach,
not what a classical lung mask would let through.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import ndimage

from phantom_chest import phantom_case

from boltzformer import fp_classifier

RADII_MM = (1.5, 2.5, 4.0, 6.0)
THRESHOLDS = (100, 200, 400, 700, 1000, 1500)
GATE_THRESHOLD = 400
BLOBNESS = (0.2, 0.35, 0.5)
BANDS = ("3-4mm", "4-8mm", "ge8mm")


def band(diameter_mm: float) -> str:
    return "3-4mm" if diameter_mm < 4 else "4-8mm" if diameter_mm < 8 else "ge8mm"


def _sigmas(r_mm: float, spacing_xyz):
    sx, sy, sz = spacing_xyz
    s = r_mm / np.sqrt(3)
    return s, (s / sz, s / sy, s / sx)


def blob_response(hu: np.ndarray, spacing_xyz) -> tuple[np.ndarray, np.ndarray]:
    """(Z x Y x X float32 max over RADII_MM of -sigma² LoG, Z x Y x X uint8 index of the best
    radius). Bright blobs of that radius score high; sigma = r / sqrt(3) in mm, so anisotropic
    voxels get per-axis sigmas."""
    img = hu.astype(np.float32).clip(-1000, 200)
    best = np.full(img.shape, -np.inf, np.float32)
    scale = np.zeros(img.shape, np.uint8)
    for k, r in enumerate(RADII_MM):
        s, sig = _sigmas(r, spacing_xyz)
        resp = -(s**2) * ndimage.gaussian_laplace(img, sig)
        better = resp > best
        best[better], scale[better] = resp[better], k
    return best, scale


def blobness_at(hu: np.ndarray, spacing_xyz, points_zyx: np.ndarray, scale_idx: np.ndarray) -> np.ndarray:
    """|λ3| / |λ1| of the Hessian (in mm units) at each point, at its own best scale."""
    img = hu.astype(np.float32).clip(-1000, 200)
    sx, sy, sz = spacing_xyz
    mm = np.array([sz, sy, sx])
    out = np.zeros(len(points_zyx), np.float32)
    for k, r in enumerate(RADII_MM):
        sel = np.flatnonzero(scale_idx == k)
        if not len(sel):
            continue
        _, sig = _sigmas(r, spacing_xyz)
        z, y, x = points_zyx[sel].T
        h = np.zeros((len(sel), 3, 3), np.float32)
        for a in range(3):
            for b in range(a, 3):
                order = [0, 0, 0]
                order[a] += 1
                order[b] += 1
                d = ndimage.gaussian_filter(img, sig, order=order)[z, y, x] / (mm[a] * mm[b])
                h[:, a, b] = h[:, b, a] = d
        ev = np.linalg.eigvalsh(h)
        ev = np.take_along_axis(ev, np.argsort(-np.abs(ev), axis=1), axis=1)
        out[sel] = np.abs(ev[:, 2]) / np.maximum(np.abs(ev[:, 0]), 1e-6)
    return out


def count_case(ph) -> list[dict]:
    best, scale = blob_response(ph.image, ph.spacing_mm)
    lung = ndimage.binary_closing(ph.masks["lung"] > 0, iterations=2)
    peaks = (best == ndimage.maximum_filter(best, size=(3, 5, 5))) & lung & (best > min(THRESHOLDS))
    zz, yy, xx = np.nonzero(peaks)
    response = best[zz, yy, xx]
    hit = ndimage.grey_dilation(ph.nodule_labels, size=(3, 3, 3))[zz, yy, xx]
    gated = response > GATE_THRESHOLD
    blobness = np.zeros(len(zz), np.float32)
    blobness[gated] = blobness_at(ph.image, ph.spacing_mm, np.stack([zz, yy, xx], 1)[gated], scale[zz, yy, xx][gated])

    def row_for(keep, **key):
        found = set(hit[keep].tolist()) - {0}
        row = {**key, "candidates": int(keep.sum()), "off_nodule": int((keep & (hit == 0)).sum())}
        for b in BANDS:
            ns = [n for n in ph.nodules if band(n.diameter_mm) == b]
            row[b] = [sum(n.label in found for n in ns), len(ns)]
        return row

    # the bundled classifier on the gated candidates, each drawn as a ball of its best radius
    clf = fp_classifier.bundled()
    sel = np.flatnonzero(gated & (blobness > min(BLOBNESS)))
    balls = np.zeros(ph.image.shape, np.int32)
    sx, sy, sz = ph.spacing_mm
    for i, k in enumerate(sel, start=1):
        r = RADII_MM[scale[zz[k], yy[k], xx[k]]]
        rz, ry, rx = (int(np.ceil(r / v)) for v in (sz, sy, sx))
        box = tuple(slice(max(0, c - h), min(n, c + h + 1))
                    for c, h, n in zip((zz[k], yy[k], xx[k]), (rz, ry, rx), ph.image.shape))
        gz, gy, gx = np.ogrid[box]
        ball = ((gz - zz[k]) * sz) ** 2 + ((gy - yy[k]) * sy) ** 2 + ((gx - xx[k]) * sx) ** 2 <= r * r
        balls[box][ball] = i
    score = np.zeros(len(zz), np.float32)
    patches = fp_classifier.extract_patches(ph.image, balls, np.stack([zz, yy, xx], 1)[sel], ph.spacing_mm,
                                            list(range(1, len(sel) + 1)))
    score[sel] = clf.probabilities(patches)
    kept = score >= clf.threshold
    return ([row_for(response > t, threshold=t) for t in THRESHOLDS],
            [row_for(gated & (blobness > g), blobness=g) for g in BLOBNESS],
            [row_for(gated & (blobness > g) & kept, blobness=g) for g in BLOBNESS])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="val", choices=("val", "test"))
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--json")
    args = ap.parse_args()
    per_case = [count_case(phantom_case(args.set, i)[0]) for i in range(args.count)]

    def summarise(part: int, key: str, values, label: str) -> list[dict]:
        out = []
        for k, v in enumerate(values):
            rows = [c[part][k] for c in per_case]
            s = {key: v, "candidates_per_volume": float(np.mean([r["candidates"] for r in rows]))}
            for b in BANDS:
                s[b] = [sum(r[b][0] for r in rows), sum(r[b][1] for r in rows)]
            out.append(s)
            print(f"{label.format(v)}: {s['candidates_per_volume']:7.0f} candidates/volume; found "
                  + ", ".join(f"{b} {s[b][0]}/{s[b][1]}" for b in BANDS))
        return out

    summary = summarise(0, "threshold", THRESHOLDS, "response > {:5d}")
    gate = summarise(1, "blobness", BLOBNESS, f"response > {GATE_THRESHOLD} and blobness > {{:.2f}}")
    classified = summarise(2, "blobness", BLOBNESS, "same, blobness > {:.2f}, classifier >= bundled threshold")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"set": args.set, "count": args.count, "radii_mm": RADII_MM, "summary": summary,
                       "hessian_gate": {"response_threshold": GATE_THRESHOLD, "summary": gate},
                       "classifier_on_gate": {"threshold": fp_classifier.bundled().threshold, "summary": classified},
                       "cases": per_case}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
