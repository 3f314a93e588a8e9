"""Learnable background template(s) and the composition of the warped prediction over them.

Templates are [V, C, H, W] in [-1, 1]: one for a fixed-camera dataset (ped2, avenue), one per video for
ShanghaiTech. The composition reads them detached; only the background loss trains them (with a larger lr).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from task.common.errors import UserError


class BackgroundTemplates(nn.Module):
    """``num`` templates [num, channels, H, W], zero until ``set`` fills them from training frames."""

    def __init__(self, num: int, channels: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.template = nn.Parameter(torch.zeros(num, channels, *image_size))

    def set(self, template: Tensor) -> None:
        """Copy ``template`` [V, C, H, W] (values in [-1, 1]) into the parameter; V, C, H, W must match it."""
        if tuple(template.shape) != tuple(self.template.shape):
            raise UserError(
                f"background template has shape {tuple(template.shape)} but the model expects "
                f"{tuple(self.template.shape)}; "
                "build the model with MODEL.num_backgrounds, MODEL.channels and the frame size of the data"
            )
        with torch.no_grad():
            self.template.copy_(template)

    def select(self, index: Tensor | None) -> Tensor:
        """The template of each clip [B, C, H, W] for ``index`` [B] int64, or the single template [1, C, H, W]."""
        if index is None:
            if self.template.shape[0] != 1:
                raise ValueError(
                    f"{self.template.shape[0]} background templates: pass background_index [B] to pick one per clip"
                )
            return self.template
        return self.template[index]


def compose(foreground: Tensor, mask: Tensor, background: Tensor) -> Tensor:
    """``foreground * mask + (1 - mask) * background``; mask [B, C or 1, H, W] in [0, 1], background broadcasts."""
    return foreground * mask + (1 - mask) * background


def compose_premultiplied(foreground: Tensor, mask: Tensor, background: Tensor) -> Tensor:
    """``foreground + (1 - mask) * background`` for a foreground already multiplied by its mask (ShanghaiTech)."""
    return foreground + (1 - mask) * background
