"""Image encoder: a small residual CNN with a feature pyramid.

Produces the token maps the decoder attends to (strides 16, 8, 4 by default; all `hidden_dim`
wide) and the per-pixel embedding map ("semantic map", stride 4, `pixel_dim` wide) that query
embeddings are dotted with to give mask logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import BoltzFormerConfig


class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.GroupNorm(min(8, c_out), c_out),
            nn.GELU(),
        )


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 + pointwise 1x1: a 3x3 receptive field at ~1/9 of the cost, used on the
    wide pyramid maps where a full 3x3 convolution dominated the encoder's time."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.GroupNorm(min(8, c_out), c_out),
            nn.GELU(),
        )


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, channels), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.norm2(self.conv2(self.conv1(x))))


class ImageEncoder(nn.Module):
    """CNN backbone (strides 2, 4, 8, 16) + top-down pyramid.

    forward(image: B x C x H x W) -> (features, pixel_map) where
      features: dict stride -> B x hidden_dim x H/stride x W/stride, for each attention stride
      pixel_map: B x pixel_dim x H/mask_stride x W/mask_stride
    """

    def __init__(self, cfg: BoltzFormerConfig):
        super().__init__()
        c1, c2, c3, c4 = cfg.encoder_channels
        self.strides = (2, 4, 8, 16)
        self.stem = ConvNormAct(cfg.in_channels, c1, stride=2)  # /2
        self.stages = nn.ModuleList(
            [
                nn.Sequential(ConvNormAct(c_in, c_out, stride=2), ResidualBlock(c_out))
                for c_in, c_out in ((c1, c2), (c2, c3), (c3, c4))  # /4, /8, /16
            ]
        )
        self.attention_strides = cfg.attention_strides
        channels = dict(zip(self.strides, cfg.encoder_channels))
        pyramid = sorted(set(cfg.attention_strides) | {cfg.mask_stride})
        self.pyramid_strides = pyramid
        self.lateral = nn.ModuleDict({str(s): nn.Conv2d(channels[s], cfg.hidden_dim, 1) for s in pyramid})
        self.smooth = nn.ModuleDict(
            {str(s): SeparableConv(cfg.hidden_dim, cfg.hidden_dim) for s in pyramid[:-1]}
        )
        self.mask_stride = cfg.mask_stride
        self.pixel_head = nn.Sequential(
            SeparableConv(cfg.hidden_dim + channels[2], cfg.pixel_dim),
            nn.Conv2d(cfg.pixel_dim, cfg.pixel_dim, 1),
        )

    def forward(self, image: torch.Tensor):
        x = self.stem(image)
        maps = {2: x}
        for stride, stage in zip(self.strides[1:], self.stages):
            x = stage(x)
            maps[stride] = x
        # Top-down pathway: coarse context flows into the finer maps.
        features: dict[int, torch.Tensor] = {}
        top = None
        for s in sorted(self.pyramid_strides, reverse=True):
            lat = self.lateral[str(s)](maps[s])
            if top is not None:
                lat = self.smooth[str(s)](lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest"))
            features[s] = lat
            top = lat
        fine = features[self.mask_stride]
        # The stride-2 stem features add edge detail the stride-4 map lacks (small nodules).
        stem = F.avg_pool2d(maps[2], kernel_size=self.mask_stride // 2) if self.mask_stride > 2 else maps[2]
        pixel_map = self.pixel_head(torch.cat([fine, stem], dim=1))
        return {s: features[s] for s in self.attention_strides}, pixel_map
