"""DMAD-PDM training loss: prediction MSEs, gradient difference, VQ, field magnitude and smoothness, background.

    total = mse(coarse_prediction) + mse(prediction)
          + gradient_weight * (grad(prediction) + warped_gradient_weight * grad(coarse_prediction))
          + vq_weight * (codebook + commitment)
          + field_weight * (field_magnitude_weight * (|coarse| + |fine|) + smoothness_weight * smoothness)
          + background term

Means are plain, or (``foreground_weighting``, ShanghaiTech) weighted by ``1 + 100 * local distance from the
background``, reduced as ``sum(v * w) / sum(w)`` with the official broadcasting.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .torch_model import VideoOutput


def gradient_difference(a: Tensor, b: Tensor) -> Tensor:
    """|dx(sum_c a) - dx(sum_c b)| + |dy(...) - dy(...)| [B, 1, H, W]; backward differences, zero before the border.

    The official filter [-1, 1] spans all channels, so channels are summed before differencing.
    """
    d = (a - b).sum(1, keepdim=True)
    dx = d - F.pad(d, (1, 0))[..., :, :-1]
    dy = d - F.pad(d, (0, 0, 1, 0))[..., :-1, :]
    return dx.abs() + dy.abs()


def smoothness_map(field: Tensor, kind: str, kernel_size: int) -> Tensor:
    """|high-pass response| [B, 1, H, W] of a field [B, H, W, 2], summed over its two channels (zero padding).

    ``separable``: 1-D filters along x and along y (1 at the centre, -1/(k-1) elsewhere), |rx| + |ry|.
    ``box``: one k x k filter (1 at the centre, -1/(k^2-1) elsewhere).
    """
    x = field.permute(0, 3, 1, 2)
    k, pad = kernel_size, kernel_size // 2
    if kind == "separable":
        taps = torch.full((k,), -1.0 / (k - 1), dtype=x.dtype, device=x.device)
        taps[pad] = 1.0
        rx = F.conv2d(F.pad(x, (pad, pad, 0, 0)), taps.view(1, 1, 1, k).expand(1, 2, 1, k))
        ry = F.conv2d(F.pad(x, (0, 0, pad, pad)), taps.view(1, 1, k, 1).expand(1, 2, k, 1))
        return rx.abs() + ry.abs()
    taps = torch.full((k, k), -1.0 / (k * k - 1), dtype=x.dtype, device=x.device)
    taps[pad, pad] = 1.0
    return F.conv2d(F.pad(x, (pad, pad, pad, pad)), taps.expand(1, 2, k, k)).abs()


def weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """``values.mean()``, or ``sum(values * weight) / sum(weight)`` with broadcasting (as the official reductions)."""
    return values.mean() if weight is None else (values * weight).sum() / weight.sum()


def foreground_weight(frame: Tensor, background: Tensor) -> Tensor:
    """``1 + 100 * avgpool15(|frame - background|^0.5)`` [B, C, H, W] (zero-padded mean, stride 1)."""
    distance = (frame - background).abs().sqrt()
    return 1 + 100 * F.avg_pool2d(distance, kernel_size=15, stride=1, padding=7)


def mask_entropy(mask: Tensor) -> Tensor:
    """Mean binary-entropy-like term of the mask plus a penalty on mean coverage above 1%."""
    return -(mask * torch.log(mask + 1e-8)).mean() + F.relu(mask.mean() - 0.01) * 0.1


@dataclass(frozen=True)
class LossWeights:
    gradient_weight: float = 1.0
    warped_gradient_weight: float = 0.25
    vq_weight: float = 1.0
    field_weight: float = 0.25
    field_magnitude_weight: float = 0.4
    smoothness_weight: float = 1.0
    smoothness: str = "separable"
    coarse_smooth_kernel: int = 7
    fine_smooth_kernel: int = 3
    foreground_weighting: bool = False
    background_loss: str = "plain"

    @classmethod
    def from_config(cls, model: dict[str, Any]) -> "LossWeights":
        """From a MODEL section dict (``config.MODEL_SCHEMA``)."""
        return cls(**{f.name: model[f.name] for f in dataclass_fields(cls)})


class VideoLoss(nn.Module):
    """``(output, target [B, C, H, W]) -> (total, terms)``; terms are the weighted summands' parts, for logging."""

    def __init__(self, weights: LossWeights = LossWeights()) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, output: VideoOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.weights
        background = output.background.expand_as(target)
        weight = foreground_weight(target, background.detach()) if w.foreground_weighting else None
        coarse, fine = output.fields.coarse, output.fields.fine
        magnitude_weight = weight[:, 0] if weight is not None else None
        terms = {
            "warped_mse": weighted_mean((output.coarse_prediction - target) ** 2, weight),
            "prediction_mse": weighted_mean((output.prediction - target) ** 2, weight),
            "gradient": w.gradient_weight
            * (
                weighted_mean(gradient_difference(target, output.prediction), weight)
                + w.warped_gradient_weight
                * weighted_mean(gradient_difference(target, output.coarse_prediction), weight)
            ),
            "vq": output.codebook_loss,
            "commitment": output.commitment_loss,
            "field_coarse": w.field_magnitude_weight * weighted_mean(coarse.norm(dim=-1), magnitude_weight),
            "field_fine": w.field_magnitude_weight * weighted_mean(fine.norm(dim=-1), magnitude_weight),
            "smoothness": w.smoothness_weight
            * (
                weighted_mean(smoothness_map(coarse, w.smoothness, w.coarse_smooth_kernel), weight)
                + weighted_mean(smoothness_map(fine, w.smoothness, w.fine_smooth_kernel), weight)
            ),
        }
        if w.background_loss == "plain":
            terms["background"] = F.mse_loss(background, target)
        else:
            outside = 1 - output.mask_warped.detach()
            terms["background"] = 0.1 * mask_entropy(output.mask) + weighted_mean((background - target) ** 2, outside)
        total = (
            terms["warped_mse"]
            + terms["prediction_mse"]
            + terms["gradient"]
            + w.vq_weight * (terms["vq"] + terms["commitment"])
            + w.field_weight * (terms["field_coarse"] + terms["field_fine"] + terms["smoothness"])
            + terms["background"]
        )
        return total, terms
