"""Raw per-frame anomaly scores exactly as the official DMAD-PDM evaluation computes them (before its per-video
min-max normalisation, smoothing and fusion, which the protocol code applies).

The official evaluation runs one clip per batch and takes each maximum over the whole batch; these functions
take it per clip, which is the same at batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .loss import gradient_difference
from .torch_model import VideoOutput


@dataclass(frozen=True)
class ScoreSettings:
    """The MODEL keys that select the official score variant (defaults: ped2)."""

    deformation_field: str = "vertical"
    deformation_window: tuple[int, int] = (7, 18)
    prediction_score: str = "l1"
    prediction_window: tuple[int, int] = (42, 31)
    gradient_window: tuple[int, int] = (16, 14)
    object_score: bool = False

    @classmethod
    def from_config(cls, model: dict[str, Any]) -> "ScoreSettings":
        """From a MODEL section dict (``config.MODEL_SCHEMA``)."""
        values = {f.name: model[f.name] for f in dataclass_fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def window_max(values: Tensor, window: tuple[int, int]) -> Tensor:
    """Max over positions of the channel-summed box mean [B]; values [B, c, H, W], window (h, w).

    As the official ``Test_Loss``: zero padding of h rows and w columns on each side, a (h, w) box of 1/(h*w)
    spanning all channels, then the maximum.
    """
    h, w = window
    # The box mean is linear and separable: sum the channels first, then an (h, 1) and a (1, w) pass, h + w adds
    # per position instead of c * h * w (the same values up to float rounding).
    padded = F.pad(values.abs().sum(1, keepdim=True), (w, w, h, h))
    return F.avg_pool2d(F.avg_pool2d(padded, (h, 1), stride=1), (1, w), stride=1).flatten(1).amax(1)


def error_map(output: VideoOutput, target: Tensor) -> Tensor:
    """Prediction error heatmap [B, 1, H, W]: squared error averaged over channels (the official ``err_map``)."""
    return ((output.prediction - target) ** 2).mean(1, keepdim=True)


def object_scores(mask: Tensor, errors: Tensor, threshold: float = 0.7, min_area: float = 13.0) -> Tensor:
    """Largest mean error inside a mask blob, per frame [B] (ShanghaiTech's third score; 0 without a blob).

    mask [B, 1, H, W] (the warped mask), errors [B, 1, H, W]. Blobs are the filled outer contours of
    ``mask > threshold`` whose polygon area exceeds ``min_area`` (OpenCV ``contourArea``).
    """
    masks = (mask[:, 0] > threshold).to(torch.uint8).cpu().numpy()
    error_maps = errors[:, 0].detach().float().cpu().numpy()
    scores = []
    for binary, err in zip(masks, error_maps):
        best = 0.0
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for i, contour in enumerate(contours):
            if cv2.contourArea(contour) > min_area:
                filled = cv2.drawContours(np.zeros_like(binary), contours, i, 1, -1).astype(bool)
                best = max(best, float(err[filled].mean()))
        scores.append(best)
    return torch.tensor(scores, dtype=errors.dtype, device=errors.device)


def frame_scores(output: VideoOutput, target: Tensor, settings: ScoreSettings = ScoreSettings()) -> dict[str, Tensor]:
    """Per-frame raw scores {deformation, prediction, gradient (, object)} each [B]; target [B, C, H, W].

    deformation: window max of |coarse field y| (ped2, avenue) or of its magnitude (ShanghaiTech).
    prediction: mean |error| (ped2), mean squared error (avenue) or window max of the squared error (ShanghaiTech).
    gradient: window max of the gradient difference. object (``object_score``): see ``object_scores``.
    """
    coarse = output.fields.coarse
    field = coarse[..., 1].abs() if settings.deformation_field == "vertical" else coarse.norm(dim=-1)
    error = output.prediction - target
    if settings.prediction_score == "l1":
        prediction = error.abs().flatten(1).mean(1)
    elif settings.prediction_score == "mse":
        prediction = (error**2).flatten(1).mean(1)
    else:
        prediction = window_max(error**2, settings.prediction_window)
    scores = {
        "deformation": window_max(field.unsqueeze(1), settings.deformation_window),
        "prediction": prediction,
        "gradient": window_max(gradient_difference(target, output.prediction), settings.gradient_window),
    }
    if settings.object_score:
        scores["object"] = object_scores(output.mask_warped, error_map(output, target))
    return scores
