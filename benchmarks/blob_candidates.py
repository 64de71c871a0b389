"""How many phantom nodules would a 3D blob detector reach, at how many candidates per volume?

    python benchmarks/blob_candidates.py [--set val] [--count 12] [--classifier W] --json benchmarks/results/blob_candidates.json
    python benchmarks/blob_candidates.py --mine 80 --mine-out .devdata/fpcand_blob   # training patches

A feasibility count for a 3D candidate generator (the model card's next step after stage 10),
not part of the product. On each phantom chest of `phantom_chest.py`'s set: a scale-normalised
3D Laplacian of Gaussian of the HU volume (radii 1.5-6 mm, the maximum over scales), its local
maxima inside the phantom's lung mask, and, for each response threshold, the number of maxima
(candidates) and the nodules with a maximum within one voxel of their mask, per size band.
Then a Hessian gate on the candidates above GATE_THRESHOLD: blobness = |λ3| / |λ1| of the
Hessian at the candidate's best scale (eigenvalues sorted by magnitude, |λ1| >= |λ2| >= |λ3|;
1 for a sphere, near 0 for a tube), candidates kept above each BLOBNESS value. Last, the bundled
3D classifier scores the gated candidates (its mask channel: a ball of the candidate's best
radius, not a slice-model component as in its training) and keeps those at its threshold;
`--classifier` scores them with another one (e.g. one fitted on `--mine` patches by
`python -m boltzformer.training.train_fp fit --data .devdata/fpcand_blob`), at its own
threshold and at each of SCORE_SWEEP.

`--mine N` writes, for N training phantoms (train_fp's seeds, never the evaluation ones), the
gated candidates (blobness > min(BLOBNESS)) as classifier patches in train_fp's format, each
labelled true when it lies within one voxel of a nodule, plus every nodule cut around its mask.
The lung mask is the phantom's own (an oracle) unless `--lung hu`: then a classical one from
the CT alone (classical_lung_mask), as the product would need.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from phantom_chest import phantom_case

from boltzformer import fp_classifier

RADII_MM = (1.5, 2.5, 4.0, 6.0)
THRESHOLDS = (100, 200, 400, 700, 1000, 1500)
GATE_THRESHOLD = 400
BLOBNESS = (0.2, 0.35, 0.5)
SCORE_SWEEP = (0.3, 0.5, 0.7, 0.9)
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


def classical_lung_mask(hu: np.ndarray, spacing_xyz) -> np.ndarray:
    """Z x Y x X bool lungs from HU alone: voxels below -400 HU not connected to the air around
    the body (in each slice), the two largest 3D components, then each slice's holes filled
    (vessels, nodules, juxta-pleural ones included) after a ~5 mm closing."""
    sx, sy, _ = spacing_xyz
    air = hu < -400
    inside = np.zeros_like(air)
    for k in range(air.shape[0]):
        lab, n = ndimage.label(air[k])
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        inside[k] = air[k] & ~np.isin(lab, edge[edge > 0])
    lab, n = ndimage.label(inside)
    if n == 0:
        return inside
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:2] + 1
    lung = np.isin(lab, keep)
    r = max(1, int(round(2.5 / min(sx, sy))))
    disk = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r
    for k in range(lung.shape[0]):
        if lung[k].any():
            lung[k] = ndimage.binary_fill_holes(ndimage.binary_closing(lung[k], disk))
    return lung


def gated_candidates(ph, lung_mask: str = "phantom"):
    """Blob maxima in the lungs -> (points N x 3 zyx, response N, blobness N (0 where not gated),
    best-scale index N, nodule label hit N (0 = none)). lung_mask: "phantom" (its own) or "hu"
    (classical_lung_mask)."""
    best, scale = blob_response(ph.image, ph.spacing_mm)
    if lung_mask == "hu":
        lung = classical_lung_mask(ph.image, ph.spacing_mm)
    else:
        lung = ndimage.binary_closing(ph.masks["lung"] > 0, iterations=2)
    peaks = (best == ndimage.maximum_filter(best, size=(3, 5, 5))) & lung & (best > min(THRESHOLDS))
    pts = np.stack(np.nonzero(peaks), 1)
    zz, yy, xx = pts.T
    response = best[zz, yy, xx]
    hit = ndimage.grey_dilation(ph.nodule_labels, size=(3, 3, 3))[zz, yy, xx]
    gated = response > GATE_THRESHOLD
    blobness = np.zeros(len(pts), np.float32)
    blobness[gated] = blobness_at(ph.image, ph.spacing_mm, pts[gated], scale[zz, yy, xx][gated])
    return pts, response, blobness, scale[zz, yy, xx], hit


def ball_patches(ph, pts, scale_idx) -> np.ndarray:
    """Classifier patches (N x 2 x D x H x W) around points, the mask channel a ball of each
    point's best radius."""
    balls = np.zeros(ph.image.shape, np.int32)
    sx, sy, sz = ph.spacing_mm
    for i, ((z, y, x), k) in enumerate(zip(pts, scale_idx), start=1):
        r = RADII_MM[k]
        half = (int(np.ceil(r / v)) for v in (sz, sy, sx))
        box = tuple(slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip((z, y, x), half, ph.image.shape))
        gz, gy, gx = np.ogrid[box]
        ball = ((gz - z) * sz) ** 2 + ((gy - y) * sy) ** 2 + ((gx - x) * sx) ** 2 <= r * r
        balls[box][ball] = i
    return fp_classifier.extract_patches(ph.image, balls, pts, ph.spacing_mm, list(range(1, len(pts) + 1)))


def count_case(ph, clf, lung_mask: str = "phantom") -> tuple[list[dict], ...]:
    pts, response, blobness, scale_idx, hit = gated_candidates(ph, lung_mask)
    gated = response > GATE_THRESHOLD

    def row_for(keep, **key):
        found = set(hit[keep].tolist()) - {0}
        row = {**key, "candidates": int(keep.sum()), "off_nodule": int((keep & (hit == 0)).sum())}
        for b in BANDS:
            ns = [n for n in ph.nodules if band(n.diameter_mm) == b]
            row[b] = [sum(n.label in found for n in ns), len(ns)]
        return row

    sel = np.flatnonzero(gated & (blobness > min(BLOBNESS)))
    score = np.zeros(len(pts), np.float32)
    score[sel] = clf.probabilities(ball_patches(ph, pts[sel], scale_idx[sel]))
    kept = score >= clf.threshold
    return ([row_for(response > t, threshold=t) for t in THRESHOLDS],
            [row_for(gated & (blobness > g), blobness=g) for g in BLOBNESS],
            [row_for(gated & (blobness > g) & kept, blobness=g) for g in BLOBNESS],
            [row_for(gated & (blobness > min(BLOBNESS)) & (score >= t), score=t) for t in SCORE_SWEEP])


def mine(volumes: int, out: Path, seed: int = 5, lung_mask: str = "phantom") -> None:
    """Training patches of the gated blob candidates, in train_fp's per-volume format."""
    from boltzformer.training.train_fp import phantom_volume, save_mined, training_volumes

    out.mkdir(parents=True, exist_ok=True)
    for v, vseed, path in training_volumes(volumes, seed, out):
        if path.exists():
            continue
        ph, vol = phantom_volume(vseed, np.random.default_rng([vseed, 1]))
        pts, response, blobness, scale_idx, hit = gated_candidates(ph, lung_mask)
        sel = np.flatnonzero((response > GATE_THRESHOLD) & (blobness > min(BLOBNESS)))
        on_nodule = hit[sel] > 0
        save_mined(path, ball_patches(ph, pts[sel], scale_idx[sel]), on_nodule, ph, vol,
                   candidates=len(sel), true_candidates=int(on_nodule.sum()))
        print(f"volume {v}: {len(sel)} gated candidates, {int(on_nodule.sum())} on nodules", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="val", choices=("val", "test"))
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--json")
    ap.add_argument("--classifier", help="3D classifier weights (.safetensors; default: the bundled one)")
    ap.add_argument("--mine", type=int, default=0, help="write training patches of this many phantoms instead")
    ap.add_argument("--mine-out", type=Path, default=Path(".devdata/fpcand_blob"))
    ap.add_argument("--mine-seed", type=int, default=5)
    ap.add_argument("--lung", choices=("phantom", "hu"), default="phantom",
                    help="lung mask: the phantom's own (default) or classical_lung_mask from the CT")
    args = ap.parse_args()
    if args.mine:
        mine(args.mine, args.mine_out, args.mine_seed, args.lung)
        return 0
    clf = fp_classifier.load(args.classifier) if args.classifier else fp_classifier.bundled()
    per_case = [count_case(phantom_case(args.set, i)[0], clf, args.lung) for i in range(args.count)]

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
    classified = summarise(2, "blobness", BLOBNESS, f"same, blobness > {{:.2f}}, classifier >= {clf.threshold:g}")
    sweep = summarise(3, "score", SCORE_SWEEP, f"blobness > {min(BLOBNESS)}, classifier >= {{:.2f}}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"set": args.set, "count": args.count, "lung_mask": args.lung, "radii_mm": RADII_MM, "summary": summary,
                       "hessian_gate": {"response_threshold": GATE_THRESHOLD, "summary": gate},
                       "classifier": args.classifier or "bundled",
                       "classifier_on_gate": {"threshold": clf.threshold, "summary": classified},
                       "classifier_sweep": {"blobness": min(BLOBNESS), "summary": sweep},
                       "cases": per_case}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
