"""Where does a fresh process's first volume lose its seconds on a GPU?

A `boltzformer segment --device cuda` run is one process per scan, and its first volume took
6-8 s of segmentation where later ones take 2 s (benchmarks/results/volume_cuda*.md: the network
4.9-6.2 s instead of 0.3 s). On the device machine, from the checkout's root:
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu/cold_start.py
Each case runs in a fresh process on the 300 x 512² bench CT ("lung nodule", bundled weights):
- plain: CUDA set-up, model load, then two volumes with the network's stage times;
- profiled: the first batch of 32 under torch.profiler (top ops by host time), then a second;
- no_cudnn: as plain, with cuDNN off (PyTorch's own convolution kernels);
- no_cudnn_sdpa: as plain, with cuDNN's attention backend off;
- perbatch: as plain, each stage of each batch timed (synchronised hooks);
- dummy_first / ct_first: perbatch after one batch of 32 random slices / of the CT's first 32
  slices through predict_batch (is the first call's cost the data's or the first call's?);
(CASES=a,b picks cases; default: plain, profiled, no_cudnn and the VARIANTS)
- each of the environment settings in VARIANTS, as plain.
Result: $OUT/cold_start.json and the log. SMOKE=1: a small CT on the CPU (a check of the script).
"""
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT") or "/tmp/cold_out")
WORK = Path("/tmp/cold_work")
SMOKE = os.environ.get("SMOKE") == "1"
VARIANTS = {"module_loading_eager": {"CUDA_MODULE_LOADING": "EAGER"}}


def child(mode: str):
    t0 = time.perf_counter()
    sys.path.insert(0, str(WORK / "pkg"))
    sys.path.insert(0, str(Path(__file__).parent))
    from ab_bench import stub_missing

    stub_missing()
    import numpy as np
    import torch

    from boltzformer.segmenter import Segmenter

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if mode == "no_cudnn":  # PyTorch's own convolution kernels instead of cuDNN's (no per-shape plans)
        torch.backends.cudnn.enabled = False
    if mode == "no_cudnn_sdpa" and dev == "cuda":  # attention through flash / memory-efficient kernels only
        torch.backends.cuda.enable_cudnn_sdp(False)
    row = {"mode": mode, "import_s": time.perf_counter() - t0}
    t = time.perf_counter()
    if dev == "cuda":
        torch.zeros(1, device=dev)
        torch.cuda.synchronize()
    row["cuda_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    seg = Segmenter.from_pretrained(None, device=dev)
    row["load_s"] = time.perf_counter() - t
    with open(WORK / "ct.pkl", "rb") as f:
        vol = pickle.load(f)
    if mode == "profiled":
        from torch.profiler import ProfilerActivity, profile

        slices = np.random.default_rng(0).random((32, 256, 256), dtype=np.float32)
        emb = seg.prompt_bank["lung nodule"]
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            seg.predict_batch(slices, emb, seg._generator(0))
            row["first_batch_s"] = time.perf_counter() - t
        t = time.perf_counter()
        seg.predict_batch(slices, emb, seg._generator(0))
        row["second_batch_s"] = time.perf_counter() - t
        row["top_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        print(row["top_ops"])
    else:
        if mode in ("dummy_first", "ct_first"):  # one batch through predict_batch before the volumes
            if mode == "dummy_first":
                slices = np.random.default_rng(0).random((32, 256, 256), dtype=np.float32)
            else:  # the CT's first 32 slices in a lung window, at 512² as the volume gives them
                slices = np.clip((vol.array[:32].astype(np.float32) + 1350) / 1500, 0, 1)
            t = time.perf_counter()
            seg.predict_batch(slices, seg.prompt_bank["lung nodule"], seg._generator(0))
            row["first_batch_s"] = time.perf_counter() - t
        if mode in ("perbatch", "dummy_first", "ct_first"):  # each network stage's time per batch, synchronised
            calls = row["calls"] = []
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

            def timed(module, name):
                def pre(*_):
                    sync()
                    module._t = time.perf_counter()

                def post(*_):
                    sync()
                    calls.append((name, round(time.perf_counter() - module._t, 4)))

                module.register_forward_pre_hook(pre)
                module.register_forward_hook(post)

            for name in ("encoder", "decoder", "pigma"):
                timed(getattr(seg.model, name), name)
        row["volumes"] = []
        for _ in range(2):
            stages = {}
            t = time.perf_counter()
            r = seg.segment_volume(vol, "lung nodule", stage_times=stages)
            if dev == "cuda":
                torch.cuda.synchronize()
            row["volumes"].append({"segment_s": time.perf_counter() - t, "stages_s": stages,
                                   "timings_s": {k: float(v) for k, v in r.timings_s.items()}})
    row["process_s"] = time.perf_counter() - t0
    print("ROW " + json.dumps(row, default=float), flush=True)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.rmtree(WORK / "pkg" / "boltzformer", ignore_errors=True)  # copied anew: an old copy would time old code
    shutil.copytree("model", WORK / "pkg" / "boltzformer")
    shutil.copytree("resources", WORK / "pkg" / "boltzformer" / "resources")
    sys.path.insert(0, str(WORK / "pkg"))
    sys.path.insert(0, str(Path(__file__).parent))
    from ab_bench import stub_missing

    stub_missing()
    from boltzformer.bench.volume import bench_ct

    vol = bench_ct(*((12, 128) if SMOKE else (300, 512)))
    with open(WORK / "ct.pkl", "wb") as f:
        pickle.dump(vol, f)
    rows = []
    cases = [(m, {}) for m in os.environ.get("CASES", "plain,profiled,no_cudnn").split(",")]
    cases += [(name, env) for name, env in VARIANTS.items() if name in os.environ.get("CASES", name)]
    for mode, env in cases:
        t = time.time()
        p = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True,
                           env=dict(os.environ, **env), timeout=300)
        print(f"== {mode} ({time.time() - t:.1f} s wall, rc {p.returncode})\n" + p.stdout[-6000:] + p.stderr[-1500:],
              flush=True)
        for line in p.stdout.splitlines():
            if line.startswith("ROW "):
                rows.append(dict(json.loads(line[4:]), env=env))
        (OUT / "cold_start.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--child") + 1])
    else:
        main()
