"""Nearest-prototype lookup shared by the vector-quantised bottleneck (images) and prototype memory (video)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def nearest_codes(latents: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """(quantized latents, code indices) for ``latents`` [..., D] and ``codebook`` [K, D].

    Squared distances via the expansion ||a||^2 + ||b||^2 - 2ab: one matmul instead of a [N, K, D] tensor.
    ``quantized`` has the shape of ``latents``; ``indices`` [N] (N = latents.numel() / D).
    """
    flat = latents.reshape(-1, latents.shape[-1])
    distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    indices = distances.argmin(dim=1)
    return F.embedding(indices, codebook).view_as(latents), indices
