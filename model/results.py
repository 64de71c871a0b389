"""What a segmentation returns: `SegmentationResult` (mask, probabilities, lesion table, on the
input's grid) and `AttentionMaps` (where the decoder's queries sampled, and their .npz file), with
the mapping of both from the canonical axial grid the network works on back to the input's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import fp_classifier, fp_filter, intensity, polarity_filter, postprocess, runtime
from . import nodule_detector as detector  # `nodule_detector` is the switch's name
from .io import Volume
from .orientation import IDENTITY, Reorientation
from .options import check_threshold


# spread (exp(entropy) / cells) at or above this: a flat distribution, in which no cell stands out
FLAT_SPREAD = 0.995


@dataclass
class AttentionMaps:
    """Per decoder layer, where the queries sampled, on the model's mask grid.

    counts: L x Z x G x G float16, queries (of m) that attended each token, nearest-upsampled
      from each layer's token map (16/32/64 at 256 input) to the finest grid G (64);
    probabilities: L x Z x G x G float16, the Boltzmann probabilities averaged over queries,
      scaled so a uniform distribution is 1 (readable across layers of different sizes);
    grid_scale_yx: size of one grid cell (y, x) in voxels of the canonical axial frame the
      network saw (the input's own voxels only for an axial input stored LPS); a cell's centre
      lies (g - 1) / 2 voxels in from its corner. `grid_geometry` (and the npz's affine_ras)
      places the maps on the input in every case;
    query_bits: L x Z x G x G unsigned integers, bit q set when query q sampled the token (None
      when the network has more queries than bits): `query_samples(q)` is one query's map.
    """

    counts: np.ndarray
    probabilities: np.ndarray
    strides: list[int]
    temperatures: list[float]
    tokens_per_query: list[int]
    slice_start: int
    grid_scale_yx: tuple[float, float]
    num_queries: int = 10  # the largest possible count
    # None: the maps lie on the input volume's slices. Else the canonical axial Volume whose
    # slices they lie on (a sagittal or coronal input has no axial slices of its own).
    frame: Volume | None = None
    query_bits: np.ndarray | None = None
    _top_mass_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _spread_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (spread, of which array)

    def __repr__(self) -> str:  # the shapes, not the arrays
        return (f"AttentionMaps(counts {self.counts.shape} (layer, slice, row, column), slice_start={self.slice_start}, "
                f"strides={list(self.strides)}, temperatures={[round(float(t), 3) for t in self.temperatures]}, "
                f"num_queries={self.num_queries})")

    @classmethod
    def empty(cls, layers: list, n: int, slice_start: int, hw, num_queries: int) -> "AttentionMaps":
        """Zeroed maps for ``n`` slices, shaped after the first batch's per-layer records.

        layers: Segmenter.predict_batch's attention, per layer (counts, probabilities, stride,
        tau, query bits or None, tokens per query); hw: the slice size (y, x) in voxels.
        """
        num_layers = len(layers)
        g = layers[0][0].shape[-1]
        q = num_queries
        has_bits = layers[0][4] is not None
        bits_dtype = np.uint8 if q <= 8 else np.uint16 if q <= 16 else np.uint32 if q <= 32 else np.uint64
        return cls(
            counts=np.zeros((num_layers, n, g, g), np.float16),
            probabilities=np.zeros((num_layers, n, g, g), np.float16),
            strides=[rec[2] for rec in layers], temperatures=[rec[3] for rec in layers],
            tokens_per_query=[rec[5] for rec in layers], slice_start=slice_start,
            grid_scale_yx=(hw[0] / g, hw[1] / g), num_queries=q,
            query_bits=np.zeros((num_layers, n, g, g), bits_dtype) if has_bits else None,
        )

    def store(self, layers: list, b0: int) -> None:
        """One batch's records (see `empty`) into slices b0, b0 + 1, ... of the maps."""
        self._top_mass_cache.clear()
        self._spread_cache = None
        for i, (c, p, _, _, bits, _) in enumerate(layers):
            self.counts[i, b0 : b0 + c.shape[0]] = c.numpy().astype(np.float16)
            self.probabilities[i, b0 : b0 + p.shape[0]] = p.numpy().astype(np.float16)
            if self.query_bits is not None and bits is not None:
                self.query_bits[i, b0 : b0 + bits.shape[0]] = bits.numpy().astype(self.query_bits.dtype)

    def grid_geometry(self, volume: Volume) -> Volume:
        """The maps' cells as a Volume (Z x G x G, zeros) placed in the world: one voxel per
        cell, at the centre of the image voxels it covers; on the canonical axial frame the
        maps lie on (``frame``), else on ``volume``, the input they were computed from."""
        frame = self.frame if self.frame is not None else volume
        scale_y, scale_x = self.grid_scale_yx
        sx, sy, sz = frame.spacing_mm
        origin = frame.index_to_world((self.slice_start, 0.5 * scale_y - 0.5, 0.5 * scale_x - 0.5))
        return Volume(np.zeros(self.counts.shape[1:], np.uint8), (sx * scale_x, sy * scale_y, sz),
                      tuple(float(v) for v in origin), frame.direction, frame.modality)

    def write_npz(self, path, volume: Volume) -> None:
        """The `--attention` file, a compressed .npz (README, "The attention file"):
        counts, probabilities (L x Z x G x G float16, layer, slice, cell row, cell column),
        strides, temperatures, tokens_per_query (per layer), slice_start, grid_scale_yx (y, x),
        num_queries, and affine_ras: the (4, 4) NIfTI affine of one layer's map as a volume,
        ``nibabel.Nifti1Image(maps[layer].transpose(2, 1, 0), affine_ras)``, which lies where it
        belongs over ``volume`` whatever its orientation (for a sagittal input the maps are on
        axial slices of the same voxels)."""
        with open(path, "wb") as f:
            np.savez_compressed(
                f, counts=self.counts, probabilities=self.probabilities, strides=np.array(self.strides),
                temperatures=np.array(self.temperatures), tokens_per_query=np.array(self.tokens_per_query),
                slice_start=self.slice_start, grid_scale_yx=np.array(self.grid_scale_yx), num_queries=self.num_queries,
                affine_ras=self.grid_geometry(volume).affine_ras(),
            )

    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    def query_samples(self, query: int) -> np.ndarray:
        """L x Z x G x G float16: 1 where query `query` (0-based) sampled the token, else 0."""
        if self.query_bits is None:
            raise ValueError("these attention maps hold no per-query record")
        if not 0 <= int(query) < self.num_queries:
            raise ValueError(f"query {query} out of range: the network has {self.num_queries} queries")
        return ((self.query_bits >> self.query_bits.dtype.type(query)) & 1).astype(np.float16)

    def top_mass(self, fraction: float = 0.5) -> np.ndarray:
        """L x Z x G x G bool: per layer and slice, the hottest cells: the fewest that together
        hold `fraction` of the Boltzmann sampling probability (mean over queries); ties at the
        cut are all in.

        Except on a floor: when the cut falls on the lowest value of the slice, the cells at it
        are a flat background that no query prefers, and any half of it would be an arbitrary
        pick; the set is then the cells above the floor only. That is the usual case: on the
        bundled sample the cells shown hold 31-56 % of the mass in the first layer and under
        10 % in the sharp ones (top_mass_stats gives each slice's share). A slice whose
        sampling is flat (spread >= FLAT_SPREAD) selects no cell: none stands out. A diffuse
        search selects much of the frame, a sharp one a few cells.
        """
        if not 0.0 < fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        key = (float(fraction), id(self.probabilities))
        if key not in self._top_mass_cache:  # a sort of every slice: done once per view setting
            self._top_mass_cache.clear()
            self._top_mass_cache[key] = self._top_mass(fraction)
        return self._top_mass_cache[key]

    def _top_mass(self, fraction: float) -> np.ndarray:
        p = self.probabilities.astype(np.float32)
        flat = p.reshape(*p.shape[:2], -1)
        ordered = -np.sort(-flat, axis=-1)
        cumulative = np.cumsum(ordered, axis=-1)
        total = cumulative[..., -1:]
        # index of the last cell needed to reach the fraction, then its value is the cut
        last = np.minimum((cumulative < fraction * total).sum(-1, keepdims=True), flat.shape[-1] - 1)
        cut = np.take_along_axis(ordered, last, axis=-1)
        floor = ordered[..., -1:]
        above_floor = flat > floor
        on_floor = (cut <= floor) & above_floor.any(-1, keepdims=True)
        top = np.where(on_floor, above_floor, flat >= cut)
        not_flat = ~(self.spread() >= FLAT_SPREAD)[..., None]  # NaN (not processed) is excluded by total
        return (top & (total > 0) & not_flat).reshape(p.shape)

    def top_mass_stats(self, fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """L x Z (share of the frame the top-`fraction` cells cover, share of the sampling mass
        they hold), both 0..1; NaN on slices that were not processed."""
        p = self.probabilities.reshape(*self.probabilities.shape[:2], -1).astype(np.float32)
        top = self.top_mass(fraction).reshape(p.shape)
        total = p.sum(-1)
        done = total > 0
        area = np.where(done, top.mean(-1), np.nan)
        mass = np.where(done, (p * top).sum(-1) / np.where(done, total, 1.0), np.nan)
        return area, mass

    def spread(self) -> np.ndarray:
        """L x Z: the share of the frame the sampling is effectively spread over, exp(entropy) /
        cells (1 = uniform; 0.01 = as if on 1 % of the cells); NaN on slices not processed.
        Computed once (0.3-0.8 s on a 224-slice CT; the panel asks 3-4 times per run) until
        `store` adds slices."""
        if self._spread_cache is None or self._spread_cache[1] is not self.probabilities:
            p = self.probabilities.reshape(*self.probabilities.shape[:2], -1).astype(np.float64)
            total = p.sum(-1, keepdims=True)
            q = p / np.where(total > 0, total, 1.0)
            entropy = -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)
            spread = np.where(total[..., 0] > 0, np.exp(entropy) / p.shape[-1], np.nan)
            spread.setflags(write=False)  # shared by every caller
            self._spread_cache = (spread, self.probabilities)
        return self._spread_cache[0]

    def sharpest_layer(self) -> int:
        """The decoder layer whose sampling is least spread: the geometric mean of `spread`
        over the processed slices, so a layer that concentrates on the slices holding the
        target wins even where it is flat on the others (an arithmetic mean drowns those
        slices in the flat ones)."""
        spread = self.spread()
        done = ~np.isnan(spread).all(0)
        if not done.any():
            return self.num_layers - 1
        return int(np.argmin(np.exp(np.log(spread[:, done]).mean(1))))

    def view(self, values: str = "counts", query: int | None = None, top_fraction: float | None = None) -> np.ndarray:
        """L x Z x G x G float16 heatmap to show: `values` 'counts' (queries that sampled each
        token; with `query`, 1 where that query did) or 'probabilities'; with `top_fraction`,
        0 outside the cells holding that share of the sampling mass (see top_mass)."""
        if values not in ("counts", "probabilities"):
            raise ValueError(f"values must be 'counts' or 'probabilities', not {values!r}")
        if values == "counts":
            data = self.counts if query is None else self.query_samples(query)
        else:
            data = self.probabilities
        if top_fraction is None:
            return data
        return np.where(self.top_mass(top_fraction), data, np.float16(0)).astype(np.float16)


@dataclass
class SegmentationResult:
    """Every array is on the input volume's grid (z, y, x), whatever its orientation."""

    volume: Volume  # the input (geometry source for every output)
    prompt: str
    probabilities: np.ndarray  # float32 (z, y, x), mean over runs; 0 outside processed slices
    mask: np.ndarray | None  # uint8 (z, y, x)
    threshold: float
    min_lesion_mm3: float
    slices: tuple[int, int]  # [start, stop) input slice indices asked for, clipped to the volume
    runs: int
    uncertainty: np.ndarray | None = None  # float32 (z, y, x), variance over sampling seeds
    mirror: bool = False  # each slice averaged with its left-right mirror image (Segmenter.predict_batch)
    planes: str = "axial"  # "three": the median of the axial, coronal and sagittal passes (boltzformer.planes)
    attention: AttentionMaps | None = None
    lesions: list[dict] = field(default_factory=list)
    window: str | None = None
    modality: str | None = None
    warnings: list[str] = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    complete: bool = True  # False when stopped early: only `finished_slices` hold results
    slices_done: int = 0  # axial slices finished (all of `slices` when complete)
    # stopped early: the finished [start, stop) input slice indices (on a z-flipped input the last
    # ones of `slices`); None when complete, or when the input was acquired sagittally or
    # coronally, whose finished axial slices are no range of its own slices
    finished_slices: tuple[int, int] | None = None
    labels: np.ndarray | None = None  # uint16/int32 (z, y, x): lesion ids as in `lesions` (0 = none)
    # The canonical axial volume the network saw (same world geometry, see boltzformer.orientation)
    # and the mapping back to the input grid; None = the input itself.
    frame: Volume | None = None
    reorientation: Reorientation | None = None
    # drop candidates the false-positive filters reject: lung prompts on HU CT (fp_filter), MS lesion
    # prompts on MR (polarity_filter)
    fp_reduction: bool = True
    # the known phrasing whose target's filters and rules apply: a free-text prompt's nearest known
    # prompt (Segmenter.rules_prompt; "lesion" → 'ms lesion'); None: the prompt itself
    rules_prompt: str | None = None
    min_nodule_score: float | None = None  # the 3D classifier's threshold; None = the one shipped with it
    rejected: list[dict] = field(default_factory=list)  # candidates the filter dropped, with their scores
    # With fp_reduction, for lung nodule prompts on HU CT: the 3D nodule detector decides which
    # lesions there are, the slice model outlines them (boltzformer.nodule_detector.merge). Its
    # candidates do not depend on the threshold: found once, on the first rethreshold that needs them.
    nodule_detector: bool = False  # off by default: it missed the real-CT false-positive target (model card)
    _candidates: "detector.Candidates | None" = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:  # a notebook prints this: a summary, not the arrays (about 32 kB of them)
        done = "" if self.complete else f", stopped early: {self.slices_done} axial slices done"
        return (f"SegmentationResult(prompt={self.prompt!r}, shape={self.volume.shape}, slices={self.slices}{done}, "
                f"lesions={len(self.lesions)}, threshold={self.threshold}, modality={self.modality!r}, "
                f"attention={'yes' if self.attention is not None else 'no'}, warnings={len(self.warnings)})")

    @property
    def rule_prompt(self) -> str:
        """The prompt the target-specific rules (lung filter, nodule detector, MS polarity) read."""
        return self.rules_prompt or self.prompt

    def _detector_skipped(self, frame: Volume) -> str | None:
        """Why the 3D nodule detector, asked for, does not run on this result (None: it runs). It
        needs its classifier, a lung nodule prompt on CT in HU and a scan as deep as the
        classifier's patch (fp_classifier.covers)."""
        head = "the 3D nodule detector was not applied: "
        if detector.bundled() is None:
            return head + f"its weights ({detector.DETECTOR_WEIGHTS_NAME}) are not installed"
        if not detector.applies(self.rule_prompt, self.modality, self.window):
            return head + (f"it serves lung nodule prompts on CT in Hounsfield units, not '{self.prompt}' on "
                           f"{self.modality or 'this image'}" + ("" if self.window or self.modality != "CT"
                                                                 else " without HU values"))
        thin = fp_classifier.too_shallow(frame.shape, frame.spacing_mm)
        return None if thin is None else head + f"{thin} its classifier looks at"

    @property
    def detector_candidates_found(self) -> bool:
        """Whether the 3D nodule detector's candidates were found already (its one slow pass: a
        rethreshold with the detector on takes seconds on a CT until they are)."""
        return self._candidates is not None

    def detector_skip_reason(self) -> str | None:
        """Why the 3D nodule detector would not run on this result (None: it would)."""
        return self._detector_skipped(self.frame if self.frame is not None else self.volume)

    def find_detector_candidates(self) -> bool:
        """The 3D nodule detector's candidate pass, now (seconds on a CT; safe on a worker thread
        while nothing else rethresholds this result): a later rethreshold with the detector on
        reuses it. -> whether the detector runs on this result (False: nothing was found)."""
        frame = self.frame if self.frame is not None else self.volume
        if self._detector_skipped(frame) is not None:
            return False
        self._ensure_candidates(frame)
        return True

    def _ensure_candidates(self, frame: Volume) -> None:
        """The detector's candidates on `frame`, found once (for a result it runs on)."""
        if self._candidates is None:
            t0 = time.perf_counter()
            with runtime.network_heap():  # its filters' large temporaries, as the network's (runtime.py)
                candidates = detector.find_candidates(frame, detector.bundled())
            self.timings_s["nodule_detector"] = time.perf_counter() - t0
            self._candidates = candidates  # set last: a reader on the main thread sees none or all

    def mask_volume(self) -> Volume:
        return self.volume.with_array(self.mask)

    def probability_volume(self) -> Volume:
        return self.volume.with_array(self.probabilities.astype(np.float32))

    def rethreshold(self, threshold: float, min_lesion_mm3: float | None = None,
                    fp_reduction: bool | None = None, nodule_detector: bool | None = None) -> "SegmentationResult":
        """Re-threshold the stored probabilities (no inference); updates mask and lesion table.
        None keeps the current setting."""
        check_threshold(threshold, min_lesion_mm3)
        self.threshold = float(threshold)
        if min_lesion_mm3 is not None:
            self.min_lesion_mm3 = float(min_lesion_mm3)
        if fp_reduction is not None:
            self.fp_reduction = bool(fp_reduction)
        if nodule_detector is not None:
            self.nodule_detector = bool(nodule_detector)
        frame = self.frame if self.frame is not None else self.volume
        reo = self.reorientation or IDENTITY
        probabilities = reo.to_canonical(self.probabilities)
        raw = probabilities > self.threshold  # strictly: slices left out (probability 0) stay empty at any threshold
        labels, n = postprocess.label_components(raw, frame.spacing_mm, min_lesion_mm3=self.min_lesion_mm3)
        del raw  # a bool scan, dead from here (post-processing holds the run's peak)
        boxes = postprocess.find_objects(labels)  # one pass over the scan, for the table and the filter
        rows = postprocess.lesion_table(labels, frame, probabilities=probabilities, boxes=boxes)
        self.rejected = []
        if self.fp_reduction and n and fp_filter.applies(self.rule_prompt, self.modality, self.window):
            labels, rows, self.rejected = fp_filter.filter_candidates(
                labels, rows, frame, probabilities, min_nodule_score=self.min_nodule_score,
                nodules=fp_filter.is_nodule_prompt(self.rule_prompt), in_place=True, boxes=boxes)
            skipped = fp_filter.classifier_skipped(frame)
            if skipped and skipped not in self.warnings:
                self.warnings.append(skipped)
        if self.fp_reduction and n and polarity_filter.applies(self.rule_prompt, self.modality):
            sequence = intensity.mr_sequence(self.volume)
            labels, rows, self.rejected = polarity_filter.filter_candidates(labels, rows, frame, in_place=True,
                                                                            sequence=sequence)
            dark = polarity_filter.dark_scan_warning(rows, sequence)
            if dark and dark not in self.warnings:
                self.warnings.append(dark)
        skipped = self._detector_skipped(frame) if self.fp_reduction and self.nodule_detector else "off"
        if skipped not in (None, "off") and skipped not in self.warnings:
            self.warnings.append(skipped)
        if skipped is None:
            self._ensure_candidates(frame)
            labels, rows, unconfirmed = detector.merge(labels, rows, frame, probabilities, self._candidates)
            self.rejected += unconfirmed
        labels = np.ascontiguousarray(reo.from_canonical(labels))
        rows_to_input(rows, labels, reo, frame.shape)
        # uint8 mask and uint16 labels written inside the lesions' box (the rest of a scan is zeros);
        # labels already uint16 (label_components' own, renumbered in place) are kept as they are
        box = postprocess.foreground_box(labels)
        self.mask = np.zeros(labels.shape, np.uint8)
        if labels.dtype == np.uint16 or len(rows) > postprocess.LABEL_UINT16_MAX:
            self.labels = labels
        else:
            self.labels = np.zeros(labels.shape, np.uint16)
            if box is not None:
                self.labels[box] = labels[box]
        if box is not None:
            self.mask[box] = labels[box] > 0
        self.lesions = rows
        return self


def to_input(reo: Reorientation, array: np.ndarray) -> np.ndarray:
    """An array of the canonical grid (z, y, x) on the input's grid (itself when nothing turns)."""
    return array if reo.is_identity else np.ascontiguousarray(reo.from_canonical(array))


def rows_to_input(rows: list[dict], labels: np.ndarray, reo: Reorientation, frame_shape) -> None:
    """Lesion-table voxel indices (centroid, slice range) from the canonical grid to the input's."""
    if reo.is_identity:
        return
    boxes = postprocess.find_objects(labels)
    for row in rows:
        row["centroid_voxel_zyx"] = reo.index_to_input(row["centroid_voxel_zyx"], frame_shape)
        box = boxes[row["lesion_id"] - 1]
        row["slice_start"], row["slice_end"] = int(box[0].start), int(box[0].stop - 1)


def attention_to_input(att: "AttentionMaps | None", reo: Reorientation, frame: Volume) -> "AttentionMaps | None":
    """Heatmaps back on the input's slices where its slices are axial (flips, in-plane swaps).

    A sagittal or coronal acquisition has no axial slices of its own: its heatmaps stay on the
    canonical axial grid and `att.frame` says where that grid lies.
    """
    if att is None or reo.is_identity:
        return att
    if not reo.keeps_slices:
        att.frame = frame
        return att
    # L x Z x G x G on the canonical grid: the same in-plane flips/swap and z flip as full-size arrays
    att.counts = np.ascontiguousarray(reo.from_canonical(att.counts))
    att.probabilities = np.ascontiguousarray(reo.from_canonical(att.probabilities))
    if att.query_bits is not None:
        att.query_bits = np.ascontiguousarray(reo.from_canonical(att.query_bits))
    if reo.source_axis[0] == 1:  # canonical x came from input y: the grid's cells swap too
        att.grid_scale_yx = tuple(att.grid_scale_yx[::-1])
    if reo.flip[2]:
        z = frame.shape[0]
        att.slice_start = z - att.slice_start - att.counts.shape[1]
    return att
