"""The one inference record and the one inference path: batches in, maps and scores out.

Every image method's eval-mode ``forward`` returns ``InferenceOutput``; ``predict_loader`` gathers a whole pass into
``Predictions``. Evaluation, calibration, pictures, the GIF, predict, benchmark and the ONNX check all read these two
records, so none of them knows which method produced the maps. Method-specific maps (DMAD: ``deformation_map``) travel
in ``extras`` by name; a method without them (e.g. DMAD with ``MODEL.pdm=false``) simply leaves them out.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from task.anomaly.unsupervised.records import Predictions
from task.common.runtime import autocast


@torch.no_grad()
def predict_loader(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    amp: str = "none",
    desc: str = "eval",
    channels_last: bool = False,
) -> Predictions:
    """Run ``model`` (eval mode, returning ``InferenceOutput``) over batches of dicts with an ``image`` key.

    Optional batch keys: ``label``, ``mask`` ([B, 1, H, W]), ``path``, ``defect``. ``masks`` is None unless every batch
    carries masks.
    """
    model.eval()
    maps, scores, labels, masks, paths, defects = [], [], [], [], [], []
    extras: dict[str, list[Tensor]] = {}
    with_masks = True
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model(images)
        maps.append(out.anomaly_map[:, 0].float().cpu())
        scores.append(out.score.float().cpu())
        for name, value in out.extras.items():
            extras.setdefault(name, []).append(value[:, 0].float().cpu())
        labels.append(batch["label"].long() if "label" in batch else torch.zeros(len(images), dtype=torch.long))
        if "mask" in batch:
            masks.append(batch["mask"][:, 0].to(torch.uint8))
        else:
            with_masks = False
        paths += list(batch.get("path", []))
        defects += list(batch.get("defect", []))
    return Predictions(
        anomaly_maps=torch.cat(maps),
        scores=torch.cat(scores),
        labels=torch.cat(labels),
        masks=torch.cat(masks) if with_masks and masks else None,
        paths=paths,
        defects=defects,
        extras={name: torch.cat(values) for name, values in extras.items()},
    )
