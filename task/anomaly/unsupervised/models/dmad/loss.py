"""DMAD training loss: reverse-distillation cosine loss + PDM regularisers + VQ loss."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .deformation import Deformation


def distillation_loss(encoder_features: list[Tensor], decoder_features: list[Tensor]) -> Tensor:
    """Sum over scales of mean_b(1 - cos(flatten(enc_b), flatten(dec_b))): one cosine per whole feature map."""
    loss = encoder_features[0].new_zeros(())
    for enc, dec in zip(encoder_features, decoder_features):
        loss = loss + (1 - F.cosine_similarity(enc.flatten(1), dec.flatten(1))).mean()
    return loss


def smoothness(field: Tensor, kernel_size: int = 3) -> Tensor:
    """Mean |Laplacian-like response| of a field [B, H, W, 2].

    The official filter is ``1`` at the centre and ``-1/(k^2-1)`` elsewhere, applied to both channels at once
    and summed (a single output channel), with zero padding.
    """
    weight = torch.full((kernel_size, kernel_size), -1.0 / (kernel_size**2 - 1), dtype=field.dtype, device=field.device)
    weight[kernel_size // 2, kernel_size // 2] = 1.0
    weight = weight.expand(1, 2, kernel_size, kernel_size)
    return F.conv2d(field.permute(0, 3, 1, 2), weight, padding=kernel_size // 2).abs().mean()


def deformation_loss(x: Tensor, deformation: Deformation, gamma: float) -> Tensor:
    """Forward-field magnitudes + smoothness of all four fields + gamma * MSE(unwarp(warp(x)), x)."""
    magnitude = deformation.coarse.norm(dim=-1).mean() + deformation.fine.norm(dim=-1).mean()
    smooth = sum(
        smoothness(f)
        for f in (deformation.coarse, deformation.fine, deformation.coarse_inverse, deformation.fine_inverse)
    )
    cycle = F.mse_loss(deformation.unwarp(deformation.warped), x)
    return magnitude + smooth + gamma * cycle


class DMADLoss(nn.Module):
    """Returns the total loss and its named terms (for logging)."""

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(
        self,
        x: Tensor,
        encoder_features: list[Tensor],
        decoder_features: list[Tensor],
        deformation: Deformation | None,
        vq_loss: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Terms ``distillation``, ``deformation`` (only with a PDM) and ``vq`` (zero without a codebook)."""
        terms = {"distillation": distillation_loss(encoder_features, decoder_features)}
        if deformation is not None:
            terms["deformation"] = deformation_loss(x, deformation, self.gamma)
        terms["vq"] = vq_loss
        return sum(terms.values()), terms
