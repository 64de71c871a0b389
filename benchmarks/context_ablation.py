"""Context ablation at inference: the stage-4 (2.5D) weights on the 12 phantom validation chests
with their context channels cut: 1 slice (every neighbour = the slice itself), 3 slices (the
±2.5 mm neighbours real, ±5 mm = the slice), 5 slices (all real). The same weights throughout:
this measures what the trained model draws from each neighbour, not what a model trained on 1 or
3 slices would do.

    python benchmarks/context_ablation.py [--count 12] [--out runs/bench/context_ablation.json]

The recorded benchmarks/results/context_ablation.json predates the 3D false-positive classifier:
its "filter on" numbers are of the lung rule alone (the model card quotes only the filter-off
ones); a re-run writes to --out, not over it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import phantom_chest  # noqa: E402  (the benchmark beside this file)

import boltzformer.segmenter as segmenter_module  # noqa: E402
from boltzformer.context import context_stack  # noqa: E402
from boltzformer.segmenter import Segmenter  # noqa: E402

WEIGHTS = HERE.parent / "checkpoints" / "boltzformer-s-stage4.safetensors"
VARIANTS = (("1 slice", set()), ("3 slices", {2.5}), ("5 slices", {2.5, 5.0}))


def cut_context(keep_mm: set):
    """A context_stack whose neighbours at |offset| not in keep_mm are the slice itself."""
    def stack(slices, indices, z_spacing_mm, offsets_mm):
        out = context_stack(slices, indices, z_spacing_mm, offsets_mm)
        for channel, offset in enumerate(offsets_mm, start=1):
            if abs(offset) not in keep_mm:
                out[:, channel] = out[:, 0]
        return out
    return stack


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=12, help="validation phantom chests")
    p.add_argument("--out", type=Path, default=HERE.parent / "runs" / "bench" / "context_ablation.json")
    args = p.parse_args()
    seg = Segmenter.from_pretrained(WEIGHTS, device="cpu")
    results = {}
    for name, keep in VARIANTS:
        segmenter_module.context_stack = cut_context(keep)
        cases, _ = phantom_chest.run("val", args.count, seg, False)
        s = phantom_chest.summarise(cases)
        results[name] = {"sensitivity_ge4mm": s["fp_on"]["sensitivity_ge4mm"],
                         "sensitivity_3_4mm": s["fp_on"]["sensitivity_3_4mm"],
                         "fp_per_volume_filter_off": s["fp_off"]["fp_per_volume"],
                         "fp_per_volume_filter_on": s["fp_on"]["fp_per_volume"]}
        print(name, results[name], flush=True)
    segmenter_module.context_stack = context_stack
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
