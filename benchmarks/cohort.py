"""A cohort of synthetic 512 x 512 CTs: one `boltzformer segment` process per scan (each loads
the model) against `boltzformer cohort` with 1 and 2 local workers, on the same machine in one run;
then the peak memory of a cohort worker on a 512 x 512 x 300 CT.

    python benchmarks/cohort.py [--scans 20] [--slices 100] [--workers 1,2] [--peak-slices 300]

Every run is a fresh `boltzformer` process timed from start to exit (the cohort's includes
starting its local cluster). Writes benchmarks/results/cohort.json and cohort.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from boltzformer.bench.machine import machine_description
from boltzformer.bench.volume import make_ct
from boltzformer.io import read_volume

RESULTS = Path(__file__).parent / "results"
PROMPT = "lung nodule"
BOLTZFORMER = [sys.executable, "-m", "boltzformer.cli"]


def _run(cmd: list[str]) -> float:
    """Seconds from start to exit of ``cmd`` (which must succeed)."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return seconds


def _load_seconds() -> float:
    """Import + model load in a fresh process: what each `segment` process pays before its scan."""
    code = ("import time; t = time.perf_counter(); from boltzformer.segmenter import Segmenter; "
            "Segmenter.from_pretrained(device='cpu'); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _report(out_dir: Path) -> list[dict]:
    with open(out_dir / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def _cohort(scans: Path, out: Path, workers: int) -> dict:
    seconds = _run([*BOLTZFORMER, "cohort", str(scans), "-p", PROMPT, "-o", str(out), "--device", "cpu", "--quiet",
                    "--workers", str(workers)])
    rows = _report(out)
    assert all(r["status"] == "ok" for r in rows), rows
    return {"workers": workers, "seconds": seconds, "scans_per_min": 60 * len(rows) / seconds,
            "mean_scan_seconds_in_worker": float(np.mean([float(r["seconds"]) for r in rows])),
            "worker_peak_rss_mb": max(float(r["worker_peak_rss_mb"]) for r in rows)}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=20)
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--peak-slices", type=int, default=300, help="slices of the scan whose peak memory is measured")
    p.add_argument("--json", default=str(RESULTS / "cohort.json"))
    args = p.parse_args()
    result = {"benchmark": "cohort", "machine": machine_description(), "scans": args.scans,
              "shape_zyx": [args.slices, 512, 512], "prompt": PROMPT, "loadavg_start": _loadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = tmp / "scans"
        scans.mkdir()
        for i in range(args.scans):
            make_ct(scans / f"ct{i:03d}.nii.gz", args.slices, seed=i)
        result["model_load_seconds_fresh_process"] = _load_seconds()

        seq = tmp / "sequential"
        seq.mkdir()
        t = time.perf_counter()
        for f in sorted(scans.iterdir()):
            _run([*BOLTZFORMER, "segment", str(f), "-p", PROMPT, "-o", str(seq / f"{f.name[:-7]}_mask.nii.gz"),
                  "--device", "cpu", "--quiet"])
        seconds = time.perf_counter() - t
        result["sequential_segment"] = {"seconds": seconds, "scans_per_min": 60 * args.scans / seconds}
        print(f"sequential segment: {seconds:.1f} s, {60 * args.scans / seconds:.2f} scans/min", flush=True)

        result["cohort"] = []
        for n in [int(w) for w in args.workers.split(",")]:
            out = tmp / f"cohort_{n}"
            r = _cohort(scans, out, n)
            r["speedup_vs_sequential"] = seconds / r["seconds"]
            r["masks_identical_to_segment"] = all(
                np.array_equal(read_volume(out / m.name).array, read_volume(m).array) for m in sorted(seq.iterdir()))
            result["cohort"].append(r)
            print(f"cohort, {n} worker(s): {r['seconds']:.1f} s, {r['scans_per_min']:.2f} scans/min, "
                  f"{r['speedup_vs_sequential']:.2f}x, masks identical: {r['masks_identical_to_segment']}", flush=True)
        one = result["cohort"][0]
        result["per_scan_seconds_saved_by_one_worker"] = (seconds - one["seconds"]) / args.scans

        # Peak memory of a worker on a 512 x 512 x peak_slices CT: one worker, then two at once.
        big = tmp / "big"
        big.mkdir()
        for i in range(2):
            make_ct(big / f"big{i}.nii.gz", args.peak_slices, seed=100 + i)
        peaks = {}
        for n in (1, 2):
            r = _cohort(big, tmp / f"big_{n}", n)
            peaks[n] = {"seconds": r["seconds"], "worker_peak_rss_mb": r["worker_peak_rss_mb"]}
            print(f"{args.peak_slices} x 512 x 512, {n} worker(s): peak RSS per worker {r['worker_peak_rss_mb']:.0f} MB",
                  flush=True)
        result["peak"] = {"shape_zyx": [args.peak_slices, 512, 512], "by_workers": peaks}
    result["loadavg_end"] = _loadavg()
    RESULTS.mkdir(exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.json).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    z = r["shape_zyx"][0]
    seq = r["sequential_segment"]
    lines = [f"{r['scans']} synthetic CTs of {z} x 512 x 512, prompt '{r['prompt']}', {m['cpu']}, {m['cores']} cores "
             f"(load average {r['loadavg_start']} at the start, {r['loadavg_end']} at the end)", "",
             "| run | s | scans/min | speed-up | worker peak RSS MB | masks = segment's |", "|---|---|---|---|---|---|",
             f"| {r['scans']} `segment` processes, one after another | {seq['seconds']:.1f} | {seq['scans_per_min']:.2f} | 1.00 | | |"]
    for c in r["cohort"]:
        lines.append(f"| `cohort --workers {c['workers']}` | {c['seconds']:.1f} | {c['scans_per_min']:.2f} | "
                     f"{c['speedup_vs_sequential']:.2f} | {c['worker_peak_rss_mb']:.0f} | {c['masks_identical_to_segment']} |")
    lines += ["", f"Model load in a fresh process (import + weights): {r['model_load_seconds_fresh_process']:.1f} s; "
                  f"one cohort worker saved {r['per_scan_seconds_saved_by_one_worker']:.1f} s per scan.", ""]
    pz = r["peak"]["shape_zyx"][0]
    for n, p in r["peak"]["by_workers"].items():
        lines.append(f"- {pz} x 512 x 512 CT, {n} worker(s): peak RSS per worker {p['worker_peak_rss_mb']:.0f} MB "
                     f"({p['seconds']:.1f} s for 2 scans)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
