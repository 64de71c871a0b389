"""How many phantom nodules would a 3D blob detector reach, at how many candidates per volume?

    python benchmarks/blob_candidates.py [--set val] [--count 12] [--classifier W] --json benchmarks/results/blob_candidates.json
    python benchmarks/blob_candidates.py --mine 80 --mine-out .devdata/fpcand_blob   # training patches
    python benchmarks/blob_candidates.py --mine 80 --lung hu --arch fine ...          # on the FINE patch grid

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
The lung mask is the phantom's own (an oracle) unless `--lung hu`: then the product's, from the
CT alone (nodule_detector.lung_mask). `--arch fine` cuts the patches on fp_classifier.FINE's grid,
for `train_fp fit --arch fine` (tried for the detector and not adopted:
benchmarks/results/detector_fine_preregistration.txt).

The filters have been the product's (boltzformer.nodule_detector) since that module landed; the
figures in benchmarks/results/blob_candidates*.json and fp-classifier-blob's training patches came
from this script's own copies at commit 378b5bd (same LoG; the Hessian then used whole-volume
filters with reflected edges, and `--lung hu` a simpler lung mask without the 15 mm closing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from phantom_chest import phantom_case

from boltzformer import fp_classifier, nodule_detector

RADII_MM = nodule_detector.RADII_MM
THRESHOLDS = (100, 200, 400, 700, 1000, 1500)
GATE_THRESHOLD = 400
BLOBNESS = (0.2, 0.35, 0.5)
SCORE_SWEEP = (0.3, 0.5, 0.7, 0.9)
BANDS = ("3-4mm", "4-8mm", "ge8mm")


def band(diameter_mm: float) -> str:
    return "3-4mm" if diameter_mm < 4 else "4-8mm" if diameter_mm < 8 else "ge8mm"


def gated_candidates(ph, lung_mask: str = "phantom"):
    """Blob maxima in the lungs -> (points N x 3 zyx, response N, blobness N (0 where not gated),
    best-scale index N, nodule label hit N (0 = none)). lung_mask: "phantom" (its own) or "hu"
    (the product's, nodule_detector.lung_mask). The filters are the product's
    (boltzformer.nodule_detector), on the phantom's own grid (its pixels are coarser than the
    detector's work grid, so nothing is averaged)."""
    img, factors, work_mm = nodule_detector._work_grid(ph.image, ph.spacing_mm)
    assert factors == [1, 1, 1], "phantom voxels are at least as coarse as the detector's grid"
    best, scale = nodule_detector.blob_response(img, work_mm)
    if lung_mask == "hu":
        lung = nodule_detector.lung_mask(img, ph.spacing_mm)
    else:
        lung = ndimage.binary_closing(ph.masks["lung"] > 0, iterations=2)
    peaks = (best == ndimage.maximum_filter(best, size=(3, 5, 5))) & lung & (best > min(THRESHOLDS))
    pts = np.stack(np.nonzero(peaks), 1)
    zz, yy, xx = pts.T
    response = best[zz, yy, xx]
    hit = ndimage.grey_dilation(ph.nodule_labels, size=(3, 3, 3))[zz, yy, xx]
    gated = response > GATE_THRESHOLD
    blobness = np.zeros(len(pts), np.float32)
    blobness[gated] = nodule_detector.blobness_at(img, work_mm, pts[gated], scale[zz, yy, xx][gated])
    return pts, response, blobness, scale[zz, yy, xx], hit


def ball_patches(ph, pts, scale_idx, geometry=fp_classifier.COARSE) -> np.ndarray:
    """Classifier patches (N x 2 x D x H x W) around points, the mask channel a ball of each
    point's best radius."""
    radius = np.array([RADII_MM[k] for k in scale_idx], float)
    return nodule_detector.ball_patches(ph.image, pts, radius, ph.spacing_mm, geometry)


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
    score[sel] = clf.probabilities(ball_patches(ph, pts[sel], scale_idx[sel], clf.geometry))
    kept = score >= clf.threshold
    return ([row_for(response > t, threshold=t) for t in THRESHOLDS],
            [row_for(gated & (blobness > g), blobness=g) for g in BLOBNESS],
            [row_for(gated & (blobness > g) & kept, blobness=g) for g in BLOBNESS],
            [row_for(gated & (blobness > min(BLOBNESS)) & (score >= t), score=t) for t in SCORE_SWEEP])


def mine(volumes: int, out: Path, seed: int = 5, lung_mask: str = "phantom", arch: str = "coarse") -> None:
    """Training patches of the gated blob candidates, in train_fp's per-volume format, on the
    patch geometry of a CandidateNet of `arch`."""
    from boltzformer.training.train_fp import phantom_volume, save_mined, training_volumes

    out.mkdir(parents=True, exist_ok=True)
    for v, vseed, path in training_volumes(volumes, seed, out):
        if path.exists():
            continue
        ph, vol = phantom_volume(vseed, np.random.default_rng([vseed, 1]))
        pts, response, blobness, scale_idx, hit = gated_candidates(ph, lung_mask)
        sel = np.flatnonzero((response > GATE_THRESHOLD) & (blobness > min(BLOBNESS)))
        on_nodule = hit[sel] > 0
        geometry = fp_classifier.GEOMETRIES[arch]
        save_mined(path, ball_patches(ph, pts[sel], scale_idx[sel], geometry), on_nodule, ph, vol,
                   candidates=len(sel), true_candidates=int(on_nodule.sum()), geometry=geometry)
        print(f"volume {v}: {len(sel)} gated candidates, {int(on_nodule.sum())} on nodules", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="val", choices=("val", "test"))
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--json")
    ap.add_argument("--classifier", help="3D classifier weights (.safetensors; default: the bundled one)")
    ap.add_argument("--mine", type=int, default=0, help="write training patches of this many phantoms instead")
    ap.add_argument("--mine-out", type=Path, default=Path(".devdata/fpcand_blob"))
    ap.add_argument("--mine-seed", type=int, default=5)
    ap.add_argument("--lung", choices=("phantom", "hu"), default="phantom",
                    help="lung mask: the phantom's own (default) or the product's from the CT")
    ap.add_argument("--arch", choices=tuple(fp_classifier.GEOMETRIES), default="coarse",
                    help="with --mine: the patch geometry of the CandidateNet to be trained")
    args = ap.parse_args()
    if args.mine:
        mine(args.mine, args.mine_out, args.mine_seed, args.lung, args.arch)
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
