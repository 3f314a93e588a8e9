"""Clip encoder: the input frames stacked along channels -> prototype features, two skips and (optionally) a mask.

Input [B, Cin, H, W] with Cin = clip_length * C (+ the background's C with ``background_input``); H, W multiples
of 8. Widths w = (D/8, D/4, D/2, D) for memory dimension D and skip width S:

    stage1 [B, w1, H] -> pool -> stage2 [B, w2, H/2] -> pool -> stage3 [B, w3, H/4] -> pool -> stage4 [B, D, H/8]
    skip3 = block(stage3.detach()) [B, S, H/4],  skip4 = block(stage4.detach()) [B, S, H/8]
    (mask_channels > 0) mask = sigmoid head(cat(up(stage2), stage1)) [B, mask_channels, H, W]

The skips read detached features: the official model trains the encoder only through the prototype path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .decoder import image_head, upsample
from .fold import FoldedSequential


def conv_block(in_channels: int, out_channels: int, last_bias_relu: bool = True) -> FoldedSequential:
    """conv-BN-ReLU twice (3x3, no bias); with ``last_bias_relu=False`` the second conv has a bias and no BN/ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if last_bias_relu:
        layers += [
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    else:
        layers += [nn.Conv2d(out_channels, out_channels, 3, padding=1)]
    return FoldedSequential(*layers)


class ClipEncoder(nn.Module):
    """See the module docstring for shapes. ``mask_channels=0`` builds no mask head."""

    def __init__(self, in_channels: int, memory_dim: int, skip_width: int, mask_channels: int) -> None:
        super().__init__()
        w1, w2, w3, w4 = memory_dim // 8, memory_dim // 4, memory_dim // 2, memory_dim
        self.stage1 = conv_block(in_channels, w1)
        self.stage2 = conv_block(w1, w2)
        self.stage3 = conv_block(w2, w3)
        self.stage4 = conv_block(w3, w4, last_bias_relu=False)
        self.pool = nn.MaxPool2d(2)
        self.skip3 = conv_block(w3, skip_width)
        self.skip4 = conv_block(w4, skip_width)
        if mask_channels:
            self.mask_up = upsample(w2, w1)
            self.mask = image_head(2 * w1, mask_channels, w1, nn.Sigmoid())
        else:
            self.mask_up = self.mask = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x [B, Cin, H, W] -> (z_e [B, D, H/8, W/8], skip3, skip4, mask [B, mask_channels, H, W] | None)."""
        s1 = self.stage1(x)
        s2 = self.stage2(self.pool(s1))
        s3 = self.stage3(self.pool(s2))
        s4 = self.stage4(self.pool(s3))
        mask = self.mask(torch.cat([self.mask_up(s2), s1], dim=1)) if self.mask is not None else None
        return s4, self.skip3(s3.detach()), self.skip4(s4.detach()), mask
