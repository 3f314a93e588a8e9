"""``--mode benchmark BENCHMARK.backends=true`` on a video run: one table of every inference backend on the same clips.

Rows: PyTorch float32 (the reference), PyTorch bf16 autocast (only where the CPU has bf16 units; the model keeps its
grids, codebook distances and maps float32 under autocast), ONNX Runtime float32, OpenVINO fp32 / fp16 / int8
(``video/openvino.py``; int8 calibrated on ``EXPORT.calibration_images`` clips of the training videos). All in this
process on the CPU with the same thread count, the same clips (the first ``BENCHMARK.eval_images`` clips of the test
videos, in order, batch ``TEST.batch_size``) and the same model: ``--checkpoint`` (a calibrated model.pt) or a fresh
one. Columns as ``deploy/backend_table.py``, per clip; the score difference is the largest over the raw scores,
relative to each score's training spread (the calibration's; for a fresh model: the spread of the reference's scores
over these clips), and the frame AUROC is the online protocol's on the scored frames (a calibrated checkpoint with
labelled test videos only). Nothing is written to disk.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from task.anomaly.unsupervised.data.video.clips import Video
from task.anomaly.unsupervised.deploy.backend_table import (
    Row,
    cpu_name,
    current_rss_mb,
    measure_backends,
    openvino_label,
    openvino_precisions,
    print_table,
)
from task.anomaly.unsupervised.deploy.ir_runner import has_bf16_units, openvino_core
from task.anomaly.unsupervised.deploy.onnx import with_metadata
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.scoring.protocols import online_protocol
from task.anomaly.unsupervised.scoring.settings import ProtocolParams
from task.anomaly.unsupervised.video.evaluation import Calibration, video_split
from task.anomaly.unsupervised.video.export import OnnxVideoModel, clip_inputs, trace_video_graph
from task.anomaly.unsupervised.video.inference import ClipScorer, FrameScores, MethodScorer, run_clips
from task.anomaly.unsupervised.video.openvino import calibration_clips, convert_video_graph

log = logging.getLogger("anomaly")

CPU = torch.device("cpu")


def _auroc(scored: FrameScores, calibration: Calibration | None, params: ProtocolParams) -> float | None:
    if calibration is None or any(v.labels is None for v in scored.videos):
        return None
    labels = [v.labels[f] for v, f in zip(scored.videos, scored.frames)]
    if not any(lab.any() for lab in labels) or all(lab.all() for lab in labels):
        return None
    raw = {n: scored.scores[n] for n in params.names}
    return online_protocol(raw, labels, calibration.train_stats, params)["frame_auroc_online"]


def run_video_backend_table(
    engine: Engine, model: nn.Module, calibration: Calibration | None, source: str, train_videos: list[Video]
) -> list[Row]:
    """Build, time and compare every backend on ``model`` (CPU float32 from here on); prints the table."""
    cfg, method = engine.cfg, engine.method
    threads = torch.get_num_threads()
    base_rss = current_rss_mb()
    model = model.float().cpu().eval()
    test_videos, test_set = video_split(engine, "test")
    count = len(test_set) if cfg.BENCHMARK.eval_images is None else min(cfg.BENCHMARK.eval_images, len(test_set))
    subset = Subset(test_set, list(range(count)))
    videos = test_videos[: int(test_set[count - 1]["video"]) + 1]  # the videos these clips come from
    loader = DataLoader(subset, batch_size=cfg.TEST.batch_size, shuffle=False)
    per_video = method.video_inputs(cfg, videos)
    every_map = {(int(x["video"]), int(x["frame"])) for x in (test_set[i] for i in range(count))}
    params = ProtocolParams.from_config(cfg.SCORE)
    bf16 = has_bf16_units(openvino_core())
    traced_once: dict[str, Any] = {}

    def traced() -> Any:
        if "graph" not in traced_once:
            traced_once["graph"] = trace_video_graph(
                method, model, cfg, clip_inputs(method, cfg, videos, 2), cfg.EXPORT.opset
            )
        return traced_once["graph"]

    def exported(precision: str) -> Callable[[], tuple[ClipScorer, str]]:
        def build() -> tuple[ClipScorer, str]:
            samples = calibration_clips(method, cfg, cfg.EXPORT.calibration_images) if precision == "int8" else []
            graph = traced()
            _, ir = convert_video_graph(graph.data, graph.metadata, precision, samples, threads, calibrated=False)
            log.info("OpenVINO %s: %s", precision, ir.runner.description)
            return ir, "none"

        return build

    def onnx() -> tuple[ClipScorer, str]:
        graph = traced()
        return OnnxVideoModel(with_metadata(graph.data, graph.metadata), "the traced graph", calibrated=False), "none"

    settings = method.score_settings(cfg)
    backends: list[tuple[str, Callable[[], tuple[ClipScorer, str]]]] = [
        ("PyTorch fp32", lambda: (MethodScorer(method, model, settings), "none"))
    ]
    if bf16:
        backends.append(
            ("PyTorch bf16 (autocast)", lambda: (MethodScorer(method, copy.deepcopy(model), settings), "bf16"))
        )
    backends += [
        ("ONNX Runtime fp32", onnx),
    ]
    backends += [(openvino_label(p, bf16), exported(p)) for p in openvino_precisions(cfg.BENCHMARK.openvino)]

    def scored(built: tuple[ClipScorer, str], clips: Any, keep: set | None) -> FrameScores:
        scorer, amp = built
        inputs = None if isinstance(scorer, MethodScorer) else per_video  # graphs take them as an input
        clip_loader = clips if isinstance(clips, DataLoader) else DataLoader(clips, batch_size=1)
        return run_clips(scorer, clip_loader, videos, CPU, amp, "benchmark", keep, inputs)

    def one_pass(built: tuple[ClipScorer, str]) -> tuple[FrameScores, float]:
        start = time.perf_counter()
        result = scored(built, loader, every_map)
        return result, count / (time.perf_counter() - start)

    def latency_ms(built: tuple[ClipScorer, str]) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            scored(built, Subset(test_set, [0]), None)
            times.append(time.perf_counter() - start)
        return 1000 * float(np.median(times))

    def compare(got: FrameScores, reference: FrameScores) -> tuple[float, float, float | None]:
        maps = [(got.error_maps[v][f], reference.error_maps[v][f]) for v, f in sorted(every_map)]
        expected = np.stack([b for _, b in maps])
        span = float(expected.max() - expected.min()) or float(np.finfo(np.float32).eps)
        map_diff = max(float(np.abs(a - b).max()) for a, b in maps) / span
        score_diff = 0.0
        for name in reference.scores:
            want, have = np.concatenate(reference.scores[name]), np.concatenate(got.scores[name])
            stats = calibration.train_stats.get(name) if calibration is not None else None
            spread = float(stats["high"] - stats["low"]) if stats else float(want.max() - want.min())
            score_diff = max(score_diff, float(np.abs(have - want).max()) / (spread or float(np.finfo(np.float32).eps)))
        return map_diff, score_diff, _auroc(got, calibration, params)

    with method.scoring_context(model, cfg, videos, None):  # per-video templates: the scored videos' own
        rows = measure_backends(
            backends, lambda built: scored(built, Subset(test_set, [0]), None), one_pass, latency_ms, compare, base_rss
        )
    size = tuple(cfg.DATASET.resize)
    print_table(
        rows,
        {
            "cpu": f"{cpu_name()} ({os.cpu_count()} logical CPUs; bf16 units: {'yes' if bf16 else 'no'})",
            "threads": threads,
            "model": f"{source}; {size[0]}x{size[1]}, clips of {cfg.DATASET.clip_length}",
            "data": f"the first {count} clips of the test videos of {cfg.DATASET.datadir}/{cfg.DATASET.target}; int8 "
            f"calibration: {cfg.EXPORT.calibration_images} training clips",
            "batch": cfg.TEST.batch_size,
            "load average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "torch": torch.__version__,
        },
        "clip",
        "frame AUROC (online)",
        "of the training spread" if calibration is not None else "of the reference's spread",
    )
    return rows
