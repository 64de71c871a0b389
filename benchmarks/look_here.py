""""Look here" on phantom chests: does a click on a missed nodule recover it, and does a click on
background stay empty?

    python benchmarks/look_here.py --volumes 20 --json benchmarks/results/look_here.json

Volumes: boltzformer.synth.lung3d.chest_phantom with seeds 70000 + i (this benchmark's own
range; 80000-99999 are the evaluation sets and are never used here), 256 x 256 in-plane, about
150 mm of chest, 2-5 nodules each. Per volume:

1. the bundled model segments the whole volume as the panel does ("lung nodule", threshold 0.5,
   5 mm³, 3D filter on); a true nodule no candidate touches is *missed*, either *by the slice
   model* (nothing above the threshold on it) or *by the 3D filter* (a candidate it dropped);
2. each missed nodule is clicked at the voxel nearest its centre on its largest slice;
3. background is clicked at random lung voxels (parenchyma, and separately on vessels) at least
   15 mm from every nodule and 10 mm from everything above the threshold in step 1 (before the
   3D filter);
4. every click runs boltzformer.look_here.look_here with each configuration: the control
   (amplitude 0: the same slices and seed re-run without a prior) and the default prior.

A nodule click *recovers* the nodule when the candidate overlaps it; a background click
*creates a lesion* when it returns any candidate. Each candidate records how look_here found it
(above the threshold, or the half-maximum region near the click that passed the 3D classifier). Also recorded: the largest probability change
the prior makes on the re-run slices against the control (how much the masks depend on where
the early blocks sample), and, with --sampling-share (after a run, from its JSON), the share of
the tokens the prior's blocks sampled within two sigmas of the click on the clicked slice, with
and without the prior (whether the prior moves the sampling at all).

    python benchmarks/look_here.py --sampling-share --json benchmarks/results/look_here.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from boltzformer.io import Volume
from boltzformer.look_here import AMPLITUDE, LAYERS, SIGMA_TOKENS, look_here
from boltzformer.segmenter import Segmenter
from boltzformer.synth.lung3d import chest_phantom

SEED0 = 70_000  # 70000-79999: this benchmark's range (80000-99999 are reserved for evaluation)
PROMPT = "lung nodule"
SPACINGS = ((1.2, 1.25), (1.5, 2.5), (1.3, 1.0), (1.4, 2.0))  # (in-plane, slice) mm
CONFIGS = {  # name -> (amplitude, layers, sigma_tokens)
    "control": (0.0, LAYERS, SIGMA_TOKENS),
    "default": (AMPLITUDE, LAYERS, SIGMA_TOKENS),
}
BACKGROUND_PER_VOLUME = {"parenchyma": 3, "vessel": 2}
MIN_NODULE_DISTANCE_MM = 15.0
MIN_CANDIDATE_DISTANCE_MM = 10.0


def phantom(index: int):
    seed = SEED0 + index
    px, z_mm = SPACINGS[index % len(SPACINGS)]
    depth = int(round(150 / z_mm))
    ph = chest_phantom(seed, shape_zyx=(depth, 256, 256), spacing_mm=(px, px, z_mm), n_nodules=(2, 5))
    origin = tuple(-(n - 1) / 2 * s for n, s in zip((256, 256, depth), ph.spacing_mm))
    return ph, Volume(ph.image, ph.spacing_mm, origin, np.eye(3), "CT", None, {"phantom_seed": seed})


def nodule_click(nodule: np.ndarray) -> tuple[int, int, int]:
    """The nodule voxel nearest its in-plane centre on its largest slice (z, y, x)."""
    z = int(np.argmax(nodule.sum(axis=(1, 2))))
    ys, xs = np.nonzero(nodule[z])
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return z, int(ys[i]), int(xs[i])


def background_clicks(ph, candidates: np.ndarray, spacing_zyx, rng) -> list[tuple[str, tuple]]:
    """Random lung voxels far from nodules and candidates: (kind, (z, y, x))."""
    far_nodule = ndimage.distance_transform_edt(ph.nodule_labels == 0, sampling=spacing_zyx) >= MIN_NODULE_DISTANCE_MM
    far_candidate = ndimage.distance_transform_edt(candidates == 0, sampling=spacing_zyx) >= MIN_CANDIDATE_DISTANCE_MM
    allowed = (ph.masks["lung"] > 0) & far_nodule & far_candidate
    vessels = ph.masks["vessels"] > 0
    clicks = []
    for kind, n in BACKGROUND_PER_VOLUME.items():
        pool = np.flatnonzero(allowed & (vessels if kind == "vessel" else ~vessels))
        for flat in rng.choice(pool, size=min(n, pool.size), replace=False):
            clicks.append((kind, tuple(int(v) for v in np.unravel_index(flat, allowed.shape))))
    return clicks


def run_click(seg, volume, point, configs) -> dict:
    out, control = {}, None
    for name, (amplitude, layers, sigma) in configs.items():
        r = look_here(seg, volume, PROMPT, point, amplitude=amplitude, layers=layers, sigma_tokens=sigma,
                      min_lesion_mm3=5.0)
        entry = {"candidate": r.candidate is not None, "source": r.source, "seconds": round(r.seconds, 2),
                 "slices": list(r.slices),
                 "distance_mm": None if not np.isfinite(r.distance_mm) else round(r.distance_mm, 2),
                 "p_at_click": round(float(r.probabilities[point[0] - r.slices[0], point[1], point[2]]), 4)}
        if control is None:
            control = r
        else:
            entry["max_abs_dp_vs_control"] = float(np.abs(r.probabilities - control.probabilities).max())
        out[name] = (entry, r)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=20)
    ap.add_argument("--first", type=int, default=0, help="index of the first volume (seed 70000 + first)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/look_here.json"))
    ap.add_argument("--sampling-share", action="store_true",
                    help="add the sampling share near the click of every missed-nodule click to an existing JSON")
    args = ap.parse_args(argv)
    if args.sampling_share:
        return add_sampling_share(args.json)
    seg = Segmenter.from_pretrained(device="cpu")
    clicks = []
    t_start = time.time()
    for index in range(args.first, args.first + args.volumes):
        ph, volume = phantom(index)
        seed = SEED0 + index
        spacing_zyx = np.asarray(volume.spacing_mm, float)[::-1]
        t = time.time()
        base = seg.segment_volume(volume, PROMPT)
        above = base.probabilities >= base.threshold  # the slice model's output before the 3D filter
        print(f"seed {seed}: baseline {time.time() - t:.0f} s, {len(base.lesions)} candidates", flush=True)
        for nod in ph.nodules:
            truth = ph.nodule_labels == nod.label
            if not truth.any() or (base.mask[truth] > 0).any():
                continue  # found by the model (or not in view): nothing to point at
            point = nodule_click(truth)
            runs = run_click(seg, volume, point, CONFIGS)
            cause = "3D filter" if above[truth].any() else "slice model"
            rec = {"seed": seed, "kind": "missed nodule", "cause": cause, "nodule_kind": nod.kind,
                   "diameter_mm": round(float(nod.diameter_mm), 2), "point_zyx": list(point)}
            for name, (entry, r) in runs.items():
                hit = r.candidate is not None and bool(truth[r.slices[0]:r.slices[1]][r.candidate].any())
                rec[name] = {**entry, "recovered": hit}
            clicks.append(rec)
            print(f"  missed {nod.kind} {nod.diameter_mm:.1f} mm: "
                  + ", ".join(f"{k} {'recovered' if rec[k]['recovered'] else '-'}" for k in CONFIGS), flush=True)
        rng = np.random.default_rng(seed)
        for kind, point in background_clicks(ph, above, spacing_zyx, rng):
            runs = run_click(seg, volume, point, CONFIGS)
            rec = {"seed": seed, "kind": f"background ({kind})", "point_zyx": list(point)}
            for name, (entry, _) in runs.items():
                rec[name] = entry
            clicks.append(rec)
            print(f"  background {kind}: " + ", ".join(
                f"{k} {'LESION' if rec[k]['candidate'] else '-'}" for k in CONFIGS), flush=True)
    summary = summarise(clicks)
    report = {
        "what": "look here on phantom chests: missed-nodule clicks vs background clicks (see the script's docstring)",
        "seeds": [SEED0 + args.first, SEED0 + args.first + args.volumes - 1],
        "configs": {k: {"amplitude": a, "layers": l, "sigma_tokens": s} for k, (a, l, s) in CONFIGS.items()},
        "machine": f"{cpu_name()}, {os.cpu_count()} cores seen, CPU inference",
        "seconds": round(time.time() - t_start, 1),
        "summary": summary,
        "clicks": clicks,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


def near_share(att, point_zyx, slab_start: int, layer: int, sigma_tokens: float) -> float:
    """Share of the tokens block `layer` sampled on the clicked slice that lie within two sigmas
    (in that block's tokens) of the click. att: AttentionMaps of the re-run slab."""
    counts = att.counts[layer, int(point_zyx[0]) - slab_start].astype(np.float64)  # G x G
    g = counts.shape[-1]
    cell = att.strides[layer] / min(att.strides)  # grid cells per token of this block
    gy = (point_zyx[1] + 0.5) / att.grid_scale_yx[0] - 0.5
    gx = (point_zyx[2] + 0.5) / att.grid_scale_yx[1] - 0.5
    yy, xx = np.mgrid[0:g, 0:g]
    near = np.hypot(yy - gy, xx - gx) <= 2 * sigma_tokens * cell
    return float(counts[near].sum() / max(counts.sum(), 1e-9))


def add_sampling_share(path: Path) -> int:
    report = json.loads(path.read_text())
    seg = Segmenter.from_pretrained(device="cpu")
    amplitude, layers, sigma = CONFIGS["default"]
    shares = {"control": [[] for _ in range(layers)], "default": [[] for _ in range(layers)]}
    cache = {}
    for click in report["clicks"]:
        if click["kind"] != "missed nodule":
            continue
        index = click["seed"] - SEED0
        if index not in cache:
            cache.clear()
            cache[index] = phantom(index)[1]
        volume, point = cache[index], tuple(click["point_zyx"])
        for name, amp in (("control", 0.0), ("default", amplitude)):
            r = look_here(seg, volume, PROMPT, point, amplitude=amp, layers=layers, sigma_tokens=sigma,
                          min_lesion_mm3=5.0, return_attention=True)
            for layer in range(layers):
                shares[name][layer].append(near_share(r.attention, point, r.slices[0], layer, sigma))
        print(f"seed {click['seed']} {point}: " + ", ".join(
            f"{n} {[round(v[-1], 3) for v in shares[n]]}" for n in shares), flush=True)
    report["sampling_share"] = {
        "what": "share of the tokens sampled on the clicked slice within 2 sigma of the click, per prior block, "
                "median (min-max) over the missed-nodule clicks",
        **{name: [{"block": layer, "median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                  for layer, v in enumerate(per)] for name, per in shares.items()}}
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def summarise(clicks: list[dict]) -> dict:
    out = {}
    nodules = [c for c in clicks if c["kind"] == "missed nodule"]
    for name in CONFIGS:
        row = {"missed_nodules": len(nodules),
               "recovered": sum(c[name]["recovered"] for c in nodules)}
        for cause in ("slice model", "3D filter"):
            sel = [c for c in nodules if c.get("cause") == cause]
            row[f"recovered, missed by the {cause}"] = f"{sum(c[name]['recovered'] for c in sel)} / {len(sel)}"
        row["recovered via the half-maximum region"] = sum(
            c[name]["recovered"] and c[name].get("source") == "half maximum" for c in nodules)

        for band, lo, hi in (("< 6 mm", 0, 6), ("6-10 mm", 6, 10), (">= 10 mm", 10, 1e9)):
            sel = [c for c in nodules if lo <= c["diameter_mm"] < hi]
            row[f"recovered {band}"] = f"{sum(c[name]['recovered'] for c in sel)} / {len(sel)}"
        for kind in BACKGROUND_PER_VOLUME:
            sel = [c for c in clicks if c["kind"] == f"background ({kind})"]
            row[f"background {kind} clicks"] = len(sel)
            row[f"background {kind} lesions created"] = sum(c[name]["candidate"] for c in sel)
            row[f"background {kind} lesions created via the half-maximum region"] = sum(
                c[name]["candidate"] and c[name].get("source") == "half maximum" for c in sel)
        dps = [c[name].get("max_abs_dp_vs_control") for c in clicks if name != "control"]
        if dps:
            row["median max |dp| vs control"] = float(np.median(dps))
            row["largest max |dp| vs control"] = float(np.max(dps))
        row["median seconds per click"] = float(np.median([c[name]["seconds"] for c in clicks])) if clicks else None
        out[name] = row
    return out


def markdown(report: dict) -> str:
    s = report["summary"]
    names = list(s)
    keys = list(dict.fromkeys(k for n in names for k in s[n]))
    lines = [f"# Look here on phantom chests (seeds {report['seeds'][0]}-{report['seeds'][1]})", "",
             f"{report['machine']}; {report['seconds']:.0f} s in all. Configurations: "
             + "; ".join(f"{k}: amplitude {v['amplitude']:g}, blocks 0-{v['layers'] - 1}, sigma {v['sigma_tokens']:g} tokens"
                         for k, v in report["configs"].items()), "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        cells = []
        for n in names:
            v = s[n].get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(f"| {k.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    share = report.get("sampling_share")
    if share:
        lines += ["", f"Sampling near the click ({share['what']}):", "", "| block | control | default |", "|---|---|---|"]
        for c, d in zip(share["control"], share["default"]):
            lines.append(f"| {c['block']} | {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f}) | "
                         f"{d['median']:.3f} ({d['min']:.3f}-{d['max']:.3f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
