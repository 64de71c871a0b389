"""3D false-positive reduction for lung lesion prompts on CT in Hounsfield units.

A slice-wise model sees a vessel's cross-section and a nodule alike: both are small, round and
bright in the lung. In 3D they differ, which is how nodule-detection systems keep false
positives down, and so does this filter. Each thresholded 3D component (a candidate) gets:

- ``lung_shell``: the share of a shell around it (``SHELL_MM`` wide) that is aerated lung
  (HU < -400). Nodules, juxta-pleural ones included, sit at least partly in air; pericardial
  fat, contrast in the aorta or the heart and bone sit in soft tissue.
- ``blobness``: from the Hessian of the CT smoothed at the candidate's own scale, the median of
  λ3/λ1 (eigenvalues with λ1 ≤ λ2 ≤ λ3 < 0 inside a bright structure) over the candidate:
  near 1 for a bright blob (a nodule), near 0 for a bright tube (a vessel, an airway wall)
  (the "dot" measure of Li et al., Med. Phys. 2003).
- ``z_continuation``: the share of its footprint, one ``CONTINUATION_MM`` beyond its first and
  last slice, that is still bright (HU > -500): a vessel running through the slices goes on
  where a nodule has ended.

- ``nodule_score``: the probability, from a small 3D network that looks at a 32 x 40 x 40 mm cube
  of CT around the candidate's thickest point, that it is a nodule and not a vessel or a wall
  (boltzformer.fp_classifier, trained on phantom chests; NaN when its weights are absent).

A candidate is kept when it lies in the lung (``lung_shell >= MIN_LUNG_SHELL``), is not a
tube that goes on (``blobness >= MIN_BLOBNESS`` or ``z_continuation <= MAX_CONTINUATION``),
its ``nodule_score`` reaches the threshold stored with the classifier's weights and, for a lung
nodule prompt, it is at least as large as a 3 mm ball (MIN_NODULE_VOLUME_MM3). The bundled
threshold, 0.73, is the operating point chosen on validation phantoms only: the lowest threshold
that leaves at most 4 false positives per volume (the middle of the range CAD systems are
compared at); it kept 20 of 32 true candidates there, above the 60 % set beforehand
(resources/MODEL_CARD.md, benchmarks/results/fp_classifier_sweep.json).

The rule's thresholds were chosen on phantom validation volumes only (`benchmarks/fp_threshold_sweep.py`
on the bundled model's candidates on 12 phantom chests, seeds 80000-80011: the rule with the
fewest false positives that keeps at least 98 % of the candidates that touch a nodule); the real
chest CTs used to measure false positives were never used to choose them. With the bundled
weights that choice leaves only the lung rule: many of their true candidates are nodules merged
with the vessels they touch, which look tubular, so any blobness threshold cost more than 2 %
of them (`benchmarks/results/fp_threshold_sweep.json`). The lesion table gets every feature and
the rule's verdict.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from scipy import ndimage

from . import fp_classifier, postprocess
from .intensity import AERATED_HU
from .io import Volume
from .parallel import start_tasks, task_pool, thread_map
from .synth import prompts as vocab

LUNG_TARGETS = ("lung_nodule", "lung_tumor")
BRIGHT_HU = -500.0  # vessels, nodules and walls in the lung are above this
SHELL_MM = 3.0
CONTINUATION_MM = 3.0

# Chosen on phantom validation volumes (see the module docstring and the model card).
MIN_LUNG_SHELL = 0.1
MIN_BLOBNESS = 0.0  # 0: the vessel rule never fires with the bundled weights (see above)
MAX_CONTINUATION = 1.0

# A nodule is 3 to 30 mm across (Fleischner glossary): for a "lung nodule" prompt a candidate
# smaller than a 3 mm ball is not one. On the validation phantoms 12 of the 45 candidates the
# filter kept off any nodule were that small, and none of the 12 on a nodule
# (benchmarks/results/nodule_size_preregistration.txt).
MIN_NODULE_VOLUME_MM3 = float(np.pi / 6 * 3.0**3)  # 14.1 mm³

FEATURES = ("lung_shell", "blobness", "z_continuation", "mean_hu", "max_probability", "nodule_score")


def applies(prompt: str, modality: str | None, window: str | None) -> bool:
    """The filter runs for lung lesion prompts on CT whose values are Hounsfield units.

    `window` is None when the CT was not in HU (an 8-bit export, say): HU thresholds would be
    meaningless there.
    """
    if (modality or "").upper() != "CT" or window is None:
        return False
    target = vocab.target_of_prompt(prompt)
    if target is not None:
        return target in LUNG_TARGETS
    text = prompt.lower()
    return any(w in text for w in ("nodul", "lung tum", "lung mass", "pulmonary mass", "lung cancer", "lung lesion"))


def is_nodule_prompt(prompt: str) -> bool:
    """Whether a lung prompt asks for nodules (3-30 mm), not tumours or masses."""
    target = vocab.target_of_prompt(prompt)
    return target == "lung_nodule" if target is not None else "nodul" in prompt.lower()


def candidate_features(labels: np.ndarray, rows: list[dict], volume: Volume, probabilities: np.ndarray,
                       classifier: "fp_classifier.Classifier | None" = None, boxes: list | None = None,
                       blobness: bool = True) -> list[dict]:
    """One dict of FEATURES per candidate (row order). labels: int (z, y, x) on `volume`'s grid.

    classifier: the 3D network that gives ``nodule_score`` (default: the bundled one; its score
    is NaN when there is none, or when the scan is too thin for it: `classifier_skipped`).
    boxes: the labels' `postprocess.find_objects`, when the caller has them already.
    blobness: measure it (else NaN, for `measure_blobness` to fill where it is wanted).

    Each candidate's measures are three independent tasks on one thread pool: its thickest
    point and classifier patch, its shell (lung_shell, mean_hu), its shape (blobness,
    z_continuation, max_probability). The largest candidates' tasks start first: on the 300 x
    512² bench CT three vessel trees each cost 0.2-0.3 s per task while a hundred small ones
    cost milliseconds, so the trees, split three ways, set the time on a machine with cores to
    spare. The classifier runs once every patch is in, while the shells are still measured."""
    hu = volume.array
    classifier = classifier or fp_classifier.bundled()
    boxes = postprocess.find_objects(labels) if boxes is None else boxes  # one pass over the scan
    scoring = classifier is not None and fp_classifier.covers(hu.shape, volume.spacing_mm)
    sx, sy, sz = volume.spacing_mm
    shell_vox = (max(1, round(SHELL_MM / sz)), max(1, round(SHELL_MM / sy)), max(1, round(SHELL_MM / sx)))
    geometry = classifier.geometry if scoring else fp_classifier.COARSE
    patches = np.zeros((len(rows) if scoring else 0, 2, *geometry.shape_zyx), np.float32)
    grid = fp_classifier.patch_grid(volume.spacing_mm, geometry) if scoring else None

    def patch(i, lid, box):
        centre = fp_classifier.candidate_centre(labels, lid, box, volume.spacing_mm)
        fp_classifier.fill_patch(patches[i], hu, labels, centre, lid, grid)

    def shell(lid, box):
        big, region, around = postprocess.candidate_shell(labels, lid, box, shell_vox, min_pad=2)
        local = hu[big].astype(np.float32)
        return {"lung_shell": float(np.mean(local[around] < AERATED_HU)) if around.any() else 1.0,  # no shell: no evidence
                "mean_hu": float(local[region].mean())}

    def shape(row, lid, box):
        return {"blobness": _blobness(hu, labels, lid, box, volume.spacing_mm, row["longest_axial_diameter_mm"])
                if blobness else float("nan"),
                "z_continuation": _z_continuation(hu, labels, lid, box, sz),
                "max_probability": float(probabilities[box][labels[box] == lid].max())}

    jobs = [(i, row, row["lesion_id"], boxes[row["lesion_id"] - 1]) for i, row in enumerate(rows)]
    size = [float(np.prod([b.stop - b.start for b in box])) for _, _, _, box in jobs]
    with task_pool(3 * len(jobs)) as pool:
        # patches first: the classifier can start on them while the other tasks run
        patched = start_tasks(pool, [partial(patch, i, lid, box) for i, _, lid, box in jobs] if scoring else [],
                              size if scoring else [])
        shells = start_tasks(pool, [partial(shell, lid, box) for _, _, lid, box in jobs], size)
        shapes = start_tasks(pool, [partial(shape, row, lid, box) for _, row, lid, box in jobs], size)
        for f in patched:
            f.result()
        scores = classifier.probabilities(patches) if scoring else np.full(len(rows), np.nan)
        return [{**shells[i].result(), **shapes[i].result(), "nodule_score": float(scores[i])} for i in range(len(rows))]


def classifier_skipped(volume: Volume) -> str | None:
    """Why the 3D classifier gives no scores on this (canonical axial) volume, or None when it
    does: a scan thinner than its patch (a single slice, say) keeps its lung candidates on the
    lung rule alone."""
    if fp_classifier.bundled() is None:  # a damaged installation: said, not silently skipped
        return (f"the 3D nodule classifier ({fp_classifier.WEIGHTS_NAME}) is missing from this installation: lung "
                "candidates were filtered by the lung rule only, so many more false positives remain; reinstall "
                "napari-boltzformer")
    thin = fp_classifier.too_shallow(volume.shape, volume.spacing_mm)
    if thin is None:
        return None
    return f"the 3D nodule classifier was not applied: {thin} it looks at; lung candidates were filtered by the lung rule only"


def verdict(features: dict, min_nodule_score: float | None = None) -> str:
    """'kept', or why the candidate is dropped. min_nodule_score: default, the bundled
    classifier's threshold (no classifier rule when there is none)."""
    if features["lung_shell"] < MIN_LUNG_SHELL:
        return "outside the lungs"
    if features["blobness"] < MIN_BLOBNESS and features["z_continuation"] > MAX_CONTINUATION:
        return "vessel-like (tubular, continues across slices)"
    if min_nodule_score is None:
        clf = fp_classifier.bundled()
        min_nodule_score = clf.threshold if clf is not None else None
    score = features.get("nodule_score", float("nan"))
    if min_nodule_score is not None and score == score and score < min_nodule_score:
        return "vessel-like (3D classifier)"
    return "kept"


def filter_candidates(labels: np.ndarray, rows: list[dict], volume: Volume, probabilities: np.ndarray,
                      min_nodule_score: float | None = None, nodules: bool = False, in_place: bool = False,
                      boxes: list | None = None):
    """-> (labels with dropped candidates removed and the rest renumbered 1..n, kept rows,
    rejected rows). Rows gain the FEATURES and ``fp_verdict``. min_nodule_score: the 3D
    classifier's threshold (None: the one shipped with its weights). nodules: the prompt asks
    for lung nodules, so candidates smaller than a 3 mm ball (MIN_NODULE_VOLUME_MM3) go too.
    in_place: renumber `labels` itself (the caller's array is spent) instead of a new array.
    boxes: the labels' `postprocess.find_objects`, when the caller has them already.

    While the vessel rule is off (MIN_BLOBNESS = 0) no verdict depends on blobness: it is then
    measured for the kept candidates only (the lesion table shows it), NaN for the dropped ones.
    On the 300 x 512² bench CT that spares 0.5 of the 1.9 s (2 CPU cores) the features cost."""
    boxes = postprocess.find_objects(labels) if boxes is None else boxes
    vessel_rule = MIN_BLOBNESS > 0
    feats = candidate_features(labels, rows, volume, probabilities, boxes=boxes, blobness=vessel_rule)
    kept, rejected = [], []
    for row, f in zip(rows, feats):
        row.update({k: round(float(v), 4) for k, v in f.items()})
        row["fp_verdict"] = verdict(f, min_nodule_score)
        if nodules and row["fp_verdict"] == "kept" and row["volume_mm3"] < MIN_NODULE_VOLUME_MM3:
            row["fp_verdict"] = "smaller than a 3 mm nodule"
        (kept if row["fp_verdict"] == "kept" else rejected).append(row)
    if not vessel_rule:
        for row, b in zip(kept, measure_blobness(labels, kept, volume, boxes)):
            row["blobness"] = round(float(b), 4)
    if not rejected:
        return labels, rows, []
    return postprocess.keep_only(labels, len(rows), kept, in_place=in_place), kept, rejected


def measure_blobness(labels: np.ndarray, rows: list[dict], volume: Volume, boxes: list | None = None) -> list[float]:
    """``blobness`` of the given candidate rows (see the module docstring), in row order."""
    boxes = postprocess.find_objects(labels) if boxes is None else boxes
    return thread_map(lambda row: _blobness(volume.array, labels, row["lesion_id"], boxes[row["lesion_id"] - 1],
                                            volume.spacing_mm, row["longest_axial_diameter_mm"]), rows)


# -- features -----------------------------------------------------------------------------------
def _blobness(hu, labels, lid, box, spacing_xyz, diameter_mm: float) -> float:
    """Median λ3/λ1 of the Hessian at the candidate's scale over its voxels (0 = tube, 1 = blob)."""
    sx, sy, sz = spacing_xyz
    sigma_mm = float(np.clip(diameter_mm / 3.5, 0.75, 6.0))  # r/sqrt(3): a sphere of radius r responds most
    sig_vox = np.array([sigma_mm / sz, sigma_mm / sy, sigma_mm / sx])
    pad = np.ceil(3 * sig_vox).astype(int) + 1
    big = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, hu.shape))
    local = hu[big].astype(np.float32)
    inside = labels[big] == lid
    # A wide kernel on fine voxels (a long vessel tree at 0.7 mm) is as well sampled with block
    # means of up to sigma / 1.5 voxels, and up to that factor cubed cheaper (7 filters per candidate).
    f = np.maximum(1, np.floor(sig_vox / 1.5)).astype(int)
    if (f > 1).any():
        n = [(d // k) * k for d, k in zip(local.shape, f)]
        shape6 = (n[0] // f[0], f[0], n[1] // f[1], f[1], n[2] // f[2], f[2])
        share = inside[: n[0], : n[1], : n[2]].reshape(shape6).mean(axis=(1, 3, 5)) if min(n) > 0 else None
        if share is not None and share.any():
            local = local[: n[0], : n[1], : n[2]].reshape(shape6).mean(axis=(1, 3, 5))
            inside = share >= 0.5 if (share >= 0.5).any() else share > 0  # a thin candidate: every block it touches
            sig_vox = sig_vox / f
            sz, sy, sx = sz * f[0], sy * f[1], sx * f[2]
    spacing_zyx = (sz, sy, sx)
    h = np.empty(inside.shape + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            d = ndimage.gaussian_filter(local, sig_vox, order=order, mode="nearest")
            d *= sigma_mm ** 2 / (spacing_zyx[i] * spacing_zyx[j])  # scale-normalised, per mm
            h[..., i, j] = h[..., j, i] = d
    # The shape shows at the structure's centre line, not at its rim: use the brightest fifth
    # of the candidate after smoothing at the same scale.
    smooth = ndimage.gaussian_filter(local, sig_vox, mode="nearest")[inside]
    core = smooth >= np.quantile(smooth, 0.8)
    ev = np.linalg.eigvalsh(h[inside][core])  # ascending: λ1 <= λ2 <= λ3
    bright = ev[:, 2] < 0
    ratio = np.where(bright, ev[:, 2] / np.minimum(ev[:, 0], -1e-6), 0.0)
    return float(np.median(ratio)) if len(ratio) else 0.0


def _z_continuation(hu, labels, lid, box, sz: float) -> float:
    """Share of the candidate's footprint that is still bright CONTINUATION_MM past each end."""
    step = max(1, int(round(CONTINUATION_MM / sz)))
    footprint = (labels[box] == lid).any(axis=0)
    ys, xs = box[1], box[2]
    shares = []
    for k in (box[0].start - step, box[0].stop - 1 + step):
        if 0 <= k < hu.shape[0]:
            shares.append(float(np.mean(hu[k, ys, xs][footprint] > BRIGHT_HU)))
    return max(shares) if shares else 0.0
