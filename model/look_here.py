""""Look here": segment a few slices again with the Boltzmann sampling pulled toward a clicked spot.

A reader clicks a spot the model missed. The slices around it are segmented again with a
`network.sampling.PointPrior`: a Gaussian bump of AMPLITUDE (in the units of the sampling
energies U, confidences in [0, 1]) and SIGMA_TOKENS tokens added to U in the first LAYERS decoder
blocks, centred on the click, so the queries explore there first; the later blocks sample from
their own masks as usual. The candidate is then, in this order:

1. "threshold": the connected component of the re-run's mask (above the threshold, at least the
   minimum lesion size) that comes within REACH_MM of the click (the reader points there, so the
   3D false-positive filter does not overrule it);
2. "half maximum": when none does, the object the re-run's probabilities outline near the click
   even below the threshold: the highest probability within REACH_MM, if at least LOCAL_FLOOR,
   and the connected region around it above half of it (the half-maximum contour, a scale-free
   edge). For lung prompts on CT in HU it must also pass the 3D classifier at its shipped
   threshold (boltzformer.fp_classifier), so a click on a vessel adds nothing.

When neither gives a candidate, nothing is proposed (a click on background should add nothing).
The constants were set before any measurement. benchmarks/look_here.py measures them, and the
prior against a re-run without it (benchmarks/results/look_here.md): with the bundled weights the
prior moves where the early blocks sample, but the masks hardly depend on it. That follows from
the decoder: values carry no position (v_j = W_v x_j) and masks are query . pixel embeddings, so
where the queries sample changes what they see, not where they draw; the candidate step above is
what localises the answer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .errors import BoltzformerError
from .options import DEFAULT_MIRROR

AMPLITUDE = 3.0  # energy at the click: exp(3 / tau) = 20x likelier in the first block (tau = 1)
SIGMA_TOKENS = 2.0  # Gaussian width in tokens of each block's own token map
LAYERS = 2  # the first two blocks (tau 1 and 0.5) explore; the rest follow the masks
MARGIN_MM = 5.0  # slices re-run above and below the click when it is on no lesion
REACH_MM = 4.0  # a candidate must come this close to the click (mm, 3D)
LOCAL_FLOOR = 0.01  # below this highest probability near the click there is nothing to outline
HALF_MAXIMUM_RADIUS_MM = 30.0  # a half-maximum region stays within this of the click (objects up to 60 mm)


@dataclass(frozen=True)
class ClickPrior:
    """Where to pull the sampling and how hard (see network.sampling.PointPrior).

    point_zyx: the click as a (fractional) voxel index (z, y, x) of the input volume.
    """

    point_zyx: tuple[float, float, float]
    amplitude: float = AMPLITUDE
    sigma_tokens: float = SIGMA_TOKENS
    layers: int = LAYERS

    def yx_fraction(self, reorientation, input_shape, canonical_shape) -> tuple[float, float]:
        """The click's in-plane position on the canonical axial slice, as fractions of its height
        and width in pixel-centre convention ((row + 0.5) / H), which any resize keeps."""
        _, cy, cx = reorientation.index_to_canonical(self.point_zyx, input_shape)
        return (cy + 0.5) / canonical_shape[1], (cx + 0.5) / canonical_shape[2]

    def point_prior(self, n: int, yx_fraction: tuple[float, float]):
        """The PointPrior of a batch of n slices, all pulled toward the same in-plane point."""
        import torch

        from .network.sampling import PointPrior

        centers = torch.tensor([list(yx_fraction)] * n, dtype=torch.float32)
        return PointPrior(centers, amplitude=float(self.amplitude), sigma_tokens=float(self.sigma_tokens),
                          layers=int(self.layers))


@dataclass
class LookHereResult:
    """What a look-here run found. Arrays cover the re-run slices [start, stop) of the input grid.

    candidate: bool (stop - start, y, x), the proposed lesion's voxels, or None when nothing came
      within REACH_MM of the click; probabilities: float32 (stop - start, y, x) of the re-run;
    row: the candidate's lesion_table row (volume, diameters, centroid, the re-run's mean and
      highest probability), or None; distance_mm: from the click to the candidate's nearest voxel;
    attention: the re-run's results.AttentionMaps (where each block sampled), when asked for;
    source: how the candidate was found ("threshold" or "half maximum"), or why none was
      ("the model found nothing within 4 mm of the click", "the 3D classifier scores it 0.12").
    """

    slices: tuple[int, int]
    point_zyx: tuple[float, float, float]
    probabilities: np.ndarray
    candidate: np.ndarray | None
    row: dict | None
    distance_mm: float
    seconds: float
    warnings: list
    attention: object = None  # the re-run's AttentionMaps when asked for (return_attention)
    source: str = ""

    def candidate_indices(self, shape_zyx) -> np.ndarray:
        """Flat indices (int64) of the candidate's voxels in a (z, y, x) array of `shape_zyx`."""
        if self.candidate is None:
            return np.zeros(0, np.int64)
        z, y, x = np.nonzero(self.candidate)
        return np.ravel_multi_index((z + self.slices[0], y, x), tuple(shape_zyx)).astype(np.int64)


def slab_around(point_zyx, num_slices: int, slice_mm: float, z_range: tuple[int, int] | None = None,
                margin_mm: float = MARGIN_MM) -> tuple[int, int]:
    """Slices [start, stop) to re-run: a lesion's z range (inclusive first, last) when the click is
    on one, else the click's slice and those within margin_mm above and below it."""
    z = int(round(float(point_zyx[0])))
    if not 0 <= z < num_slices:
        raise BoltzformerError(f"the click is outside the volume (slice {z} of {num_slices})")
    if z_range is not None:
        lo, hi = sorted(int(v) for v in z_range)
        return max(0, min(lo, z)), min(num_slices, max(hi, z) + 1)
    k = int(math.floor(margin_mm / slice_mm + 1e-6)) if slice_mm > 0 else 0
    return max(0, z - k), min(num_slices, z + k + 1)


def look_here(segmenter, volume, prompt: str, point_zyx, *, z_range=None, margin_mm: float = MARGIN_MM,
              reach_mm: float = REACH_MM, threshold: float = 0.5, min_lesion_mm3: float = 0.0, seed: int = 0,
              window: str | None = None, modality: str | None = None, force_prompt: bool = False,
              amplitude: float = AMPLITUDE, sigma_tokens: float = SIGMA_TOKENS, layers: int = LAYERS,
              batch_size: int | None = None, return_attention: bool = False,
              mirror: bool = DEFAULT_MIRROR) -> LookHereResult:
    """Re-run the slices around `point_zyx` (input voxel index, z y x) with the sampling pulled
    toward it and return the candidate there (see the module docstring).

    z_range: the (first, last) slice of the lesion clicked on, if any. amplitude 0 runs the same
    slices without a prior (the control of benchmarks/look_here.py). The 3D false-positive filter
    is not applied: the reader is pointing at the spot. Raises BoltzformerError for a click
    outside the volume or a volume that is not axial (only its slices can be re-run). mirror: as
    in Segmenter.iter_segment (the panel passes the setting of the run it reviews). The slices are
    re-run axially, whichever planes the run reviewed used.
    """
    from . import fp_classifier, fp_filter, postprocess

    t0 = time.perf_counter()
    point = tuple(float(v) for v in point_zyx)
    shape = volume.shape
    if not all(-0.5 <= p < n - 0.5 for p, n in zip(point, shape)):
        raise BoltzformerError(f"the click {tuple(round(p, 1) for p in point)} is outside the volume {shape}")
    start, stop = slab_around(point, shape[0], _slice_mm(volume), z_range, margin_mm)
    prior = ClickPrior(point, amplitude, sigma_tokens, layers) if amplitude else None
    result = segmenter.segment_volume(
        volume, prompt, slices=(start, stop), threshold=threshold, min_lesion_mm3=min_lesion_mm3, seed=seed,
        window=window, modality=modality, fp_reduction=False, force_prompt=force_prompt, prior=prior,
        batch_size=batch_size, return_attention=return_attention, mirror=mirror,
        planes="axial")  # the click pulls each axial slice's sampling; coronal and sagittal passes would dilute it
    probabilities = np.ascontiguousarray(result.probabilities[start:stop])
    spacing_zyx = np.asarray(volume.spacing_mm, float)[::-1]
    labels = result.labels[start:stop]
    found, distance = _nearest_component(labels, point, start, spacing_zyx)
    candidate = row = None
    source = f"the model found nothing within {reach_mm:g} mm of the click"
    if found and distance <= reach_mm:
        candidate, source = labels == found, "threshold"
    else:
        candidate = _half_maximum_region(probabilities, point, start, spacing_zyx, reach_mm)
        if candidate is not None:
            distance = _nearest_component(candidate.astype(np.int32), point, start, spacing_zyx)[1]
            source = "half maximum"
    if candidate is not None:
        full = np.zeros(shape, np.int32)
        full[start:stop][candidate] = 1
        if result.frame is not None and result.reorientation is not None:
            # the intensities the run read: a CT stored as HU + 1024 is back in HU there
            volume = volume.with_array(result.reorientation.from_canonical(result.frame.array))
        (row,) = postprocess.lesion_table(full, volume, probabilities=result.probabilities)
        if source == "half maximum" and fp_filter.applies(result.rule_prompt, result.modality, result.window):
            clf = fp_classifier.bundled()
            skipped = fp_filter.classifier_skipped(volume)  # a scan thinner than its patch: no score
            if skipped:
                result.warnings.append(skipped)
            elif clf is not None:
                score = float(clf.score(volume.array, full, [row], volume.spacing_mm)[0])
                row["nodule_score"] = round(score, 4)
                if score < clf.threshold:
                    candidate = row = None
                    distance, source = math.inf, f"the 3D classifier scores it {score:.2f}"
        if row is not None:
            row["look_here_source"] = source
    return LookHereResult((start, stop), point, probabilities, candidate, row,
                          float(distance) if candidate is not None else math.inf, time.perf_counter() - t0,
                          list(result.warnings), result.attention, source)


def _half_maximum_region(probabilities: np.ndarray, point_zyx, z0: int, spacing_zyx: np.ndarray,
                         reach_mm: float) -> np.ndarray | None:
    """bool (slab) region: the voxels connected to the highest probability within reach_mm of the
    point whose probability is at least half of it (and within HALF_MAXIMUM_RADIUS_MM of the
    point); None when that highest one is < LOCAL_FLOOR.
    probabilities: float (slab z, y, x) starting at input slice z0."""
    from scipy import ndimage

    zz, yy, xx = np.indices(probabilities.shape, dtype=np.float64)
    d2 = (((zz + z0 - point_zyx[0]) * spacing_zyx[0]) ** 2 + ((yy - point_zyx[1]) * spacing_zyx[1]) ** 2
          + ((xx - point_zyx[2]) * spacing_zyx[2]) ** 2)
    near = np.where(d2 <= reach_mm**2, probabilities, -1.0)
    peak = np.unravel_index(int(np.argmax(near)), near.shape)
    if near[peak] < LOCAL_FLOOR:
        return None
    regions, _ = ndimage.label((probabilities >= 0.5 * near[peak]) & (d2 <= HALF_MAXIMUM_RADIUS_MM**2))
    return regions == regions[peak]


def _slice_mm(volume) -> float:
    """Distance between slices along z of the input grid (mm)."""
    return float(volume.spacing_mm[2])


def _nearest_component(labels: np.ndarray, point_zyx, z0: int, spacing_zyx: np.ndarray) -> tuple[int, float]:
    """(label of the component nearest the point, its distance in mm); (0, inf) when none."""
    zs, ys, xs = np.nonzero(labels)
    if zs.size == 0:
        return 0, math.inf
    d = (np.column_stack([zs + z0, ys, xs]) - np.asarray(point_zyx, float)) * spacing_zyx
    i = int(np.argmin(np.einsum("ij,ij->i", d, d)))
    return int(labels[zs[i], ys[i], xs[i]]), float(np.sqrt(np.dot(d[i], d[i])))
