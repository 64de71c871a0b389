"""Nodule detection on 3D phantom chest CTs with vessel trees (boltzformer.synth.lung3d).

    python benchmarks/phantom_chest.py --set test --json benchmarks/results/phantom_chest_test.json
    python benchmarks/phantom_chest.py --set val --candidates runs/phantom_val_candidates.json

Two fixed sets, never trained on (training phantoms use other seeds, see data.phantom_examples):
`val` (seeds 80000+, for choosing the false-positive filter's thresholds) and `test` (seeds
90000+, for reporting). Per set: nodule sensitivity by diameter band (3-4 mm, >= 4 mm), false-
positive components per volume, with the false-positive filter on and off, and how much of the
last decoder layer's sampling lands on the nodule (tokens on the nodule dilated by one token /
all sampled tokens, on slices that hold a nodule). `--candidates` also writes every candidate's
filter features with whether it hit a nodule (for the threshold sweep in fp_threshold_sweep.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from boltzformer import weights
from boltzformer import fp_filter
from boltzformer.io import Volume
from boltzformer.options import DEFAULT_MIRROR
from boltzformer.segmenter import Segmenter
from boltzformer.synth.lung3d import chest_phantom

SETS = {"val": 80_000, "test": 90_000}
# (in-plane pixel at 256 x 256, slice spacing) in mm: fields of view of 307-384 mm
SPACINGS = ((1.2, 1.25), (1.5, 2.5), (1.3, 1.0), (1.4, 2.0))


def phantom_case(set_name: str, index: int):
    """The index-th volume of a set: 256 x 256 in-plane, about 150 mm of chest."""
    seed = SETS[set_name] + index
    px, z_mm = SPACINGS[index % len(SPACINGS)]
    depth = int(round(150 / z_mm))
    ph = chest_phantom(seed, shape_zyx=(depth, 256, 256), spacing_mm=(px, px, z_mm), n_nodules=(2, 5))
    origin = tuple(-(n - 1) / 2 * s for n, s in zip((256, 256, depth), ph.spacing_mm))
    volume = Volume(ph.image, ph.spacing_mm, origin, np.eye(3), "CT", None, {"phantom_seed": seed})
    return ph, volume


def attention_on_target(result, nodules: np.ndarray) -> tuple[float, float, float, int]:
    """On the last decoder layer, over slices that hold a nodule, with the nodule dilated by one
    token: (share of the sampled tokens that lie on it, share of the Boltzmann probability mass
    on it, the most a sample of K distinct tokens could put on it, number of slices).

    Sampling K distinct tokens (10 % of them) caps the first share at (target tokens) / K: a
    5 mm nodule covers a handful of the 4 096 finest tokens, so its share stays small however
    sharp the search; the probability mass shows how sharp it is.
    """
    att = result.attention
    counts = att.counts[-1].astype(np.float64)  # Z x G x G, last decoder layer
    probs = att.probabilities[-1].astype(np.float64)
    g = counts.shape[-1]
    cell = (att.strides[-1] // min(att.strides)) ** 2  # grid cells per token of the last layer
    k_tokens = att.tokens_per_query[-1]
    on = total = mass_on = mass = cap_on = cap = 0.0
    n = 0
    for j in range(counts.shape[0]):
        z = att.slice_start + j
        if not nodules[z].any():
            continue
        h, w = nodules.shape[1:]
        # the nodule on the token grid: any voxel of the cell, then one token of margin
        ys, xs = np.nonzero(nodules[z])
        cells = np.zeros((g, g), bool)
        cells[(ys * g // h).clip(0, g - 1), (xs * g // w).clip(0, g - 1)] = True
        cells = ndimage.binary_dilation(cells, iterations=1)
        on += counts[j][cells].sum()
        total += counts[j].sum()
        mass_on += probs[j][cells].sum()
        mass += probs[j].sum()
        cap_on += min(cells.sum() / cell, k_tokens)
        cap += k_tokens
        n += 1
    nan = float("nan")
    return (on / total if total else nan), (mass_on / mass if mass else nan), (cap_on / cap if cap else nan), n


def run(set_name: str, count: int, seg: Segmenter, want_candidates: bool, threshold: float = 0.5):
    cases, candidates = [], []
    for i in range(count):
        ph, vol = phantom_case(set_name, i)
        t = time.perf_counter()
        res = seg.segment_volume(vol, "lung nodule", return_attention=True, fp_reduction=False, threshold=threshold)
        seconds = time.perf_counter() - t
        frac, mass, cap, nslices = attention_on_target(res, ph.nodule_labels > 0)
        row = {"case": i, "seed": SETS[set_name] + i, "spacing_mm": list(ph.spacing_mm), "seconds": seconds,
               "attention_on_target": frac, "attention_mass_on_target": mass, "attention_cap": cap,
               "attention_slices": nslices,
               "nodules": [{"diameter_mm": n.diameter_mm, "kind": n.kind, "label": n.label} for n in ph.nodules]}
        for key in ("fp_off", "fp_on", "nodule_detector"):  # default = fp_on; the 3D detector is opt-in
            if key != "fp_off":
                res.rethreshold(res.threshold, fp_reduction=True, nodule_detector=key == "nodule_detector")
            labels = res.labels
            hit = set(np.unique(ph.nodule_labels[labels > 0]).tolist()) - {0}
            pred_on_nodule = set(np.unique(labels[ph.nodule_labels > 0]).tolist()) - {0}
            row[key] = {"detected_labels": sorted(hit), "components": len(res.lesions),
                        "false_positives": len(res.lesions) - len(pred_on_nodule)}
            if want_candidates and key == "fp_off":  # every candidate, before the filter
                feats = fp_filter.candidate_features(labels, res.lesions, vol, res.probabilities)
                for r, f in zip(res.lesions, feats):
                    candidates.append({"case": i, **f, "diameter_mm": r["longest_axial_diameter_mm"],
                                       "volume_mm3": r["volume_mm3"], "short_axis_mm": r["short_axis_diameter_mm"],
                                       "z_extent_mm": (r["slice_end"] - r["slice_start"] + 1) * float(vol.spacing_mm[2]),
                                       "true": bool((ph.nodule_labels[labels == r["lesion_id"]] > 0).any()),
                                       "nodule_labels": sorted(set(np.unique(ph.nodule_labels[labels == r["lesion_id"]]).tolist()) - {0})})
        cand = res._candidates
        if cand is not None:  # the 3D detector alone: its kept points, on a nodule when within one voxel
            near = ndimage.grey_dilation(ph.nodule_labels, size=(3, 3, 3))
            on = near[tuple(cand.points_zyx[cand.kept].T)] if len(cand.kept) else np.zeros(0, int)
            row["detector_only"] = {"detected_labels": sorted(set(on.tolist()) - {0}), "components": len(on),
                                    "false_positives": int((on == 0).sum())}
            row["detector_seconds"] = res.timings_s.get("nodule_detector")
            every = near[tuple(cand.points_zyx.T)] if len(cand.points_zyx) else np.zeros(0, int)
            row["detector_candidates"] = [[round(float(sc), 4), int(h)] for sc, h in zip(cand.score, every)]
        cases.append(row)
        print(f"{set_name} {i}: {len(ph.nodules)} nodules, detected {len(row['fp_off']['detected_labels'])} -> "
              f"{len(row['fp_on']['detected_labels'])} -> {len(row['nodule_detector']['detected_labels'])}, FP {row['fp_off']['false_positives']} -> "
              f"{row['fp_on']['false_positives']} -> {row['nodule_detector']['false_positives']}, sampled tokens on target {frac:.3f} (cap {cap:.3f}), probability mass "
              f"on target {mass:.3f}, {seconds:.1f} s", flush=True)
    return cases, candidates


def summarise(cases):
    out = {}
    for key in ("fp_off", "fp_on", "nodule_detector", "detector_only"):
        if not all(key in c for c in cases):
            continue
        small_hit = small_n = big_hit = big_n = 0
        for c in cases:
            hit = set(c[key]["detected_labels"])
            for n in c["nodules"]:
                if n["diameter_mm"] < 4.0:
                    small_n += 1
                    small_hit += n["label"] in hit
                else:
                    big_n += 1
                    big_hit += n["label"] in hit
        fps = [c[key]["false_positives"] for c in cases]
        out[key] = {"sensitivity_3_4mm": small_hit / small_n if small_n else None, "nodules_3_4mm": small_n,
                    "sensitivity_ge4mm": big_hit / big_n if big_n else None, "nodules_ge4mm": big_n,
                    "fp_per_volume": float(np.mean(fps)), "fp_max": int(np.max(fps))}
    for key in ("attention_on_target", "attention_mass_on_target", "attention_cap"):
        vals = [c[key] for c in cases if c["attention_slices"]]
        out[key + "_mean"] = float(np.mean(vals)) if vals else None
    out["seconds_per_volume"] = float(np.mean([c["seconds"] for c in cases]))
    det = [c["detector_seconds"] for c in cases if c.get("detector_seconds") is not None]
    out["detector_seconds_per_volume"] = float(np.mean(det)) if det else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=tuple(SETS), required=True,
                    help="val: to choose on; test: once, after a choice (no default: the test phantoms are not run "
                         "by accident)")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=DEFAULT_MIRROR,
                    help="average each slice with its mirror image (Segmenter.iter_segment)")
    ap.add_argument("--candidates", type=Path, default=None)
    ap.add_argument("--fp-classifier", type=Path, default=None,
                    help="a 3D classifier's .safetensors (with its .json) in place of the bundled one")
    ap.add_argument("--detector-classifier", type=Path, default=None,
                    help="the 3D nodule detector's classifier (.safetensors with its .json) in place of the bundled one")
    args = ap.parse_args()
    from boltzformer import fp_classifier, nodule_detector

    if args.fp_classifier:
        fp_classifier._BUNDLED[fp_classifier.WEIGHTS_NAME] = fp_classifier.load(args.fp_classifier)
    if args.detector_classifier:
        fp_classifier._BUNDLED[nodule_detector.DETECTOR_WEIGHTS_NAME] = fp_classifier.load(args.detector_classifier)
    seg = Segmenter.from_pretrained(args.weights, device="cpu")
    seg.segment_volume = functools.partial(seg.segment_volume, mirror=args.mirror)  # every run here
    cases, candidates = run(args.set, args.count, seg, args.candidates is not None, args.threshold)
    summary = {"set": args.set, "count": args.count, "threshold": args.threshold, "mirror": args.mirror,
               "weights_sha256": weights.sha256(seg.info["weights_path"]),
               "fp_classifier": str(args.fp_classifier) if args.fp_classifier else "bundled",
               "detector_classifier": str(args.detector_classifier) if args.detector_classifier else "bundled",
               "weights": seg.info.get("weights_path"), **summarise(cases)}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "cases": cases}, indent=2))
    if args.candidates:
        args.candidates.parent.mkdir(parents=True, exist_ok=True)
        args.candidates.write_text(json.dumps(candidates, indent=1))


if __name__ == "__main__":
    main()
