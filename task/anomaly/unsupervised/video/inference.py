"""The one inference path of video methods: clips in, raw per-frame scores (and optionally error maps) out, per video.

Calibration, evaluation, pictures, predict, export's check and benchmark all run clips through ``run_clips`` with a
``ClipScorer``: ``MethodScorer`` runs the method's ``score_batch`` on a PyTorch model, and the exported graph's
adapter (``video/export.py``) takes the same batches, so a backend is a scorer and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from task.anomaly.unsupervised.data.video.clips import Video
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.method import VideoMethod
from task.common.runtime import autocast


class ClipScorer(Protocol):
    """Batches of ClipDataset items (on the scorer's device; ``video_input`` [B, C, H, W] added where the run has
    per-video
    inputs) -> (raw scores name -> [B], prediction-error maps [B, 1, H, W])."""

    def __call__(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]: ...


@dataclass
class MethodScorer:
    """A PyTorch model scored by its method's ``score_batch`` with the score settings of a config."""

    method: VideoMethod
    model: nn.Module
    settings: Any

    def __call__(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        return self.method.score_batch(self.model, batch, self.settings)


@dataclass
class FrameScores:
    """Raw per-frame scores of a set of videos, in video order (CPU numpy)."""

    videos: list[Video]
    scores: dict[str, list[np.ndarray]]  # name -> V arrays [n_v]
    frames: list[np.ndarray]  # V arrays [n_v] int64: the target frame index of each score
    error_maps: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # kept maps: video -> frame -> [H, W]


@torch.no_grad()
def run_clips(
    scorer: ClipScorer,
    loader: DataLoader,
    videos: list[Video],
    device: torch.device,
    amp: str = "none",
    desc: str = "score",
    keep_maps: set[tuple[int, int]] | None = None,
    video_inputs: Tensor | None = None,
) -> FrameScores:
    """Score every batch of ``loader`` (over a ClipDataset of ``videos`` or a Subset of one), grouped per video.

    ``keep_maps``: (video, frame) pairs whose error map [H, W] is kept; ``video_inputs`` [V, C, H, W]: each video's
    extra input, given to the scorer as ``video_input`` per clip.
    """
    per_video: dict[int, dict[str, list[Tensor]]] = {}
    frames: dict[int, list[Tensor]] = {}
    kept: dict[int, dict[int, np.ndarray]] = {}
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if video_inputs is not None:
            on_device["video_input"] = video_inputs[batch["video"]].to(device)
        with autocast(device, amp):
            scores, maps = scorer(on_device)
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


def score_clips(
    engine: Engine,
    model: nn.Module,
    dataset,
    videos: list[Video],
    desc: str,
    keep_maps: set[tuple[int, int]] | None = None,
) -> FrameScores:
    """``run_clips`` of a run's PyTorch model with the run's score settings, loader and precision."""
    cfg = engine.cfg
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=cfg.TEST.batch_size,
        shuffle=False,
        num_workers=cfg.DATALOADER.num_workers,
        pin_memory=cfg.DATALOADER.pin_memory,
    )
    scorer = MethodScorer(engine.method, model, engine.method.score_settings(cfg))
    return run_clips(scorer, loader, videos, engine.device, engine.amp, desc, keep_maps)
