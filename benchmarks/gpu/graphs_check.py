"""GPU lease: check and time the product's CUDA graphs (model/network/graphs.py) in one call.

On the device machine, from the checkout's root (no carry needed):
    PYTHONUNBUFFERED=1 BUDGET_S=400 python3 benchmarks/gpu/graphs_check.py
SMOKE=1 here: a CPU run of every section on a small CT (graphs are off there).

1. tests/model/network/test_graphs.py under pytest: its CUDA tests run there;
2. `boltzformer bench decoder` at batch 1 and 8, token maps 16²-128², eager and as graph replays
   (the product's code, boltzformer.bench.decoder);
3. `Segmenter.segment_volume` on the 300 x 512² bench CT ("lung nodule", bundled weights, filter
   on), graphs off and on in turn, three rounds after a warm-up run: seconds, network time, GPU
   peak memory, lesions, and the voxels where the masks of the two differ;
4. if time is left, benchmarks/gpu/layout_bench.py (channels-last on the GPU, never measured),
   eagerly (BOLTZFORMER_CUDA_GRAPHS=0).
Results: $OUT/graphs_check.json, $OUT/layout.json and the log.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

T0 = time.time()
SMOKE = os.environ.get("SMOKE") == "1"
BUDGET_S = float(os.environ.get("BUDGET_S", 400))
OUT = Path(os.environ.get("OUT") or "/tmp/graphs_out")
OUT.mkdir(parents=True, exist_ok=True)
PKG = Path("/tmp/graphs_work/pkg")
if __name__ == "__main__":  # the package as installed (model/ with resources/ inside), copied anew each run
    shutil.rmtree(PKG / "boltzformer", ignore_errors=True)
    shutil.copytree("model", PKG / "boltzformer")
    shutil.copytree("resources", PKG / "boltzformer" / "resources")
sys.path.insert(0, str(PKG))
sys.path.insert(0, str(Path(__file__).parent))
from ab_bench import stub_missing  # noqa: E402  SimpleITK and the MiniLM wheel are absent there
from timelog import logger  # noqa: E402

stub_missing()
import numpy as np  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RESULT = {"device": DEVICE, "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else None,
          "torch": torch.__version__, "cpus": os.cpu_count()}


say = logger(OUT / "graphs_log.txt", T0)


def save():
    (OUT / "graphs_check.json").write_text(json.dumps(RESULT, indent=2, default=str))


def guarded(title, fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - one failing section must not hide the others
        say(f"{title} FAILED:\n" + traceback.format_exc())
        RESULT.setdefault("failed", []).append(title)
    save()


def tests():
    env = dict(os.environ, PYTHONPATH=f"{PKG}:{Path(__file__).parent}")
    code = ("import ab_bench; ab_bench.stub_missing(); import sys, pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--noconftest', '-rs', "
            "'tests/model/network/test_graphs.py']))")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    say("pytest test_graphs.py rc", p.returncode, "\n" + p.stdout[-4000:] + p.stderr[-2000:])
    RESULT["pytest"] = {"rc": p.returncode, "tail": p.stdout[-2000:]}


def decoder():
    from boltzformer.bench.decoder import bench_decoder, decoder_markdown

    RESULT["decoder"] = {}
    for batch in (1, 8):
        r = bench_decoder(sizes=(16, 32) if SMOKE else (16, 32, 64, 128), device=torch.device(DEVICE),
                          batch=batch, repeats=5 if SMOKE else 100)
        RESULT["decoder"][f"batch{batch}"] = r
        say(f"decoder, batch {batch}:\n" + decoder_markdown(r))
        save()


def volume():
    from boltzformer.bench.volume import bench_ct
    from boltzformer.segmenter import Segmenter

    slices, size = (12, 128) if SMOKE else (300, 512)
    t = time.time()
    vol = bench_ct(slices, size)
    say(f"bench CT {slices} x {size}^2 made in {time.time() - t:.1f} s")
    segs = {on: Segmenter.from_pretrained(None, device=DEVICE, cuda_graphs=on) for on in (False, True)}
    runs, masks = [], {}
    order = [False] + [False, True] * (1 if SMOKE else 3)  # run 0: CUDA's first-use costs
    for i, on in enumerate(order):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        r = segs[on].segment_volume(vol, "lung nodule")
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        row = {"run": i, "cuda_graphs": on, "seconds_segment": time.time() - t,
               "timings_s": {k: float(v) for k, v in r.timings_s.items() if isinstance(v, (int, float))},
               "graphs_captured": len(segs[on]._graphs._graphs),
               "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None,
               "gpu_reserved_mb": torch.cuda.memory_reserved() / 2**20 if DEVICE == "cuda" else None,
               "lesions": len(r.lesions)}
        masks.setdefault(on, np.asarray(r.mask) > 0)
        runs.append(row)
        say(json.dumps(row))
        RESULT["volume"] = {"slices": slices, "size": size, "runs": runs}
        save()
        if time.time() - T0 > BUDGET_S - 60:
            break
    if len(masks) == 2:
        RESULT["volume"]["mask_voxels_differing"] = int((masks[True] != masks[False]).sum())
        RESULT["volume"]["mask_voxels"] = int(masks[False].sum())
        say("mask voxels differing, graphs on vs off:", RESULT["volume"]["mask_voxels_differing"],
            "of", RESULT["volume"]["mask_voxels"])


def layout():
    left = BUDGET_S - (time.time() - T0)
    if left < 150 and not SMOKE:
        say(f"layout bench skipped: {left:.0f} s left")
        return
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "layout_bench.py")], capture_output=True,
                       text=True, timeout=max(30, left - 20),
                       # eager: a layout change gives the weights new storage, which graphs would re-record
                       env=dict(os.environ, OUT=str(OUT), BOLTZFORMER_CUDA_GRAPHS="0"))
    say("layout_bench rc", p.returncode, "\n" + p.stdout[-3000:] + p.stderr[-1500:])


if __name__ == "__main__":
    say("device", DEVICE, RESULT["gpu"], "torch", torch.__version__)
    for title, fn in (("tests", tests), ("decoder", decoder), ("volume", volume), ("layout", layout)):
        guarded(title, fn)
    say("done")
