"""Synthetic defects for model selection without test labels: CutPaste (Li et al., CVPR 2021), with its masks.

A rectangle cut from the image (2-15 % of its area, aspect ratio 0.3-3.3) is pasted at another random place, its
brightness jittered; the mask is the pasted rectangle. Applied to normal calibration images, it gives a labelled
validation set that never touches the test set (``image/validation.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cutpaste"]


def cutpaste(image: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(defective image [C, H, W], mask [H, W] float32 of {0, 1}) from ``image`` [C, H, W] (any normalisation)."""
    _, h, w = image.shape

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    area = uniform(0.02, 0.15) * h * w
    ratio = math.exp(uniform(math.log(0.3), math.log(1 / 0.3)))
    ph = max(2, min(h - 1, round(math.sqrt(area * ratio))))
    pw = max(2, min(w - 1, round(math.sqrt(area / ratio))))
    sy, sx = (int(torch.randint(0, n - p + 1, (), generator=generator)) for n, p in ((h, ph), (w, pw)))
    ty, tx = (int(torch.randint(0, n - p + 1, (), generator=generator)) for n, p in ((h, ph), (w, pw)))
    patch = image[:, sy : sy + ph, sx : sx + pw].clone()
    patch = patch * uniform(0.8, 1.2) + uniform(-0.3, 0.3)  # a visibly different piece, not a copy in place
    out = image.clone()
    out[:, ty : ty + ph, tx : tx + pw] = patch
    mask = torch.zeros(h, w)
    mask[ty : ty + ph, tx : tx + pw] = 1.0
    return out, mask
