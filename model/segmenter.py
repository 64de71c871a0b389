"""Segmenter: the thin predictor users call (CLI, napari plugin, Python).

    seg = Segmenter.from_pretrained()            # bundled weights, best local device
    result = seg.segment_volume(volume, "lung nodule")
    result.mask, result.probabilities, result.lesions

`iter_segment` is the same work as a generator that yields `Progress` after every batch of
slices and returns the `SegmentationResult`: GUIs run it in a worker thread and can stop it
between batches.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Generator

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from . import fp_filter, intensity, postprocess
from .checkpoint import load_model
from .errors import BoltzformerError, PromptError
from .context import context_margin, context_stack
from .io import Volume
from .network.boltzformer import BoltzFormer
from .orientation import Reorientation, to_canonical
from .network.text import PromptEmbedding, SentenceEncoder, batch_embeddings, normalise_prompt
from .options import DEFAULT_MIN_LESION_MM3, check_prompt_text

log = logging.getLogger(__name__)

# A prompt whose sentence embedding has a lower cosine similarity than this to every known prompt
# names nothing the model was trained for, and is refused unless forced. Measured on the bundled
# model (benchmarks/prompt_similarity.py): phrasings of known targets score >= 0.59, unrelated
# words and sentences <= 0.49.
MIN_PROMPT_SIMILARITY = 0.54


def available_devices() -> dict[str, bool]:
    mps = getattr(torch.backends, "mps", None)
    return {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(mps is not None and mps.is_available()),
    }


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an unavailable device is a clear error."""
    name = str(device)
    avail = available_devices()
    if name == "auto":
        return torch.device("cuda" if avail["cuda"] else "mps" if avail["mps"] else "cpu")
    kind = name.split(":")[0]
    if kind not in avail:
        raise BoltzformerError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if not avail[kind]:
        raise BoltzformerError(f"device {name!r} is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def sampling_generator(device: torch.device, seed: int) -> torch.Generator:
    """The seeded generator for Boltzmann sampling on `device`.

    CUDA draws its own noise; MPS and CPU draw on the CPU (MPS generators are not available on
    every torch build) and the noise is moved to the device, so a seed gives the same tokens on
    CPU and MPS.
    """
    dev = device if device.type == "cuda" else torch.device("cpu")
    return torch.Generator(device=dev).manual_seed(int(seed))


@dataclass
class Progress:
    slices_done: int
    slices_total: int  # slices x runs
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.slices_done / max(1, self.slices_total)

    @property
    def eta_s(self) -> float:
        if self.slices_done == 0:
            return math.nan
        return self.elapsed_s / self.slices_done * (self.slices_total - self.slices_done)


@dataclass
class AttentionMaps:
    """Per decoder layer, where the queries sampled, on the model's mask grid.

    counts: L x Z x G x G float16, queries (of m) that attended each token, nearest-upsampled
      from each layer's token map (16/32/64 at 256 input) to the finest grid G (64);
    probabilities: L x Z x G x G float16, the Boltzmann probabilities averaged over queries,
      scaled so a uniform distribution is 1 (readable across layers of different sizes);
    grid_scale_yx: size of one grid cell in source voxels (y, x): place the maps in a viewer
      with scale = voxel spacing * grid_scale_yx and the first processed slice as z offset;
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
        """L x Z x G x G bool: per layer and slice, the fewest cells that together hold `fraction`
        of the Boltzmann sampling probability (mean over queries); ties at the cut are all in.

        Except on a floor: when the cut falls on the lowest value of the slice, the cells at it
        are a flat background that no query prefers, and any half of it would be an arbitrary
        pick; the set is then the cells above the floor only (holding less than `fraction`,
        see top_mass_stats). A perfectly flat slice selects every cell. A diffuse search
        selects much of the frame, a sharp one a few cells.
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
        return (top & (total > 0)).reshape(p.shape)

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
        cells (1 = uniform; 0.01 = as if on 1 % of the cells); NaN on slices not processed."""
        p = self.probabilities.reshape(*self.probabilities.shape[:2], -1).astype(np.float64)
        total = p.sum(-1, keepdims=True)
        q = p / np.where(total > 0, total, 1.0)
        entropy = -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)
        return np.where(total[..., 0] > 0, np.exp(entropy) / p.shape[-1], np.nan)

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
    slices: tuple[int, int]  # processed [start, stop) in input slice indices
    runs: int
    uncertainty: np.ndarray | None = None  # float32 (z, y, x), variance over sampling seeds
    attention: AttentionMaps | None = None
    lesions: list[dict] = field(default_factory=list)
    window: str | None = None
    modality: str | None = None
    warnings: list[str] = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    complete: bool = True  # False when stopped early (only slices before `slices_done` are valid)
    slices_done: int = 0
    labels: np.ndarray | None = None  # uint16/int32 (z, y, x): lesion ids as in `lesions` (0 = none)
    # The canonical axial volume the network saw (same world geometry, see boltzformer.orientation)
    # and the mapping back to the input grid; None = the input itself.
    frame: Volume | None = None
    reorientation: Reorientation | None = None
    fp_reduction: bool = True  # drop candidates the false-positive filter rejects (lung prompts on HU CT)
    min_nodule_score: float | None = None  # the 3D classifier's threshold; None = the one shipped with it
    rejected: list[dict] = field(default_factory=list)  # candidates the filter dropped, with their scores

    def mask_volume(self) -> Volume:
        return self.volume.with_array(self.mask)

    def probability_volume(self) -> Volume:
        return self.volume.with_array(self.probabilities.astype(np.float32))

    def rethreshold(self, threshold: float, min_lesion_mm3: float | None = None,
                    fp_reduction: bool | None = None) -> "SegmentationResult":
        """Re-threshold the stored probabilities (no inference); updates mask and lesion table."""
        self.threshold = float(threshold)
        if min_lesion_mm3 is not None:
            self.min_lesion_mm3 = float(min_lesion_mm3)
        if fp_reduction is not None:
            self.fp_reduction = bool(fp_reduction)
        frame = self.frame if self.frame is not None else self.volume
        reo = self.reorientation or IDENTITY
        probabilities = reo.to_canonical(self.probabilities)
        raw = probabilities > self.threshold  # strictly: slices left out (probability 0) stay empty at any threshold
        labels, n = postprocess.label_components(raw, frame.spacing_mm, min_lesion_mm3=self.min_lesion_mm3)
        rows = postprocess.lesion_table(labels, frame, probabilities=probabilities)
        self.rejected = []
        if self.fp_reduction and n and fp_filter.applies(self.prompt, self.modality, self.window):
            labels, rows, self.rejected = fp_filter.filter_candidates(labels, rows, frame, probabilities,
                                                                      min_nodule_score=self.min_nodule_score)
        labels = np.ascontiguousarray(reo.from_canonical(labels))
        _rows_to_input(rows, labels, reo, frame.shape)
        self.mask = (labels > 0).astype(np.uint8)
        self.labels = labels.astype(np.uint16) if len(rows) < 65535 else labels
        self.lesions = rows
        return self


IDENTITY = Reorientation((0, 1, 2), (False, False, False))


def _to_input(reo: Reorientation, array: np.ndarray) -> np.ndarray:
    return array if reo.is_identity else np.ascontiguousarray(reo.from_canonical(array))


def _rows_to_input(rows: list[dict], labels: np.ndarray, reo: Reorientation, frame_shape) -> None:
    """Lesion-table voxel indices (centroid, slice range) from the canonical grid to the input's."""
    if reo.is_identity:
        return
    boxes = ndimage.find_objects(labels)
    for row in rows:
        row["centroid_voxel_zyx"] = reo.index_to_input(row["centroid_voxel_zyx"], frame_shape)
        box = boxes[row["lesion_id"] - 1]
        row["slice_start"], row["slice_end"] = int(box[0].start), int(box[0].stop - 1)


def _attention_to_input(att: "AttentionMaps | None", reo: Reorientation, frame: Volume) -> "AttentionMaps | None":
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


class Segmenter:
    """A trained BoltzFormer on a device, with its known prompts."""

    def __init__(self, model: BoltzFormer, prompt_bank: dict[str, PromptEmbedding], device="auto", info=None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.prompt_bank = dict(prompt_bank)
        self.info = info or {}
        self._encoder = SentenceEncoder(model.cfg.max_text_tokens)
        self._encoder.cache.update(self.prompt_bank)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source=None, device="auto", **inference_options) -> "Segmenter":
        """source: None (bundled), a .safetensors file, a folder, or "hf:owner/name" (Hugging Face).

        inference_options: sampling ('boltzmann', 'uniform', 'mask2former', 'dense'),
        token_ratio, tau0, attention_impl ('auto', 'gather', 'dense').
        """
        model, bank, meta, src = load_model(source)
        if inference_options:
            model.set_inference_options(**inference_options)
        info = {k: v for k, v in meta.items() if k != "prompts"}
        info["weights_path"] = str(src.weights_path)
        info["weights_source"] = src.description
        return cls(model, bank, device=device, info=info)

    def release_memory(self) -> None:
        """Give cached accelerator memory back (after an out-of-memory error, say)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps" and hasattr(torch, "mps"):
            torch.mps.empty_cache()

    @property
    def config(self):
        return self.model.cfg

    @property
    def known_prompts(self) -> list[str]:
        return sorted(self.prompt_bank)

    # -- prompts --------------------------------------------------------------------------
    def embed(self, prompts: list[str]) -> list[PromptEmbedding]:
        return self._encoder.encode([normalise_prompt(p) for p in prompts])

    def nearest_prompts(self, prompt: str, n: int = 3) -> list[tuple[str, float]]:
        """Known prompts closest to `prompt` by cosine similarity of sentence embeddings."""
        if not self.prompt_bank:
            return []
        query = self.embed([prompt])[0].pooled
        names = self.known_prompts
        sims = np.stack([self.prompt_bank[p].pooled for p in names]) @ query
        order = np.argsort(-sims)[:n]
        return [(names[i], float(sims[i])) for i in order]

    def check_prompt(self, prompt: str, force: bool = False) -> tuple[str, list[str]]:
        """Normalise a prompt -> (text, warnings).

        Raises PromptError when it is empty or too long (options.check_prompt_text), or when it
        names nothing the model knows (cosine similarity to every known prompt below
        MIN_PROMPT_SIMILARITY) unless `force`: a model asked for "banana" would otherwise return
        whatever its nearest target looks like.
        """
        check_prompt_text(prompt)
        text = normalise_prompt(str(prompt))
        warnings = []
        if self.prompt_bank and text not in self.prompt_bank:
            near = self.nearest_prompts(text)
            if near and near[0][1] < MIN_PROMPT_SIMILARITY:
                listed = ", ".join(f"'{p}' ({s:.2f})" for p, s in near)
                if not force:
                    raise PromptError(
                        f"prompt '{text}' names nothing this model was trained to find (nearest known prompts, "
                        f"cosine similarity: {listed}; at least {MIN_PROMPT_SIMILARITY:.2f} is needed); "
                        "rephrase it, or force it (--force-prompt, or 'force prompt' in the panel)")
                warnings.append(
                    f"prompt '{text}' is far from everything the model was trained on (forced); nearest known "
                    f"prompts (cosine similarity): {listed}. Results may be meaningless."
                )
        return text, warnings

    # -- 2D core --------------------------------------------------------------------------
    def _generator(self, seed: int) -> torch.Generator:
        return sampling_generator(self.device, seed)

    @torch.inference_mode()
    def predict_batch(self, slices01: np.ndarray, embedding: PromptEmbedding, generator: torch.Generator,
                      return_attention: bool = False, stage_times: dict | None = None, out_hw=None, prior=None):
        """slices01: n x H x W, or n x C x H x W with 2.5D context, float32 in [0, 1]
        -> (probabilities n x out_h x out_w float32, attention).

        A 2D batch given to a context model has its neighbours replicated from the slice (what a
        single-slice image gives). Slices are resized to the network size and the probabilities
        resized to out_hw (default: the input's H x W). attention: list per layer of (counts,
        probabilities, stride, tau, query bits or None, tokens per query) with n x G x G tensors on
        CPU, or None.
        prior: an optional network.sampling.PointPrior for the n slices ("look here"); None leaves
        every output exactly as without it.
        """
        channels = self.model.cfg.in_channels
        if slices01.ndim == 3:
            slices01 = slices01[:, None]
        if slices01.shape[1] != channels:
            if slices01.shape[1] != 1:
                raise BoltzformerError(f"the model takes {channels} input channels, got {slices01.shape[1]}")
            slices01 = np.repeat(slices01, channels, axis=1)
        n, _, h, w = slices01.shape
        size = self.model.cfg.image_size
        x = torch.from_numpy(np.ascontiguousarray(slices01, dtype=np.float32)).to(self.device, non_blocking=True)
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=(h > size or w > size))
        tokens, valid, pooled = batch_embeddings([embedding] * n, self.model.cfg.max_text_tokens, self.device)
        use_bf16 = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = self.model(x, tokens, valid, pooled, generator=generator, return_attention=return_attention,
                             stage_times=stage_times, prior=prior)
        prob = torch.sigmoid(out["logits"].float())
        out_hw = tuple(out_hw or (h, w))
        if out_hw != (size, size):
            prob = F.interpolate(prob, size=out_hw, mode="bilinear", align_corners=False)
        attention = None
        if return_attention:
            grid = size // self.model.cfg.finest_stride  # heatmaps at the finest token resolution
            attention = []
            for rec in out["attention"]:
                c = F.interpolate(rec["counts"][:, None].float(), size=(grid, grid), mode="nearest")[:, 0]
                p = rec["probabilities"].float() * rec["probabilities"][0].numel()  # uniform == 1
                p = F.interpolate(p[:, None], size=(grid, grid), mode="nearest")[:, 0]
                bits = rec.get("query_bits")
                if bits is not None:  # integer nearest upsampling: each token repeated over its cells
                    f = grid // bits.shape[-1]
                    bits = bits.repeat_interleave(f, 1).repeat_interleave(f, 2).cpu()
                attention.append((c.cpu(), p.cpu(), rec["stride"], rec["tau"], bits, rec["tokens_per_query"]))
        return prob[:, 0].cpu().numpy(), attention

    def _to_network_size(self, slices01: np.ndarray, chunk: int = 32) -> np.ndarray:
        """Z x H x W -> Z x S x S float32 (S = the network size), resized as predict_batch would."""
        size = self.model.cfg.image_size
        z, h, w = slices01.shape
        if (h, w) == (size, size):
            return slices01
        out = np.empty((z, size, size), np.float32)
        for c0 in range(0, z, chunk):
            x = torch.from_numpy(np.ascontiguousarray(slices01[c0 : c0 + chunk], dtype=np.float32))[:, None]
            out[c0 : c0 + chunk] = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                                 antialias=(h > size or w > size))[:, 0].numpy()
        return out

    # -- volumes --------------------------------------------------------------------------
    def default_batch_size(self) -> int:
        return 32 if self.device.type in ("cuda", "mps") else 8

    def segment_volume(self, volume: Volume, prompt: str, **kwargs) -> SegmentationResult:
        gen = self.iter_segment(volume, prompt, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def iter_segment(
        self,
        volume: Volume,
        prompt: str,
        *,
        window: str | None = None,
        modality: str | None = None,
        slices: tuple[int, int] | None = None,
        runs: int = 1,
        seed: int = 0,
        threshold: float = 0.5,
        min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3,
        batch_size: int | None = None,
        return_attention: bool = False,
        should_stop: Callable[[], bool] | None = None,
        stage_times: dict | None = None,
        fp_reduction: bool = True,
        min_nodule_score: float | None = None,
        force_prompt: bool = False,
        prior=None,
    ) -> Generator[Progress, None, SegmentationResult]:
        """Segment every slice (or slices [start, stop)) of `volume` for `prompt`.

        runs > 1 repeats inference with seeds seed, seed+1, ... and returns the mean probability
        and the per-voxel variance (uncertainty). should_stop is polled between batches; when it
        returns True the result comes back with complete=False. The volume is segmented in its
        canonical axial orientation (boltzformer.orientation) and every output is mapped back
        to its grid. min_nodule_score: with fp_reduction, drop candidates whose 3D classifier
        score is below it (None: the threshold shipped with the classifier, which drops nothing).
        fp_reduction: the 3D false-positive filter for lung prompts on HU CT
        (boltzformer.fp_filter). force_prompt: run a prompt that names nothing known. prior: a
        boltzformer.look_here.ClickPrior pulling the sampling toward a clicked voxel (None: none).
        """
        t_start = time.perf_counter()
        timings = {}
        text, warnings = self.check_prompt(prompt, force=force_prompt)
        if runs < 1:
            raise BoltzformerError("runs must be at least 1")
        if not 0.0 <= threshold <= 1.0:
            raise BoltzformerError("threshold must be between 0 and 1")
        # Work on the canonical axial grid (the orientation the network was trained in); every
        # output goes back to the input grid at the end.
        frame, reo, orientation_warnings = to_canonical(volume)
        warnings += orientation_warnings
        z = volume.shape[0]
        start, stop = (0, z) if slices is None else (max(0, slices[0]), min(z, slices[1]))
        if start >= stop:
            raise BoltzformerError(f"slice range {slices} selects no slice of a volume with {z} slices")
        if (start, stop) != (0, z) and not reo.keeps_slices:
            raise BoltzformerError("a slice range needs an axially acquired volume; this one is "
                                   f"{reo.describe()}: segment all slices instead")
        input_range = (start, stop)
        if not reo.keeps_slices:
            start, stop = 0, frame.shape[0]
        elif reo.flip[2]:
            start, stop = z - stop, z - start
        modality = intensity.normalise_modality(modality or intensity.detect_modality(volume))
        offset = intensity.shifted_hu_offset(frame.array) if modality == "CT" else 0
        if offset:  # unsigned CT without its rescale intercept: bring it back to HU
            frame = frame.with_array(frame.array.astype(np.float32) - offset)
            warnings.append(f"the values look like Hounsfield units + {offset} (air near 0, soft tissue near "
                            f"{offset + 40}); {offset} was subtracted. Check the file's rescale intercept.")
        # 2.5D context: prepare the neighbours a few mm beyond the range too.
        offsets = self.model.cfg.context_offsets_mm
        z_mm = frame.spacing_mm[2]
        margin = context_margin(z_mm, offsets) if frame.shape[0] > 1 else 0
        lo, hi = max(0, start - margin), min(frame.shape[0], stop + margin)
        t = time.perf_counter()
        prepared, info = intensity.prepare_slices(frame.array[lo:hi], modality=modality, window=window, prompt=text)
        warnings += info.get("warnings", [])
        window = info.get("window", window)  # None when the CT was not in HU and windowing was skipped
        if offsets:  # resize each slice once, not once per context channel that uses it
            prepared = self._to_network_size(prepared)
        timings["preprocess"] = time.perf_counter() - t
        embedding = self.embed([text])[0]
        # the click's in-plane position as fractions of the canonical slice (any network size)
        click_yx = None if prior is None else prior.yx_fraction(reo, volume.shape, frame.shape)
        n = stop - start
        bs = batch_size or self.default_batch_size()
        shape = frame.shape
        mean = np.zeros(shape, np.float32)
        m2 = np.zeros(shape, np.float32) if runs > 1 else None  # Welford's sum of squares
        att = None
        total = n * runs
        done = 0
        timings["inference"] = 0.0
        complete = True
        for run in range(runs):
            generator = self._generator(seed + run)
            want_att = return_attention and run == 0
            for b0 in range(0, n, bs):
                if should_stop is not None and should_stop():
                    complete = False
                    break
                b1 = min(n, b0 + bs)
                t = time.perf_counter()
                index = np.arange(start + b0, start + b1) - lo
                batch = context_stack(prepared, index, z_mm, offsets) if offsets else prepared[index]
                point = None if prior is None else prior.point_prior(b1 - b0, click_yx)
                prob, layers = self.predict_batch(batch, embedding, generator, want_att, stage_times,
                                                  out_hw=frame.shape[1:], prior=point)
                timings["inference"] += time.perf_counter() - t
                sl = slice(start + b0, start + b1)
                if runs == 1:
                    mean[sl] = prob
                else:  # running mean and variance across sampling seeds
                    delta = prob - mean[sl]
                    mean[sl] += delta / (run + 1)
                    m2[sl] += delta * (prob - mean[sl])
                if want_att:
                    att = self._store_attention(att, layers, b0, n, start, frame.shape[1:])
                done += b1 - b0
                yield Progress(done, total, time.perf_counter() - t_start)
            if not complete:
                break
        t = time.perf_counter()
        uncertainty = None if m2 is None else m2 / runs
        result = SegmentationResult(
            volume=volume, prompt=text, probabilities=_to_input(reo, mean), mask=None, threshold=threshold,
            min_lesion_mm3=min_lesion_mm3, slices=input_range, runs=runs,
            uncertainty=None if uncertainty is None else _to_input(reo, uncertainty),
            attention=_attention_to_input(att, reo, frame), window=window, modality=modality, warnings=warnings,
            # slices_done - slices[0] = slices finished (on a z-flipped input they are the last ones)
            timings_s=timings, complete=complete, slices_done=input_range[0] + min(done, n), frame=frame,
            reorientation=reo, fp_reduction=fp_reduction, min_nodule_score=min_nodule_score,
        )
        result.rethreshold(threshold)
        timings["postprocess"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        return result

    def _store_attention(self, att, layers, b0, n, start, hw):
        if att is None:
            num_layers = len(layers)
            g = layers[0][0].shape[-1]
            q = self.model.cfg.num_queries
            has_bits = layers[0][4] is not None
            bits_dtype = np.uint8 if q <= 8 else np.uint16 if q <= 16 else np.uint32 if q <= 32 else np.uint64
            att = AttentionMaps(
                counts=np.zeros((num_layers, n, g, g), np.float16),
                probabilities=np.zeros((num_layers, n, g, g), np.float16),
                strides=[rec[2] for rec in layers], temperatures=[rec[3] for rec in layers],
                tokens_per_query=[rec[5] for rec in layers], slice_start=start,
                grid_scale_yx=(hw[0] / g, hw[1] / g), num_queries=q,
                query_bits=np.zeros((num_layers, n, g, g), bits_dtype) if has_bits else None,
            )
        for i, (c, p, _, _, bits, _) in enumerate(layers):
            att.counts[i, b0 : b0 + c.shape[0]] = c.numpy().astype(np.float16)
            att.probabilities[i, b0 : b0 + p.shape[0]] = p.numpy().astype(np.float16)
            if att.query_bits is not None and bits is not None:
                att.query_bits[i, b0 : b0 + bits.shape[0]] = bits.numpy().astype(att.query_bits.dtype)
        return att
