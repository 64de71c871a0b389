"""PiGMA: pixel-grounded mask aggregation of the m query masks into one full-resolution mask.

Path 1 (query ensemble): the mean of the m query masks, upsampled.
Path 2 (pixel-grounded correction): the low-resolution query masks and the downsampled image
go through a transposed convolution to 10 channels at full resolution, are concatenated with
the full-resolution image, and a 1x1 convolution gives one channel.
The output is the average of the two paths (logits). Linear and tiny: 462 parameters in the
bundled 2D configuration (10 queries, stride-2 masks), 626 with four context channels.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PiGMA(nn.Module):
    """forward(query_masks: B x Q x h x w logits, image: B x C x H x W) -> B x 1 x H x W logits."""

    def __init__(self, num_queries: int, in_channels: int, upscale: int, hidden: int = 10, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.upscale = upscale
        self.up = nn.ConvTranspose2d(num_queries + in_channels, hidden, kernel_size=upscale, stride=upscale)
        self.fuse = nn.Conv2d(hidden + in_channels, 1, kernel_size=1)

    def forward(self, query_masks: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-2:]
        mean = F.interpolate(query_masks.mean(1, keepdim=True), size=size, mode="bilinear", align_corners=False)
        if not self.enabled:
            return mean
        low_image = F.adaptive_avg_pool2d(image, query_masks.shape[-2:])
        x = self.up(torch.cat([query_masks, low_image], dim=1))
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        correction = self.fuse(torch.cat([x, image], dim=1))
        return 0.5 * (mean + correction)
