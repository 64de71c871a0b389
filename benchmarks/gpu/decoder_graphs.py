"""Decoder cross-attention with the host's launch overhead removed (written when the product ran
eagerly; it now replays the network as CUDA graphs on CUDA, and `bench decoder` times that). Each variant, dense attention and sparse attention with its Boltzmann sampling, is
captured once as a CUDA graph and replayed; the sampling draws from the default CUDA generator,
which graph replays advance. Eager times beside them, in the same process. Per cell: the median of
single synchronised calls (`_ms`, as boltzformer.bench.decoder times them) and the mean of 200
calls back to back (`_loop_ms`).

On the device machine, from the checkout's root: `python3 benchmarks/gpu/decoder_graphs.py`
(it imports `ab_bench` beside it for the package copy and the stand-ins of what is not installed
there); writes $OUT/graphs.json (benchmarks/results/decoder_cuda_graphs.json).
"""
import json, os, sys, time, shutil
from pathlib import Path
sys.path.insert(0, "benchmarks/gpu")
import ab_bench
OUT = Path(os.environ.get("OUT") or "/tmp/ab_out"); OUT.mkdir(parents=True, exist_ok=True)
new = ab_bench.WORK / "new"
shutil.rmtree(new / "boltzformer", ignore_errors=True)  # copied anew: an old copy would time old code
shutil.copytree("model", new / "boltzformer"); shutil.copytree("resources", new / "boltzformer" / "resources")
sys.path.insert(0, str(new)); ab_bench.stub_missing()
import torch
from boltzformer.network.attention import TokenCrossAttention, token_table
from boltzformer.network import sampling
from boltzformer.network.decoder import sine_positions, POS_DIM
from boltzformer.bench.decoder import _time

dev = torch.device("cuda")
attn = TokenCrossAttention(128, 4).to(dev).eval()
res = {"gpu": torch.cuda.get_device_name(0), "rows": []}


def loop_ms(fn, n=200):
    """Mean time per call of n calls back to back (no synchronisation between them)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / n


def graphed(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


with torch.inference_mode():
    for b in (1, 8):
        for side in (16, 32, 64, 128):
            n = side * side; k = sampling.num_sampled_tokens(n, 0.1)
            q = torch.randn(b, 10, 128, device=dev); tokens = torch.randn(b, n, 128, device=dev)
            pos = sine_positions(side, side, POS_DIM, dev, torch.float32); table = token_table(tokens, pos)
            conf = torch.rand(b, 10, n, device=dev)
            dense = lambda: attn(q, tokens, pos)
            sparse = lambda: attn(q, tokens, pos, indices=sampling.sample_tokens(conf, k, 0.5, None), impl="gather", table=table)
            row = {"batch": b, "side": side, "k": k}
            for name, fn in (("dense", dense), ("sparse+sampling", sparse)):
                row[name + "_eager_ms"] = 1e3 * _time(fn, dev, 100)
                row[name + "_eager_loop_ms"] = loop_ms(fn)
                try:
                    replay = graphed(fn)
                    row[name + "_graph_ms"] = 1e3 * _time(replay, dev, 200)
                    row[name + "_graph_loop_ms"] = loop_ms(replay)
                except Exception as e:  # noqa: BLE001
                    row[name + "_graph_ms"] = None; row[name + "_error"] = repr(e)[:300]
            res["rows"].append(row)
            print(json.dumps({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}), flush=True)
            (OUT / "graphs.json").write_text(json.dumps(res, indent=2))
