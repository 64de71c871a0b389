"""`boltzformer bench volume` (also benchmarks/volume.py): end-to-end segmentation of a synthetic CT, stages timed.

The synthetic CT (default 300 slices of 512 x 512, int16 HU, gzip NIfTI) is written first; the
measurement then runs in a fresh subprocess so that peak RSS is that of a user's `segment`
run: read -> preprocess -> encoder -> decoder -> PiGMA -> post-process -> write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import runtime
from ..errors import BoltzformerError
from ..options import DEFAULT_MIRROR
from ..io import write_text
from .machine import describe, machine_description


def bench_ct(slices: int, size: int = 512, seed: int = 0):
    """The benchmark's synthetic chest CT, in memory: `slices` x size x size int16 HU at
    0.7 x 0.7 x 1.0 mm. A 3D phantom chest (boltzformer.synth.lung3d, vessel trees that run
    through the slices, as the 3D nodule detector meets in a real CT) of half as many 2 mm
    slices at 256 x 256, upsampled."""
    import torch
    from torch.nn import functional as F

    from ..io import Volume
    from ..synth.lung3d import chest_phantom

    # A seed of the range never drawn for training (data.RESERVED_PHANTOM_SEEDS), off the evaluation sets.
    base = chest_phantom(99_100 + seed, shape_zyx=(max(16, slices // 2), 256, 256), spacing_mm=(1.4, 1.4, 2.0),
                         n_nodules=(2, 5))
    img = torch.from_numpy(base.image.astype(np.float32))[None]
    img = F.interpolate(img[None], size=(slices, size, size), mode="trilinear", align_corners=False)[0, 0]
    return Volume(np.round(img.numpy()).astype(np.int16), (0.7, 0.7, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT", None, {})


def make_ct(path: Path, slices: int, size: int = 512, seed: int = 0) -> Path:
    """`bench_ct` written to `path` (NIfTI or any format write_volume knows)."""
    from ..io import write_volume

    write_volume(bench_ct(slices, size, seed), path, overwrite=True)
    return path


def measure(input_path: str, output_path: str, device: str, prompt: str = "lung nodule", weights: str | None = None,
            mirror: bool = DEFAULT_MIRROR) -> dict:
    """One `segment` run with stage times; meant to run in its own process."""
    t0 = time.perf_counter()
    import torch

    from ..io import read_volume, write_volume
    from ..runtime import tune_allocator
    from ..segmenter import Segmenter

    t_import = time.perf_counter() - t0
    # as `boltzformer segment` does: without it the same CT took 11.2 s instead of 8.8 s (2 cores)
    tune_allocator()
    seg = Segmenter.from_pretrained(weights, device=device)
    t_load = time.perf_counter() - t0 - t_import
    cold_s = None
    if seg.device.type == "cuda":
        # A fresh process's first volume on a GPU also pays CUDA's set-up and the CUDA graphs'
        # capture (several seconds, benchmarks/gpu/cold_start.py): timed apart, then the volume
        # is timed warm, as every later volume of a session or a cohort worker runs.
        t = time.perf_counter()
        seg.segment_volume(read_volume(input_path), prompt, mirror=mirror)
        torch.cuda.synchronize()
        cold_s = time.perf_counter() - t
        torch.cuda.reset_peak_memory_stats()
    stages: dict = {}
    t = time.perf_counter()
    vol = read_volume(input_path)
    stages["read"] = time.perf_counter() - t
    # On CUDA the network's stages are not timed: the stage clock synchronises the device inside the
    # forward pass, which keeps it off its CUDA graphs (network/graphs.py), so `segment` would not be
    # what is measured; the network is then one "network" stage.
    network_stages = seg.device.type != "cuda"
    result = seg.segment_volume(vol, prompt, stage_times=stages if network_stages else None, mirror=mirror)
    stages.update(split_stages(result.timings_s, stages, network_stages))
    t = time.perf_counter()
    write_volume(result.mask_volume(), output_path, overwrite=True)
    stages["write"] = time.perf_counter() - t
    end_to_end = sum(stages.values())
    lesions, rejected = len(result.lesions), len(result.rejected)  # the default pipeline's, before the detector's
    peak_rss_mb = runtime.peak_rss_mb()  # the default pipeline's peak
    # What the opt-in 3D nodule detector adds (lung nodule prompts): its blobs, its classifier, the
    # merge; a re-threshold with it less one without it (each re-runs the default post-processing).
    t = time.perf_counter()
    result.rethreshold(result.threshold)
    again_s = time.perf_counter() - t
    t = time.perf_counter()
    result.rethreshold(result.threshold, nodule_detector=True)
    detector_s = time.perf_counter() - t - again_s
    out = {
        "slices": vol.shape[0], "shape_zyx": list(vol.shape), "device": str(seg.device),
        "seconds_end_to_end": end_to_end, "slices_per_s": vol.shape[0] / end_to_end, "stages_s": stages,
        "import_s": t_import, "model_load_s": t_load,
        "seconds_with_start_up": end_to_end + t_import + t_load,  # what `boltzformer segment` costs in all
        "peak_rss_mb": peak_rss_mb,
        "peak_rss_mb_with_nodule_detector": runtime.peak_rss_mb(),
        "cuda_first_volume_s": cold_s,  # a fresh process's first volume on a GPU (timed apart; None on CPU)
        "lesions_found": lesions, "sampling": seg.config.sampling, "mirror": mirror,
        "attention_impl": seg.config.attention_impl, "batch_size": seg.default_batch_size(),
        "context_offsets_mm": list(seg.config.context_offsets_mm), "fp_filter_rejected": rejected,
        "nodule_detector_s": detector_s,  # not in seconds_end_to_end: the detector is opt-in
        "nodule_detector_find_s": result.timings_s.get("nodule_detector"),  # of which finding the blobs
        "lesions_found_with_nodule_detector": len(result.lesions),
        "weights": seg.info.get("weights_source"),
    }
    if seg.device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def split_stages(timings_s: dict, network: dict, network_stages: bool) -> dict:
    """A segment_volume run's timings -> the table's stages: preprocess, postprocess, and either the
    network's own (encoder / decoder / pigma, already in `network`) plus the rest of the inference
    (resize_and_copy), or, without network stages, the whole inference as "network"."""
    out = {"preprocess": timings_s["preprocess"], "postprocess": timings_s["postprocess"]}
    if network_stages:
        other = timings_s["inference"] - sum(network.get(k, 0.0) for k in ("encoder", "decoder", "pigma"))
        out["resize_and_copy"] = max(0.0, other)
    else:
        out["network"] = timings_s["inference"]
    return out


def main(args) -> int:
    """`boltzformer bench volume`: ``args.slices`` ("100,300"), ``args.device``, ``args.weights``,
    ``args.json`` (also writes the table beside it as .md), ``args.mirror``."""
    text = str("100,300" if getattr(args, "slices", None) is None else args.slices)
    try:
        slices_list = [int(s) for s in text.split(",")]
    except ValueError:
        slices_list = []
    if not slices_list or min(slices_list) < 1:
        raise BoltzformerError(f"--slices {text!r}: give slice counts of at least 1, separated by commas, e.g. 100,300")
    device = getattr(args, "device", None) or "auto"
    mirror = getattr(args, "mirror", DEFAULT_MIRROR)
    results = []
    print(f"bench volume: {describe(machine_description())}; each size in a fresh process, as `segment` runs it"
          + ("; on a GPU after one untimed warm-up volume" if device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for n in slices_list:
            src = make_ct(Path(tmp) / f"ct_{n}.nii.gz", n)
            cmd = [sys.executable, "-m", "boltzformer.bench.volume", "--measure", str(src),
                   str(Path(tmp) / f"mask_{n}.nii.gz"), device, "mirror" if mirror else "no-mirror"]
            if getattr(args, "weights", None):
                cmd.append(str(args.weights))
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:  # the measuring process's last words, as one line
                last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                raise BoltzformerError(f"bench volume: timing {n} slices failed ({last})")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            cold = f"; first volume of the process {r['cuda_first_volume_s']:.1f} s" if r.get("cuda_first_volume_s") else ""
            print(f"{n} slices on {r['device']}{' (mirror)' if r['mirror'] else ''}: {r['seconds_end_to_end']:.1f} s end to end "
                  f"({r['slices_per_s']:.1f} slices/s), peak RSS {r['peak_rss_mb']:.0f} MB{cold}; the opt-in nodule "
                  f"detector adds {r['nodule_detector_s']:.1f} s")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        slope = (b["seconds_end_to_end"] - a["seconds_end_to_end"]) / (b["slices"] - a["slices"])
        print(f"scaling: {1000 * slope:.1f} ms per additional slice")
    report = {"benchmark": "volume", "machine": machine_description(), "results": results}
    if len(results) >= 2:
        report["seconds_per_additional_slice"] = slope
    if getattr(args, "json", None):
        write_text(args.json, json.dumps(report, indent=2))
        write_text(Path(args.json).with_suffix(".md"), volume_markdown(report))
    return 0


def volume_markdown(report: dict) -> str:
    m = report["machine"]
    stages = list(report["results"][0]["stages_s"])
    gpu = any("peak_gpu_mb" in r for r in report["results"])
    lines = [f"End-to-end `segment` of a synthetic 512 x 512 CT; {describe(m)}. One run per size, each in a "
             "fresh process" + (" after one untimed warm-up volume (its time: 'first volume s')" if gpu else "")
             + "; the peak RSS is the default pipeline's (the opt-in nodule detector's own is in the JSON).", "",
             "| slices | device | s (read→write) | s incl. start-up | slices/s | peak RSS MB | "
             + ("peak GPU MB | first volume s | " if gpu else "")
             + " | ".join(f"{s} s" for s in stages) + " |",
             "|---" * (6 + 2 * gpu + len(stages)) + "|"]
    for r in report["results"]:
        extra = (f"{r.get('peak_gpu_mb', float('nan')):.0f} | {r.get('cuda_first_volume_s') or float('nan'):.1f} | "
                 if gpu else "")
        lines.append(f"| {r['slices']} | {r['device']}{' (mirror)' if r.get('mirror') else ''} | {r['seconds_end_to_end']:.1f} | {r['seconds_with_start_up']:.1f} | "
                     f"{r['slices_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {extra}"
                     + " | ".join(f"{r['stages_s'].get(s, 0.0):.2f}" for s in stages) + " |")
    if "seconds_per_additional_slice" in report:
        lines += ["", f"Scaling: {1000 * report['seconds_per_additional_slice']:.1f} ms per additional slice."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the measuring subprocess that main() starts, not an entry point
    if len(sys.argv) in (6, 7) and sys.argv[1] == "--measure" and sys.argv[5] in ("mirror", "no-mirror"):
        print(json.dumps(measure(sys.argv[2], sys.argv[3], sys.argv[4], weights=(sys.argv[6:] or [None])[0],
                                 mirror=sys.argv[5] == "mirror")))
