"""Pictures of a video evaluation: one score-over-time plot per test video and the dataset's annotated GIF.

The plotted score is the ONLINE frame score (training statistics, causal smoothing) with its alarm threshold: what a
deployed camera would show. The GIF follows the test video with the most abnormal frames (the first one when none has
labels): frames, the prediction-error heatmap and a cursor moving along that video's score plot.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from task.anomaly.unsupervised.data.video.clips import frames_of
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.video.inference import FrameScores, score_clips
from task.anomaly.unsupervised.video.plots import render_score_plot, write_video_gif
from task.common.io import atomic_write_bytes

log = logging.getLogger("anomaly")


def _png(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return encoded.tobytes()


def write_score_plots(out_dir: Path, scored: FrameScores, online: list[np.ndarray], threshold: float) -> list[Path]:
    """plots/<video>.png per test video: online score over time, abnormal ranges shaded, threshold drawn."""
    written = []
    for video, frames, values in zip(scored.videos, scored.frames, online):
        plot = render_score_plot(
            values, frames, video.num_frames, video.labels, threshold, f"{video.name}: online frame score"
        )
        target = out_dir / "plots" / f"{video.name}.png"
        data = _png(plot)
        atomic_write_bytes(target, lambda handle, data=data: handle.write(data))
        written.append(target)
    return written


def gif_video(scored: FrameScores) -> int:
    """Index (into ``scored.videos``) of the video the GIF follows: the most abnormal frames, else the first."""
    counts = [int((v.labels == 1).sum()) if v.labels is not None else 0 for v in scored.videos]
    return int(np.argmax(counts)) if counts else 0


def write_dataset_gif(
    engine: Engine,
    out_dir: Path,
    model: nn.Module,
    test_set,
    scored: FrameScores,
    online: list[np.ndarray],
    threshold: float,
) -> Path:
    """<out_dir>/<target>.gif (and a copy in RESULT.assets_dir for the run's own outputs)."""
    cfg = engine.cfg
    chosen = gif_video(scored)
    video = scored.videos[chosen]
    dataset_index = test_set.videos.index(video)
    items = [i for i, (v, _) in enumerate(test_set.index.tolist()) if v == dataset_index]
    frames_scored = scored.frames[chosen]
    maps = score_clips(
        engine,
        model,
        Subset(test_set, items),
        test_set.videos,
        "gif",
        keep_maps={(dataset_index, int(f)) for f in frames_scored},
    ).error_maps[dataset_index]
    pixels = frames_of(video, tuple(cfg.DATASET.resize), cfg.DATASET.grayscale)
    rgb = [np.repeat(pixels[f], 3, axis=2) if pixels.shape[-1] == 1 else pixels[f] for f in frames_scored.tolist()]
    targets = [out_dir / f"{cfg.DATASET.target}.gif"]
    if cfg.RESULT.assets_dir and out_dir == engine.run_dir:
        targets.append(Path(cfg.RESULT.assets_dir) / f"{cfg.DATASET.target}.gif")
    shown = write_video_gif(
        rgb,
        [maps[int(f)] for f in frames_scored.tolist()],
        online[chosen],
        frames_scored,
        video.num_frames,
        video.labels,
        threshold,
        f"{cfg.DATASET.target} / {video.name}",
        targets,
        max_frames=40,  # 40 frames keep the GIF near 1 MB
    )
    log.info("GIF of video %s with %d frames written to %s", video.name, len(shown), ", ".join(map(str, targets)))
    return targets[0]


def write_plots_and_gif(
    engine: Engine,
    out_dir: Path,
    model: nn.Module,
    test_set,
    scored: FrameScores,
    online: list[np.ndarray],
    threshold: float,
) -> tuple[list[Path], Path]:
    """Both kinds of pictures; returns (the plots, the GIF)."""
    plots = write_score_plots(out_dir, scored, online, threshold)
    log.info("%d score plots written to %s", len(plots), out_dir / "plots")
    with torch.no_grad():
        return plots, write_dataset_gif(engine, out_dir, model, test_set, scored, online, threshold)
