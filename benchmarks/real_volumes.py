"""The whole real volumes (--real-dir, default ../shared/data/real): false positives on chest CT, MS brains in 3D.

    python benchmarks/real_volumes.py [--real-dir DIR] --json benchmarks/results/real_volumes.json

- `ts_chest01_heart`, `ts_chest01b_aorta` (contrast chest CT in HU, no nodule annotated): the
  number of "lung nodule" components, with the 3D false-positive filter on and off. These two
  scans are a test only: nothing was trained or tuned on them.
- `openms_p07/p19/p26_flair` (3D FLAIR, MNI space, stored RAS): "multiple sclerosis lesion"
  Dice, lesion detection and false components per brain. p19 and p26 are held out; p07 was
  trained on and is reported apart.
- The bundled chest sample stored LPS and RAS (same voxels in world space): Dice between the
  two masks for "aorta", "heart" and "lung nodule" after mapping RAS back.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import SimpleITK as sitk

from boltzformer import postprocess
from boltzformer.evaluate import read_split
from boltzformer.io import Volume, read_volume
from boltzformer.options import DEFAULT_MIRROR, DEFAULT_PLANES, PLANES
from boltzformer.segmenter import Segmenter
from boltzformer.synth.sample import SAMPLES
from boltzformer.training.data import REAL_SPLIT, default_real_dir

CHECKOUT_REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def chest_false_positives(seg, folder: Path) -> list[dict]:
    rows = []
    for cid in ("ts_chest01_heart", "ts_chest01b_aorta"):
        vol = read_volume(folder / f"{cid}_image.nii.gz")
        t = time.perf_counter()
        res = seg.segment_volume(vol, "lung nodule", fp_reduction=False)
        seconds = time.perf_counter() - t
        off = len(res.lesions)
        keys = ("volume_mm3", "longest_axial_diameter_mm", "mean_intensity", "lung_shell", "blobness",
                "z_continuation", "nodule_score", "outline")
        res.rethreshold(res.threshold, fp_reduction=True)  # the default pipeline
        row = {"case": cid, "shape_zyx": list(vol.shape), "components_fp_off": off,
               "components_fp_on": len(res.lesions), "seconds": seconds,
               "kept": [{k: r.get(k) for k in keys} for r in res.lesions]}
        res.rethreshold(res.threshold, nodule_detector=True)  # the 3D nodule detector (opt-in)
        row.update({"components_nodule_detector": len(res.lesions),
                    "kept_nodule_detector": [{k: r.get(k) for k in keys} for r in res.lesions],
                    "nodule_detector_seconds": res.timings_s.get("nodule_detector")})
        rows.append(row)
        print(f"{cid}: lung nodule components {off} -> {row['components_fp_on']} (default), "
              f"{len(res.lesions)} with the 3D nodule detector ({seconds:.1f} s)", flush=True)
    return rows


def ms_brains(seg, folder: Path) -> list[dict]:
    split = read_split(REAL_SPLIT)
    rows = []
    for p in ("p07", "p19", "p26"):
        cid = f"openms_{p}_flair"
        vol = read_volume(folder / f"{cid}_image.nii.gz")
        truth = read_volume(folder / f"{cid}_mask.nii.gz").array > 0
        res = seg.segment_volume(vol, "multiple sclerosis lesion", modality="MR")
        det = postprocess.lesion_detection(res.mask > 0, truth, vol.spacing_mm, min_lesion_mm3=res.min_lesion_mm3)
        rows.append({"case": cid, "split": split[cid], "dice": postprocess.dice(res.mask, truth), **det})
        print(f"{cid} ({split[cid]}): Dice {rows[-1]['dice']:.3f}, detected {det['detected']}/{det['true_lesions']}, "
              f"false components {det['false_positive_components']}", flush=True)
    return rows


def orientation_agreement(seg) -> dict:
    case = SAMPLES["chest_ct"]()
    lps = case.volume()
    ras = Volume.from_sitk(sitk.Flip(lps.to_sitk(), [True, True, False]))
    out = {}
    for prompt in ("aorta", "heart", "lung nodule"):
        a = seg.segment_volume(lps, prompt).mask
        b = seg.segment_volume(ras, prompt).mask[:, ::-1, ::-1]  # the RAS grid flipped back onto LPS
        out[prompt] = {"dice": postprocess.dice(a, b), "voxels_lps": int(a.sum()), "voxels_ras": int(b.sum())}
    a = seg.segment_volume(lps, "lung nodule", nodule_detector=True).mask
    b = seg.segment_volume(ras, "lung nodule", nodule_detector=True).mask[:, ::-1, ::-1]
    out["lung nodule, 3D nodule detector"] = {"dice": postprocess.dice(a, b), "voxels_lps": int(a.sum()),
                                              "voxels_ras": int(b.sum())}
    print("LPS vs RAS:", out, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=DEFAULT_MIRROR,
                    help="average each slice with its mirror image (Segmenter.iter_segment)")
    ap.add_argument("--planes", choices=PLANES, default=DEFAULT_PLANES, help="which planes (Segmenter.iter_segment)")
    ap.add_argument("--real-dir", type=Path, default=default_real_dir() or CHECKOUT_REAL_DIR,
                    help="folder of the real cases (default: $BOLTZFORMER_REAL_DATA, else ../shared/data/real)")
    args = ap.parse_args()
    folder = args.real_dir
    if not (folder / "cases.csv").is_file():
        raise SystemExit(f"{folder}: no cases.csv (give --real-dir or set BOLTZFORMER_REAL_DATA)")
    seg = Segmenter.from_pretrained(args.weights, device="cpu")
    seg.segment_volume = functools.partial(seg.segment_volume, mirror=args.mirror, planes=args.planes)  # every run here
    result = {"weights": seg.info.get("weights_path"), "mirror": args.mirror, "planes": args.planes,
              "chest_false_positives": chest_false_positives(seg, folder),
              "ms_brains": ms_brains(seg, folder), "lps_vs_ras": orientation_agreement(seg)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
