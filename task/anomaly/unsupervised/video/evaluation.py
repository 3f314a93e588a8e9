"""Video evaluation: per-frame raw scores -> both protocols -> metrics.json, scores.npz, plots, GIF, checkpoint.

A video method provides ``score_batch(model, batch, settings) -> (raw scores name -> [B], error maps [B, 1, H, W])``
and, through ``scoring_context``, whatever it needs to score videos it was not trained on.
Calibration is the statistics of the raw scores of the calibration frames (the last ``DATASET.calibration_split`` of
each training video, never trained on: ``data/video/calibration.py``) and an alarm threshold fitted on them (the
conformal order statistic for ``1 - SCORE.ONLINE.threshold_quantile``): the online protocol and predict use only
these, never the test set. The paper
protocol (``frame_scoring.paper_protocol``) uses whole-video statistics of the test videos, as the official code.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Subset

from task.anomaly.unsupervised.curves import run_curves
from task.anomaly.unsupervised.data.video.calibration import split_rows
from task.anomaly.unsupervised.data.video.clips import ClipDataset, Video, scan_videos
from task.anomaly.unsupervised.data.video.labels import attach_labels, load_frame_labels
from task.anomaly.unsupervised.engine.checkpoints import make_payload
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.scoring.protocols import (
    fit_threshold,
    fit_train_stats,
    online_frame_scores,
    online_protocol,
    paper_frame_scores,
    paper_protocol,
)
from task.anomaly.unsupervised.scoring.score_file import ScoreFile, write_scores
from task.anomaly.unsupervised.scoring.settings import ProtocolParams
from task.anomaly.unsupervised.video.inference import FrameScores, score_clips
from task.anomaly.unsupervised.video.outputs import write_plots_and_gif
from task.common.config import Config
from task.common.io import csv_cell, ensure_dir, save_checkpoint, write_json, write_text
from task.common.spacing import spread

log = logging.getLogger("anomaly")

FRAME_NOTE = "frames of one video are not exchangeable: the alarm target is a rate, not a finite-sample bound"

# Calibration clips scored for the calibration statistics at most (evenly spread); enough for stable 1 %/99 % quantiles.
MAX_CALIBRATION_CLIPS = 2000


def video_split(engine: Engine, split: str) -> tuple[list[Video], ClipDataset]:
    """The videos of ``split`` (test videos with their frame labels) and their clip dataset."""
    ds = engine.cfg.DATASET
    videos = scan_videos(ds, split)
    if split == "test":
        videos = attach_labels(videos, load_frame_labels(ds, videos, ds.clip_length))
    dataset = ClipDataset(videos, ds.clip_length, tuple(ds.resize), ds.grayscale, ds.cache)
    return videos, dataset


def data_root(engine: Engine) -> Path:
    """The dataset's folder, where a method may cache what it computes from the frames (e.g. background templates)."""
    ds = engine.cfg.DATASET
    return Path(ds.datadir).expanduser() / ds.target


def scoring_unseen(engine: Engine, model: nn.Module, videos: list[Video]) -> AbstractContextManager[None]:
    """The method's state for scoring ``videos`` the model was not trained on (e.g. their own templates)."""
    return engine.method.scoring_context(model, engine.cfg, videos, data_root(engine))


@dataclass
class Calibration:
    """Training-frame statistics per raw score, the online alarm threshold, and the SCORE settings they were fitted
    with (stored in the checkpoint; the fused scores and threshold belong to those settings)."""

    train_stats: dict[str, dict[str, float]]
    threshold: float
    protocol: dict[str, Any] | None = None  # ProtocolParams.to_config() of the fit
    scoring: dict[str, Any] | None = None  # the method's scoring settings of the fit (score variants, windows)
    fit: dict[str, Any] | None = (
        None  # how the threshold was chosen (Threshold.to_dict: n, rank, target, bound; source)
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_stats": self.train_stats,
            "threshold": self.threshold,
            "protocol": self.protocol,
            "scoring": self.scoring,
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Calibration | None:
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("train_stats"), dict)
            or not isinstance(data.get("threshold"), (int, float))
        ):
            return None
        protocol = data.get("protocol") if isinstance(data.get("protocol"), dict) else None
        scoring = data.get("scoring") if isinstance(data.get("scoring"), dict) else None
        fit = data.get("fit") if isinstance(data.get("fit"), dict) else None
        return cls(data["train_stats"], float(data["threshold"]), protocol, scoring, fit)

    def fits(self, params: ProtocolParams, scoring: dict[str, Any]) -> bool:
        """True when this calibration was fitted with ``params`` and the method's ``scoring`` settings (what a
        calibration did not record is assumed to match)."""
        return (self.protocol is None or self.protocol == params.to_config()) and (
            self.scoring is None or self.scoring == scoring
        )


def served_protocol(calibration: Calibration, cfg: Config, path: Path) -> ProtocolParams:
    """The SCORE settings the checkpoint's threshold was fitted with (a differing YAML section is a warning)."""
    asked = ProtocolParams.from_config(cfg.SCORE)
    if calibration.protocol is None or calibration.protocol == asked.to_config():
        return asked
    log.warning(
        "SCORE: serving the settings %s was calibrated with (the config's differ); run --mode test with the new SCORE "
        "section to recalibrate",
        path,
    )
    return ProtocolParams.from_config(calibration.protocol)


def calibration_split(engine: Engine, train_set: ClipDataset) -> tuple[Subset, Subset, str]:
    """(training clips, calibration clips, source) of the training videos (``data/video/calibration.py``)."""
    train_rows, calibration_rows, source = split_rows(train_set.index, engine.cfg.DATASET.calibration_split)
    return Subset(train_set, train_rows.tolist()), Subset(train_set, calibration_rows.tolist()), source


def calibrate(
    engine: Engine,
    model: nn.Module,
    train_videos: list[Video],
    calibration_set,
    source: str = "calibration_split",
) -> Calibration:
    """Statistics of the raw scores of (at most ``MAX_CALIBRATION_CLIPS``) calibration clips (a ClipDataset or a Subset
    of one over ``train_videos``), and the alarm threshold."""
    count = len(calibration_set)
    picks = spread(range(count), MAX_CALIBRATION_CLIPS)
    scored = score_clips(engine, model, Subset(calibration_set, picks), train_videos, "calibrate")
    params = ProtocolParams.from_config(engine.cfg.SCORE)
    stats = fit_train_stats(scored.scores)
    scoring = engine.method.config_scoring(engine.cfg)
    threshold = fit_threshold(scored.scores, stats, params)
    frames = "held-out calibration frames" if source == "calibration_split" else "training frames"
    log.info("alarm threshold %s, %s", threshold.describe(), frames)
    if threshold.capped:
        log.warning(
            "alarm threshold: %d calibration frames are too few for a false-alarm target of %g; "
            "the largest score is used",
            threshold.n,
            threshold.alpha,
        )
    fit = {**threshold.to_dict(), "source": source, "guarantee": FRAME_NOTE}
    return Calibration(stats, threshold.value, params.to_config(), scoring, fit)


def evaluate(
    engine: Engine,
    model: nn.Module,
    calibration: Calibration,
    test_videos: list[Video],
    test_set: ClipDataset,
    step: int | None,
    out_dir: Path | None,
    final: bool,
) -> dict[str, Any]:
    """Both protocols on the test videos; with ``final`` also every output file."""
    if not engine.dist.is_main:
        return {}
    cfg = engine.cfg
    start = time.perf_counter()
    with scoring_unseen(engine, model, test_videos):
        scored = score_clips(engine, model, test_set, test_videos, "test")
    labels = [v.labels[f] for v, f in zip(scored.videos, scored.frames)]
    names = [v.name for v in scored.videos]
    params = ProtocolParams.from_config(cfg.SCORE)
    paper = paper_protocol({n: scored.scores[n] for n in params.names}, labels, params, names)
    online = online_protocol(
        {n: scored.scores[n] for n in params.names},
        labels,
        calibration.train_stats,
        params,
        calibration.threshold,
        names,
    )
    metrics = {
        "frame_auroc": paper["frame_auroc"],
        "frame_aupr": paper["frame_aupr"],
        "frame_auroc_online": online["frame_auroc_online"],
        "frame_aupr_online": online["frame_aupr_online"],
        "online_threshold": online["online_threshold"],
        "online_tpr": online["online_tpr"],
        "online_fpr": online["online_fpr"],
    }
    if calibration.fit is not None:
        fit = calibration.fit
        metrics.update(
            {
                "online_target_fpr": fit.get("alpha"),
                "calibration_frames": fit.get("n"),
                "online_threshold_rank": fit.get("rank"),
            }
        )
    log.info(
        "%s%s: %s (%.1fs)",
        cfg.DATASET.target,
        f" step {step}" if step is not None else "",
        " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
        time.perf_counter() - start,
    )
    engine.reporters.log_eval(step, metrics)
    if final:
        details = {
            "per_video_auroc": paper["per_video_auroc"],
            "per_video_auroc_online": online["per_video_auroc_online"],
        }
        write_outputs(engine, out_dir or engine.run_dir, model, test_set, calibration, scored, metrics, details, step)
    return metrics


def write_outputs(
    engine: Engine,
    out_dir: Path,
    model: nn.Module,
    test_set: ClipDataset,
    calibration: Calibration,
    scored: FrameScores,
    metrics: dict[str, Any],
    details: dict[str, Any],
    step: int | None,
) -> None:
    """model.pt (with the calibration), metrics.json, run.json, frame_scores.csv, scores.npz, plots, GIF, reporters."""
    cfg = engine.cfg
    ensure_dir(out_dir)
    payload = make_payload(engine.method, cfg, model, {"frame": calibration.threshold})
    payload["calibration"] = calibration.to_dict()
    save_checkpoint(payload, out_dir / "model.pt")
    fit = calibration.fit
    calibration_info = {"calibration_source": fit.get("source"), "guarantee": FRAME_NOTE} if fit else {}
    write_json(
        out_dir / "metrics.json",
        {
            **{k: _json_number(v) for k, v in metrics.items()},
            **calibration_info,
            **{k: {n: _json_number(x) for n, x in d.items()} for k, d in details.items()},
        },
    )
    write_json(
        out_dir / "run.json",
        {
            "method": engine.method.name,
            "modality": "video",
            "category": cfg.DATASET.target,
            "format": "video",
            "exp_name": cfg.RESULT.exp_name,
            **engine.method.describe(cfg),
            "image_size": list(cfg.DATASET.resize),
            "steps": step,
            "device": str(engine.device),
        },
    )
    params = ProtocolParams.from_config(cfg.SCORE)
    online = online_frame_scores({n: scored.scores[n] for n in params.names}, calibration.train_stats, params)
    write_text(out_dir / "frame_scores.csv", frame_scores_csv(scored, online, calibration.threshold))
    curves = write_frame_curves(out_dir / "curves", scored, online, params)  # live: ROC/PR pictures
    if cfg.TEST.save_scores:
        write_scores(
            out_dir / "scores.npz",
            ScoreFile(
                dataset=cfg.DATASET.target,
                clip_length=cfg.DATASET.clip_length,
                videos=[v.name for v in scored.videos],
                scores=scored.scores,
                labels=[np.asarray(v.labels, dtype=np.int8) for v in scored.videos],
                frames=scored.frames,
                train_stats=calibration.train_stats,
                threshold=calibration.threshold,
                extra={"source": f"{engine.method.name} {cfg.DATASET.target}"},
            ),
        )
    gif, plots = None, []
    if cfg.TEST.save_images:
        try:
            with scoring_unseen(engine, model, scored.videos):
                plots, gif = write_plots_and_gif(
                    engine, out_dir, model, test_set, scored, online, calibration.threshold
                )
        except Exception as exc:  # noqa: BLE001  (pictures are a by-product: never lose a finished run over them)
            log.warning(
                "score plots / GIF not written (%s: %s); model.pt and metrics are saved, rerun with --mode gif",
                type(exc).__name__,
                exc,
            )
    engine.reporters.log_results(metrics, [(p, p.stem) for p in plots[:8]], gif, out_dir / "model.pt")
    engine.reporters.log_curves(curves)
    log.info("outputs written to %s", out_dir)


def write_frame_curves(
    folder: Path, scored: FrameScores, online: list[np.ndarray], params: ProtocolParams
) -> list[Path]:
    """curves/roc_frame.png and pr_frame.png: the paper and the online protocol's frame scores against the labels."""
    if any(v.labels is None for v in scored.videos) or not scored.videos:
        return []
    labels = np.concatenate([np.asarray(v.labels)[f] for v, f in zip(scored.videos, scored.frames)])
    paper = np.concatenate(paper_frame_scores({n: scored.scores[n] for n in params.names}, params))
    return run_curves(folder, {"frame": [("paper", labels, paper), ("online", labels, np.concatenate(online))]})


def frame_scores_csv(scored: FrameScores, online: list[np.ndarray], threshold: float) -> str:
    """``video,frame,label,score,prediction`` per scored frame (online score; prediction = score >= threshold)."""
    lines = ["video,frame,label,score,prediction"]
    for video, frames, values in zip(scored.videos, scored.frames, online):
        for frame, value in zip(frames.tolist(), values.tolist()):
            label = int(video.labels[frame]) if video.labels is not None else ""
            lines.append(f"{csv_cell(video.name)},{frame},{label},{value:.6f},{int(value >= threshold)}")
    return "\n".join(lines) + "\n"


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
