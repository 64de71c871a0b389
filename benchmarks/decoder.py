"""Sparse vs dense vs Mask2Former decoder cross-attention, side by side in one run.

    python benchmarks/decoder.py [--device cpu|cuda] [--json out.json]

Same as `boltzformer bench decoder`; writes benchmarks/results/decoder_<device>.{json,md}.
"""

import argparse
import json
from pathlib import Path

from boltzformer.bench import bench_decoder, decoder_markdown
from boltzformer.segmenter import resolve_device

RESULTS = Path(__file__).parent / "results"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--batch", type=int, default=1, help="slices per call")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args()
    device = resolve_device(args.device)
    result = bench_decoder(device=device, repeats=args.repeats, batch=args.batch)
    md = decoder_markdown(result)
    print(md)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"decoder_{device.type}_batch{args.batch}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
