"""Segmenter: the thin predictor users call (CLI, napari plugin, Python).

    seg = Segmenter.from_pretrained()            # bundled weights, best local device
    result = seg.segment_volume(volume, "lung nodule")
    result.mask, result.probabilities, result.lesions

`iter_segment` is the same work as a generator that yields `Progress` after every batch of
slices (and a first one, at 0 slices, carrying the warnings known before the network runs) and
returns the `SegmentationResult`: GUIs run it in a worker thread and can stop it between batches.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np
import torch
from torch.nn import functional as F

from . import fp_filter, intensity, polarity_filter, runtime
from . import planes as planes_mod  # `planes` is iter_segment's argument
from .checkpoint import load_model
from .context import context_margin, context_stack
from .devices import fast_layout, resolve_device, sampling_generator
from .errors import BoltzformerError, InputError, PromptError
from .io import Volume, require_finite
from .network.boltzformer import BoltzFormer
from .network.graphs import GraphedNetwork
from .network.text import PromptEmbedding, SentenceEncoder, batch_embeddings, normalise_prompt
from .options import (DEFAULT_BATCH_ACCELERATOR, DEFAULT_BATCH_CPU, DEFAULT_MIN_LESION_MM3, DEFAULT_MIRROR,
                      DEFAULT_PLANES, check_prompt_text, check_run_options)
from .orientation import to_canonical
from .synth.prompts import TARGETS, target_of_prompt
from .results import AttentionMaps, SegmentationResult, attention_to_input, to_input

# A prompt whose sentence embedding has a lower cosine similarity than this to every known prompt
# names nothing the model was trained for, and is refused unless forced. Measured on the bundled
# model (benchmarks/prompt_similarity.py): phrasings of known targets score >= 0.59, unrelated
# words and sentences <= 0.49.
MIN_PROMPT_SIMILARITY = 0.54


@dataclass
class Progress:
    slices_done: int
    slices_total: int  # slices x runs (with three planes, the coronal and sagittal slices too)
    elapsed_s: float
    # the warnings about the input and the options, known before the network runs: the first
    # Progress (0 slices done) carries them, so that a long run is not silent about them till its end
    warnings: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.slices_done / max(1, self.slices_total)

    @property
    def eta_s(self) -> float:
        if self.slices_done == 0:
            return math.nan
        return self.elapsed_s / self.slices_done * (self.slices_total - self.slices_done)


def _canonical_range(volume: Volume, slices, warnings: list):
    """(frame, reorientation, input range, range on the frame) for a slice range of ``volume``.

    frame: the canonical axial volume (to_canonical); ranges are half-open slice indices [start,
    stop). A volume acquired sagittally or coronally has no axial slices of its own: it is
    processed whole, and a range on it is an error.
    """
    frame, reo, orientation_warnings = to_canonical(volume)
    warnings += orientation_warnings
    z = volume.shape[0]
    start, stop = (0, z) if slices is None else (max(0, slices[0]), min(z, slices[1]))
    if start >= stop:
        asked = "the volume" if slices is None else f"slice range {slices[0]}:{slices[1]}"
        raise InputError(volume.path, f"{asked} selects no slice of its {z} slices")
    if slices is not None and tuple(slices) != (start, stop):
        warnings.append(f"slice range {slices[0]}:{slices[1]} reaches past the volume's {z} slices; "
                        f"slices {start}:{stop} were segmented")
    if (start, stop) != (0, z) and not reo.keeps_slices:
        raise BoltzformerError("a slice range needs an axially acquired volume; this one is "
                               f"{reo.describe()}: segment all slices instead")
    input_range = (start, stop)
    if not reo.keeps_slices:
        start, stop = 0, frame.shape[0]
    elif reo.flip[2]:
        start, stop = z - stop, z - start
    return frame, reo, input_range, (start, stop)


def _finished_input_range(reo, input_range: tuple[int, int], done: int) -> tuple[int, int] | None:
    """The input slices [start, stop) among `input_range` whose canonical axial slices were the
    first `done` processed: the last ones on a z-flipped input; None for a sagittal or coronal
    input (its axial slices are not slices of its own)."""
    if not reo.keeps_slices:
        return None
    start, stop = input_range
    return (stop - done, stop) if reo.flip[2] else (start, start + done)


def _undo_shifted_hu(frame: Volume, modality: str, warnings: list) -> Volume:
    """Unsigned CT stored without its rescale intercept (HU + 1024) brought back to HU, with a warning."""
    offset = intensity.shifted_hu_offset(frame.array) if modality == "CT" else 0
    if not offset:
        return frame
    warnings.append(f"the values look like Hounsfield units + {offset} (air near 0, soft tissue near "
                    f"{offset + 40}); {offset} was subtracted. Check the file's rescale intercept.")
    return frame.with_array(frame.array.astype(np.float32) - offset)


def _warn_constant(frame: Volume, warnings: list) -> None:
    """A blank image (every voxel the same value) has nothing to segment: say so rather than return
    an empty mask that reads as "no lesion"."""
    a = frame.array
    value = a.flat[0]
    if a.size == 0 or np.any(a[0] != value):  # almost every scan varies within its first slice
        return
    if np.all(a == value):
        warnings.append(f"every voxel of the image is {float(value):g}: there is nothing to segment (a blank "
                        "series, or pixel data lost on export?)")


# Beyond this magnitude a voxel is no intensity (a fill value such as float32's largest): the
# float32 steps of the pipeline overflow on it
MAX_VOXEL_MAGNITUDE = 1e30


def _refuse_bad_values(volume: Volume) -> None:
    """NaN or infinite voxels (io.require_finite: they would empty the mask silently), and voxels
    beyond MAX_VOXEL_MAGNITUDE, in one min/max pass over a float volume; an integer volume can
    hold neither."""
    a, where = volume.array, volume.path or "the image"
    if a.dtype.kind != "f":
        return
    lo, hi = float(np.min(a)), float(np.max(a))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        require_finite(a, where)  # counts them and says so
    if max(abs(lo), abs(hi)) > MAX_VOXEL_MAGNITUDE:
        raise InputError(where, f"has voxels of {lo if abs(lo) > abs(hi) else hi:g}: no CT or MR intensity is that "
                                "large (a fill value?); replace them first")


def _warn_implausible(frame: Volume, warnings: list) -> None:
    """Inputs the weights cannot have learnt from: very coarse pixels or slices, a tiny matrix, an
    image of two values (a mask?). It runs, and says so, rather than return lesions that read as
    findings."""
    dx, dy, dz = frame.spacing_mm
    z, h, w = frame.shape
    if max(dx, dy) > 3.0:
        warnings.append(f"its pixels are {max(dx, dy):.1f} mm: the model learnt from 0.5-2 mm pixels, and lesions "
                        "of a few mm are a pixel or less here; treat the result as unverified")
    if z > 1 and dz > 10.0:
        warnings.append(f"its slices are {dz:.1f} mm apart: 3D measures and the 3D filter are coarse at that spacing")
    if min(h, w) < 32:
        warnings.append(f"its slices are {h} x {w} pixels: too small an image for the model to see anatomy")
    a = frame.array
    if np.unique(a[:: max(1, a.shape[0] // 32), ::4, ::4]).size == 2:  # a strided view: no copy of the scan
        warnings.append("the image holds only two values: a mask or a thresholded image, not a scan?")


def _warn_untrained_sequence(volume: Volume, prompt: str, rules: str, modality: str, warnings: list) -> None:
    """MS lesions (`rules`: Segmenter.rules_prompt) on a series the file calls T1-weighted: the
    bundled model never saw one (on 20 held-out T1 slices it found almost nothing; model card,
    Dice by sequence)."""
    if modality != "MR" or not polarity_filter.applies(rules, modality):
        return
    sequence, said = intensity.stated_mr_sequence(volume)
    if sequence == "T1":
        warnings.append(f"'{prompt}' on a T1-weighted series ({said}): the model learnt MS lesions on FLAIR images "
                        "and finds almost none on T1 (model card: held-out Dice by sequence); segment the FLAIR "
                        "or T2 series of this study instead")


class _Sweep:
    """What the runs over n slices accumulate on the canonical grid (z, y, x): the running mean
    probability and, for runs > 1, Welford's sum of squares across sampling seeds. extra: slices
    of the coronal and sagittal passes per run (three planes), counted in the progress only."""

    def __init__(self, shape, n: int, runs: int, extra: int = 0):
        self.n, self.runs = n, runs
        self.mean = np.zeros(shape, np.float32)
        self.m2 = np.zeros(shape, np.float32) if runs > 1 else None
        self.attention: AttentionMaps | None = None
        self.done = 0  # axial slices processed, all runs together
        self.steps, self.total_steps = 0, (n + extra) * runs  # slices of every plane, for the progress
        self.complete = True

    def add(self, run: int, sl: slice, prob: np.ndarray) -> None:
        if self.runs == 1:
            self.mean[sl] = prob
        else:  # running mean and variance across sampling seeds
            delta = prob - self.mean[sl]
            self.mean[sl] += delta / (run + 1)
            self.m2[sl] += delta * (prob - self.mean[sl])


class Segmenter:
    """A trained BoltzFormer on a device, with its known prompts."""

    def __init__(self, model: BoltzFormer, prompt_bank: dict[str, PromptEmbedding], device="auto", info=None,
                 cuda_graphs: bool | None = None):
        """cuda_graphs: on a CUDA device, replay the network's forward pass as CUDA graphs
        (network/graphs.py); None reads BOLTZFORMER_CUDA_GRAPHS (on unless it is "0")."""
        self.device = resolve_device(device)
        self.model = fast_layout(model.to(self.device), self.device).eval()  # the encoder's and PiGMA's convolutions
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("BOLTZFORMER_CUDA_GRAPHS", "1") != "0"
        self._graphs = GraphedNetwork(self.model, self.device, enabled=cuda_graphs)
        self.prompt_bank = dict(prompt_bank)
        self.info = info or {}
        self._encoder = SentenceEncoder(model.cfg.max_text_tokens)
        self._encoder.cache.update(self.prompt_bank)
        self._bank_layout: bool | None = None  # see _padded_bank

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source=None, device="auto", cuda_graphs: bool | None = None,
                        **inference_options) -> "Segmenter":
        """source: None (bundled), a .safetensors file, a folder, or "hf:owner/name" (Hugging Face).

        inference_options: sampling ('boltzmann', 'uniform', 'mask2former', 'dense'),
        token_ratio, tau0, attention_impl ('auto', 'gather', 'dense'). cuda_graphs: see __init__.
        """
        model, bank, meta, src = load_model(source)
        if inference_options:
            model.set_inference_options(**inference_options)
        info = {k: v for k, v in meta.items() if k != "prompts"}
        info["weights_path"] = str(src.weights_path)
        info["weights_source"] = src.description
        return cls(model, bank, device=device, info=info, cuda_graphs=cuda_graphs)

    def release_memory(self) -> None:
        """Give cached accelerator memory back (after an out-of-memory error, say)."""
        if self.device.type == "cuda":
            self._graphs.clear()  # their memory pool too
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
        """Frozen-encoder embeddings: the weights' cached ones for the prompts they were trained
        on; a new prompt is encoded, in the token layout of the cached ones (see _padded_bank)."""
        texts = [normalise_prompt(p) for p in prompts]
        for text in dict.fromkeys(texts):
            if text not in self._encoder.cache and self._padded_bank():
                nearest = self._nearest_known(self._encoder.encode([text])[0].pooled, 1)[0][0]
                self._encoder.cache[text] = self._encoder.encode_padded(text, len(self.prompt_bank[nearest].tokens))
        return self._encoder.encode(texts)

    def _padded_bank(self) -> bool:
        """Whether the cached prompts hold [SEP] and padding rows besides their word pieces (the
        bundled weights do: they were trained before the encoder kept word pieces only). A new
        prompt is then given the same layout, as its nearest known prompt has it, instead of a
        form the network never saw (on a real FLAIR slice the two layouts of one prompt gave
        masks of Dice 0.976)."""
        if self._bank_layout is None:
            self._bank_layout = any(len(e.tokens) > self._encoder.word_pieces(p) for p, e in self.prompt_bank.items())
        return self._bank_layout

    def nearest_prompts(self, prompt: str, n: int = 3) -> list[tuple[str, float]]:
        """Known prompts closest to `prompt` by cosine similarity of sentence embeddings."""
        if not self.prompt_bank:
            return []
        return self._nearest_known(self.embed([prompt])[0].pooled, n)

    def _nearest_known(self, pooled: np.ndarray, n: int) -> list[tuple[str, float]]:
        """The `n` known prompts whose pooled embeddings are closest to `pooled` (cosine)."""
        names = self.known_prompts
        sims = np.stack([self.prompt_bank[p].pooled for p in names]) @ pooled
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
                        "rephrase it, or force it (--force-prompt; 'force prompt' in the panel; "
                        "force_prompt=True in Python)")
                warnings.append(
                    f"prompt '{text}' is far from everything the model was trained on (forced); nearest known "
                    f"prompts (cosine similarity): {listed}. Results may be meaningless."
                )
        return text, warnings

    def trained_modality(self, text: str) -> str | None:
        """The modality ("CT" or "MR") the target a prompt names was trained on: its own target
        when it is a known phrasing, else that of the nearest known prompt when it is near enough
        (MIN_PROMPT_SIMILARITY); None for a prompt that names nothing known."""
        target = target_of_prompt(self.rules_prompt(text)[0])
        return TARGETS[target].modality if target in TARGETS else None

    def rules_prompt(self, text: str) -> tuple[str, float | None]:
        """(the phrasing whose target's rules apply to prompt `text`, its cosine similarity): `text`
        itself (None) when it names a known target, or when nothing known is near enough; else its
        nearest known prompt. 'lesion' is nearest 'ms lesion' (0.80), and the network, given it,
        finds what 'ms lesion' finds: its filters (MS contrast polarity) must apply as well."""
        if target_of_prompt(text) is not None or not self.prompt_bank:
            return text, None
        near = self.nearest_prompts(text, n=1)
        if near and near[0][1] >= MIN_PROMPT_SIMILARITY and target_of_prompt(near[0][0]) is not None:
            return near[0][0], near[0][1]
        return text, None

    def _modality_of(self, volume: Volume, text: str, warnings: list) -> str:
        """The modality of a volume whose caller did not give one: the file's, else what its
        values show (intensity.detect_modality). Values that cannot tell (8-bit grey levels, 0-1:
        no HU, nothing MR-only either) with no modality in the file take the one the prompt's
        target was trained on: these weights learnt CT targets on 8-bit and 0-1 CT scaled as CT,
        and an MR normalisation fed them other values (model card, training data)."""
        detected = intensity.detect_modality(volume)
        if detected != "MR" or intensity.stated_modality(volume):
            return detected
        trained = self.trained_modality(text)
        if trained == "CT" and intensity.classify_units(volume.array) in ("8bit", "normalized"):
            warnings.append(f"{volume.path or 'the image'}: its file does not say CT or MR and its values (8-bit grey "
                            f"levels or 0-1) cannot tell; taken as CT, on which '{text}' was learnt (give the "
                            "modality with --modality or the panel's Modality box to choose otherwise)")
            return "CT"
        return detected

    def _warn_modality(self, text: str, modality: str, warnings: list) -> None:
        """A target asked for on the other modality ("lung nodule" on MR): the model never saw one."""
        trained = self.trained_modality(text)
        if trained and modality in ("CT", "MR") and trained != modality:
            warnings.append(f"untested on {modality}: the model learnt '{text}' on {trained} images only and was never "
                            f"trained or tested on it in {modality}; treat the result as unverified")

    # -- 2D core --------------------------------------------------------------------------
    def _generator(self, seed: int) -> torch.Generator:
        return sampling_generator(self.device, seed)

    @torch.inference_mode()
    def predict_batch(self, slices01: np.ndarray, embedding: PromptEmbedding, generator: torch.Generator,
                      return_attention: bool = False, stage_times: dict | None = None, out_hw=None, prior=None,
                      mirror: bool = False):
        """slices01: n x H x W, or n x C x H x W with 2.5D context, float32 in [0, 1]
        -> (probabilities n x out_h x out_w float32, attention).

        mirror: also run the slices mirrored left-right and average the two probabilities (the
        second mirrored back). The network trained with random left-right flips, so the mirrored
        slice is a second view of a kind it knows; both passes draw the same sampling noise, so
        mirroring the input mirrors the output (up to float rounding). The attention is the first
        pass's, and the generator ends where it would without the mirror.

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
        x = torch.from_numpy(np.ascontiguousarray(slices01, dtype=np.float32))
        antialias = h > size or w > size
        if (h, w) != (size, size) and self.device.type == "mps":  # MPS has no antialiased resize before torch 2.7
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        # non_blocking only where it is safe to read the host array later (CUDA); on MPS it is not
        x = x.to(self.device, non_blocking=self.device.type == "cuda")
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        tokens, valid, pooled = batch_embeddings([embedding] * n, self.model.cfg.max_text_tokens, self.device)
        use_bf16 = self.device.type == "cuda"

        def logits_of(image, prior, want_attention=False):
            """The network's logits (and its output dict when attention is asked for): replayed as a
            CUDA graph when nothing is asked of the pass but its logits (network/graphs.py)."""
            if not want_attention and stage_times is None and prior is None:
                replayed = self._graphs.run(image, tokens, valid, pooled, generator)
                if replayed is not None:
                    return replayed, None
            # no autocast context at all off CUDA: torch < 2.5 refuses an 'mps' autocast even when disabled
            with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
                out = self.model(image, tokens, valid, pooled, generator=generator, return_attention=want_attention,
                                 stage_times=stage_times, prior=prior)
            return out["logits"], out

        noise = generator.get_state() if mirror else None
        logits, out = logits_of(x, prior, return_attention)
        prob = torch.sigmoid(logits.float())
        if mirror:
            after = generator.get_state()
            generator.set_state(noise)  # the same draws as the first pass: an exactly mirror-symmetric mean
            flipped, _ = logits_of(x.flip(-1), None if prior is None else prior.mirrored())
            prob = (prob + torch.sigmoid(flipped.float()).flip(-1)) / 2
            generator.set_state(after)  # later batches draw as they would without the mirror
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
        return DEFAULT_BATCH_ACCELERATOR if self.device.type in ("cuda", "mps") else DEFAULT_BATCH_CPU

    def segment_volume(self, volume: Volume, prompt: str, **kwargs) -> SegmentationResult:
        """Segment `volume` (a boltzformer.io.Volume, array (z, y, x)) for `prompt`, one text;
        the options are iter_segment's (slices, runs, seed, threshold, mirror, planes, ...).
        Runs to the end; iter_segment yields progress on the way."""
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
        nodule_detector: bool = False,
        mirror: bool = DEFAULT_MIRROR,
        planes: str = DEFAULT_PLANES,
    ) -> Generator[Progress, None, SegmentationResult]:
        """Segment every slice (or slices [start, stop)) of `volume` for `prompt`.

        runs > 1 repeats inference with seeds seed, seed+1, ... and returns the mean probability
        and the per-voxel variance (uncertainty). should_stop is polled between batches; when it
        returns True the result comes back with complete=False. The volume is segmented in its
        canonical axial orientation (boltzformer.orientation) and every output is mapped back
        to its grid. min_nodule_score: with fp_reduction, drop candidates whose 3D classifier
        score is below it (None: the threshold shipped with the classifier's weights).
        fp_reduction: the false-positive filters: 3D, for lung prompts on HU CT (boltzformer.fp_filter);
        contrast polarity, for MS lesion prompts on MR (boltzformer.polarity_filter). force_prompt: run a prompt that names nothing known. prior: a
        boltzformer.look_here.ClickPrior pulling the sampling toward a clicked voxel (None: none).
        nodule_detector: with fp_reduction, lung nodule prompts on HU CT take their lesions from the
        3D nodule detector (boltzformer.nodule_detector; off by default, see the model card).
        mirror: average every slice's probabilities with those of the slice mirrored left-right
        (test-time augmentation: a second network pass per slice; see predict_batch and the model
        card). planes: "axial"; "three" (the coronal and sagittal slices too, the median of the
        three planes per voxel); "auto" (three on nearly isotropic 3D MR, else axial); see
        boltzformer.planes. The result's ``planes`` says which ran.
        """
        t_start = time.perf_counter()
        timings = {}
        if not isinstance(volume, Volume):
            raise TypeError(f"segment a boltzformer.io.Volume, not {type(volume).__name__}: read a file with "
                            "read_volume(path), wrap an array with Volume(array_zyx, spacing_mm=(x, y, z)), or a "
                            "SimpleITK image with Volume.from_sitk(image)")
        modality = check_run_options(
            prompt=prompt, runs=runs, seed=seed, slices=slices, batch_size=batch_size, threshold=threshold,
            min_lesion_mm3=min_lesion_mm3, min_nodule_score=min_nodule_score, modality=modality,
            flags=dict(return_attention=return_attention, fp_reduction=fp_reduction, force_prompt=force_prompt,
                       nodule_detector=nodule_detector, mirror=mirror))
        text, warnings = self.check_prompt(prompt, force=force_prompt)
        rules, similarity = self.rules_prompt(text)
        if rules != text:
            filtered = target_of_prompt(rules) in fp_filter.LUNG_TARGETS + polarity_filter.BRIGHT_TARGETS
            warnings.append(f"'{text}' is not a phrasing the model was trained on; its nearest known prompt is "
                            f"'{rules}' (cosine similarity {similarity:.2f})" + (
                                ", whose false-positive filter applies" if filtered else "")
                            + "; name the target to be sure of it")
        planes_mod.check_planes(planes)
        _refuse_bad_values(volume)
        # 1. the canonical axial grid (the orientation the network was trained in) and the range on it
        frame, reo, input_range, (start, stop) = _canonical_range(volume, slices, warnings)
        # 2. intensities: modality, CT stored as HU + 1024 brought back, window or normalisation
        modality = intensity.normalise_modality(modality or self._modality_of(volume, text, warnings))
        frame = _undo_shifted_hu(frame, modality, warnings)
        _warn_constant(frame, warnings)
        _warn_implausible(frame, warnings)
        self._warn_modality(text, modality, warnings)
        _warn_untrained_sequence(volume, text, rules, modality, warnings)
        t = time.perf_counter()
        native, lo, window = self._prepare(frame, start, stop, modality, window, text, warnings)
        offsets = self.model.cfg.context_offsets_mm
        prepared = self._to_network_size(native) if offsets else native  # each slice resized once
        three = planes_mod.choose(planes, modality, (stop - start,) + frame.shape[1:], frame.spacing_mm, warnings)
        cuts = [planes_mod.PlaneCut(p, (stop - start,) + frame.shape[1:], frame.spacing_mm)
                for p in planes_mod.CUT_PLANES] if three else []
        timings["preprocess"] = time.perf_counter() - t
        # 3. the network over the slices, `runs` times: mean, variance, attention maps
        embedding = self.embed([text])[0]
        # the click's in-plane position as fractions of the canonical slice (any network size)
        click_yx = None if prior is None else prior.yx_fraction(reo, volume.shape, frame.shape)
        timings["inference"] = 0.0
        sweep = _Sweep(frame.shape, stop - start, runs, extra=sum(c.n_slices for c in cuts))
        yield Progress(0, sweep.total_steps, time.perf_counter() - t_start, tuple(warnings))
        with runtime.network_heap():  # the tuned heap for the network, given back after it
            yield from self._run_slices(sweep, prepared, lo, start, frame, embedding, click_yx, prior, seed,
                                        batch_size or self.default_batch_size(), return_attention, should_stop,
                                        stage_times, timings, t_start, mirror, cuts, native[start - lo : stop - lo])
        del native, prepared  # the windowed scan (float32, twice the CT's int16): post-processing has its peak
        if cuts and not sweep.complete:
            warnings.append("stopped before the coronal and sagittal passes ended: the probabilities are the "
                            "axial pass's")
        # 4. back on the input's grid; threshold, components, lesion table, false-positive filter
        t = time.perf_counter()
        uncertainty = None if sweep.m2 is None else sweep.m2 / runs
        done = min(sweep.done, sweep.n)  # axial slices finished
        result = SegmentationResult(
            volume=volume, prompt=text, probabilities=to_input(reo, sweep.mean), mask=None, threshold=threshold,
            min_lesion_mm3=min_lesion_mm3, slices=input_range, runs=runs,
            uncertainty=None if uncertainty is None else to_input(reo, uncertainty),
            attention=attention_to_input(sweep.attention, reo, frame), window=window, modality=modality,
            warnings=warnings,
            timings_s=timings, complete=sweep.complete, slices_done=done,
            finished_slices=None if sweep.complete else _finished_input_range(reo, input_range, done),
            frame=frame, reorientation=reo, fp_reduction=fp_reduction, min_nodule_score=min_nodule_score,
            nodule_detector=nodule_detector, mirror=mirror, planes="three" if cuts and sweep.complete else "axial",
            rules_prompt=None if rules == text else rules,
        )
        del sweep, uncertainty  # a reoriented input's result holds copies on its grid: the canonical ones go
        result.rethreshold(threshold)
        timings["postprocess"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        return result

    def _prepare(self, frame: Volume, start: int, stop: int, modality: str, window, text: str, warnings: list):
        """Slices [start, stop) of the canonical frame, and the 2.5D context a few mm beyond, as
        network input -> (prepared (z, H, W) float32 in [0, 1], index of its first slice, window
        used or None)."""
        offsets = self.model.cfg.context_offsets_mm
        margin = context_margin(frame.spacing_mm[2], offsets) if frame.shape[0] > 1 else 0
        lo, hi = max(0, start - margin), min(frame.shape[0], stop + margin)
        # prepare_slices picks the CT window from the prompt when none is given
        # the units and the MR normalisation are the whole volume's, as training had them: a slice
        # range gets the values the whole-volume run gives those slices
        prepared, info = intensity.prepare_slices(frame.array[lo:hi], modality=modality, window=window, prompt=text,
                                                  reference=frame.array)
        warnings += info.get("warnings", [])
        window = info.get("window", window)  # None when the CT was not in HU and windowing was skipped
        return prepared, lo, window

    def _run_slices(self, sweep: "_Sweep", prepared, lo, start, frame, embedding, click_yx, prior, seed, bs,
                    return_attention, should_stop, stage_times, timings, t_start,
                    mirror: bool, cuts=(), native=None) -> Generator[Progress, None, None]:
        """Batches of slices through the network, run after run, into ``sweep``; yields Progress.
        cuts: the coronal and sagittal planes.PlaneCut to run after each run's axial pass, on
        ``native`` (the range's prepared slices, (n, H, W)); the run then adds the median of the
        three planes (the axial pass alone when stopped before the cuts end)."""
        offsets = self.model.cfg.context_offsets_mm
        z_mm = frame.spacing_mm[2]
        n = sweep.n
        for run in range(sweep.runs):
            generator = self._generator(seed + run)
            want_att = return_attention and run == 0
            axial = np.zeros((n,) + frame.shape[1:], np.float32) if cuts else None
            done = 0  # axial slices of this run
            for b0 in range(0, n, bs):
                if should_stop is not None and should_stop():
                    sweep.complete = False
                    break
                b1 = min(n, b0 + bs)
                t = time.perf_counter()
                index = np.arange(start + b0, start + b1) - lo
                batch = context_stack(prepared, index, z_mm, offsets) if offsets else prepared[index]
                point = None if prior is None else prior.point_prior(b1 - b0, click_yx)
                prob, layers = self.predict_batch(batch, embedding, generator, want_att, stage_times,
                                                  out_hw=frame.shape[1:], prior=point, mirror=mirror)
                timings["inference"] += time.perf_counter() - t
                if axial is None:
                    sweep.add(run, slice(start + b0, start + b1), prob)
                else:
                    axial[b0:b1] = prob
                if want_att:
                    if sweep.attention is None:
                        sweep.attention = AttentionMaps.empty(layers, n, start, frame.shape[1:], self.model.cfg.num_queries)
                    sweep.attention.store(layers, b0)
                done = b1
                sweep.done += b1 - b0
                sweep.steps += b1 - b0
                yield Progress(sweep.steps, sweep.total_steps, time.perf_counter() - t_start)
            if axial is not None:
                views = [axial]
                for cut in cuts if sweep.complete else ():
                    view = yield from self._run_cut(cut, native, embedding, generator, bs, sweep, should_stop,
                                                    stage_times, timings, t_start, mirror)
                    if view is None:
                        break
                    views.append(view)
                fused = planes_mod.median_of_three(*views) if len(views) == 3 else axial[:done]
                sweep.add(run, slice(start, start + len(fused)), fused)
            if not sweep.complete:
                break

    def _run_cut(self, cut: "planes_mod.PlaneCut", native: np.ndarray, embedding, generator, bs, sweep: "_Sweep",
                 should_stop, stage_times, timings, t_start, mirror: bool):
        """One coronal or sagittal pass over ``native`` (n, H, W) -> its probabilities on that
        axial grid (n, H, W) float32, or None when stopped; yields Progress."""
        offsets = self.model.cfg.context_offsets_mm
        out = np.zeros(native.shape, np.float32)
        # a context model needs each cut slice's neighbours: the whole stack at the network size
        stack = self._to_network_size(cut.images(native, 0, cut.n_slices)) if offsets else None
        for b0 in range(0, cut.n_slices, bs):
            if should_stop is not None and should_stop():
                sweep.complete = False
                return None
            b1 = min(cut.n_slices, b0 + bs)
            t = time.perf_counter()
            batch = (context_stack(stack, np.arange(b0, b1), cut.slice_spacing_mm, offsets) if offsets
                     else cut.images(native, b0, b1))
            prob, _ = self.predict_batch(batch, embedding, generator, stage_times=stage_times,
                                         out_hw=(cut.side, cut.side), mirror=mirror)
            timings["inference"] += time.perf_counter() - t
            cut.to_axial(prob, out, b0)
            sweep.steps += b1 - b0
            yield Progress(sweep.steps, sweep.total_steps, time.perf_counter() - t_start)
        return out
