"""Sparse vs dense vs Mask2Former decoder cross-attention, side by side in one run.

    python benchmarks/decoder.py [--device cpu|cuda] [--batch 1] [--repeats 50] [--out DIR]

Same as `boltzformer bench decoder`, plus --batch and a plot; writes
DIR/decoder_<device>_batch<N>.{json,md,png}. DIR defaults to runs/bench (git-ignored): a trial run
never replaces a published result; pass --out benchmarks/results to update one.
"""

import argparse
import json
from pathlib import Path

from boltzformer.bench.decoder import bench_decoder, decoder_markdown
from boltzformer.devices import resolve_device
from boltzformer.plots import pyplot, save_figure

TRIALS = Path(__file__).parent.parent / "runs" / "bench"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--batch", type=int, default=1, help="slices per call")
    p.add_argument("--out", type=Path, default=TRIALS,
                   help="folder for the results (default runs/bench; benchmarks/results holds the published ones)")
    args = p.parse_args()
    device = resolve_device(args.device)
    result = bench_decoder(device=device, repeats=args.repeats, batch=args.batch)
    md = decoder_markdown(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decoder_{device.type}_batch{args.batch}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(md)
    plot(result, stem.with_suffix(".png"))
    print(f"-> {stem}.json, .md, .png")


def plot(result: dict, path: Path) -> None:
    """Time per call against the number of tokens (log-log), one line per attention variant."""
    plt = pyplot()
    tokens = [r["tokens"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"dense": "dense (all tokens)", "mask2former": "Mask2Former (thresholded mask)",
              "sparse_as_dense_mask": "sampled, as a dense mask", "sparse_as_dense_mask+sampling": "Boltzmann sampling + dense mask", "sparse_gather+sampling": "Boltzmann sampling + gather",
              "sparse_gather": "gather only (K tokens)"}
    for key, label in labels.items():
        ax.plot(tokens, [r["time_ms"][key] for r in result["rows"]], "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(tokens, [f"{r['side']}²" for r in result["rows"]])
    ax.set_xlabel("token map")
    batch = result.get("batch", 1)
    ax.set_ylabel(f"ms per call ({batch} slice{'s' if batch > 1 else ''} a call)")
    machine = result["machine"].get("gpu") or result["machine"]["cpu"]
    ax.set_title(f"Decoder cross-attention, m={result['num_queries']}, {result['ratio']:.0%} tokens, batch {batch}"
                 f"\n{machine}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
