"""The one inference path of video methods: clips in, raw per-frame scores (and optionally error maps) out, per video.

Calibration, evaluation, pictures, predict and benchmark all run clips through ``score_clips``; the method supplies
``score_batch(model, batch, settings) -> (raw scores name -> [B], error maps [B, 1, H, W])``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from task.anomaly.unsupervised.data.video.clips import Video
from task.anomaly.unsupervised.engine.engine import Engine
from task.common.runtime import autocast


@dataclass
class FrameScores:
    """Raw per-frame scores of a set of videos, in video order (CPU numpy)."""

    videos: list[Video]
    scores: dict[str, list[np.ndarray]]  # name -> V arrays [n_v]
    frames: list[np.ndarray]  # V arrays [n_v] int64: the target frame index of each score
    error_maps: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # kept maps: video -> frame -> [H, W]


@torch.no_grad()
def score_clips(engine: Engine, model: nn.Module, dataset, videos: list[Video], desc: str, keep_maps: set[tuple[int, int]] | None = None) -> FrameScores:
    """Run the method's ``score_batch`` over ``dataset`` (a ClipDataset or a Subset of one), grouped per video."""
    method, cfg = engine.method, engine.cfg
    settings = method.score_settings(cfg)
    model.eval()
    loader = DataLoader(dataset, batch_size=cfg.TEST.batch_size, shuffle=False, num_workers=cfg.DATALOADER.num_workers, pin_memory=cfg.DATALOADER.pin_memory)
    per_video: dict[int, dict[str, list[Tensor]]] = {}
    frames: dict[int, list[Tensor]] = {}
    kept: dict[int, dict[int, np.ndarray]] = {}
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        on_device = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
        with autocast(engine.device, engine.amp):
            scores, maps = method.score_batch(model, on_device, settings)
        video_ids, frame_ids = batch["video"].tolist(), batch["frame"]
        for i, v in enumerate(video_ids):
            store = per_video.setdefault(v, {})
            for name, values in scores.items():
                store.setdefault(name, []).append(values[i : i + 1].float().cpu())
            frames.setdefault(v, []).append(frame_ids[i : i + 1])
            if keep_maps is not None and (v, int(frame_ids[i])) in keep_maps:
                kept.setdefault(v, {})[int(frame_ids[i])] = maps[i, 0].float().cpu().numpy()
    order = sorted(per_video)
    names = list(per_video[order[0]]) if order else []
    return FrameScores(
        videos=[videos[v] for v in order],
        scores={n: [torch.cat(per_video[v][n]).double().numpy() for v in order] for n in names},
        frames=[torch.cat(frames[v]).numpy().astype(np.int64) for v in order],
        error_maps=kept,
    )
