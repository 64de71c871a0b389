"""The paper's ablations at our scale (boltzformer.training.ablations); results in benchmarks/results.

    python benchmarks/ablations.py [--steps 400] [--out runs/ablations] [--real-dir DIR]

The real held-out cases come from --real-dir, else $BOLTZFORMER_REAL_DATA, else ../shared/data/real
beside the checkout.
"""

from pathlib import Path

from boltzformer.training.ablations import main
from boltzformer.training.data import default_real_dir

CHECKOUT_REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

if __name__ == "__main__":
    guess = default_real_dir() or (CHECKOUT_REAL_DIR if (CHECKOUT_REAL_DIR / "cases.csv").is_file() else None)
    raise SystemExit(main(results=Path(__file__).parent / "results", real_dir=guess))
