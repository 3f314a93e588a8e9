"""DMAD-PDM video model: predict the frame after a clip, through a prototype memory and a learned deformation.

    clip [B, T, C, H, W] in [-1, 1] -> stacked [B, T*C (+C), H, W]
      -> PDM fields (coarse, fine) ; encoder -> z_e [B, D, H/8, W/8] -> nearest prototypes -> decoder -> prototype frame
      -> warp coarse, compose over the background -> warp fine, compose -> prediction [B, C, H, W]

In eval mode the forward is the official evaluation forward (BatchNorm statistics frozen; nothing else changes).
H and W must be multiples of 8 and equal the background template size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from task.common.errors import UserError
from task.common.warping import warp

from .background import BackgroundTemplates, compose, compose_premultiplied
from .decoder import PredictionDecoder
from .deformation import Fields, PyramidDeformation
from .encoder import ClipEncoder
from .memory import PrototypeMemory


@dataclass
class VideoOutput:
    prediction: Tensor  # [B, C, H, W]: predicted next frame (coarse and fine warps, composed)
    coarse_prediction: Tensor  # [B, C, H, W]: after the coarse warp only, composed
    prototype: Tensor  # [B, C, H, W]: decoded prototype frame before any warp (masked with mask_source=decoder)
    fields: Fields  # coarse / fine displacements and grids [B, H, W, 2]
    mask: Tensor  # [B, M, H, W]: foreground mask before warping (M = C, or 1 with mask_source=decoder)
    mask_warped: Tensor  # [B, M, H, W]: the mask after both warps (what composes the prediction)
    background: Tensor  # [B or 1, C, H, W]: each clip's template, not detached (the background loss trains it)
    codebook_loss: Tensor
    commitment_loss: Tensor  # already scaled by the VQ beta
    indices: Tensor  # [B, H/8, W/8] prototype indices


class VideoDMADModel(nn.Module):
    """See the module docstring. Widths are (D/8, D/4, D/2, D) for ``memory_dim`` D; skips are D/skip_ratio wide."""

    def __init__(
        self,
        channels: int = 3,
        clip_length: int = 4,
        memory_size: int = 200,
        memory_dim: int = 256,
        skip_ratio: int = 8,
        vq_beta: float = 0.25,
        coarse_shift: float = 2.0,
        fine_shift: float = 3.0,
        coarse_strides: Sequence[int] = (1, 2, 2),
        num_backgrounds: int = 1,
        image_size: tuple[int, int] = (256, 256),
        background_input: bool = False,
        mask_source: str = "encoder",
        pdm_width: int = 64,
    ) -> None:
        super().__init__()
        if memory_dim % 8 or memory_dim % skip_ratio:
            raise UserError(
                f"MODEL.memory_dim={memory_dim} must be a multiple of 8 and of MODEL.skip_ratio={skip_ratio}"
            )
        if mask_source not in ("encoder", "decoder"):
            raise UserError(f"MODEL.mask_source must be encoder or decoder; got {mask_source!r}")
        if any(s % 8 or s < 16 for s in image_size):
            raise UserError(
                f"frame size {tuple(image_size)} must be multiples of 8 and at least 16; set DATASET.resize"
            )
        self.channels, self.clip_length = channels, clip_length
        self.background_input = background_input
        in_channels = channels * (clip_length + int(background_input))
        skip_width = memory_dim // skip_ratio
        self.deformation = PyramidDeformation(in_channels, coarse_shift, fine_shift, coarse_strides, pdm_width)
        self.encoder = ClipEncoder(in_channels, memory_dim, skip_width, channels if mask_source == "encoder" else 0)
        self.memory = PrototypeMemory(memory_size, memory_dim, vq_beta)
        self.decoder = PredictionDecoder(memory_dim, skip_width, channels, mask=mask_source == "decoder")
        self.background = BackgroundTemplates(num_backgrounds, channels, tuple(image_size))

    @classmethod
    def from_config(
        cls, model: dict[str, Any], image_size: tuple[int, int], num_videos: int | None = None
    ) -> "VideoDMADModel":
        """Build from a MODEL section dict (``config.MODEL_SCHEMA``); ``num_videos`` resolves num_backgrounds=null."""
        num = model["num_backgrounds"]
        if num is None:
            if num_videos is None:
                raise UserError(
                    "MODEL.num_backgrounds is null (one per video) but the number of videos is unknown; set it"
                )
            num = num_videos
        keys = (
            "channels",
            "clip_length",
            "memory_size",
            "memory_dim",
            "skip_ratio",
            "vq_beta",
            "coarse_shift",
            "fine_shift",
            "coarse_strides",
            "background_input",
            "mask_source",
            "pdm_width",
        )
        return cls(**{k: model[k] for k in keys}, num_backgrounds=num, image_size=tuple(image_size))

    def set_background(self, template: Tensor) -> None:
        """Initialise the template parameter(s) from ``template`` [V, C, H, W] in [-1, 1]."""
        self.background.set(template)

    def forward(self, clip: Tensor, background_index: Tensor | None = None) -> VideoOutput:
        """clip [B, T, C, H, W] in [-1, 1]; background_index [B] int64 (needed with several templates)."""
        batch, length, channels, height, width = clip.shape
        if length != self.clip_length or channels != self.channels:
            raise ValueError(f"expected clips [B, {self.clip_length}, {self.channels}, H, W], got {list(clip.shape)}")
        background = self.background.select(background_index)
        if background.shape[-2:] != (height, width):
            raise ValueError(
                f"frames are {height}x{width} but the background template is {tuple(background.shape[-2:])}"
            )
        x = clip.reshape(batch, length * channels, height, width)  # frame-major channel stacking, as the official
        fixed_background = background.detach()
        if self.background_input:
            x = torch.cat([x, fixed_background.expand(batch, -1, -1, -1)], dim=1)
        fields = self.deformation(x)
        z_e, skip3, skip4, encoder_mask = self.encoder(x)
        quantized = self.memory(z_e)
        prototype, decoder_mask = self.decoder(quantized.features, skip3, skip4)
        if encoder_mask is not None:
            mask, combine = encoder_mask, compose
        else:
            prototype = prototype * decoder_mask
            mask, combine = decoder_mask, compose_premultiplied
        coarse, fine = fields.apply(prototype)
        mask_coarse = warp(mask, fields.grid_coarse)
        mask_fine = warp(mask_coarse, fields.grid_fine)
        return VideoOutput(
            prediction=combine(fine, mask_fine, fixed_background),
            coarse_prediction=combine(coarse, mask_coarse, fixed_background),
            prototype=prototype,
            fields=fields,
            mask=mask,
            mask_warped=mask_fine,
            background=background,
            codebook_loss=quantized.codebook_loss,
            commitment_loss=quantized.commitment_loss,
            indices=quantized.indices,
        )


def optimizer_groups(model: VideoDMADModel, lr: float, background_lr_factor: float) -> list[dict[str, Any]]:
    """AdamW parameter groups as the official training builds them; the background group comes last.

    The official ped2/avenue scripts later overwrite the last group's lr each epoch; see ``official_background_lr``.
    """
    parts = ("encoder", "decoder", "deformation", "memory")
    groups = [{"name": name, "params": list(getattr(model, name).parameters()), "lr": lr} for name in parts]
    return groups + [{"name": "background", "params": [model.background.template], "lr": lr * background_lr_factor}]


def official_background_lr(epoch: int, lr: float, late_factor: float | None, switch_epoch: int | None) -> float | None:
    """The background lr the official script forces for 0-based ``epoch``, or None to keep the scheduler's value.

    Train_ped2/avenue set it to ``20 * lr`` after each scheduler step from the end of epoch 5 on, i.e. epochs 6, 7,
    ... run with a constant 20x lr; apply it after every ``scheduler.step()``.
    """
    if late_factor is None or switch_epoch is None or epoch < switch_epoch:
        return None
    return late_factor * lr
