"""Vector-quantised prototype memory: each feature vector is replaced by its nearest prototype."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from task.common.vector_quantize import nearest_codes


@dataclass
class Quantized:
    features: Tensor  # [B, D, h, w]: prototype values forward, straight-through gradient to the input
    indices: Tensor  # [B, h, w] int64: chosen prototype per position
    codebook_loss: Tensor  # mean ||q - sg[z]||^2: moves the prototypes
    commitment_loss: Tensor  # beta * mean ||sg[q] - z||^2: pulls the encoder toward its prototypes


class PrototypeMemory(nn.Module):
    """``size`` prototypes of dimension ``dim``, initialised uniform in [-1/size, 1/size] as the official code."""

    def __init__(self, size: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(size, dim)
        nn.init.uniform_(self.codebook.weight, -1 / size, 1 / size)

    def forward(self, z: Tensor) -> Quantized:
        """z [B, D, h, w] -> ``Quantized``."""
        latents = z.permute(0, 2, 3, 1)
        quantized, indices = nearest_codes(latents, self.codebook.weight)
        codebook_loss = F.mse_loss(quantized, latents.detach())
        commitment_loss = self.beta * F.mse_loss(quantized.detach(), latents)
        quantized = latents + (quantized - latents).detach()
        return Quantized(
            quantized.permute(0, 3, 1, 2), indices.view(latents.shape[:-1]), codebook_loss, commitment_loss
        )
