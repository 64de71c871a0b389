"""Exploration: does running the network on magnified tiles find more small lesions?

    python benchmarks/zoom_tiles.py --json benchmarks/results/zoom_tiles.json

Every slice is magnified (``--zoom``, bilinear), cut into overlapping tiles of the network's
input size (stride half a tile), each tile segmented as it is, the tiles blended with a Hann
window and the probabilities brought back to the slice's grid by area averaging. A 4 mm nodule
at 1.4 mm pixels covers 3 pixels of the network's input; at x2 it covers 6, at about four times
the network time. Measured on data that may be tuned on only:
- the 12 validation phantom chests (benchmarks/phantom_chest.py, seeds 80000+): nodules found
  and false candidates per volume, with the 3D filter off and on, for the slice as it is, the
  tiles, and the voxelwise max and mean of the two;
- with ``--ms``, the 3D MS brain of the training split (openms_p07, FLAIR and T2): Dice, lesions
  found, false components.
Not product code: the product runs whole slices (model card, "Zoomed tiles").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from phantom_chest import phantom_case  # noqa: E402

from boltzformer import weights
from boltzformer import postprocess  # noqa: E402
from boltzformer.io import read_volume  # noqa: E402
from boltzformer.segmenter import Segmenter  # noqa: E402


def tile_starts(n_px: int, size: int) -> list[int]:
    """First pixel of each tile along an axis of n_px >= size pixels: every half tile, and the last
    tile flush with the end."""
    return sorted({*range(0, n_px - size + 1, size // 2), n_px - size})


def tiled(predict, size: int, zoom: float):
    """Wrap Segmenter.predict_batch: slices (n, [C,] H, W) -> probabilities (n, H, W) from
    magnified, overlapping size x size tiles."""

    def run(slices01, embedding, generator, return_attention=False, stage_times=None, out_hw=None, prior=None,
            mirror=False):
        x = torch.from_numpy(np.ascontiguousarray(slices01, np.float32))
        x = x[:, None] if x.ndim == 3 else x
        n, _, h, w = x.shape
        big_h, big_w = max(size, round(h * zoom)), max(size, round(w * zoom))
        up = F.interpolate(x, size=(big_h, big_w), mode="bilinear", align_corners=False)
        hann = torch.hann_window(size, periodic=False).numpy() * 0.98 + 0.02  # never 0: every pixel weighed
        window = hann[:, None] * hann[None, :]
        acc = np.zeros((n, big_h, big_w), np.float32)
        weight = np.zeros((big_h, big_w), np.float32)
        for y0 in tile_starts(big_h, size):
            for x0 in tile_starts(big_w, size):
                tile = up[:, :, y0 : y0 + size, x0 : x0 + size].numpy()
                prob, _ = predict(tile, embedding, generator, False, stage_times, out_hw=(size, size), mirror=mirror)
                acc[:, y0 : y0 + size, x0 : x0 + size] += prob * window
                weight[y0 : y0 + size, x0 : x0 + size] += window
        prob = torch.from_numpy(acc / weight)[:, None]
        return F.interpolate(prob, size=tuple(out_hw or (h, w)), mode="area")[:, 0].numpy(), None

    return run


@contextlib.contextmanager
def tiles_in(seg: Segmenter, zoom: float):
    """Within the block, ``seg`` runs the network on magnified tiles (see `tiled`)."""
    whole = seg.predict_batch
    seg.predict_batch = tiled(whole, seg.model.cfg.image_size, zoom)
    try:
        yield
    finally:
        seg.predict_batch = whole


def phantoms(seg: Segmenter, zoom: float, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        ph, vol = phantom_case("val", i)
        t = time.perf_counter()
        res = seg.segment_volume(vol, "lung nodule", fp_reduction=False)
        seconds = [time.perf_counter() - t]
        t = time.perf_counter()
        with tiles_in(seg, zoom):
            p_tiles = seg.segment_volume(vol, "lung nodule", fp_reduction=False).probabilities
        seconds.append(time.perf_counter() - t)
        p_whole = res.probabilities
        row = {"case": i, "seconds_whole_tiles": seconds,
               "nodules": [{"diameter_mm": n.diameter_mm, "label": n.label} for n in ph.nodules]}
        for name, prob in (("whole", p_whole), ("tiles", p_tiles), ("max", np.maximum(p_whole, p_tiles)),
                           ("mean", (p_whole + p_tiles) / 2)):
            res.probabilities = prob
            for fp in (False, True):
                res.rethreshold(0.5, fp_reduction=fp)
                on_nodule = set(np.unique(res.labels[ph.nodule_labels > 0]).tolist()) - {0}
                row[f"{name}_fp_{'on' if fp else 'off'}"] = {
                    "detected_labels": sorted(set(np.unique(ph.nodule_labels[res.labels > 0]).tolist()) - {0}),
                    "false_positives": len(res.lesions) - len(on_nodule)}
        rows.append(row)
        print(f"val {i}: " + ", ".join(f"{k} {len(v['detected_labels'])}/{v['false_positives']}" for k, v in row.items()
                                       if isinstance(v, dict)), flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in (k for k in rows[0] if k.endswith(("_fp_on", "_fp_off"))):
        small = [n["label"] in r[key]["detected_labels"] for r in rows for n in r["nodules"] if n["diameter_mm"] < 4]
        big = [n["label"] in r[key]["detected_labels"] for r in rows for n in r["nodules"] if n["diameter_mm"] >= 4]
        out[key] = {"sensitivity_3_4mm": float(np.mean(small)), "nodules_3_4mm": len(small),
                    "sensitivity_ge4mm": float(np.mean(big)), "nodules_ge4mm": len(big),
                    "fp_per_volume": float(np.mean([r[key]["false_positives"] for r in rows]))}
    out["seconds_per_volume_whole_tiles"] = np.mean([r["seconds_whole_tiles"] for r in rows], axis=0).tolist()
    return out


def ms_brain(seg: Segmenter, zoom: float, folder: Path) -> list[dict]:
    rows = []
    for cid in ("openms_p07_flair", "openms_p07_t2"):  # the training split's 3D brain only
        vol = read_volume(folder / f"{cid}_image.nii.gz")
        truth = read_volume(folder / f"{cid}_mask.nii.gz").array > 0
        for name in ("whole", "tiles"):
            with tiles_in(seg, zoom) if name == "tiles" else contextlib.nullcontext():
                res = seg.segment_volume(vol, "multiple sclerosis lesion", modality="MR")
            det = postprocess.lesion_detection(res.mask > 0, truth, vol.spacing_mm, min_lesion_mm3=res.min_lesion_mm3)
            rows.append({"case": cid, "run": name, "dice": postprocess.dice(res.mask, truth), **det})
            print(f"{cid} {name}: Dice {rows[-1]['dice']:.3f}, found {det['detected']}/{det['true_lesions']}, "
                  f"false components {det['false_positive_components']}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoom", type=float, default=2.0)
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--ms", type=Path, default=None, help="folder of the real cases (../shared/data/real)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.ms:  # checked before the phantoms' minutes of work
        missing = [f for c in ("openms_p07_flair", "openms_p07_t2") for f in (f"{c}_image.nii.gz", f"{c}_mask.nii.gz")
                   if not (args.ms / f).is_file()]
        if missing:
            ap.error(f"--ms {args.ms}: {', '.join(missing)} not there")
    seg = Segmenter.from_pretrained(None, device="cpu")
    rows = phantoms(seg, args.zoom, args.count)
    out = {"zoom": args.zoom, "set": "val", "count": args.count, "weights_sha256": weights.sha256(seg.info["weights_path"]),
           "summary": summarise(rows), "cases": rows}
    if args.ms:
        out["ms_brain"] = ms_brain(seg, args.zoom, args.ms)
    print(json.dumps(out["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
