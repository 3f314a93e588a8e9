"""Sampling grids shared by the deformation modules of both DMAD variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def warp(x: Tensor, grid: Tensor) -> Tensor:
    """Bilinear resampling of ``x`` [B, C, H, W] at ``grid`` [B, H, W, 2] (align_corners, zero padding)."""
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def identity_grid(batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The grid [B, H, W, 2] that ``warp`` maps to the identity: x varies along W, y along H."""
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1).unsqueeze(0).expand(batch, height, width, 2)
