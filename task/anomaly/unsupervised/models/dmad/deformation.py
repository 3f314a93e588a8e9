"""Pyramid Deformation Module (PDM): learned coarse + fine warps of the input and their inverses.

Data flow for an input ``x`` of shape [B, 3, H, W]:

    stem (2 coordinate convs) -> [B, 64, H, W] -> refine (residual block) -> cat -> [B, 128, H, W]
    coarse heads: stride 8 -> [B, 2, H/8, W/8]     fine heads: stride 2 -> [B, 2, H/2, W/2]
    tanh-bounded fields, scaled to at most ``coarse_shift`` / ``fine_shift`` of the image, upsampled to
    [B, H, W, 2] in ``grid_sample``'s normalised [-1, 1] coordinates (x first, then y).

The input is warped coarse-then-fine; the inverse fields warp fine-back-then-coarse-back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from task.common.warping import identity_grid, warp


def coordinate_channels(height: int, width: int, block: int = 4) -> Tensor:
    """Four position channels [1, 4, H, W]: row offset within its ``block``, row block, column offset, column block.

    Each is scaled to [-1, 1] as in the official PDM: ``2 * (i / (H - 1) - (i // block) / (H / block - 1)) - 1``
    for the fine channel and ``2 * (i // block) / (H / block - 1) - 1`` for the coarse one (same along W).
    """

    def axis(n: int) -> tuple[Tensor, Tensor]:
        blocks = n // block
        coarse = (torch.arange(n) // (n // blocks)).float() / (blocks - 1)
        fine = torch.arange(n, dtype=torch.float32) / (n - 1) - coarse
        return fine * 2 - 1, coarse * 2 - 1

    row_fine, row_coarse = axis(height)
    col_fine, col_coarse = axis(width)
    rows = [c.view(1, 1, height, 1).expand(1, 1, height, width) for c in (row_fine, row_coarse)]
    cols = [c.view(1, 1, 1, width).expand(1, 1, height, width) for c in (col_fine, col_coarse)]
    return torch.cat([rows[0], rows[1], cols[0], cols[1]], dim=1)


class CoordConv2d(nn.Module):
    """3x3 convolution over the input with the four ``coordinate_channels`` appended (no bias)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 4, out_channels, kernel_size=3, padding=1, bias=False)
        self._coords: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        key = (height, width, x.device, x.dtype)
        if torch.compiler.is_compiling():
            # Traced into the graph as a constant; filling the cache here would make torch.compile recompile.
            coords = coordinate_channels(height, width).to(device=x.device, dtype=x.dtype)
        else:
            if key not in self._coords:  # constant per size; built once, not per step
                self._coords[key] = coordinate_channels(height, width).to(device=x.device, dtype=x.dtype)
            coords = self._coords[key]
        coords = coords.expand(batch, -1, -1, -1)
        return self.conv(torch.cat([x, coords], dim=1))


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(bn(conv3x3(relu(x)))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _field_head(downsamplings: int, channels: int = 64) -> nn.Sequential:
    """``downsamplings`` strided conv-BN-ReLU stages, then a conv to 2 channels and tanh (field in [-1, 1])."""
    layers: list[nn.Module] = _conv_bn_relu(2 * channels, channels)
    for _ in range(downsamplings - 1):
        layers += _conv_bn_relu(channels, channels)
    layers += [nn.Conv2d(channels, 2, 3, padding=1), nn.Tanh()]
    return nn.Sequential(*layers)


@dataclass
class Deformation:
    """Output of the PDM. Fields are displacements [B, H, W, 2]; grids are ``identity + field``, clamped."""

    warped: Tensor  # [B, C, H, W]: input warped coarse then fine, what the encoder sees
    coarse: Tensor
    fine: Tensor
    coarse_inverse: Tensor
    fine_inverse: Tensor
    grid_coarse: Tensor
    grid_fine: Tensor
    grid_coarse_inverse: Tensor
    grid_fine_inverse: Tensor

    def unwarp(self, x: Tensor) -> Tensor:
        """Map ``x`` [B, C, H, W] from the warped frame back to the input frame (fine inverse, then coarse)."""
        return warp(warp(x, self.grid_fine_inverse), self.grid_coarse_inverse)

    def magnitude_map(self) -> Tensor:
        """Deformation magnitude [B, 1, H, W] as the official evaluation builds it.

        ``|fine_inverse|`` carried through the coarse inverse warp, plus ``|coarse_inverse|``.
        """
        fine = self.fine_inverse.norm(dim=-1).unsqueeze(1)
        coarse = self.coarse_inverse.norm(dim=-1).unsqueeze(1)
        return warp(fine, self.grid_coarse_inverse) + coarse


class PyramidDeformation(nn.Module):
    """Predicts coarse (stride 8) and fine (stride 2) deformation fields and their inverses, and warps the input.

    Args:
        in_channels: image channels.
        coarse_shift: largest coarse displacement as a fraction of the image size (official: 8/256).
        fine_shift: largest fine displacement as a fraction of the image size (official: 3/256).
    """

    def __init__(self, in_channels: int = 3, coarse_shift: float = 8 / 256, fine_shift: float = 3 / 256) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            CoordConv2d(in_channels, 64),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            CoordConv2d(64, 64),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.refine = nn.Sequential(ResidualBlock(64), nn.BatchNorm2d(64))
        self.fine_head = _field_head(1)
        self.coarse_head = _field_head(3)
        self.fine_inverse_head = _field_head(1)
        self.coarse_inverse_head = _field_head(3)
        # grid_sample coordinates span 2 units across the image, hence the factor 2.
        self.coarse_scale = 2 * coarse_shift
        self.fine_scale = 2 * fine_shift

    def forward(self, x: Tensor) -> Deformation:
        """x: [B, C, H, W] (H, W multiples of 8) -> ``Deformation``."""
        batch, _, height, width = x.shape
        stem = self.stem(x)
        features = torch.cat([self.refine(stem), stem], dim=1)
        heads = (self.coarse_head, self.fine_head, self.coarse_inverse_head, self.fine_inverse_head)
        scales = (self.coarse_scale, self.fine_scale, self.coarse_scale, self.fine_scale)
        # All four heads open with a stride-2 conv over the same full-resolution features. One conv with their
        # stacked weights reads (and back-propagates into) those features once instead of four times; each output
        # channel is the same sum as before, so only float rounding can differ.
        openers = [head[0] for head in heads]
        opened = F.conv2d(
            features,
            torch.cat([c.weight for c in openers]),
            torch.cat([c.bias for c in openers]),
            stride=openers[0].stride,
            padding=openers[0].padding,
        )

        def field(head: nn.Sequential, opened_part: Tensor, scale: float) -> Tensor:
            out = opened_part
            for layer in list(head)[1:]:
                out = layer(out)
            # Fields and grids stay float32 under autocast: a bf16 grid coordinate near the border is only good
            # to about one pixel at 256x256.
            out = F.interpolate(out.float() * scale, (height, width), mode="bilinear", align_corners=True)
            # Stored [B, H, W, 2] contiguous: the per-pixel norms over the last dim are then ~20x faster than on
            # the permuted view.
            return out.permute(0, 2, 3, 1).contiguous()

        coarse, fine, coarse_inverse, fine_inverse = (
            field(head, part, scale) for head, part, scale in zip(heads, opened.chunk(len(heads), dim=1), scales)
        )
        base = identity_grid(batch, height, width, x.device, coarse.dtype)
        grids = [torch.clamp(base + f, -1, 1) for f in (coarse, fine, coarse_inverse, fine_inverse)]
        warped = warp(warp(x, grids[0]), grids[1])
        return Deformation(warped, coarse, fine, coarse_inverse, fine_inverse, *grids)
