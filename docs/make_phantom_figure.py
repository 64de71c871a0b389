"""Phantom chest CT (boltzformer.synth.lung3d) next to real chest CT, in the lung window.

    python docs/make_phantom_figure.py [--seed 8] [--out docs/images/phantom_vs_real_chest.png]

Top row: axial slices of a phantom rendered at the real scans' 1.5 mm isotropic spacing, cropped
to the same field of view as the real crops (about 180 x 190 mm around the mediastinum), from the
upper abdomen to the upper chest, a coronal view, and the whole phantom slice below the carina
(nodule outlines in red).
Bottom row: slices of the real contrast chest CT crops `ts_chest01_heart` and `ts_chest01b_aorta`
(TotalSegmentator test data, read from ../shared/data/real) at matching levels.
Lung window: centre -600, width 1500. Anterior is up and the patient's right is on image left.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
OUT = Path(__file__).resolve().parent / "images" / "phantom_vs_real_chest.png"
WINDOW = (-600 - 750, -600 + 750)


def read_real(name: str):
    """(z, y, x) HU array oriented so that row 0 is anterior, column 0 the patient's right and
    z increases toward the head, plus the spacing (x, y, z)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(REAL / f"{name}_image.nii.gz"))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    d = np.array(img.GetDirection()).reshape(3, 3)  # columns: index axes (i, j, k) in LPS
    # array axes (z, y, x) = index (k, j, i); flip an axis whose LPS direction is negative
    for arr_axis, idx_axis in ((2, 0), (1, 1), (0, 2)):
        if d[idx_axis, idx_axis] < 0:
            arr = np.flip(arr, axis=arr_axis)
    if not np.allclose(np.abs(d), np.eye(3), atol=1e-3):
        print(f"warning: {name} is not axis-aligned; shown without reorientation", file=sys.stderr)
    return arr, img.GetSpacing()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if not (REAL / "ts_chest01b_aorta_image.nii.gz").exists():
        print(f"skipped: the real chest CT scans are not in {REAL}")
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from boltzformer.synth.lung3d import chest_phantom

    sp = (1.5, 1.5, 1.5)
    t = time.perf_counter()
    ph = chest_phantom(args.seed, shape_zyx=(176, 256, 256), spacing_mm=sp, n_nodules=(3, 4))
    print(f"phantom (176, 256, 256) at 1.5 mm rendered in {time.perf_counter() - t:.1f} s; {ph.info['contrast']} phase")
    lm = ph.info["landmarks_z_mm"]
    nz, ny, nx = ph.image.shape
    bx, by = ph.info["body_center_mm"]

    def zidx(z_mm):
        return int(np.clip(round(z_mm / sp[2] + (nz - 1) / 2), 0, nz - 1))

    # a crop like the real ones: about 180 mm wide, from the front of the chest to behind the spine
    x0 = int(round((bx + 12 - 90) / sp[0] + (nx - 1) / 2))
    y0 = int(round((by - 105) / sp[1] + (ny - 1) / 2))
    crop = (slice(max(y0, 0), max(y0, 0) + 126), slice(max(x0, 0), max(x0, 0) + 120))
    levels = [("liver dome", lm["right_dome"] - 25), ("heart", lm["heart_centre"] + 5),
              ("below the carina", lm["carina"] - 15), ("aortic arch", lm["carina"] + 25)]
    heart, _ = read_real("ts_chest01_heart")
    aorta, _ = read_real("ts_chest01b_aorta")
    real = [("ts_chest01b_aorta z=35", aorta[35]), ("ts_chest01_heart z=45", heart[45]),
            ("ts_chest01b_aorta z=97", aorta[97]), ("ts_chest01b_aorta z=128", aorta[128])]
    fig, axes = plt.subplots(2, 6, figsize=(24, 8.8))
    kw = dict(cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="nearest")
    for c, (name, z_mm) in enumerate(levels):
        k = zidx(z_mm)
        ax = axes[0, c]
        ax.imshow(ph.image[k][crop], **kw)
        lab = ph.masks["lung_nodule"][k][crop]
        if lab.any():
            ax.contour(lab, [0.5], colors="red", linewidths=0.7)
        ax.set_title(f"phantom: {name} (z={k})", fontsize=10)
    for c, (name, sl) in enumerate(real):
        axes[1, c].imshow(sl, **kw)
        axes[1, c].set_title(f"real: {name}", fontsize=10)
    # coronal views through the middle of the crops
    axes[0, 4].imshow(ph.image[:, crop[0].start + 63, crop[1]], origin="lower", **kw)
    axes[0, 4].set_title("phantom: coronal", fontsize=10)
    axes[1, 4].imshow(aorta[:, 63, :], origin="lower", **kw)
    axes[1, 4].set_title("real: ts_chest01b_aorta coronal", fontsize=10)
    k = zidx(lm["carina"] - 15)
    axes[0, 5].imshow(ph.image[k], **kw)
    axes[0, 5].add_patch(plt.Rectangle((crop[1].start, crop[0].start), 120, 126, fill=False, ec="y", lw=0.8))
    axes[0, 5].set_title(f"phantom: whole slice z={k} (box = crop)", fontsize=10)
    axes[1, 5].imshow(aorta[159], **kw)
    axes[1, 5].set_title("real: ts_chest01b_aorta z=159 (top)", fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Synthetic 3D chest phantom (top) vs real contrast chest CT crops (bottom), 1.5 mm, "
                 "lung window C -600 / W 1500; anterior up, patient right on image left", fontsize=12)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
