"""The paper's ablations at our scale: same data, budget and seed for every row.

    python benchmarks/ablations.py [--steps 400] [--out runs/ablations] [--real-dir DIR]

Every row trains `boltzformer-s` at a reduced 128 x 128 input (so that ten rows fit on 2 CPU
cores) from the same synthetic cache and real training cases, seed 0, then reports held-out
synthetic Dice (all, and objects < 0.1 % / 0.1-1 % of the slice), held-out real Dice, and the
decoder's time per slice. Results: RESULTS/ablations.{json,md,png} (benchmarks/results from the
script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..plots import pyplot, save_figure
from . import data as data_mod
from .train import TrainConfig, evaluate_examples, synthetic_cache, train

BASE = {"image_size": 128, "min_tokens": 4}
# Rows trained separately (same data, steps, seed).
ROWS = {
    "boltzmann (τ0=1, 10 %, m=10)": {},
    "uniform random": {"sampling": "uniform"},
    "mask2former threshold": {"sampling": "mask2former"},
    "dense attention (100 %)": {"sampling": "dense"},
    "m = 1 query": {"num_queries": 1},
    "no text query init": {"text_query_init": False},
    "PiGMA off (mean only)": {"pigma": False},
    "τ0 = 0.5": {"tau0": 0.5},
    "τ0 = 2": {"tau0": 2.0},
    "5 % tokens": {"token_ratio": 0.05},
}
# Rows that change only inference options of the first row's weights (cheap; labelled as such).
INFERENCE_ROWS = {
    "τ0 = 0.5 (inference only)": {"tau0": 0.5},
    "τ0 = 2 (inference only)": {"tau0": 2.0},
    "5 % tokens (inference only)": {"token_ratio": 0.05},
    "100 % tokens (inference only)": {"token_ratio": 1.0},
}


@torch.inference_mode()
def decoder_ms_per_slice(model, batch: int = 16, repeats: int = 5) -> float:
    cfg = model.cfg
    x = torch.rand(batch, 1, cfg.image_size, cfg.image_size)
    feats, pix = model.encoder(x)
    text, pad = model.text(torch.randn(batch, 4, cfg.text_dim), torch.ones(batch, 4, dtype=torch.bool),
                           torch.randn(batch, cfg.text_dim))
    gen = torch.Generator().manual_seed(0)
    model.decoder(feats, pix, text, pad, gen)
    t = time.perf_counter()
    for _ in range(repeats):
        model.decoder(feats, pix, text, pad, gen)
    return 1000 * (time.perf_counter() - t) / repeats / batch


def main(argv=None, results: Path | None = None, real_dir: Path | None = None) -> int:
    """Train and evaluate the rows; ``results``: the folder for ablations.{json,md,png} (else
    --results), ``real_dir``: the real cases (else --real-dir, else $BOLTZFORMER_REAL_DATA)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", type=Path, default=results, required=results is None,
                   help="folder for ablations.{json,md,png}")
    p.add_argument("--real-dir", type=Path, default=real_dir, help="folder of the real cases (cases.csv)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--rows", default=None, help="comma-separated subset of row numbers")
    p.add_argument("--inference-only", action="store_true", help="only the inference-time rows (needs row 0 trained)")
    args = p.parse_args(argv)
    results_dir = args.results
    if args.rows or args.inference_only:  # a subset never replaces the published table of all the rows
        results_dir = Path(args.out)
        print(f"a subset of the rows: its ablations.{{json,md,png}} go to {results_dir}, not {args.results}")
    torch.set_num_threads(2)
    rows = list(ROWS.items())
    if args.rows:
        rows = [rows[int(i)] for i in args.rows.split(",")]
    results = []
    size = BASE["image_size"]
    common = dict(model="boltzformer-s", synth_train=3000, synth_val=300, steps=args.steps, steps_per_epoch=args.steps,
                  batch_size=16, warmup_steps=50, workers=2, threads=2, seed=0, lr=1e-3, positive_weight_max=20.0)
    real_dir = args.real_dir or data_mod.default_real_dir()
    if real_dir is not None and not (Path(real_dir) / "cases.csv").is_file():  # before minutes of training
        p.error(f"--real-dir {real_dir}: no cases.csv there (a folder of the real cases is needed)")
    real_val = data_mod.real_examples(real_dir, "heldout", size, negatives=False) if real_dir else None
    def evaluate_row(name, overrides, model, bank, minutes):
        synth_val = synthetic_cache(cfg, cfg.synth_val, cfg.seed + 10_000, size)
        v = evaluate_examples(model, synth_val, bank, "cpu")
        r = evaluate_examples(model, real_val, bank, "cpu") if real_val is not None and len(real_val) else {"dice": float("nan")}
        row = {"row": name, "overrides": overrides, "synth_dice": v["dice"], "synth_dice_small": v["dice_small"],
               "synth_dice_medium": v["dice_medium"], "synth_dice_large": v["dice_large"],
               "negative_fp_rate": v["negative_fp_rate"], "real_dice": r["dice"],
               "decoder_ms_per_slice": decoder_ms_per_slice(model), "train_minutes": minutes}
        results.append(row)
        print(json.dumps(row), flush=True)
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "ablations.json").write_text(json.dumps({"steps": args.steps, "input": size, "rows": results}, indent=2))

    if args.inference_only:
        rows = []
    for name, overrides in rows:
        out = Path(args.out) / name.replace(" ", "_").replace("%", "pct").replace("(", "").replace(")", "").replace(",", "")
        cfg = TrainConfig(model_overrides={**BASE, **overrides}, **common)
        t = time.perf_counter()
        train(cfg, out)  # each row is evaluated from its last.safetensors, below
        minutes = (time.perf_counter() - t) / 60
        model, bank, meta, _ = load_model(out / "last.safetensors")
        evaluate_row(name, overrides, model, bank, minutes)
    base_dir = Path(args.out) / list(ROWS)[0].replace(" ", "_").replace("%", "pct").replace("(", "").replace(")", "").replace(",", "")
    if (base_dir / "last.safetensors").is_file():
        cfg = TrainConfig(model_overrides=dict(BASE), **common)
        for name, options in INFERENCE_ROWS.items():
            model, bank, _, _ = load_model(base_dir / "last.safetensors")
            model.set_inference_options(**options)
            evaluate_row(name, options, model, bank, 0.0)
    if not results:
        print(f"no row was trained or evaluated (the inference-only rows need row 0's weights in {base_dir}); "
              "nothing written", file=sys.stderr)
        return 1
    write_markdown_and_plot(results, args.steps, results_dir)
    return 0


def write_markdown_and_plot(results, steps, results_dir: Path) -> None:
    lines = [f"Ablations: {steps} steps x 16 slices at 128² input, seed 0, same data, Dice + class-balanced BCE (cap 20), for every row (2 CPU cores).", "",
             "| row | synth Dice | synth Dice < 0.1 % | synth Dice 0.1–1 % | synth Dice ≥ 1 % | FP rate on negatives | real held-out Dice | decoder ms/slice |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['synth_dice']:.3f} | {r['synth_dice_small']:.3f} | {r['synth_dice_medium']:.3f} | "
                     f"{r['synth_dice_large']:.3f} | {r['negative_fp_rate']:.2f} | {r['real_dice']:.3f} | {r['decoder_ms_per_slice']:.2f} |")
    (results_dir / "ablations.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plt = pyplot()
    names = [r["row"] for r in results]
    y = np.arange(len(names))
    fig, ax = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5), sharey=True)
    ax[0].barh(y - 0.2, [r["synth_dice"] for r in results], 0.4, label="synthetic, all")
    ax[0].barh(y + 0.2, [r["synth_dice_small"] for r in results], 0.4, label="synthetic, < 0.1 % area")
    ax[0].set_yticks(y, names)
    ax[0].invert_yaxis()
    ax[0].set_xlabel("held-out synthetic Dice")
    ax[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.5 / len(names)), ncol=2, frameon=False)
    ax[1].barh(y, [r["decoder_ms_per_slice"] for r in results], color="gray")
    ax[1].set_xlabel("decoder ms / slice (CPU)")
    fig.suptitle(f"Ablations: {steps} steps x 16 slices at 128² input, one seed each (real held-out Dice: the table)")
    fig.tight_layout()
    save_figure(fig, results_dir / "ablations.png", dpi=90)
