"""Locally aware patch features: backbone feature maps -> one embedding vector per patch of the first layer's grid.

Each map is averaged over its 3x3 neighbourhood (stride 1, zero padding counted, so the grid keeps its size), the
deeper maps are upsampled bilinearly to the first (shallowest) map's grid, and all are concatenated along channels.
Optionally each patch vector is reduced to ``embedding_dim`` channels by adaptive average pooling (the paper's code
does so; anomalib does not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def adaptive_pool_matrix(in_dim: int, out_dim: int) -> Tensor:
    """[in_dim, out_dim] matrix ``P`` with ``x @ P == F.adaptive_avg_pool1d(x[:, None], out_dim)[:, 0]``.

    Bin j averages inputs floor(j * in / out) .. ceil((j + 1) * in / out) - 1, as torch's adaptive pooling. A matmul
    exports to ONNX for any pair of sizes, where the pooling operator needs ``in_dim`` divisible by ``out_dim``.
    """
    matrix = torch.zeros(in_dim, out_dim)
    for j in range(out_dim):
        start, end = (j * in_dim) // out_dim, -((-(j + 1) * in_dim) // out_dim)
        matrix[start:end, j] = 1.0 / (end - start)
    return matrix


class PatchEmbedding(nn.Module):
    """features (maps [B, C_i, h_i, w_i], shallowest first) -> embedding [B, D, h_0, w_0].

    D = sum(C_i), or ``embedding_dim`` when set.
    """

    def __init__(self, channels: list[int], embedding_dim: int | None = None) -> None:
        super().__init__()
        self.aggregate = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        total = sum(channels)
        self.dim = embedding_dim or total
        # Derived from the sizes alone: not saved in checkpoints.
        self.register_buffer(
            "pool", adaptive_pool_matrix(total, embedding_dim) if embedding_dim else None, persistent=False
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        maps = [self.aggregate(f) for f in features]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        embedding = torch.cat(maps, dim=1)
        if self.pool is None:
            return embedding
        # [B, C, h, w] -> [B, h, w, C] @ [C, D] -> [B, D, h, w]
        return (embedding.permute(0, 2, 3, 1) @ self.pool).permute(0, 3, 1, 2)


def patch_vectors(embedding: Tensor) -> Tensor:
    """[B, D, h, w] -> [B * h * w, D] (row-major over h, w within each image)."""
    return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
