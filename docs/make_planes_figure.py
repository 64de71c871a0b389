"""Axial-only vs three-plane inference on a held-out 3D FLAIR brain with MS lesions.

    python docs/make_planes_figure.py [--case openms_p26_flair] [--out docs/images/planes_ms_flair.png]

Reads the case from ../shared/data/real (open_ms_data, CC-BY; held out, never trained on), runs
"multiple sclerosis lesion" with planes="axial" (the default) and planes="three", and shows four
axial slices and one coronal slice: the FLAIR with the reference lesions (green outlines), each
result's lesions (orange: touching a reference lesion; red: false components). Shown in the
canonical orientation the network works in (anterior up, the patient's right on image left).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
OUT = Path(__file__).resolve().parent / "images" / "planes_ms_flair.png"


def touching(labels: np.ndarray, truth: np.ndarray):
    """The result's lesions (labels, 0 = none) split into those touching a reference lesion and the rest."""
    hit = np.unique(labels[truth & (labels > 0)])
    on = np.isin(labels, hit) & (labels > 0)
    return on, (labels > 0) & ~on


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="openms_p26_flair")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if not (REAL / f"{args.case}_image.nii.gz").exists():
        print(f"skipped: {args.case} is not in {REAL}")
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from boltzformer import postprocess
    from boltzformer.io import read_volume
    from boltzformer.orientation import to_canonical
    from boltzformer.segmenter import Segmenter

    volume = read_volume(REAL / f"{args.case}_image.nii.gz")
    truth_in = read_volume(REAL / f"{args.case}_mask.nii.gz").array > 0
    seg = Segmenter.from_pretrained(device="cpu")
    frame, reo, _ = to_canonical(volume)
    truth = reo.to_canonical(truth_in)
    runs = {}
    for planes in ("axial", "three"):
        res = seg.segment_volume(volume, "multiple sclerosis lesion", modality="MR", planes=planes)
        det = postprocess.lesion_detection(res.mask > 0, truth_in, volume.spacing_mm, min_lesion_mm3=res.min_lesion_mm3)
        runs[planes] = (reo.to_canonical(res.labels), postprocess.dice(res.mask, truth_in), det["false_positive_components"])
    img = frame.array.astype(np.float32)
    hi = np.percentile(img[img > 0], 99.5)
    zs = []  # the four slices with the most reference lesion, at least 8 mm apart
    for z in np.argsort(truth.sum((1, 2)))[::-1]:
        if len(zs) < 4 and all(abs(int(z) - o) * frame.spacing_mm[2] >= 8 for o in zs):
            zs.append(int(z))
    zs.sort()
    y_cor = int(np.argmax(truth.sum((0, 2))))
    views = [(f"axial z={z}", lambda a, z=z: a[z][::-1]) for z in zs]  # row 0 anterior
    views.append((f"coronal y={y_cor}", lambda a: a[:, y_cor][::-1]))  # superior up
    fig, axes = plt.subplots(3, len(views), figsize=(3.2 * len(views), 10))
    rows = [("FLAIR, reference lesions", None)] + [
        (f"{p}: Dice {d:.2f}, {n} false components", m) for p, (m, d, n) in runs.items()]
    for r, (title, mask) in enumerate(rows):
        for c, (name, cut) in enumerate(views):
            ax = axes[r, c]
            ax.imshow(cut(img), cmap="gray", vmin=0, vmax=hi)
            ax.contour(cut(truth), [0.5], colors="lime", linewidths=0.7)
            if mask is not None:
                on, off = touching(mask, truth)
                rgba = np.zeros(cut(on).shape + (4,))
                rgba[cut(on)] = (1.0, 0.6, 0.0, 0.8)
                rgba[cut(off)] = (1.0, 0.1, 0.1, 0.9)
                ax.imshow(rgba)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(title, fontsize=10)
    fig.suptitle(f"{args.case} (open_ms_data, CC-BY; held out): \"multiple sclerosis lesion\", axial slices only "
                 "vs the median of axial, coronal and sagittal passes\ngreen: reference lesions; orange: found "
                 "lesions touching one; red: false components", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
