"""Train the 3D false-positive classifier (boltzformer.fp_classifier) on phantom chests.

    python -m boltzformer.training.train_fp mine --volumes 160 --out .devdata/fpcand   # candidates (resumable)
    python -m boltzformer.training.train_fp fit --data .devdata/fpcand --out runs/fp   # the classifier

`mine` runs the slice model ("lung nodule", threshold 0.5, no false-positive reduction) on 3D
phantom chests (boltzformer.synth.lung3d) drawn from training seeds only (never the evaluation
phantoms, data.RESERVED_PHANTOM_SEEDS) and stores a patch per candidate: true when it touches a
nodule. Every phantom nodule is also stored as a patch around its true mask (more positives, and
nodules the slice model found only in part). At most `negatives_per_volume` vessel candidates
are kept per volume. One file per volume, so an interrupted run resumes where it stopped.

`fit` trains CandidateNet with balanced batches (half nodules), flips, axial transposes and
shifts of up to 2 voxels, and holds out the last tenth of the volumes to report its accuracy.
`--candidate-share` draws that share of the nodule half from the slice model's own true
candidates and the rest from true nodule masks: the candidates are what the classifier judges in
use (often a nodule merged with a vessel, or found only in part), and in proportion they were
outnumbered two to one by the clean masks (the bundled classifier: 0.5).
The decision threshold is chosen afterwards, on the phantom validation set, by
benchmarks/fp_threshold_sweep.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import fp_classifier as fpc
from ..devices import fast_layout
from .data import RESERVED_PHANTOM_SEEDS


def phantom_volume(vseed: int, rng: np.random.Generator):
    """A training phantom chest with scan-like spacing -> (ChestPhantom, Volume)."""
    from ..io import Volume
    from ..synth.lung3d import chest_phantom

    z_mm = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0]))
    px = float(rng.uniform(1.1, 1.6))
    depth = int(min(150, round(150 / z_mm)))
    ph = chest_phantom(vseed, shape_zyx=(depth, 256, 256), spacing_mm=(px, px, z_mm), n_nodules=(1, 6))
    origin = tuple(-(n - 1) / 2 * s for n, s in zip((256, 256, depth), ph.spacing_mm))
    return ph, Volume(ph.image, ph.spacing_mm, origin, np.eye(3), "CT", None, {"phantom_seed": vseed})


def training_volumes(volumes: int, seed: int, out: Path):
    """(index, phantom seed, file path in ``out``) of each training volume: seeds drawn from
    ``seed``, never the evaluation phantoms' (data.RESERVED_PHANTOM_SEEDS)."""
    rng = np.random.default_rng([seed, 4242])
    for v in range(volumes):
        vseed = int(rng.integers(1 << 31))
        while RESERVED_PHANTOM_SEEDS[0] <= vseed < RESERVED_PHANTOM_SEEDS[1]:
            vseed = int(rng.integers(1 << 31))
        yield v, vseed, out / f"vol{v:04d}_{vseed}.npz"


def save_mined(path: Path, patches: np.ndarray, is_true: np.ndarray, ph, vol, *, candidates: int,
               true_candidates: int, geometry: fpc.PatchGeometry = fpc.COARSE) -> None:
    """One volume's mined file: the candidates' patches (N x 2 x D x H x W, source 0) with their
    labels, then every true nodule cut around its own mask (source 1, on `geometry`, the
    candidates' own), written atomically."""
    labels = np.asarray(is_true).astype(np.uint8)
    source = np.zeros(len(labels), np.uint8)  # 0: a candidate
    truth = ph.nodule_labels
    gt_ids = [n.label for n in ph.nodules if (truth == n.label).any()]
    if gt_ids:
        gt = fpc.extract_patches(vol.array, truth, fpc.candidate_centres(truth, gt_ids, vol.spacing_mm),
                                 vol.spacing_mm, gt_ids, geometry=geometry)
        patches = np.concatenate([patches, gt])
        labels = np.concatenate([labels, np.ones(len(gt_ids), np.uint8)])
        source = np.concatenate([source, np.ones(len(gt_ids), np.uint8)])  # 1: a true nodule's mask
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, ct=np.round(patches[:, 0] * 255).astype(np.uint8), mask=patches[:, 1] > 0.5,
                        label=labels, source=source, candidates=candidates, true_candidates=true_candidates)
    tmp.rename(path)


def mine(volumes: int, out: Path, seed: int = 5, weights=None, negatives_per_volume: int = 80, device: str = "cpu",
         only=None, deadline: float | None = None) -> None:
    """only: the volume indices this call mines (None: all; parallel miners split them);
    deadline: time.time() after which no new volume starts."""
    from ..segmenter import Segmenter

    out.mkdir(parents=True, exist_ok=True)
    seg = Segmenter.from_pretrained(weights, device=device)
    for v, vseed, path in training_volumes(volumes, seed, out):
        if path.exists() or (only is not None and v not in only):
            continue
        if deadline is not None and time.time() > deadline:
            break
        vol_rng = np.random.default_rng([vseed, 1])
        t = time.perf_counter()
        ph, vol = phantom_volume(vseed, vol_rng)
        res = seg.segment_volume(vol, "lung nodule", fp_reduction=False, threshold=0.5)
        rows = res.lesions
        truth = ph.nodule_labels
        is_true = np.array([bool((truth[res.labels == r["lesion_id"]] > 0).any()) for r in rows], bool)
        keep = np.flatnonzero(is_true)
        neg = np.flatnonzero(~is_true)
        keep = np.concatenate([keep, vol_rng.permutation(neg)[:negatives_per_volume]]).astype(int)
        ids = [rows[i]["lesion_id"] for i in keep]
        patches = fpc.extract_patches(vol.array, res.labels, fpc.candidate_centres(res.labels, ids, vol.spacing_mm),
                                      vol.spacing_mm, ids)
        save_mined(path, patches, is_true[keep], ph, vol, candidates=len(rows), true_candidates=int(is_true.sum()))
        print(f"volume {v} (seed {vseed}, {vol.shape[0]} slices at {vol.spacing_mm[2]} mm): {len(rows)} candidates, "
              f"{int(is_true.sum())} on nodules, {len(ph.nodules)} nodules, {time.perf_counter() - t:.1f} s", flush=True)


def load_mined(folder: Path):
    """-> (patches N x 2 x D x H x W uint8, labels N, volume index N, source N)."""
    files = sorted(folder.glob("vol*.npz"))
    files = [f for f in files if not f.name.endswith(".tmp.npz")]
    cts, masks, labels, vols, sources = [], [], [], [], []
    for i, f in enumerate(files):
        d = np.load(f)
        cts.append(d["ct"])
        masks.append(d["mask"])
        labels.append(d["label"])
        sources.append(d["source"])
        vols.append(np.full(len(d["label"]), i))
    x = np.stack([np.concatenate(cts), np.concatenate(masks).astype(np.uint8) * 255], axis=1)
    return x, np.concatenate(labels), np.concatenate(vols), np.concatenate(sources), len(files)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips of each axis, axial transposes and shifts of up to 2 voxels (B x 2 x D x H x W)."""
    for dim in (2, 3, 4):
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(dim)
    if torch.rand((), generator=gen) < 0.5:
        x = x.transpose(3, 4)
    shifts = [int(torch.randint(-2, 3, (), generator=gen)) for _ in range(3)]
    x = torch.roll(x, shifts=shifts, dims=(2, 3, 4))
    scale = 1.0 + 0.1 * (torch.rand((x.shape[0], 1, 1, 1), generator=gen) - 0.5)
    x[:, 0] = (x[:, 0] * scale).clamp(0, 1)
    return x


def fit(data: Path, out: Path, steps: int = 3000, batch: int = 32, lr: float = 1e-3, seed: int = 0,
        width: int = 16, candidate_share: float | None = None, device: str = "cpu", arch: str = "coarse") -> dict:
    """Train a CandidateNet of `arch` on the patches mined into `data` (they must be on its
    geometry) and save it to `out` at threshold 0.5 (chosen later, on validation phantoms)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y, vols, source, n_vols = load_mined(data)
    geometry = fpc.GEOMETRIES[arch]
    if x.shape[2:] != geometry.shape_zyx:
        raise ValueError(f"{data}: patches of {x.shape[2:]} voxels, but a {arch!r} CandidateNet reads {geometry.shape_zyx}")
    val_vols = set(range(n_vols - max(1, n_vols // 10), n_vols))
    is_val = np.isin(vols, list(val_vols))
    train_pos = np.flatnonzero(~is_val & (y == 1))
    train_neg = np.flatnonzero(~is_val & (y == 0))
    train_cand = np.flatnonzero(~is_val & (y == 1) & (source == 0))  # the slice model's true candidates
    train_mask = np.flatnonzero(~is_val & (y == 1) & (source == 1))  # true nodule masks
    print(f"{n_vols} volumes: train {len(train_pos)} nodule / {len(train_neg)} other patches, "
          f"held out {int((is_val & (y == 1)).sum())} / {int((is_val & (y == 0)).sum())}", flush=True)
    net = fast_layout(fpc.CandidateNet(width, arch).to(device), device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if candidate_share is None:
            pos = rng.choice(train_pos, batch // 2)
        else:
            n_cand = int(round(candidate_share * (batch // 2)))
            pos = np.concatenate([rng.choice(train_cand, n_cand), rng.choice(train_mask, batch // 2 - n_cand)])
        idx = np.concatenate([pos, rng.choice(train_neg, batch - batch // 2)])
        xb = augment(torch.from_numpy(x[idx]).float() / 255.0, gen).to(device)
        yb = torch.from_numpy(y[idx]).float().to(device)
        net.train()
        loss = F.binary_cross_entropy_with_logits(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            net.cpu()  # evaluated (and saved) on the CPU, as the product runs it
            report = evaluate(net, x[is_val], y[is_val], source[is_val])
            net.to(device)
            print(f"step {step} loss {loss.item():.4f} held-out {report} ({(time.perf_counter() - t0) / 60:.1f} min)",
                  flush=True)
    net.cpu()
    report = evaluate(net, x[is_val], y[is_val], source[is_val])
    info = {"width": width, "arch": arch, "steps": steps, "candidate_share": candidate_share, "volumes": n_vols,
            "held_out_volumes": len(val_vols),
            "held_out": report, "patch_shape_zyx": list(geometry.shape_zyx),
            "patch_spacing_mm_zyx": list(geometry.spacing_mm_zyx), "hu_range": list(fpc.HU_RANGE)}
    fpc.save(net, 0.5, info, out)
    return info


def evaluate(net, x: np.ndarray, y: np.ndarray, source: np.ndarray) -> dict:
    clf = fpc.Classifier(net, 0.5, {})
    p = clf.probabilities(x.astype(np.float32) / 255.0)
    cand = source == 0
    pos, neg = cand & (y == 1), cand & (y == 0)
    return {"candidate_nodules_kept": round(float((p[pos] >= 0.5).mean()), 3) if pos.any() else None,
            "vessels_kept": round(float((p[neg] >= 0.5).mean()), 3) if neg.any() else None,
            "true_masks_kept": round(float((p[source == 1] >= 0.5).mean()), 3) if (source == 1).any() else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m boltzformer.training.train_fp", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mine", help="candidates of the slice model on training phantoms")
    m.add_argument("--volumes", type=int, default=160)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--seed", type=int, default=5)
    m.add_argument("--weights", default=None, help="slice-model weights (default: the bundled ones)")
    m.add_argument("--device", default="cpu", help="where the slice model runs (cpu, cuda)")
    f = sub.add_parser("fit", help="train the classifier on mined candidates")
    f.add_argument("--data", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--steps", type=int, default=3000)
    f.add_argument("--width", type=int, default=16)
    f.add_argument("--arch", choices=tuple(fpc.GEOMETRIES), default="coarse",
                   help="network and patch geometry (the mined patches must match it)")
    f.add_argument("--candidate-share", type=float, default=None,
                   help="share of the nodule patches drawn from the slice model's true candidates (default: in proportion)")
    f.add_argument("--device", default="cpu", help="where the classifier trains (cpu, cuda)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.command == "mine":
        mine(args.volumes, args.out, args.seed, args.weights, device=args.device)
    else:
        print(json.dumps(fit(args.data, args.out, steps=args.steps, width=args.width,
                                  candidate_share=args.candidate_share, device=args.device, arch=args.arch), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
