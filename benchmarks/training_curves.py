"""Training curves of the bundled model across its training stages, from the runs' `log.csv`.

    python benchmarks/training_curves.py runs/bundled_ext/log.csv:"stage 1 (stride 4)" \
        runs/v2/log.csv:"stage 2 (stride 2, warm start)" --out docs/images/training_curves.png

Each stage's steps continue where the previous stage's last row ended; a dashed line marks the
start of every stage after the first. Each stage logs on its own validation set (the synthetic
validation set is regenerated when the negative fraction changes), so levels across a stage
boundary are comparable only roughly; the model card compares stages on one fixed set.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from boltzformer.plots import pyplot, save_figure


def read_stage(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def batch_size_of(log: Path) -> int | None:
    """The batch size of the run that wrote `log` (its train_config.json beside it), or None."""
    try:
        return int(json.loads((log.parent / "train_config.json").read_text())["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="+", help="LOG.csv[:label], in training order")
    p.add_argument("--out", default="docs/images/training_curves.png")
    args = p.parse_args(argv)
    missing = [spec.partition(":")[0] for spec in args.stages if not Path(spec.partition(":")[0]).is_file()]
    if missing:  # the training runs' logs are not in the repository (model card, "Training recipe")
        p.error(f"no such log: {', '.join(missing)} (the logs of `boltzformer train --out DIR` are DIR/log.csv)")

    plt = pyplot()
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(14, 4.2))
    offset = 0.0
    batch_sizes = set()
    for i, spec in enumerate(args.stages):
        path, _, label = spec.partition(":")
        rows = read_stage(Path(path))
        batch_sizes.add(batch_size_of(Path(path)))
        if not rows:
            raise SystemExit(f"{path}: no rows")
        steps = [offset + r["step"] for r in rows]  # each stage counts its steps from 0
        if i:
            for ax in (ax_loss, ax_dice):
                ax.axvline(offset, color="grey", ls="--", lw=1)
        if label:
            ax_dice.text(offset, 0.97, f" {label}", va="top", fontsize=8, color="dimgrey")
        kw = dict(marker="o", ms=2.5, lw=1.2)
        ax_loss.plot(steps, [r["loss"] for r in rows], color="C0", **kw, label="train loss (Dice + BCE)" if i == 0 else None)
        for key, colour, name in (("val_synth_dice", "C1", "synthetic validation, all"),
                                  ("val_synth_dice_small", "C2", "synthetic validation, < 0.1 % of the slice"),
                                  ("val_real_dice", "C3", "real held-out (monitoring only)"),
                                  ("val_synth_negative_fp_rate", "C7", "share of lesion-free val slices with any FP")):
            ys = [r.get(key, math.nan) for r in rows]
            if not all(math.isnan(y) for y in ys):
                ax_dice.plot(steps, ys, color=colour, **kw, label=name if i == 0 else None)
        offset = steps[-1]
    batch = batch_sizes.pop() if len(batch_sizes) == 1 else None  # one size across the stages, or unknown
    xlabel = f"training step (batch {batch})" if batch else "training step"
    ax_loss.set_xlabel(xlabel)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_dice.set_xlabel(xlabel)
    ax_dice.set_ylabel("Dice / rate")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_dice.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(args.out)
    save_figure(fig, out, dpi=90)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
