"""`boltzformer bench decoder` (also benchmarks/decoder.py): decoder cross-attention speed.

One decoder cross-attention call, m = 10 queries, D = 128, 4 heads, at token maps 32², 64²,
128², measured side by side in one run: sparse gather (10 % of tokens, Boltzmann sampling
included), dense attention over every token, Mask2Former thresholded attention, and the dense
implementation of the sampled pattern. Time (median of repeats) and MACs.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from ..network import sampling
from ..network.attention import TokenCrossAttention, cross_attention_macs, token_table
from ..network.decoder import AUTO_ATTENTION_IMPL, POS_DIM, sine_positions
from ..network.graphs import capture, graphs_available
from ..runtime import tune_allocator
from ..devices import resolve_device
from ..io import write_text
from .machine import describe, machine_description


WARMUP_CALLS = 3  # untimed calls before the repeats (allocation, kernel selection)


def _time(fn, device, repeats: int, warmup: int = WARMUP_CALLS) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


@torch.inference_mode()
def bench_decoder(sizes=(16, 32, 64, 128), num_queries=10, dim=128, heads=4, ratio=0.10, batch=1, repeats=30,
                  device="cpu", seed=0, graphs=True) -> dict:
    """Time each variant at each token map side; on CUDA (graphs=True) also replayed as CUDA graphs,
    as the product runs the network there."""
    device = torch.device(device)
    tune_allocator()
    torch.manual_seed(seed)
    attn = TokenCrossAttention(dim, heads).to(device).eval()
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    use_graphs = graphs and graphs_available(device)
    rows = []
    for side in sizes:
        n = side * side
        k = sampling.num_sampled_tokens(n, ratio)
        q = torch.randn(batch, num_queries, dim, device=device)
        tokens = torch.randn(batch, n, dim, device=device)
        pos = sine_positions(side, side, POS_DIM, device, torch.float32)
        conf = torch.rand(batch, num_queries, n, device=device)
        idx = sampling.sample_tokens(conf, k, 0.5, gen)
        m2f = sampling.threshold_mask(conf, 0.9)  # ~10 % of tokens above threshold
        # The decoder copies each token map once per forward pass, shared by the blocks that attend
        # to it: B x N x D for dense attention (`tokens` here), the token table for the sparse path.
        table = token_table(tokens, pos)
        variants = {
            "dense": lambda: attn(q, tokens, pos),
            "sparse_gather": lambda: attn(q, tokens, pos, indices=idx, impl="gather", table=table),
            "sparse_gather+sampling": lambda: attn(q, tokens, pos, indices=sampling.sample_tokens(conf, k, 0.5, gen),
                                                   impl="gather", table=table),
            "sparse_as_dense_mask": lambda: attn(q, tokens, pos, indices=idx, impl="dense"),
            "sparse_as_dense_mask+sampling": lambda: attn(q, tokens, pos, impl="dense",
                                                          indices=sampling.sample_tokens(conf, k, 0.5, gen)),
            "mask2former": lambda: attn(q, tokens, pos, mask=sampling.threshold_mask(conf, 0.9)),
        }
        spread = {name: _time(fn, device, repeats) for name, fn in variants.items()}
        times = {name: t[0] for name, t in spread.items()}
        # On CUDA the product replays the network as CUDA graphs (network/graphs.py): time the
        # three variants that way too, each recorded once and replayed.
        graphed = {}
        if use_graphs:
            for name in _GRAPHED:
                fn = variants[name]
                graph, _ = capture(fn, generators=(gen,) if "sampling" in name else (), warmup=2)
                graphed[name] = _time(graph.replay, device, repeats)[0]
        macs_dense = cross_attention_macs(num_queries, n, dim, heads, None) * batch
        macs_sparse = cross_attention_macs(num_queries, n, dim, heads, k) * batch
        rows.append({
            "tokens": n, "side": side, "k": k, "batch": batch,
            "time_ms": {name: 1000 * t for name, t in times.items()},  # medians
            "time_ms_min_max": {name: [1000 * t[1], 1000 * t[2]] for name, t in spread.items()},
            "macs": {"dense": macs_dense, "sparse_gather": macs_sparse, "mask2former": macs_dense},
            "mask2former_attended_fraction": float(m2f.float().mean()),
            "speedup_sparse_vs_dense": times["dense"] / times["sparse_gather"],
            "speedup_sparse_with_sampling_vs_dense": times["dense"] / times["sparse_gather+sampling"],
            "speedup_masked_dense_with_sampling_vs_dense": times["dense"] / times["sparse_as_dense_mask+sampling"],
            "flop_ratio_dense_over_sparse": macs_dense / macs_sparse,
        })
        if graphed:
            rows[-1]["graph_time_ms"] = {name: 1000 * t for name, t in graphed.items()}
            rows[-1]["speedup_graphed_sparse_with_sampling_vs_dense"] = (graphed["dense"]
                                                                          / graphed["sparse_gather+sampling"])
    # What attention_impl="auto" runs (network/decoder.py), so the choice can be checked against
    # the two sampled-pattern columns measured here.
    auto = AUTO_ATTENTION_IMPL
    return {"benchmark": "decoder_cross_attention", "device": str(device), "machine": machine_description(),
            "num_queries": num_queries, "dim": dim, "heads": heads, "ratio": ratio, "auto_impl": auto,
            "batch": batch, "cuda_graphs": use_graphs, "repeats": repeats, "warmup_calls": WARMUP_CALLS, "rows": rows}


# The variants timed as CUDA graph replays too (on CUDA).
_GRAPHED = ("dense", "sparse_gather+sampling", "sparse_as_dense_mask+sampling")

# The decoder's impl names, as the table's columns call them ("dense" there is unsampled attention).
_AUTO_NAMES = {"gather": "gather", "dense": "masked (attention_impl 'dense' over the sampled tokens)"}


def decoder_markdown(result: dict) -> str:
    lines = [f"Decoder cross-attention, m = {result['num_queries']}, D = {result['dim']}, {result['heads']} heads, "
             f"ratio {result['ratio']:.0%}, {result.get('batch', 1)} slice(s) per call, device {result['device']} "
             f"({describe(result['machine'])}). "
             f"Each time is the median of {result.get('repeats', '?')} calls after {result.get('warmup_calls', '?')} "
             "untimed ones (min and max in the JSON).", "",
             "Sampling included (the method draws its tokens every layer): gather = sparse gather "
             "attention, masked = the same sampled pattern as a boolean-masked dense SDPA. "
             f"attention_impl='auto' runs **{_AUTO_NAMES.get(result.get('auto_impl'), '?')}** on this device.", "",
             "| tokens | K | dense ms | gather+sampling ms | masked+sampling ms | gather only ms | mask2former ms "
             "| speed-up (gather+sampling) | speed-up (masked+sampling) | MAC ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r["time_ms"]
        masked = t.get("sparse_as_dense_mask+sampling", float("nan"))
        lines.append(f"| {r['side']}² | {r['k']} | {t['dense']:.3f} | {t['sparse_gather+sampling']:.3f} | "
                     f"{masked:.3f} | {t['sparse_gather']:.3f} | {t['mask2former']:.3f} | "
                     f"{r['speedup_sparse_with_sampling_vs_dense']:.1f}× | {t['dense'] / masked:.1f}× | "
                     f"{r['flop_ratio_dense_over_sparse']:.1f}× |")
    graphed = [r for r in result["rows"] if "graph_time_ms" in r]
    if graphed:
        lines += ["", "As the product runs them on CUDA: each variant recorded once as a CUDA graph and replayed "
                  "(network/graphs.py), so the host launches one graph instead of each kernel.", "",
                  "| tokens | K | dense ms | gather+sampling ms | masked+sampling ms | speed-up (gather+sampling) |",
                  "|---|---|---|---|---|---|"]
        for r in graphed:
            t = r["graph_time_ms"]
            lines.append(f"| {r['side']}² | {r['k']} | {t['dense']:.3f} | {t['sparse_gather+sampling']:.3f} | "
                         f"{t['sparse_as_dense_mask+sampling']:.3f} | "
                         f"{r['speedup_graphed_sparse_with_sampling_vs_dense']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    """`boltzformer bench decoder`: print the table; ``args.json``: also the JSON result;
    ``args.batch``: slices per call."""
    device = getattr(args, "device", "cpu") or "cpu"

    result = bench_decoder(device=resolve_device(device), repeats=getattr(args, "repeats", 30) or 30,
                           batch=getattr(args, "batch", 1) or 1)
    text = decoder_markdown(result)
    print(text)
    if getattr(args, "json", None):
        write_text(args.json, json.dumps(result, indent=2))
    return 0
