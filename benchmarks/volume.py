"""End-to-end `segment` of a synthetic 512 x 512 CT (100 and 300 slices), stages timed.

    python benchmarks/volume.py [--device auto|cpu|cuda] [--slices 100,300]

Same as `boltzformer bench volume`; writes benchmarks/results/volume_<device>.json.
"""

import argparse
from pathlib import Path

from boltzformer.bench import volume

RESULTS = Path(__file__).parent / "results"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--slices", default="100,300")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    args.json = args.json or str(RESULTS / f"volume_{args.device}.json")
    raise SystemExit(volume.main(args))


if __name__ == "__main__":
    main()
