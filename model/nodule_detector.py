"""A 3D nodule detector for lung nodule prompts on CT in Hounsfield units.

The slice-wise network misses most nodules under 8 mm: in one slice they look like the vessel
cross-sections around them, and every slice-model fine-tune that learnt to drop the vessels
dropped the small nodules with them (model card, stages 5-10). In 3D a nodule is a blob and a
vessel a tube. This module finds blobs; with the detector on, `results.SegmentationResult` keeps
the slice model's lesions that hold a kept blob and outlines the other kept blobs itself
(``merge``). Steps, on the CT alone:

1. ``lung_mask``: aerated voxels (< AERATED_HU) inside the body, closed by CLOSING_MM per lung so
   that juxta-pleural nodules and vessels lie inside.
2. ``blob_response``: the scale-normalised Laplacian of Gaussian, -σ² ∇²G * CT, its maximum over
   RADII_MM (σ = r / √3, the scale at which a ball of radius r responds most), on a grid of about
   WORK_SPACING_MM in-plane (block means of the CT when its pixels are finer).
3. Candidates: local maxima in the lungs above MIN_RESPONSE, then a Hessian gate at each one's
   best scale: blobness |λ3| / |λ1| (eigenvalues by magnitude: 1 for a ball, near 0 for a tube)
   above MIN_BLOBNESS, or the ``min_blobness`` stored with the classifier (the gate its training
   candidates passed).
4. A 3D classifier (`fp_classifier.CandidateNet`, weights DETECTOR_WEIGHTS_NAME: trained on such
   candidates of phantom chests, never evaluation ones) scores a cube of CT around each, its
   mask channel a ball of the candidate's best radius; kept at the threshold stored with it.
5. ``outline``: each kept candidate's lesion mask, the region grown from it above half-way
   between its peak HU and the lung's, within 1.5 times its radius.

Figures, and how the thresholds were chosen (phantom validation only): resources/MODEL_CARD.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import fp_classifier
from .intensity import AERATED_HU
from .io import Volume
from .parallel import thread_map

OUTSIDE_AIR_HU = -960.0  # median of air around the body (-1000); lung parenchyma is about -850
CLOSING_MM = 15.0  # closes bumps of up to ~30 mm into the lung: juxta-pleural nodules stay inside
RADII_MM = (1.5, 2.5, 4.0, 6.0)  # nodules of 3 to ~12 mm; larger ones the slice model finds
WORK_SPACING_MM = 1.25  # finer CT is block-averaged to about this before filtering
HU_CLIP = (-1000.0, 200.0)  # bone and contrast would otherwise dominate the filter responses
MIN_RESPONSE = 400.0
MIN_BLOBNESS = 0.5
DETECTOR_WEIGHTS_NAME = "nodule-detector.safetensors"
LUNG_HU = -850.0  # parenchyma, the outline's background level


@dataclass
class Candidates:
    """Blob candidates on a volume's grid (threshold-free: a result computes them once).

    points_zyx: N x 3 int voxel indices; radius_mm: N best LoG radii; response, blobness: N;
    score: N classifier probabilities (NaN where not scored: failed the gate)."""

    points_zyx: np.ndarray
    radius_mm: np.ndarray
    response: np.ndarray
    blobness: np.ndarray
    score: np.ndarray
    threshold: float

    @property
    def kept(self) -> np.ndarray:
        """Indices of the candidates the classifier keeps."""
        return np.flatnonzero(np.nan_to_num(self.score, nan=-1.0) >= self.threshold)


# -- lungs --------------------------------------------------------------------------------------
def lung_mask(hu: np.ndarray, spacing_xyz) -> np.ndarray:
    """Z x Y x X bool lungs from HU alone.

    Air below AERATED_HU, less the air around the body: per slice, the air components that touch
    the image border and are as dark as air (median below OUTSIDE_AIR_HU; a lung cut by a crop
    touches the border too, but is brighter). Then the 3D components of at least 2 % of the rest
    (bowel gas and noise go), each lung's slices closed by a CLOSING_MM disc and their holes
    filled: vessels, airway walls and nodules on the pleura lie inside."""
    air = hu < AERATED_HU
    inside = air.copy()

    def drop_outside_air(k):  # slice k only: the slices run on threads
        lab, n = ndimage.label(air[k])
        if n == 0:
            return
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        for lid in edge[edge > 0]:
            comp = lab == lid
            if np.median(hu[k][comp]) < OUTSIDE_AIR_HU:
                inside[k][comp] = False

    thread_map(drop_outside_air, range(air.shape[0]))
    lab, n = ndimage.label(inside)
    if n == 0:
        return inside
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.flatnonzero(sizes >= 0.02 * sizes.sum()) + 1
    sx, sy, _ = spacing_xyz
    pad = [int(np.ceil(CLOSING_MM / v)) + 1 for v in (sy, sx)]
    lung = np.zeros(hu.shape, bool)
    boxes = ndimage.find_objects(lab)
    for lid in keep:  # one lung at a time: closing both at once would bridge the mediastinum
        zs, ys, xs = boxes[lid - 1]
        ys = slice(max(0, ys.start - pad[0]), min(hu.shape[1], ys.stop + pad[0]))
        xs = slice(max(0, xs.start - pad[1]), min(hu.shape[2], xs.stop + pad[1]))

        def close_slice(k, lid=lid, ys=ys, xs=xs):  # slice k of this lung: the slices run on threads
            one = lab[k, ys, xs] == lid
            if not one.any():
                return
            # A closing by a CLOSING_MM disc (two distance transforms), in-plane: a nodule on the
            # pleura is a bite out of the lung's outline in its slices.
            padded = np.pad(one, [(p, p) for p in pad])
            grown = ndimage.distance_transform_edt(~padded, sampling=(sy, sx)) <= CLOSING_MM
            closed = ndimage.distance_transform_edt(grown, sampling=(sy, sx)) > CLOSING_MM
            closed = ndimage.binary_fill_holes(closed[pad[0] : -pad[0], pad[1] : -pad[1]] | one)
            lung[k, ys, xs] |= closed

        thread_map(close_slice, range(zs.start, zs.stop))
    return lung


# -- blobs --------------------------------------------------------------------------------------
def _work_grid(hu: np.ndarray, spacing_xyz):
    """(CT block-averaged to about WORK_SPACING_MM, factors (z, y, x), its spacing (z, y, x) mm)."""
    sx, sy, sz = spacing_xyz
    f = [max(1, int(round(WORK_SPACING_MM / s))) for s in (sz, sy, sx)]
    # Clip in the CT's own integer type when it has one: float bounds would first copy a 512² scan
    # to float64 (1.3 s of 2.5 s at 300 slices). The values are the same.
    bounds = tuple(int(b) for b in HU_CLIP) if np.issubdtype(hu.dtype, np.integer) and hu.dtype.itemsize >= 2 else HU_CLIP
    img = np.clip(hu, *bounds).astype(np.float32)
    if f != [1, 1, 1]:
        n = [(d // k) * k for d, k in zip(img.shape, f)]
        img = img[: n[0], : n[1], : n[2]].reshape(n[0] // f[0], f[0], n[1] // f[1], f[1], n[2] // f[2], f[2])
        img = img.mean(axis=(1, 3, 5), dtype=np.float32)
    return img, f, (sz * f[0], sy * f[1], sx * f[2])


def blob_response(img: np.ndarray, spacing_zyx) -> tuple[np.ndarray, np.ndarray]:
    """(Z x Y x X float32 max over RADII_MM of -σ² ∇²G * img, Z x Y x X uint8 index of the best
    radius). σ = r / √3 in mm, per axis in voxels."""
    best = np.full(img.shape, -np.inf, np.float32)
    scale = np.zeros(img.shape, np.uint8)

    def response(r):  # the scales are filtered on threads, then merged in order
        s = r / np.sqrt(3)
        return -(s**2) * ndimage.gaussian_laplace(img, [s / v for v in spacing_zyx])

    for k, resp in enumerate(thread_map(response, RADII_MM)):
        better = resp > best
        best[better], scale[better] = resp[better], k
    return best, scale


def _gauss_kernels(sigma_vox: float, half: int) -> np.ndarray:
    """3 x (2 half + 1): a normalised Gaussian and its first and second derivatives."""
    x = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma_vox) ** 2)
    g /= g.sum()
    return np.stack([g, -x / sigma_vox**2 * g, (x**2 / sigma_vox**4 - 1 / sigma_vox**2) * g])


def blobness_at(img: np.ndarray, spacing_zyx, points_zyx: np.ndarray, scale_idx: np.ndarray,
                chunk: int = 512) -> np.ndarray:
    """|λ3| / |λ1| of the Hessian (per mm²) at each point at its own best scale.

    The Hessian at one point is the cube around it times separable Gaussian-derivative kernels,
    so only the points' cubes are filtered: a chest CT has thousands of maxima, and filtering the
    whole volume six times per scale would cost more than the rest of the detector."""
    out = np.zeros(len(points_zyx), np.float32)
    mm = np.asarray(spacing_zyx, float)
    pairs = [(a, b) for a in range(3) for b in range(a, 3)]
    for k, r in enumerate(RADII_MM):
        sel = np.flatnonzero(scale_idx == k)
        if not len(sel):
            continue
        sig = (r / np.sqrt(3)) / mm
        half = [int(np.ceil(4 * s)) for s in sig]
        kern = [_gauss_kernels(s, h) for s, h in zip(sig, half)]  # per axis: 3 x (2h + 1)
        padded = np.pad(img, [(w, w) for w in half], mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, [2 * w + 1 for w in half])
        hess = np.zeros((len(sel), 3, 3))  # per point, per mm²
        for i0 in range(0, len(sel), chunk):
            part = sel[i0 : i0 + chunk]
            cubes = windows[tuple(points_zyx[part].T)].astype(np.float64)  # n x Dz x Dy x Dx
            along_x = cubes @ kern[2].T  # n x Dz x Dy x 3 (x order)
            along_y = np.einsum("nzyc,oy->nzoc", along_x, kern[1])  # n x Dz x 3 (y order) x 3
            full = np.einsum("nzoc,pz->npoc", along_y, kern[0])  # n x 3 (z) x 3 (y) x 3 (x)
            for a, b in pairs:
                order = [0, 0, 0]
                order[a] += 1
                order[b] += 1
                hess[i0 : i0 + len(part), a, b] = hess[i0 : i0 + len(part), b, a] = (
                    full[:, order[0], order[1], order[2]] / (mm[a] * mm[b]))
        ev = np.linalg.eigvalsh(hess)
        ev = np.take_along_axis(ev, np.argsort(-np.abs(ev), axis=1), axis=1)
        out[sel] = np.abs(ev[:, 2]) / np.maximum(np.abs(ev[:, 0]), 1e-6)
    return out


def find_candidates(volume: Volume, classifier: "fp_classifier.Classifier") -> Candidates:
    """Blob candidates of an axial HU volume, scored by `classifier` where they pass the gate."""
    hu = volume.array
    img, f, work_mm = _work_grid(hu, volume.spacing_mm)
    sz, sy, sx = work_mm
    lung = lung_mask(img, (sx, sy, sz))
    empty = Candidates(np.zeros((0, 3), int), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), classifier.threshold)
    if not lung.any():
        return empty
    # Filter only the lungs' box (plus the largest filter's reach): the rest is never a candidate.
    reach = [int(np.ceil(4 * RADII_MM[-1] / np.sqrt(3) / v)) + 1 for v in work_mm]
    zz, yy, xx = (np.flatnonzero(lung.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    box = tuple(slice(max(0, lo[0] - r), min(n, lo[-1] + r + 1)) for lo, r, n in zip((zz, yy, xx), reach, img.shape))
    offset = np.array([b.start for b in box])
    sub, sub_lung = img[box], lung[box]
    best, scale = blob_response(sub, work_mm)
    peaks = (best == ndimage.maximum_filter(best, size=(3, 5, 5))) & sub_lung & (best > MIN_RESPONSE)
    pts = np.stack(np.nonzero(peaks), 1)
    if not len(pts):
        return empty
    response = best[tuple(pts.T)]
    scale_idx = scale[tuple(pts.T)]
    blobness = blobness_at(sub, work_mm, pts, scale_idx)
    gated = blobness > min_blobness(classifier)
    pts, response, blobness, scale_idx = pts[gated], response[gated], blobness[gated], scale_idx[gated]
    # Back to the volume's voxels: the centre of each work-grid block.
    native = (pts + offset) * np.array(f) + (np.array(f) - 1) // 2
    native = np.minimum(native, np.array(hu.shape) - 1)
    radius = np.array([RADII_MM[k] for k in scale_idx], float)
    score = (classifier.probabilities(ball_patches(hu, native, radius, volume.spacing_mm, classifier.geometry))
             if len(native) else np.zeros(0))
    return Candidates(native.astype(int), radius, response, blobness, score.astype(float), classifier.threshold)


def min_blobness(classifier: "fp_classifier.Classifier") -> float:
    """The Hessian gate for a classifier: the one its training candidates passed (stored with its
    weights as ``min_blobness``), else MIN_BLOBNESS."""
    return float(classifier.info.get("min_blobness", MIN_BLOBNESS))


def ball_patches(hu: np.ndarray, points_zyx: np.ndarray, radius_mm: np.ndarray, spacing_xyz,
                 geometry: "fp_classifier.PatchGeometry" = fp_classifier.COARSE) -> np.ndarray:
    """Classifier patches (N x 2 x D x H x W, `geometry`'s shape) around points, the mask channel
    a ball of each point's radius (a candidate has no outline yet).

    The balls are painted in point order, a later one over an earlier one where they meet (the
    classifier was trained on such patches), but only inside each patch's box: no scan-sized
    label array."""
    sx, sy, sz = spacing_xyz
    mm = np.array([sz, sy, sx])
    points = np.asarray(points_zyx, int).reshape(-1, 3)
    radius = np.asarray(radius_mm, float).reshape(-1)
    half = np.ceil(radius[:, None] / mm).astype(int)
    lo = np.maximum(points - half, 0)
    hi = np.minimum(points + half + 1, np.array(hu.shape))

    def mask_of(i: int, box: tuple[slice, ...]) -> np.ndarray:
        start = np.array([b.start for b in box])
        stop = np.array([b.stop for b in box])
        out = np.zeros(tuple(stop - start), bool)
        # Ball i, then every later ball that reaches the box, which took its voxels from ball i.
        later = i + np.flatnonzero(np.all((lo[i:] < stop) & (hi[i:] > start), axis=1))
        for j in later:
            a, b = np.maximum(lo[j], start), np.minimum(hi[j], stop)
            gz, gy, gx = np.ogrid[a[0] : b[0], a[1] : b[1], a[2] : b[2]]
            z, y, x = points[j]
            ball = ((gz - z) * sz) ** 2 + ((gy - y) * sy) ** 2 + ((gx - x) * sx) ** 2 <= radius[j] * radius[j]
            out[a[0] - start[0] : b[0] - start[0], a[1] - start[1] : b[1] - start[1],
                a[2] - start[2] : b[2] - start[2]][ball] = j == i
        return out

    ids = list(range(1, len(points) + 1))
    return fp_classifier.extract_patches(hu, None, points, spacing_xyz, ids, mask_of=mask_of, geometry=geometry)


# -- outlines -----------------------------------------------------------------------------------
def outline(hu: np.ndarray, point_zyx, radius_mm: float, spacing_xyz, taken: np.ndarray | None = None):
    """(box, bool region in the box): the lesion around a candidate point.

    The voxels above half-way between the candidate's peak (mean HU within half its radius) and
    the lung (LUNG_HU), connected to the point, within 1.5 x its radius (+ one voxel) so that it
    does not run along a vessel it touches; never on `taken` voxels (lesions already found).
    Falls back to the ball of its radius when nothing connects (a faint ground-glass nodule)."""
    sx, sy, sz = spacing_xyz
    mm = np.array([sz, sy, sx])
    reach = 1.5 * radius_mm + mm.max()
    half = np.ceil(reach / mm).astype(int)
    box = tuple(slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip(point_zyx, half, hu.shape))
    local = hu[box].astype(np.float32)
    gz, gy, gx = np.ogrid[box]
    z, y, x = point_zyx
    dist = np.sqrt(((gz - z) * sz) ** 2 + ((gy - y) * sy) ** 2 + ((gx - x) * sx) ** 2)
    core = dist <= max(radius_mm / 2, mm.max())
    peak = float(local[core].mean())
    level = (peak + LUNG_HU) / 2 if peak > LUNG_HU else peak
    region = (local >= level) & (dist <= reach)
    if taken is not None:
        region &= ~taken[box]
    lab, _ = ndimage.label(region)
    seeds = np.unique(lab[core & region])
    region = np.isin(lab, seeds[seeds > 0])
    if not region.any():
        region = dist <= radius_mm
        if taken is not None:
            region &= ~taken[box]
    return box, region


# -- where it runs, and its classifier ----------------------------------------------------------
def applies(prompt: str, modality: str | None, window: str | None) -> bool:
    """Lung nodule prompts on HU CT (fp_filter.applies, less lung tumours: masses of several
    centimetres are beyond RADII_MM, and the slice model finds them)."""
    from . import fp_filter

    return fp_filter.applies(prompt, modality, window) and fp_filter.is_nodule_prompt(prompt)


def bundled() -> "fp_classifier.Classifier | None":
    """The detector's classifier shipped in boltzformer.resources (loaded once), or None."""
    return fp_classifier.bundled(DETECTOR_WEIGHTS_NAME)


def merge(labels: np.ndarray, rows: list[dict], volume: Volume, probabilities: np.ndarray,
          candidates: Candidates) -> tuple[np.ndarray, list[dict], list[dict]]:
    """The lesions of a lung nodule prompt: the detector's kept candidates, each outlined by the
    slice model's lesion that holds it, else by `outline`.

    labels: int (z, y, x) lesions 1..n on `volume`'s grid (the slice model's, after fp_filter);
    rows: their lesion-table rows. -> (labels renumbered 1..m, their rows, the slice model's rows
    that no kept candidate confirms, with ``fp_verdict`` saying so). Rows say which outline they
    have (``outline``: "slice model" or "3D region") and carry the detector's ``nodule_score``
    and ``blobness`` (the surest candidate's, when a lesion holds several)."""
    from . import postprocess

    kept = candidates.kept[np.argsort(-candidates.score[candidates.kept])]  # surest first
    by_id = {row["lesion_id"]: row for row in rows}
    confirmed: dict[int, int] = {}  # slice lesion id -> its surest candidate
    outside = []
    for i in kept:
        lid = int(labels[tuple(candidates.points_zyx[i])])
        if lid > 0:
            confirmed.setdefault(lid, i)
        else:
            outside.append(i)
    # Grown regions stay off the confirmed lesions (and each other), not off the dropped ones.
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    for new_id, lid in enumerate(sorted(confirmed), start=1):
        lut[lid] = new_id
    out = postprocess.relabel(labels, lut)  # int32, as lut
    taken = out > 0
    grown = np.zeros(labels.shape, np.int32)
    new_candidates = []
    for i in outside:
        p = tuple(int(c) for c in candidates.points_zyx[i])
        if taken[p]:
            continue  # inside a region grown from a surer candidate
        box, region = outline(volume.array, p, float(candidates.radius_mm[i]), volume.spacing_mm, taken)
        if not region.any():
            continue
        new_candidates.append(i)
        grown[box][region] = len(new_candidates)
        taken[box] |= region
    unconfirmed = [dict(row, fp_verdict="not confirmed by the 3D nodule detector")
                   for lid, row in by_id.items() if lid not in confirmed]
    out_rows = []
    for new_id, (lid, i) in enumerate(sorted(confirmed.items()), start=1):
        out_rows.append(dict(by_id[lid], lesion_id=new_id, outline="slice model",
                             nodule_score=round(float(candidates.score[i]), 4),
                             blobness=round(float(candidates.blobness[i]), 4), fp_verdict="kept"))
    if new_candidates:
        n = len(out_rows)
        for row, i in zip(postprocess.lesion_table(grown, volume, probabilities=probabilities), new_candidates):
            row.update({"lesion_id": row["lesion_id"] + n, "outline": "3D region",
                        "nodule_score": round(float(candidates.score[i]), 4),
                        "blobness": round(float(candidates.blobness[i]), 4), "fp_verdict": "kept"})
            out_rows.append(row)
        mine = grown > 0
        out[mine] = grown[mine] + n
    return out, out_rows, unconfirmed
