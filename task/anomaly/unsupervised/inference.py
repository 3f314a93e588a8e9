"""One inference path for evaluation, pictures, prediction and export checks: batches in, maps and scores out."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm


def autocast(device: torch.device, amp: str):
    """Autocast context for ``amp`` in {none, bf16, fp16}; fp16 only on CUDA."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Predictions:
    """Per-image outputs of a pass over a dataset (CPU tensors)."""

    anomaly_maps: Tensor  # [N, H, W] float32
    deformation_maps: Tensor  # [N, H, W] float32
    scores: Tensor  # [N] fused image scores
    labels: Tensor  # [N] int64 (0 when unknown)
    masks: Tensor | None  # [N, H, W] uint8 {0, 1}, None when the loader has no masks
    paths: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)

    @property
    def anomaly_max(self) -> Tensor:
        return self.anomaly_maps.flatten(1).amax(1)

    @property
    def deformation_max(self) -> Tensor:
        return self.deformation_maps.flatten(1).amax(1)


@torch.no_grad()
def predict_loader(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, amp: str = "none", desc: str = "eval", channels_last: bool = False
) -> Predictions:
    """Run ``model`` (eval mode, returning ``InferenceOutput``) over ``loader`` batches of dicts with an ``image`` key."""
    model.eval()
    maps, deforms, scores, labels, masks, paths, defects = [], [], [], [], [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model(images)
        maps.append(out.anomaly_map[:, 0].float().cpu())
        deforms.append(out.deformation_map[:, 0].float().cpu())
        scores.append(out.score.float().cpu())
        labels.append(batch["label"].long() if "label" in batch else torch.zeros(len(images), dtype=torch.long))
        if "mask" in batch:
            masks.append(batch["mask"][:, 0].to(torch.uint8))
        paths += list(batch.get("path", []))
        defects += list(batch.get("defect", []))
    return Predictions(
        torch.cat(maps), torch.cat(deforms), torch.cat(scores), torch.cat(labels), torch.cat(masks) if masks else None, paths, defects
    )
