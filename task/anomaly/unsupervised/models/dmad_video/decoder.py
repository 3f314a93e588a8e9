"""Prediction decoder with position-aware (coordinate) convolutions.

Input: the quantised prototype features [B, D, H/8, W/8] and two skip features [B, S, H/4, W/4] (from the encoder's
third stage) and [B, S, H/8, W/8] (from its fourth). Widths w = (D/8, D/4, D/2, D):

    cat(z, skip4) -> coord block -> [B, D, H/8]   -> up -> [B, D/2, H/4]
    cat(., skip3) -> coord block -> [B, D/2, H/4] -> up -> [B, D/4, H/2]
    coord block -> [B, D/4, H/2] -> up -> [B, D/8, H] -> head -> tanh frame [B, C, H, W]
    (mask_source="decoder") a sigmoid head on the same [B, D/8, H, W] features -> mask [B, 1, H, W]
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .fold import FoldedSequential

COORDINATE_BLOCKS = 32  # the official coordinate channels split every axis into 32 blocks


def _axis_coordinates(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(fine, coarse) position of each of ``n`` indices, both in [-1, 1].

    coarse = block index / (blocks - 1), fine = i / (n - 1) - coarse, with blocks = min(32, n) equal blocks. The
    official code requires n to be a multiple of 32; ``floor(i * blocks / n)`` is its ``i // (n / 32)`` there and
    extends it to any n >= 2.
    """
    blocks = min(COORDINATE_BLOCKS, n)
    index = torch.arange(n, device=device, dtype=torch.float64)
    coarse = torch.floor(index * blocks / n) / (blocks - 1)
    fine = index / (n - 1) - coarse
    return (fine * 2 - 1).to(dtype), (coarse * 2 - 1).to(dtype)


def coordinate_channels(batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Four position channels [B, 4, H, W]: row fine, row coarse, column fine, column coarse (official order)."""
    row_fine, row_coarse = _axis_coordinates(height, device, dtype)
    col_fine, col_coarse = _axis_coordinates(width, device, dtype)
    rows = [c.view(height, 1).expand(height, width) for c in (row_fine, row_coarse)]
    cols = [c.view(1, width).expand(height, width) for c in (col_fine, col_coarse)]
    return torch.stack(rows + cols).unsqueeze(0).expand(batch, 4, height, width)


class CoordConv2d(nn.Module):
    """3x3 convolution (no bias) over the input with ``coordinate_channels`` appended; built per call, any size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 4, out_channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self._with_coordinates(x))

    def forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution with ``weight`` and ``bias`` in place of its own (``fold.FoldedSequential``)."""
        return self.conv._conv_forward(self._with_coordinates(x), weight, bias)

    def _with_coordinates(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        if height < 2 or width < 2:
            raise ValueError(f"coordinate convolution needs a feature map of at least 2x2, got {height}x{width}")
        return torch.cat([x, coordinate_channels(batch, height, width, x.device, x.dtype)], dim=1)


def coord_block(in_channels: int, out_channels: int) -> FoldedSequential:
    """Two coordinate convs, each followed by BN and ReLU."""
    return FoldedSequential(
        CoordConv2d(in_channels, out_channels),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        CoordConv2d(out_channels, out_channels),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def upsample(in_channels: int, out_channels: int) -> FoldedSequential:
    """x2 transposed conv (3x3, no bias), BN, ReLU."""
    return FoldedSequential(
        nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def image_head(in_channels: int, out_channels: int, mid_channels: int, activation: nn.Module) -> FoldedSequential:
    """conv-BN-ReLU twice (no bias), then a biased 3x3 conv to ``out_channels`` and ``activation``."""
    return FoldedSequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, mid_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, 3, padding=1),
        activation,
    )


class PredictionDecoder(nn.Module):
    """Decodes prototypes + skips into a frame in [-1, 1] (and, with ``mask``, a 1-channel foreground mask)."""

    def __init__(self, memory_dim: int, skip_width: int, channels: int, mask: bool) -> None:
        super().__init__()
        w1, w2, w3, w4 = memory_dim // 8, memory_dim // 4, memory_dim // 2, memory_dim
        self.block4 = coord_block(w4 + skip_width, w4)
        self.up4 = upsample(w4, w3)
        self.block3 = coord_block(w3 + skip_width, w3)
        self.up3 = upsample(w3, w2)
        self.block2 = coord_block(w2, w2)
        self.up2 = upsample(w2, w1)
        self.head = image_head(w1, channels, w1, nn.Tanh())
        self.mask = image_head(w1, 1, w1, nn.Sigmoid()) if mask else None

    def forward(self, z: Tensor, skip3: Tensor, skip4: Tensor) -> tuple[Tensor, Tensor | None]:
        """z [B, D, h, w], skip3 [B, S, 2h, 2w], skip4 [B, S, h, w] -> (frame [B, C, 8h, 8w], mask [B, 1, 8h, 8w] |
        None)."""
        x = self.up4(self.block4(torch.cat([z, skip4], dim=1)))
        x = self.up3(self.block3(torch.cat([x, skip3], dim=1)))
        x = self.up2(self.block2(x))
        return self.head(x), (self.mask(x) if self.mask is not None else None)
