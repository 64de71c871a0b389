"""`boltzformer train`: Dice + BCE, AdamW, cosine schedule, checkpoint + resume, logs and a plot.

    boltzformer train --config resources/boltzformer-s.train.json --out runs/retrain [--max-minutes 10]

The config (JSON) records everything needed to retrain the bundled weights: network config
name and overrides, data sizes and seeds, optimiser settings. Training resumes from
`<out>/last.pt` when it exists, so long runs can go in chunks (e.g. 10-minute GPU leases): the
checkpoint holds the weights, the optimiser, the step, the random generators' states (a run in
chunks gives the same weights as one straight run) and the config, which a resumed run must
keep (only RESUME_MAY_CHANGE may differ). It is written at every epoch's end, when
--max-minutes runs out (the command then exits 75: steps are left), and on Ctrl-C or SIGTERM
between two steps.
Outputs: `<out>/log.csv` (one row per epoch: losses, held-out Dice), `<out>/curves.png`,
`<out>/best.safetensors` + `.json` (best score on the synthetic validation split),
`<out>/last.safetensors` + `.json` (the last epoch), `<out>/last.pt` (the checkpoint) and
`<out>/train_config.json` (this leg's config).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..checkpoint import save_model
from ..devices import fast_layout
from ..errors import Terminated, out_of_memory
from ..io import write_text
from ..network.boltzformer import BoltzFormer, build_model, count_parameters
from ..network.config import get_config
from ..network.text import SentenceEncoder, batch_embeddings, normalise_prompt
from ..plots import pyplot, save_figure
from ..postprocess import dice
from ..synth import prompts as vocab
from . import data as data_mod
from .testset import LARGE_AREA, SMALL_AREA

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    model: str = "boltzformer-s"
    model_overrides: dict = field(default_factory=dict)
    seed: int = 0
    synth_train: int = 8000  # synthetic training examples (generated once, cached)
    synth_val: int = 400  # held-out synthetic examples (a different seed)
    real_weight: float = 0.15  # probability that a batch item is a real training case
    # How a real item is drawn: "example" (each equally often, so the many liver slices and MS
    # brain slices crowd out the 13 lung tumours) or "sqrt_group": each (target, has-lesion)
    # group as often as the square root of its size, examples equally often within a group.
    real_sampling: str = "example"
    negative_fraction: float = 0.15
    lesion_fraction: float = 0.75  # share of synthetic batch items whose prompt asks for a lesion (or its absence)
    # Share of positive synthetic lesion items swapped for one whose lesion covers < 0.1 % of the
    # slice (the band the model learns last); negative items are left alone. 0 = uniform draws.
    small_lesion_fraction: float = 0.0
    batch_size: int = 16
    steps: int = 6000
    steps_per_epoch: int = 250
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    grad_clip: float = 1.0
    # BCE weight on lesion pixels: min(background/foreground pixels, this cap) per slice. 1 = plain
    # BCE. Plain BCE lets small-lesion logits saturate at about -20, where neither BCE (diluted
    # over 65k pixels) nor Dice (sigmoid' ~ 0) moves them any more.
    positive_weight_max: float = 1.0
    positive_weight_from_step: int = 0  # step at which the weighting starts (the bundled run: 1000)
    # Each lesion counted once, whatever its size: the lesion pixels of a connected component
    # smaller than this many pixels (at the network's input size) weigh area_ref / area times
    # more in the BCE, at most `component_weight_max` times. 0 = off (each pixel counts once, so
    # a 4 mm nodule weighs 1/25 of a 20 mm one). See component_multipliers.
    component_area_ref_px: float = 0.0
    component_weight_max: float = 10.0
    amp: bool = True  # bf16 autocast on CUDA only
    threads: int = 0  # torch threads on CPU (0 = torch default)
    workers: int = 2  # processes generating synthetic data
    cache_dir: str = ".devdata"  # synthetic example caches (git-ignored)
    real_dir: str | None = None  # folder of the real cases (cases.csv); default: $BOLTZFORMER_REAL_DATA
    split_file: str | None = None  # case_id,split CSV of the real cases; default: data.REAL_SPLIT
    use_real: bool = True  # False: synthetic data only
    # 3D phantom chests with 2.5D context (boltzformer.synth.lung3d): volumes generated, slices
    # drawn per volume, and the share of synthetic batch items taken from them.
    phantom_volumes: int = 0
    phantom_val_volumes: int = 0
    phantom_slices_per_volume: int = 40
    phantom_weight: float = 0.0
    # Share of phantom items that are lesion-free lung slices prompted for a nodule (hard
    # negatives), and how positives are drawn: "slice" (any slice through a nodule: large
    # nodules dominate) or "nodule" (each nodule equally often). See data.phantom_examples.
    phantom_negative_fraction: float = 0.35
    phantom_positive_sampling: str = "slice"
    # Share of items whose context channels are replaced by the slice itself (a 2D input).
    context_dropout: float = 0.15
    # Warm start: a .safetensors file whose matching tensors initialise the network (fine-tuning
    # after an architecture change). Ignored when resuming from <out>/last.pt.
    init_weights: str | None = None
    device: str = "auto"

    @classmethod
    def load(cls, path) -> "TrainConfig":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a training config is a JSON object of options")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{path}: unknown training options {sorted(unknown)}")
        defaults = cls()
        return cls(**{k: _as_option_type(f"{path}: {k}={json.dumps(v)}", k, getattr(defaults, k), v)
                      for k, v in d.items()})

    def check(self, resuming: bool = False) -> None:
        """BoltzformerError for a value no run can use, before any data is made. ``resuming``:
        a checkpoint is there, so init_weights is not read (and need not exist any more)."""
        from ..errors import BoltzformerError

        # synth_val: best.safetensors is chosen on it, so at least one example
        bad = [f"{k}={getattr(self, k)} (at least 1)" for k in ("steps", "steps_per_epoch", "batch_size", "synth_val")
               if getattr(self, k) < 1]
        bad += [f"{k}={getattr(self, k)} (0 or more)" for k in ("lr", "weight_decay", "warmup_steps", "synth_train")
                if not getattr(self, k) >= 0]
        bad += [f"{k}={getattr(self, k)} (between 0 and 1)" for k in
                ("real_weight", "negative_fraction", "lesion_fraction", "small_lesion_fraction", "phantom_weight",
                 "phantom_negative_fraction", "context_dropout") if not 0.0 <= getattr(self, k) <= 1.0]
        if bad:
            raise BoltzformerError(f"training options out of range: {', '.join(bad)}")
        try:
            get_config(self.model, **self.model_overrides)
        except (KeyError, TypeError, ValueError) as exc:
            raise BoltzformerError(f"network {self.model!r} with {self.model_overrides}: {exc}") from None
        if self.init_weights and not resuming and not Path(self.init_weights).is_file():
            raise BoltzformerError(f"{self.init_weights}: init_weights does not exist")
        env = os.environ.get("BOLTZFORMER_REAL_DATA")
        if self.use_real and self.real_dir and not (Path(self.real_dir) / "cases.csv").is_file():
            raise BoltzformerError(f"{self.real_dir}: no cases.csv; set real_dir or use_real=false")
        if self.use_real and not self.real_dir and env and not (Path(env) / "cases.csv").is_file():
            raise BoltzformerError(f"BOLTZFORMER_REAL_DATA={env}: no cases.csv there (the folder of the real cases; a "
                                   "relative path counts from where the command runs); fix it, or set use_real=false")


# A resumed run goes on as it started; only these may differ from the checkpoint's config (more
# steps, another machine: its device, cores and paths).
RESUME_MAY_CHANGE = ("steps", "device", "threads", "workers", "cache_dir", "real_dir", "split_file", "init_weights")
# (real_dir and split_file may move, but the cases they select may not change: _check_same_cases;
# init_weights is read at the start of a run only)


# -- losses ------------------------------------------------------------------------------------
def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice per example, averaged. logits/target: B x 1 x H x W. An empty target is
    matched by an empty prediction (loss -> 0 as probabilities -> 0)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def component_multipliers(masks: np.ndarray, area_ref_px: float, cap: float) -> np.ndarray:
    """Per-pixel BCE multipliers that count each lesion once, whatever its size.

    masks: B x H x W bool. Returns B x H x W float32: 1 on background and on components of at
    least ``area_ref_px`` pixels, min(area_ref_px / area, cap) on the pixels of a smaller one
    (8-connected components of each slice).
    """
    from scipy import ndimage

    out = np.ones(masks.shape, np.float32)
    for b, m in enumerate(masks):
        labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        areas = np.bincount(labels.ravel())[1:].astype(np.float32)
        factor = np.concatenate([[1.0], np.clip(area_ref_px / areas, 1.0, cap)]).astype(np.float32)
        out[b] = factor[labels]
    return out


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, positive_weight_max: float = 1.0,
                      positive_multiplier: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Dice + BCE on the final (PiGMA) output only, as in the paper.

    logits/target: B x 1 x H x W. With ``positive_weight_max`` > 1 the lesion pixels of each slice
    weigh min(#background / #foreground, positive_weight_max) in the BCE (class balancing).
    positive_multiplier (B x 1 x H x W, from component_multipliers) scales the lesion pixels'
    weight further; background pixels keep weight 1.
    """
    d = dice_loss(logits, target)
    weight = None
    if positive_weight_max > 1.0:
        fg = target.flatten(1).sum(1)
        ratio = ((target[0].numel() - fg) / fg.clamp_min(1.0)).clamp(1.0, positive_weight_max)
        weight = 1.0 + (ratio.view(-1, 1, 1, 1) - 1.0) * target
    if positive_multiplier is not None:
        base = weight if weight is not None else torch.ones_like(target)
        weight = torch.where(target > 0, base * positive_multiplier, base)
    b = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    return d + b, {"dice_loss": float(d.detach()), "bce": float(b.detach())}


# -- data -----------------------------------------------------------------------------------------
def synthetic_cache(cfg: TrainConfig, count: int, seed: int, size: int) -> data_mod.ExampleSet:
    cache = Path(cfg.cache_dir) / f"synth_s{seed}_n{count}_{size}_neg{cfg.negative_fraction}.npz"
    if cache.is_file():
        return load_cache(cache)
    t = time.perf_counter()
    examples = data_mod.generate_synthetic(count, seed, size, workers=cfg.workers, negative_fraction=cfg.negative_fraction)
    save_cache(examples, cache)
    log.info("generated %d synthetic examples in %.0f s -> %s", count, time.perf_counter() - t, cache)
    return examples


def load_cache(cache: Path) -> data_mod.ExampleSet:
    """A cached example set; BoltzformerError naming it when it cannot be read (a disk that filled
    up, a copy cut short), since the cure is to delete it: the next run makes it again."""
    from ..errors import BoltzformerError

    try:
        return data_mod.ExampleSet.load(cache)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, EOFError, KeyError, ValueError: all one cure
        if out_of_memory(exc) == "machine":  # the machine's trouble, not the file's: deleting it would not help
            raise
        raise BoltzformerError(f"{cache}: the cached examples cannot be read ({type(exc).__name__}"
                               f"{_first_line(exc) or ': truncated?'}); delete the file and the run makes it again") from None


def _first_line(exc: BaseException) -> str:
    """': ' and the first line of an exception's message (at most 120 characters), or '' when it has none."""
    lines = str(exc).splitlines()
    return f": {lines[0][:120]}" if lines and lines[0].strip() else ""


def save_cache(examples: data_mod.ExampleSet, cache: Path) -> None:
    """Write a cache through a temporary file of its own (two runs sharing cache_dir may write the
    same cache at once), renamed into place whole."""
    import tempfile

    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cache.stem}.", suffix=".tmp.npz", dir=cache.parent)
    os.close(fd)
    try:
        examples.save(Path(tmp))
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prompt_vocabulary(extra: list[str]) -> list[str]:
    return sorted({normalise_prompt(p) for p in vocab.all_prompts()} | {normalise_prompt(p) for p in extra})


def phantom_cache_path(cfg: TrainConfig, volumes: int, seed: int, size: int, offsets) -> Path:
    """Where the phantom examples of these settings are cached (the defaults keep their old names)."""
    tag = "_".join(f"{o:g}" for o in offsets)
    name = f"phantom_s{seed}_v{volumes}_k{cfg.phantom_slices_per_volume}_{size}_ctx{tag}"
    if cfg.phantom_negative_fraction != 0.35:
        name += f"_neg{cfg.phantom_negative_fraction:g}"
    if cfg.phantom_positive_sampling != "slice":
        name += f"_per{cfg.phantom_positive_sampling}"
    return Path(cfg.cache_dir) / f"{name}.npz"


def phantom_cache(cfg: TrainConfig, volumes: int, seed: int, size: int, offsets) -> data_mod.ExampleSet:
    cache = phantom_cache_path(cfg, volumes, seed, size, offsets)
    if cache.is_file():
        return load_cache(cache)
    t = time.perf_counter()
    examples = data_mod.phantom_examples(seed, volumes, cfg.phantom_slices_per_volume, size, offsets,
                                         negative_fraction=cfg.phantom_negative_fraction,
                                         positive_sampling=cfg.phantom_positive_sampling)
    save_cache(examples, cache)
    log.info("generated %d phantom examples from %d volumes in %.0f s -> %s", len(examples), volumes,
             time.perf_counter() - t, cache)
    return examples


def as_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """N x S x S or N x C x S x S -> N x channels x S x S (a 2D slice repeats as its own context)."""
    if images.ndim == 3:
        images = images[:, None]
    if images.shape[1] == channels:
        return images
    return np.repeat(images[:, :1], channels, axis=1)


def real_draw_probabilities(real, how: str) -> np.ndarray | None:
    """Per-example draw probabilities of the real set (None: uniform). "sqrt_group": a group of n
    examples sharing (target, has-lesion) is drawn sqrt(n) times as often as a single example."""
    if how == "example" or len(real) == 0:
        return None
    if how != "sqrt_group":
        raise ValueError(f"real_sampling must be 'example' or 'sqrt_group', got {how!r}")
    has = real.masks.reshape(len(real), -1).any(axis=1)
    keys = [(t, bool(h)) for t, h in zip(real.targets, has)]
    counts = {k: keys.count(k) for k in set(keys)}
    w = np.array([counts[k] ** -0.5 for k in keys])
    return w / w.sum()


class BatchSampler:
    """Random batches mixing synthetic (2D slices and 3D phantoms with context) and real training
    examples, with light augmentation (flips, gamma), context dropout and prompt synonyms for
    real cases. Batches are B x C x S x S float32 (C = 1 + context offsets)."""

    def __init__(self, synth, real, cfg: TrainConfig, rng: np.random.Generator, phantom=None, channels: int = 1):
        self.synth, self.real, self.cfg, self.rng = synth, real, cfg, rng
        self.phantom, self.channels = phantom, channels
        # Lesions are the product's job; organs are easy and would dominate the batches otherwise.
        is_lesion = np.array([t in vocab.LESION_TARGETS for t in synth.targets])
        self.lesion_idx, self.organ_idx = np.flatnonzero(is_lesion), np.flatnonzero(~is_lesion)
        self.area = synth.area
        self.small_idx = np.flatnonzero(is_lesion & (self.area > 0) & (self.area < SMALL_AREA))
        self.real_p = real_draw_probabilities(real, cfg.real_sampling)

    def _synonym(self, prompt: str, target: str) -> str:
        spec = vocab.TARGETS.get(target)
        if spec is None or self.rng.random() < 0.5:
            return prompt
        return spec.prompts[self.rng.integers(len(spec.prompts))]

    def sample(self, n: int):
        images, masks, prompts = [], [], []
        for _ in range(n):
            use_real = len(self.real) > 0 and self.rng.random() < self.cfg.real_weight
            use_phantom = (not use_real and self.phantom is not None and len(self.phantom) > 0
                           and self.rng.random() < self.cfg.phantom_weight)
            src = self.real if use_real else self.phantom if use_phantom else self.synth
            if use_real and self.real_p is not None:
                i = int(self.rng.choice(len(src), p=self.real_p))
            elif use_real or use_phantom:
                i = int(self.rng.integers(len(src)))
            else:
                pool = self.lesion_idx if (self.rng.random() < self.cfg.lesion_fraction or not len(self.organ_idx)) else self.organ_idx
                i = int(pool[self.rng.integers(len(pool))]) if len(pool) else int(self.rng.integers(len(src)))
                if (self.cfg.small_lesion_fraction > 0 and pool is self.lesion_idx and len(self.small_idx)
                        and self.area[i] > 0 and self.rng.random() < self.cfg.small_lesion_fraction):
                    i = int(self.small_idx[self.rng.integers(len(self.small_idx))])
            img = as_channels(src.images[i : i + 1], self.channels)[0].astype(np.float32) / 255.0
            m = src.masks[i]
            if self.channels > 1 and self.rng.random() < self.cfg.context_dropout:
                img = np.repeat(img[:1], self.channels, axis=0)
            if self.rng.random() < 0.5:
                img, m = img[..., ::-1], m[:, ::-1]
            if self.rng.random() < 0.3:
                img = img ** self.rng.uniform(0.7, 1.4)
            images.append(np.ascontiguousarray(img))
            masks.append(np.ascontiguousarray(m))
            prompts.append(self._synonym(src.prompts[i], src.targets[i]) if use_real else src.prompts[i])
        return np.stack(images), np.stack(masks).astype(np.float32), prompts


# -- evaluation during training -------------------------------------------------------------------
@torch.inference_mode()
def evaluate_examples(model: BoltzFormer, examples: data_mod.ExampleSet, bank, device, batch_size=32, seed=0) -> dict:
    """Dice on examples at the network size: mean over positives, false-positive rate on negatives,
    and Dice per area band (< 0.1 %, 0.1-1 %, >= 1 % of the slice)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    dices, areas, fp = [], [], []
    for b0 in range(0, len(examples), batch_size):
        sl = slice(b0, b0 + batch_size)
        x = torch.from_numpy(as_channels(examples.images[sl], model.cfg.in_channels).astype(np.float32) / 255.0).to(device)
        embs = [bank[normalise_prompt(p)] for p in examples.prompts[sl]]
        tokens, valid, pooled = batch_embeddings(embs, model.cfg.max_text_tokens, device)
        prob = torch.sigmoid(model(x, tokens, valid, pooled, generator=gen)["logits"].float())[:, 0].cpu().numpy()
        for p, t in zip(prob, examples.masks[sl]):
            if t.any():
                dices.append(dice(p >= 0.5, t))
                areas.append(t.mean())
            else:
                fp.append(bool((p >= 0.5).any()))
    dices, areas = np.array(dices), np.array(areas)
    bands = {"small": areas < SMALL_AREA, "medium": (areas >= SMALL_AREA) & (areas < LARGE_AREA), "large": areas >= LARGE_AREA}
    out = {"dice": float(dices.mean()) if len(dices) else math.nan,
           "negative_fp_rate": float(np.mean(fp)) if fp else math.nan, "positives": len(dices)}
    for name, sel in bands.items():
        out[f"dice_{name}"] = float(dices[sel].mean()) if sel.any() else math.nan
    model.train()
    return out


def selection_score(row: dict) -> float:
    """What best.safetensors is chosen on: synthetic validation Dice; with phantom chests, the
    mean of the two Dice less half the phantom's false-positive rate on lesion-free slices."""
    score = row["val_synth_dice"]
    if "val_phantom_dice" in row:
        score = 0.5 * (score + row["val_phantom_dice"]) - 0.5 * row["val_phantom_negative_fp_rate"]
    return score


CURVES = (  # (log key, legend, line style): Dice solid, false-positive rates dashed
    ("val_synth_dice", "synthetic validation", "-"), ("val_synth_dice_small", "synthetic, < 0.1 % area", "-"),
    ("val_phantom_dice", "phantom chests", "-"), ("val_phantom_dice_small", "phantom chests, < 0.1 % area", "-"),
    ("val_real_dice", "real held-out (reported, not chosen on)", "-"),
    ("val_synth_negative_fp_rate", "synthetic: FP rate on lesion-free slices", "--"),
    ("val_phantom_negative_fp_rate", "phantom: FP rate on lesion-free slices", "--"),
)


def _score_or_none(row: dict) -> float | None:
    """selection_score, or None where a figure it needs is missing or NaN (no lesion to score)."""
    try:
        score = selection_score(row)
    except KeyError:
        return None
    return None if math.isnan(score) else score


def plot_curves(rows: list[dict], path: Path) -> None:
    """curves.png: the loss and the validation figures per epoch, the epoch best.safetensors holds."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ax[0].plot(ep, [r["loss"] for r in rows], marker="o", ms=3, label="train loss (Dice + BCE)")
    ax[0].set_ylabel("loss (mean over the epoch's steps)")
    plotted = 0
    for key, label, style in CURVES:
        ys = [r.get(key, math.nan) for r in rows]
        if not all(math.isnan(y) for y in ys):
            ax[1].plot(ep, ys, style, marker="o", ms=3, label=label)
            plotted += 1
    if not plotted:
        ax[1].text(0.5, 0.5, "no validation figure yet", ha="center", va="center", transform=ax[1].transAxes)
    scores = [_score_or_none(r) for r in rows]
    scores = [-math.inf if v is None else v for v in scores]
    if max(scores, default=-math.inf) > -math.inf:
        best = ep[int(np.argmax(scores))]
        for a in ax:
            a.axvline(best, color="gray", ls=":", label=f"best.safetensors (epoch {best})")
    ax[1].set_ylabel("Dice (solid); false-positive rate (dashed)")
    ax[1].set_ylim(0, 1)
    for a in ax:
        a.set_xlabel("epoch")
        a.set_xlim(min(ep, default=0) - 0.5, max(ep, default=0) + 0.5)  # one epoch is a point, not a line
        if len(ep) <= 12:
            a.set_xticks(ep)
        else:
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle(f"{path.parent.name}: training loss and validation per epoch")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


# EX_TEMPFAIL of sysexits.h: the leg ended on --max-minutes with steps left; run the command again
EXIT_UNFINISHED = 75


# -- training ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out_dir, max_minutes: float | None = None) -> Path:
    """Train (or resume) into out_dir up to cfg.steps; returns the best weights' path. Raises
    Unfinished when max_minutes ends the leg first, KeyboardInterrupt (Terminated for
    SIGTERM) on Ctrl-C; each after checkpointing the steps done."""
    from ..devices import resolve_device

    from ..errors import BoltzformerError, OutputError, os_problem

    out = Path(out_dir)
    ckpt = out / "last.pt"
    cfg.check(resuming=ckpt.is_file())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out, f"cannot be made a folder for the run ({os_problem(exc)})") from None
    state = _read_checkpoint(ckpt, cfg) if ckpt.is_file() else None
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    net_cfg = get_config(cfg.model, **cfg.model_overrides)
    size = net_cfg.image_size
    t0 = time.perf_counter()

    # The real cases first: a mistake in them is reported before minutes of synthetic data are made.
    real_dir = (Path(cfg.real_dir) if cfg.real_dir else data_mod.default_real_dir()) if cfg.use_real else None
    split_file = cfg.split_file or data_mod.REAL_SPLIT
    if cfg.use_real and real_dir is None:
        log.warning("use_real is on but no folder of real cases was given (real_dir, or BOLTZFORMER_REAL_DATA "
                    "holding cases.csv): this run trains on synthetic data only")
    chosen = data_mod.real_split_rows(real_dir, split_file, warn=log.warning) if real_dir else {}
    cases = {name: sorted(r["case_id"] for r in rows) for name, rows in chosen.items()}
    if state is not None:
        _check_same_cases(state, cases, ckpt)
    if real_dir is not None and not cfg.real_dir:  # from BOLTZFORMER_REAL_DATA: the config records the folder
        cfg = dataclasses.replace(cfg, real_dir=str(real_dir))
    offsets = net_cfg.context_offsets_mm
    empty = data_mod.ExampleSet(np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), bool), [], [])
    real_train = (data_mod.real_examples(real_dir, "train", size, offsets_mm=offsets, rows=chosen["train"])
                  if real_dir else empty)
    real_val = (data_mod.real_examples(real_dir, "heldout", size, negatives=False, offsets_mm=offsets,
                                       rows=chosen["heldout"]) if real_dir else empty)
    synth_train = synthetic_cache(cfg, cfg.synth_train, cfg.seed, size)
    synth_val = synthetic_cache(cfg, cfg.synth_val, cfg.seed + 10_000, size)
    if not synth_val.masks.any():  # no Dice on it: no score, and no best.safetensors would be chosen
        raise BoltzformerError(f"the synthetic validation set (synth_val={cfg.synth_val}) holds no lesion, so no "
                               "epoch could be scored and best.safetensors never written; raise synth_val")
    write_text(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    _remove_stale_temporaries(out)
    # A 2D network reads channel 0 (the slice itself) of the phantom cache the 2.5D networks use,
    # so both train on the same phantom slices and share one cache.
    phantom_offsets = offsets if offsets else data_mod.PHANTOM_CONTEXT_MM
    phantom_train = (phantom_cache(cfg, cfg.phantom_volumes, cfg.seed, size, phantom_offsets)
                     if cfg.phantom_volumes else None)
    phantom_val = (phantom_cache(cfg, cfg.phantom_val_volumes, cfg.seed + 10_000, size, phantom_offsets)
                   if cfg.phantom_val_volumes else None)
    log.info("data: %d synthetic train, %d synthetic val, %d real train, %d real held-out (%s) [%.0f s]",
             len(synth_train), len(synth_val), len(real_train), len(real_val), real_dir, time.perf_counter() - t0)

    prompts = prompt_vocabulary(real_train.prompts + real_val.prompts)
    encoder = SentenceEncoder(net_cfg.max_text_tokens)
    bank = dict(zip(prompts, encoder.encode(prompts)))
    # Prompts that name nothing are trained on (-> empty) but never become known prompts.
    train_bank = {**bank, **dict(zip(data_mod.UNRELATED_PROMPTS, encoder.encode(list(data_mod.UNRELATED_PROMPTS))))}

    model = fast_layout(build_model(net_cfg, seed=cfg.seed).to(device), device)  # checkpoints are saved contiguous
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "embed" not in n and "query" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "embed" not in n and "query" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr)

    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    step, best, rows, running = 0, -1.0, [], []
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise BoltzformerError(f"{ckpt}: its weights do not fit this network ({str(exc).splitlines()[0][:160]}); "
                                   "give another --out for a new run") from None
        step, best, rows = state["step"], state["best"], state["rows"]
        running = list(state.get("running", []))
        if "rng" in state:  # the generators as they were: the run goes on as if never stopped
            rng.bit_generator.state = json.loads(state["rng"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        else:  # a checkpoint from before 2026-11-27: new draws, seeded by the step
            rng = np.random.default_rng([cfg.seed, step])
            gen.manual_seed(cfg.seed + step)
        log.info("resumed from %s at step %d", ckpt, step)
    elif cfg.init_weights:
        from safetensors.torch import load_file

        from ..checkpoint import load_matching

        report = load_matching(model, load_file(cfg.init_weights, device=str(device)))
        log.info("warm start from %s: %d tensors loaded, re-initialised %s, new %s", cfg.init_weights,
                 len(report["loaded"]), report["reinitialised"], report["new"])
    sampler = BatchSampler(synth_train, real_train, cfg, rng, phantom=phantom_train, channels=net_cfg.in_channels)
    info = {"training": {"config": dataclasses.asdict(cfg), "parameters": count_parameters(model)}}
    use_amp = cfg.amp and device.type == "cuda"

    def checkpoint():
        _write_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                 "best": best, "rows": rows, "running": running,
                                 "config": json.dumps(dataclasses.asdict(cfg)),
                                 "rng": json.dumps(rng.bit_generator.state), "generator": gen.get_state(),
                                 "torch_rng": torch.get_rng_state(), "cases": json.dumps(cases),
                                 "minutes": minutes_before + (time.perf_counter() - started) / 60})

    model.train()
    started = time.perf_counter()
    minutes_before = float(state.get("minutes", rows[-1]["minutes"] if rows else 0.0)) if state is not None else 0.0
    saved_at = first_step = step
    with _stop_between_steps() as stop:
        while step < cfg.steps and not stop.is_set():
            # at least one step per leg, so that legs with a short budget still get somewhere
            if max_minutes is not None and step > first_step and (time.perf_counter() - started) > 60 * max_minutes:
                log.info("time budget reached at step %d; the same command goes on from there", step)
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            images, masks, batch_prompts = sampler.sample(cfg.batch_size)
            x = torch.from_numpy(images).to(device)
            y = torch.from_numpy(masks)[:, None].to(device)
            tokens, valid, pooled = batch_embeddings([train_bank[normalise_prompt(p)] for p in batch_prompts],
                                                     net_cfg.max_text_tokens, device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext():
                out_ = model(x, tokens, valid, pooled, generator=gen)
            pos_w = cfg.positive_weight_max if step >= cfg.positive_weight_from_step else 1.0
            mult = None
            if cfg.component_area_ref_px > 0:
                mult = torch.from_numpy(component_multipliers(masks > 0.5, cfg.component_area_ref_px,
                                                              cfg.component_weight_max))[:, None].to(device)
            loss, parts = segmentation_loss(out_["logits"].float(), y, pos_w, mult)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            running.append(float(loss.detach()))
            step += 1
            if step % cfg.steps_per_epoch == 0 or step == cfg.steps:
                best = _end_epoch(model, bank, train_bank, rows, running, step, best, lr_at(step),
                                  started - 60 * minutes_before, info, synth_val, real_val, phantom_val, device, out)
                running = []
                checkpoint()
                saved_at = step
        if step > saved_at:  # stopped mid-epoch (--max-minutes, Ctrl-C, SIGTERM): keep the steps done
            checkpoint()
        if stop.is_set():
            stopped = Terminated() if stop.signum == signal.SIGTERM else KeyboardInterrupt()
            stopped.note = f"the checkpoint {ckpt} holds step {step}; the same command goes on from there"
            raise stopped
    if step < cfg.steps:
        raise Unfinished(f"stopped at step {step} of {cfg.steps} (--max-minutes {max_minutes:g}); the same command "
                         "goes on from there", out / "best.safetensors")
    return out / "best.safetensors"


class Unfinished(Exception):
    """The time budget (--max-minutes) ended a training leg before its last step; the
    checkpoint holds the steps done. ``best`` is the best weights written so far (may not exist)."""

    def __init__(self, message: str, best: Path):
        super().__init__(message)
        self.best = best


@contextlib.contextmanager
def _stop_between_steps():
    """Ctrl-C and SIGTERM set a flag that the training loop reads between two steps, so the
    checkpoint it then writes never holds a half-applied optimiser step; a second Ctrl-C stops
    at once (the last checkpoint stays as it was). Off the main thread: a flag nobody sets."""
    stop = threading.Event()
    stop.signum = None  # the signal that asked: SIGTERM makes the command exit 143, Ctrl-C 130
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def ask(signum, frame):
        if stop.is_set():
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        stop.signum = signum
        stop.set()
        said = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        log.info("%s: stopping after this step; a second %s stops at once", said, said)

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_epoch(model, bank, train_bank, rows, running, step, best, lr, started, info, synth_val, real_val,
               phantom_val, device, out: Path) -> float:
    """Validate, log, save best/last weights, log.csv and curves.png; returns the best score."""
    row = {"epoch": len(rows) + 1, "step": step, "loss": float(np.mean(running)) if running else math.nan, "lr": lr,
           "minutes": (time.perf_counter() - started) / 60}
    v = evaluate_examples(model, synth_val, bank, device)
    row.update({f"val_synth_{k}": v_ for k, v_ in v.items()})
    if len(real_val):
        r = evaluate_examples(model, real_val, bank, device)
        row["val_real_dice"] = r["dice"]
    if phantom_val is not None:
        pv = evaluate_examples(model, phantom_val, train_bank, device)
        row.update({f"val_phantom_{k}": v_ for k, v_ in pv.items()})
    rows.append(row)
    log.info("epoch %d step %d loss %.4f synth Dice %.3f (small %.3f) real Dice %.3f fp-neg %.3f",
             row["epoch"], step, row["loss"], row["val_synth_dice"], row["val_synth_dice_small"],
             row.get("val_real_dice", math.nan), row["val_synth_negative_fp_rate"])
    if phantom_val is not None:
        log.info("   phantom Dice %.3f (small %.3f) fp-neg %.3f", row["val_phantom_dice"],
                 row["val_phantom_dice_small"], row["val_phantom_negative_fp_rate"])
    # Checkpoints are chosen on synthetic validation only: the real held-out split is reported here
    # (it has entered adoption decisions elsewhere: MODEL_CARD "How clean the test sets are").
    # With phantom chests, their Dice counts as much as the 2D slices' and each false
    # positive on a lesion-free phantom slice costs as much as a missed lesion.
    score = _score_or_none(row)
    meta = {**info, "trained_steps": step, "validation": row}
    if score is not None and score > best:
        best = score
        save_model(model, out / "best.safetensors", bank, meta)
    save_model(model, out / "last.safetensors", bank, meta)
    _write_log(rows, out / "log.csv")
    plot_curves(rows, out / "curves.png")
    return best


def _read_checkpoint(ckpt: Path, cfg: TrainConfig) -> dict:
    """The checkpoint's state; BoltzformerError when it cannot be read, or when it was trained
    with another config (beyond RESUME_MAY_CHANGE)."""
    from ..errors import BoltzformerError

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain tensors and numbers
    except Exception as exc:  # noqa: BLE001 - truncated, not a checkpoint, another torch's format
        if out_of_memory(exc) == "machine":  # MemoryError, torch's CPU allocator: the machine's trouble,
            raise                            # not the file's (moving it away would restart the training)
        raise BoltzformerError(f"{ckpt}: cannot be read as a training checkpoint ({type(exc).__name__}"
                               f"{_first_line(exc)}); move it away to start the run again") from None
    if "config" in state:
        # an option added since the checkpoint was written had its default then (json: lists, not tuples)
        defaults = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
        was, now = json.loads(state["config"]), json.loads(json.dumps(dataclasses.asdict(cfg)))
        changed = [k for k in now if k not in RESUME_MAY_CHANGE and was.get(k, defaults[k]) != now[k]]
        if changed:
            said = ", ".join(f"{k} {json.dumps(was.get(k, defaults[k]))} -> {json.dumps(now[k])}" for k in changed[:6])
            weights = ckpt.with_name("last.safetensors")
            then = (f"give another --out, or fine-tune from {weights} with init_weights" if weights.is_file()
                    else "give another --out")
            raise BoltzformerError(
                f"{ckpt} was trained with other options ({said}); a resumed run goes on as it started (only "
                f"{', '.join(RESUME_MAY_CHANGE)} may change): {then}")
    if state.get("step", 0) >= cfg.steps:
        log.info("%s is at step %d, the run's %d steps are done; raise steps to train on", ckpt, state["step"], cfg.steps)
    return state


def _check_same_cases(state: dict, cases: dict[str, list[str]], ckpt: Path) -> None:
    """BoltzformerError when the real cases a resumed run would read are not the ones it started
    with: another split file (or the same one edited) could move held-out cases into training, and
    a missing BOLTZFORMER_REAL_DATA would silently drop the real data. Checkpoints written before
    2026-11-28 do not record their cases: nothing to compare."""
    from ..errors import BoltzformerError

    if "cases" not in state:
        return
    was = {k: list(v) for k, v in json.loads(state["cases"]).items()}
    if was == cases:
        return
    if was and not cases:
        raise BoltzformerError(f"{ckpt} trained on real cases ({len(was.get('train', []))} train, "
                               f"{len(was.get('heldout', []))} held out), but no folder of real cases is given now: "
                               "set real_dir (or BOLTZFORMER_REAL_DATA) as when the run started")
    moved = []
    for name in sorted(set(was) | set(cases)):
        before, now = set(was.get(name, [])), set(cases.get(name, []))
        if before != now:
            moved.append(f"{name}: {len(now - before)} added, {len(before - now)} gone"
                         f" (e.g. {sorted((now - before) or (before - now))[0]})")
    raise BoltzformerError(f"{ckpt} started with other real cases in its splits ({'; '.join(moved)}); a resumed run "
                           "reads the same cases (split_file and real_dir may move, not change): give another --out")


# The temporary files of the run's own writes (atomic_output's ".<name>.tmp-XXXX<ext>", the
# checkpoint's and the log's): a kill -9 mid-write leaves one behind, the next leg removes it.
_TEMPORARIES = (".best.safetensors.tmp-*", ".last.safetensors.tmp-*", ".best.json.tmp-*", ".last.json.tmp-*",
                ".train_config.json.tmp-*", ".curves.png.tmp-*", "last.pt.tmp", "log.tmp")


def _remove_stale_temporaries(out: Path) -> None:
    for pattern in _TEMPORARIES:
        for leftover in out.glob(pattern):
            leftover.unlink(missing_ok=True)
            log.info("removed %s, left by a run killed while writing", leftover)


def _write_checkpoint(ckpt: Path, state: dict) -> None:
    """torch.save to a temporary file, fsynced, then renamed over ``ckpt``: a kill or a full disk
    never leaves a half-written checkpoint under its name (a kill -9 mid-write leaves the
    temporary file, which the next leg removes)."""
    from ..errors import OutputError, os_problem

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(ckpt)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) or "enforce fail" in str(exc) or "unexpected pos" in str(exc):
            problem = os_problem(exc) if isinstance(exc, OSError) else "no space left on device?"
            raise OutputError(ckpt, f"could not be written ({problem}); the previous checkpoint is kept") from None
        raise


def _write_log(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


# -- CLI (`boltzformer train`, parser in cli.py) ----------------------------------------------------
def _as_option_type(item: str, key: str, old, new):
    """`new` for the option `key` whose current value is `old`, checked against old's type (an
    int also serves where a float is wanted); raises BoltzformerError naming ``item`` (where the
    value came from: "--set steps=abc", "run.json: steps=..."), so a mistyped value stops the run
    at once instead of minutes later, and never reaches its saved config."""
    from ..errors import BoltzformerError

    if old is None:
        return new
    if isinstance(old, bool):
        ok = isinstance(new, bool)
    elif isinstance(old, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    elif isinstance(old, float):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
        new = float(new) if ok else new
    elif isinstance(old, (list, tuple)):
        ok = isinstance(new, list)
        new = type(old)(new) if ok else new
    else:
        ok = isinstance(new, type(old))
    if not ok:
        raise BoltzformerError(f"{item}: {key} takes a value of type {type(old).__name__} "
                               f"(now {json.dumps(old)}), not {json.dumps(new)}")
    return new


def run_train(args) -> int:
    from ..errors import BoltzformerError

    try:
        cfg = TrainConfig.load(args.config)
    except (OSError, ValueError, TypeError) as exc:
        raise BoltzformerError(f"{args.config}: unreadable training config ({exc})") from exc
    for item in args.set:
        key, _, value = item.partition("=")
        if not hasattr(cfg, key):
            raise BoltzformerError(f"--set {item}: unknown training option {key!r}")
        try:
            new = json.loads(value)
        except ValueError:
            new = value
        setattr(cfg, key, _as_option_type(f"--set {item}", key, getattr(cfg, key), new))
    pyplot()  # every epoch writes curves.png: without matplotlib, say so now, not after the first epoch
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    try:
        best = train(cfg, out, max_minutes=args.max_minutes)
    except Unfinished as exc:  # a status of its own: a wrapper can tell "run again" from "done"
        print(exc)
        if exc.best.is_file():
            print(f"best weights so far: {exc.best}")
        return EXIT_UNFINISHED
    except KeyboardInterrupt as exc:  # before the loop, or a second Ctrl-C inside it
        if not getattr(exc, "note", None):
            exc.note = (f"{out / 'last.pt'} holds the last checkpoint; the same command goes on from there"
                        if (out / "last.pt").is_file() else "no checkpoint was written yet")
        raise
    if best.is_file():
        print(f"best weights: {best}")
    return 0
