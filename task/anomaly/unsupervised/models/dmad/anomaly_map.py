"""Anomaly and deformation maps, and the fused image score, from one forward pass."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from task.common.smoothing import gaussian_blur2d

from .deformation import Deformation


def feature_discrepancy(
    encoder_features: list[Tensor], decoder_features: list[Tensor], size: tuple[int, int]
) -> Tensor:
    """Sum over scales of per-pixel (1 - cosine similarity), each upsampled to ``size``: [B, 1, H, W]."""
    total = None
    for enc, dec in zip(encoder_features, decoder_features):
        distance = 1 - F.cosine_similarity(enc, dec, dim=1).unsqueeze(1)
        distance = F.interpolate(distance, size=size, mode="bilinear", align_corners=True)
        total = distance if total is None else total + distance
    return total


class AnomalyMapGenerator(nn.Module):
    """Feature discrepancy warped back into the input frame, and the deformation magnitude, both smoothed.

    Returns (anomaly_map [B, 1, H, W], deformation_map [B, 1, H, W] or None without a PDM) before any normalisation.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(
        self,
        encoder_features: list[Tensor],
        decoder_features: list[Tensor],
        size: tuple[int, int],
        deformation: Deformation | None,
    ) -> tuple[Tensor, Tensor | None]:
        # Maps are computed in float32 even under autocast: smoothing and warps are cheap and precision-sensitive
        # (autocast would run the smoothing convolutions in bf16/fp16 and quantise the maps into many tied values).
        device_type = encoder_features[0].device.type
        float32 = (
            torch.autocast(device_type, enabled=False)
            if torch.is_autocast_enabled(device_type)
            else contextlib.nullcontext()
        )
        with float32:
            enc = [f.float() for f in encoder_features]
            dec = [f.float() for f in decoder_features]
            anomaly = feature_discrepancy(enc, dec, size)
            if deformation is None:
                return gaussian_blur2d(anomaly, self.sigma), None
            return gaussian_blur2d(deformation.unwarp(anomaly), self.sigma), gaussian_blur2d(
                deformation.magnitude_map(), self.sigma
            )


def fuse_scores(anomaly_max: Tensor, deformation_max: Tensor | None, stats: Tensor, weight: Tensor) -> Tensor:
    """Image score = minmax(anomaly max) + weight * minmax(deformation max); [B] maxima in, [B] scores out.

    Without a PDM (``deformation_max`` None) the score is minmax(anomaly max) alone.

    ``stats`` = [anomaly_min, anomaly_max, deformation_min, deformation_max] measured on normal training
    images (the official code min-max normalises over the test set instead, which leaks test statistics).
    """
    eps = torch.finfo(torch.float32).eps
    anomaly = (anomaly_max - stats[0]) / (stats[1] - stats[0]).clamp_min(eps)
    if deformation_max is None:
        return anomaly
    deform = (deformation_max - stats[2]) / (stats[3] - stats[2]).clamp_min(eps)
    return anomaly + weight * deform
