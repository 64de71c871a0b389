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


class DetailBranch(nn.Module):
    """Lifts the stride-4 pixel embeddings to stride 2 with edge detail from the stem.

    forward(coarse: B x P x h x w, stem: B x C1 x 2h x 2w) -> B x P x 2h x 2w
    = bilinear(coarse) + a small correction from [bilinear(coarse), stem]. The last convolution
    starts at zero, so a checkpoint trained at stride 4 loads and gives its own pixel
    embeddings, upsampled.
    """

    def __init__(self, pixel_dim: int, stem_channels: int, hidden: int = 32):
        super().__init__()
        self.mix = nn.Sequential(
            nn.Conv2d(pixel_dim + stem_channels, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),  # 3x3 context, depthwise (cheap at 128^2)
            nn.GELU(),
            nn.Conv2d(hidden, pixel_dim, 1),
        )
        nn.init.zeros_(self.mix[-1].weight)
        nn.init.zeros_(self.mix[-1].bias)

    def forward(self, coarse: torch.Tensor, stem: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(coarse, size=stem.shape[-2:], mode="bilinear", align_corners=False)
        return up + self.mix(torch.cat([up, stem], dim=1))


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
        pyramid = sorted(set(cfg.attention_strides))
        self.pyramid_strides = pyramid
        self.lateral = nn.ModuleDict({str(s): nn.Conv2d(channels[s], cfg.hidden_dim, 1) for s in pyramid})
        self.smooth = nn.ModuleDict(
            {str(s): SeparableConv(cfg.hidden_dim, cfg.hidden_dim) for s in pyramid[:-1]}
        )
        self.finest_stride = cfg.finest_stride
        self.mask_stride = cfg.mask_stride
        self.pixel_head = nn.Sequential(
            SeparableConv(cfg.hidden_dim + channels[2], cfg.pixel_dim),
            nn.Conv2d(cfg.pixel_dim, cfg.pixel_dim, 1),
        )
        self.detail = DetailBranch(cfg.pixel_dim, channels[2]) if self.mask_stride < self.finest_stride else None

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
        fine = features[self.finest_stride]
        # The stride-2 stem features add edge detail the stride-4 map lacks (small nodules).
        k = self.finest_stride // 2
        stem = F.avg_pool2d(maps[2], kernel_size=k) if k > 1 else maps[2]
        pixel_map = self.pixel_head(torch.cat([fine, stem], dim=1))
        if self.detail is not None:
            pixel_map = self.detail(pixel_map, maps[self.mask_stride])
        return {s: features[s] for s in self.attention_strides}, pixel_map
