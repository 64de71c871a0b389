"""The BoltzFormer network: image encoder + text projection + Boltzmann decoder + PiGMA."""

from __future__ import annotations

import time

import torch
from torch import nn

from .config import BoltzFormerConfig
from .decoder import BoltzDecoder
from .encoder import ImageEncoder
from .pigma import PiGMA
from .text import TextProjection


class BoltzFormer(nn.Module):
    """forward(image, text_tokens, text_valid, text_pooled, generator=None, return_attention=False, prior=None)

    image: B x C x S x S windowed intensities in [0, 1] (S = cfg.image_size)
    text_tokens: B x T x E frozen word-piece embeddings, text_valid: B x T bool,
    text_pooled: B x E pooled sentence embeddings (see text.py)
    Returns {"logits": B x 1 x S x S, "query_masks": B x Q x S/m x S/m (m = cfg.mask_stride),
             "attention": [per layer {"probabilities", "counts": B x h x w, ...}] (if asked)}.
    prior: an optional sampling.PointPrior ("look here"); None leaves every output unchanged.
    """

    def __init__(self, cfg: BoltzFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        self.text = TextProjection(cfg)
        self.decoder = BoltzDecoder(cfg)
        self.pigma = PiGMA(cfg.num_queries, cfg.in_channels, cfg.mask_stride, enabled=cfg.pigma)

    def set_inference_options(self, **changes) -> None:
        """Change sampling options (sampling, token_ratio, tau0, attention_impl, min_tokens)
        without touching weights: the same weights load in every ablation mode."""
        allowed = {"sampling", "token_ratio", "tau0", "attention_impl", "min_tokens"}
        bad = set(changes) - allowed
        if bad:
            raise ValueError(f"not an inference option: {sorted(bad)}")
        self.cfg = self.cfg.replace(**changes)
        self.decoder.cfg = self.cfg

    def forward(self, image, text_tokens, text_valid, text_pooled, generator=None, return_attention=False,
                stage_times: dict | None = None, prior=None):
        """stage_times: if a dict is given, seconds spent in encoder / decoder / pigma are added
        to it (with a device synchronisation per stage, so only for benchmarks)."""
        clock = _StageClock(stage_times, image.device)
        features, pixel_map = self.encoder(image)
        clock.lap("encoder")
        text, text_padding = self.text(text_tokens, text_valid, text_pooled)
        out = self.decoder(features, pixel_map, text, text_padding, generator, return_attention, prior=prior)
        clock.lap("decoder")
        out["logits"] = self.pigma(out["query_masks"], image)
        clock.lap("pigma")
        return out


class _StageClock:
    def __init__(self, times: dict | None, device: torch.device):
        self.times, self.device = times, device
        self.t = time.perf_counter() if times is not None else 0.0

    def lap(self, name: str) -> None:
        if self.times is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.t
        self.t = now


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: BoltzFormerConfig, seed: int | None = None) -> BoltzFormer:
    if seed is not None:
        torch.manual_seed(seed)
    return BoltzFormer(cfg)
