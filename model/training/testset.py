"""Held-out synthetic evaluation sets in the `boltzformer evaluate` folder format.

    boltzformer testset OUT_DIR --count 300 --seed 777

Writes `<id>_image.nii.gz` (one slice; CT in HU, MR raw signal, true pixel spacing) and
`<id>_mask.nii.gz` per case and a `cases.csv` with `case_id, prompt, modality, target,
area_fraction, size_band` (size band of the target: `<0.1%`, `0.1-1%`, `>=1%`, or `none` for
lesion-free cases whose correct answer is an empty mask). The default seed, 777, is reserved:
training refuses chunk seeds 555 and 777 (data.RESERVED_SLICE_SEEDS), so these slices were never
seen in training. Another seed gives no such promise: training chunk i of seed s is seeded
s * 100003 + i, so `--seed 3` starts with the very slice that training's seed 3 starts with.
2D CT slices are written as rendered, noise included: a few air pixels fall below -1024 HU, as on
scanners that do not clip.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..synth import ct, mri
from ..synth.prompts import LESION_TARGETS, TARGETS

# Lesion size bands, as fractions of the slice area (the model card's tables).
SMALL_AREA, LARGE_AREA = 0.001, 0.01


def size_band(area_fraction: float) -> str:
    if area_fraction <= 0:
        return "none"
    return "<0.1%" if area_fraction < SMALL_AREA else "0.1-1%" if area_fraction < LARGE_AREA else ">=1%"


def write_testset(out_dir, count: int = 300, seed: int = 777, size: int = 256, overwrite: bool = False) -> Path:
    from ..io import Volume, write_volume

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        sl = ct.ct_slice(rng, size) if rng.random() < 0.7 else mri.brain_slice(rng, size)
        present = [k for k in LESION_TARGETS if k in sl.masks and sl.masks[k].any()]
        if present and rng.random() > 0.2:
            target = present[rng.integers(len(present))]
        else:  # a lesion-free question: a lesion target of this modality that is absent
            absent = [k for k in LESION_TARGETS if TARGETS[k].modality == sl.modality and k not in present]
            if not absent:
                continue
            target = absent[rng.integers(len(absent))]
        mask = sl.masks.get(target, np.zeros(sl.image.shape, bool)).astype(bool)
        if target == "lung_tumor" and "lung_nodule" in sl.masks:
            mask = mask | sl.masks["lung_nodule"].astype(bool)
        prompt = TARGETS[target].prompts[0]
        case_id = f"synth_{i:04d}_{target}"
        image = np.round(sl.image).astype(np.int16) if sl.modality == "CT" else sl.image.astype(np.float32)
        geometry = dict(spacing_mm=(sl.pixel_mm, sl.pixel_mm, 1.0), origin_mm=(0.0, 0.0, 0.0), direction=np.eye(3))
        write_volume(Volume(image[None], modality=sl.modality, **geometry), out / f"{case_id}_image.nii.gz", overwrite=overwrite)
        write_volume(Volume(mask[None].astype(np.uint8), **geometry), out / f"{case_id}_mask.nii.gz", overwrite=overwrite)
        area = float(mask.mean())
        rows.append({"case_id": case_id, "prompt": prompt, "modality": sl.modality, "target": target,
                     "area_fraction": f"{area:.6f}", "size_band": size_band(area)})
    with open(out / "cases.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out
