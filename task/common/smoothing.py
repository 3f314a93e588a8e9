"""Gaussian smoothing that reproduces ``scipy.ndimage.gaussian_filter`` on 2-D maps, on any torch device.

scipy builds a kernel of radius ``int(truncate * sigma + 0.5)`` from ``exp(-x^2 / (2 sigma^2))`` normalised to
sum 1, and pads with mode ``reflect`` (half-sample symmetric: ``d c b a | a b c d``), which torch's own
padding modes lack. The padding is done with a precomputed index gather, which also exports to ONNX.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """The 1-D kernel scipy uses for ``gaussian_filter(sigma, truncate)``, float64, length ``2r+1``."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 / (float(sigma) ** 2) * x**2)
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=32)
def _symmetric_indices(length: int, radius: int) -> Tensor:
    """Source index for each padded position under half-sample symmetric reflection (any radius)."""
    idx = torch.arange(-radius, length + radius)
    period = 2 * length
    idx = torch.remainder(idx, period)
    return torch.where(idx >= length, period - 1 - idx, idx)


def gaussian_blur2d(maps: Tensor, sigma: float = 4.0, truncate: float = 4.0) -> Tensor:
    """Smooth the last two dimensions of ``maps`` ([..., H, W]) like ``scipy.ndimage.gaussian_filter``.

    Leading dimensions are treated as a batch (scipy on a [1, 1, H, W] array gives the same result, since
    reflecting a length-1 axis is the identity). Output has the shape and dtype of the input.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate).to(device=maps.device, dtype=maps.dtype)
    radius = kernel.numel() // 2
    shape = maps.shape
    height, width = shape[-2], shape[-1]
    x = maps.reshape(-1, 1, height, width)
    rows = _symmetric_indices(height, radius).to(maps.device)
    cols = _symmetric_indices(width, radius).to(maps.device)
    # scipy filters the axes one after the other (rows first, then columns); keep that order.
    x = F.conv2d(x.index_select(2, rows), kernel.view(1, 1, -1, 1))
    x = F.conv2d(x.index_select(3, cols), kernel.view(1, 1, 1, -1))
    return x.reshape(shape)


def kernel_radius(sigma: float, truncate: float = 4.0) -> int:
    return int(truncate * float(sigma) + 0.5) if sigma > 0 else 0


__all__ = ["gaussian_blur2d", "gaussian_kernel1d", "kernel_radius"]
