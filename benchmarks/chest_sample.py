"""The bundled chest sample, "lung nodule": Dice, nodules found and false positives, with the
default pipeline and with the opt-in 3D nodule detector; the same for the sample this round
replaced (boltzformer.synth.ct, vessels drawn independently on every slice).

    python benchmarks/chest_sample.py --json benchmarks/results/chest_sample.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np

from boltzformer import postprocess
from boltzformer.options import DEFAULT_MIRROR
from boltzformer.segmenter import Segmenter
from boltzformer.synth import ct
from boltzformer.synth.sample import SAMPLES


def old_sample():
    """The chest sample before 2026-11-27 (synth/sample.py at 378b5bd)."""
    from boltzformer.io import Volume

    v = ct.ct_volume(11, shape_zyx=(48, 256, 256), spacing_mm=(1.4, 1.4, 2.5), region="chest", n_nodules=(4, 6))
    origin = (-1.4 * 127.5, -1.4 * 127.5, -2.5 * 47)
    return Volume(v.image, v.spacing_mm, origin, np.eye(3), "CT", None, {}), v.masks["lung_nodule"] > 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=DEFAULT_MIRROR,
                    help="average each slice with its mirror image (Segmenter.iter_segment)")
    args = ap.parse_args()
    seg = Segmenter.from_pretrained(None, device="cpu")
    seg.segment_volume = functools.partial(seg.segment_volume, mirror=args.mirror)  # every run here
    case = SAMPLES["chest_ct"]()
    samples = {"chest_ct (bundled, 3D phantom)": (case.volume(), case.masks["lung_nodule"] > 0),
               "chest_ct before 2026-11-27 (per-slice vessel dots)": old_sample()}
    out = {"mirror": args.mirror}
    for name, (vol, truth) in samples.items():
        res = seg.segment_volume(vol, "lung nodule", seed=0)
        for mode in ("default", "nodule_detector"):
            if mode == "nodule_detector":
                res.rethreshold(res.threshold, nodule_detector=True)
            det = postprocess.lesion_detection(res.mask > 0, truth, vol.spacing_mm, min_lesion_mm3=res.min_lesion_mm3)
            out[f"{name}, {mode}"] = {"dice": postprocess.dice(res.mask > 0, truth), **det}
            print(f"{name}, {mode}: Dice {out[f'{name}, {mode}']['dice']:.3f}, nodules {det['detected']}/"
                  f"{det['true_lesions']}, false positives {det['false_positive_components']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
