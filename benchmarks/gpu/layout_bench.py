"""Does the slice network run faster channels-last on a GPU too? An A/B for a lease.

Answered on an H200, 2026-11-27 (benchmarks/results/cuda_graphs_h200.md): no measurable gain, so
GPUs keep the default layout. Run it with BOLTZFORMER_CUDA_GRAPHS=0: the layout change gives the
weights new storage, and graphs (the product's default on CUDA) would be recorded again.

On the CPU the Segmenter keeps its convolutions channels-last (oneDNN's layout: 300 x 512² CT
15.1 -> 10.5 s on 2 cores). GPUs keep the default layout because it was never measured there;
cuDNN's tensor-core kernels also prefer NHWC under bf16, so it may pay there as well.

On the device machine: `PYTHONUNBUFFERED=1 python3 benchmarks/gpu/layout_bench.py` (no carry
needed: it copies model/ and resources/ itself). SMOKE=1: a small CT and few repeats (a CPU check
of the script). Each layout runs in turn, ROUNDS times (default 2), in one process:

- `predict_batch` on a batch of 8 slices at 256² (median of 20, after warm-up);
- `segment_volume` on the bench CT (300 x 512², "lung nodule"), warm, with its stage times;
- the largest absolute difference of the probabilities between the layouts (expect ~1e-2 under
  bf16, ~1e-5 in float32).

Result: $OUT/layout.json and the log. Adopting channels-last on CUDA is then a one-line change in
`devices.fast_layout` (the condition on the device type).
"""
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT") or "/tmp/layout_out")
WORK = Path("/tmp/layout_work")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    pkg = WORK / "pkg"
    shutil.rmtree(pkg / "boltzformer", ignore_errors=True)  # copied anew: an old copy would time old code
    shutil.copytree("model", pkg / "boltzformer")
    shutil.copytree("resources", pkg / "boltzformer" / "resources")
    sys.path.insert(0, str(pkg))
    sys.path.insert(0, str(Path(__file__).parent))
    from ab_bench import stub_missing  # SimpleITK and the MiniLM wheel are absent on the GPU machine

    stub_missing()
    import numpy as np
    import torch

    from boltzformer.bench.volume import bench_ct
    from boltzformer.segmenter import Segmenter

    smoke = os.environ.get("SMOKE") == "1"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    seg = Segmenter.from_pretrained(device=dev)
    vol = bench_ct(*((40, 256) if smoke else (300, 512)))
    emb = seg.prompt_bank["lung nodule"]  # cached with the weights: no sentence encoder needed
    x = np.random.default_rng(0).random((8, 256, 256), dtype=np.float32)
    repeats = 3 if smoke else 20

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def batch_ms():
        times, prob = [], None
        for i in range(repeats + 3):
            sync()
            t = time.perf_counter()
            prob = seg.predict_batch(x, emb, torch.Generator(device=dev).manual_seed(0))[0]
            sync()
            if i >= 3:
                times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times), prob

    res = {"device": dev, "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None, "torch": torch.__version__,
           "rounds": []}
    probs = {}
    for r in range(int(os.environ.get("ROUNDS", 2))):
        for layout in ("default", "channels_last"):
            seg.model.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
            ms, probs[layout] = batch_ms()
            seg.segment_volume(vol, "lung nodule")  # warm
            stages = {}
            sync()
            t = time.perf_counter()
            result = seg.segment_volume(vol, "lung nodule", stage_times=stages)
            sync()
            row = {"round": r, "layout": layout, "predict_batch8_ms": ms, "segment_s": time.perf_counter() - t,
                   "stages_s": {k: float(v) for k, v in stages.items()}, "lesions": len(result.lesions)}
            res["rounds"].append(row)
            print(json.dumps(row), flush=True)
    res["max_abs_prob_diff"] = float(np.abs(probs["default"] - probs["channels_last"]).max())
    print("max |probability difference| between the layouts:", res["max_abs_prob_diff"], flush=True)
    (OUT / "layout.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
