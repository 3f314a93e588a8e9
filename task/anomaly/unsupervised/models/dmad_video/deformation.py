"""Pyramid deformation (offset) module: a coarse and a fine displacement field that warp the predicted frame.

Input: the stacked clip [B, Cin, H, W]. Data flow:

    stem (2 coordinate convs) -> [B, w, H, W] -> refine (residual block, BN) -> cat with stem -> [B, 2w, H, W] (w = 64)
    coarse head: 3 convs with ``coarse_strides`` (official 1,2,2 or 2,2,1) -> tanh [B, 2, H/4, W/4]
    fine head:   2 convs, stride 1                                        -> tanh [B, 2, H, W]

Each tanh field is scaled to at most ``shift`` pixels (x by 2*shift/W, y by 2*shift/H in ``grid_sample``'s
[-1, 1] coordinates; the official code divides both by H, identical for its square frames) and bilinearly
upsampled to [B, H, W, 2] (x first). Grids are ``identity + field`` clamped to [-1, 1]; the prediction is warped
coarse first, then fine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from task.common.warping import identity_grid, warp

from .decoder import coord_block
from .fold import FoldedSequential


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(bn(conv3x3(relu(x)))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = FoldedSequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def field_head(strides: Sequence[int], in_channels: int = 128, channels: int = 64) -> FoldedSequential:
    """conv-BN-ReLU stages then a conv to 2 channels and tanh; conv i has stride ``strides[i]`` (biased 3x3 convs)."""
    layers: list[nn.Module] = []
    widths = [in_channels] + [channels] * (len(strides) - 1) + [2]
    for i, stride in enumerate(strides):
        layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=stride, padding=1))
        layers += [nn.BatchNorm2d(widths[i + 1]), nn.ReLU(inplace=True)] if i < len(strides) - 1 else [nn.Tanh()]
    return FoldedSequential(*layers)


@dataclass
class Fields:
    """Displacements [B, H, W, 2] (x, y in grid units) and their sampling grids ``clamp(identity + field)``."""

    coarse: Tensor
    fine: Tensor
    grid_coarse: Tensor
    grid_fine: Tensor

    def apply(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, H, W] -> (coarse-warped, coarse-then-fine-warped), both [B, C, H, W]."""
        coarse = warp(x, self.grid_coarse)
        return coarse, warp(coarse, self.grid_fine)


class PyramidDeformation(nn.Module):
    """Predicts the coarse and fine fields from the clip. Shifts are the largest displacements in pixels.

    ``width`` is the channel width of its full-resolution convolutions (64 in all official presets); it dominates the
    cost of a small model, so the demo narrows it.
    """

    def __init__(
        self,
        in_channels: int,
        coarse_shift: float,
        fine_shift: float,
        coarse_strides: Sequence[int] = (1, 2, 2),
        width: int = 64,
    ) -> None:
        super().__init__()
        self.stem = coord_block(in_channels, width)
        self.refine = nn.Sequential(ResidualBlock(width), nn.BatchNorm2d(width))
        self.coarse_head = field_head(coarse_strides, 2 * width, width)
        self.fine_head = field_head((1, 1), 2 * width, width)
        self.coarse_shift = coarse_shift
        self.fine_shift = fine_shift

    def forward(self, x: Tensor) -> Fields:
        """x [B, Cin, H, W] -> ``Fields`` at the input's size, device and dtype."""
        batch, _, height, width = x.shape
        stem = self.stem(x)
        features = torch.cat([self.refine(stem), stem], dim=1)

        def field(head: nn.Sequential, shift: float) -> Tensor:
            scale = x.new_tensor([2 * shift / width, 2 * shift / height]).view(1, 2, 1, 1)
            out = F.interpolate(head(features) * scale, (height, width), mode="bilinear", align_corners=True)
            return out.permute(0, 2, 3, 1)

        coarse, fine = field(self.coarse_head, self.coarse_shift), field(self.fine_head, self.fine_shift)
        base = identity_grid(batch, height, width, x.device, x.dtype)
        return Fields(coarse, fine, torch.clamp(base + coarse, -1, 1), torch.clamp(base + fine, -1, 1))
