"""End-to-end `segment` of a synthetic 512 x 512 CT (100 and 300 slices), stages timed.

    python benchmarks/volume.py [--device cpu|cuda] [--slices 100,300] [--out DIR]

Same as `boltzformer bench volume`; writes DIR/volume_<device>.{json,md}. DIR defaults to
runs/bench (git-ignored): a trial run never replaces a published result; pass
--out benchmarks/results to update one.
"""

import argparse
from pathlib import Path

from boltzformer.bench import volume
from boltzformer.devices import resolve_device
from boltzformer.options import DEFAULT_MIRROR

TRIALS = Path(__file__).parent.parent / "runs" / "bench"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--slices", default="100,300")
    p.add_argument("--weights", default=None, help="weights to time (default: bundled)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=DEFAULT_MIRROR)
    p.add_argument("--out", type=Path, default=TRIALS,
                   help="folder for the results (default runs/bench; benchmarks/results holds the published ones)")
    args = p.parse_args()
    device = resolve_device(args.device)  # the file is named for the device that ran, never "auto"
    args.out.mkdir(parents=True, exist_ok=True)
    args.json = str(args.out / f"volume_{device.type}.json")
    raise SystemExit(volume.main(args))


if __name__ == "__main__":
    main()
