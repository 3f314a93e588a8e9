"""The video half on OpenVINO: ``--mode export EXPORT.format=openvino`` and ``--backend openvino`` for predict.

Export converts the checked ONNX graph of ``video/export.py`` (clip, target[, per-video input] -> predicted frame,
error map, raw scores; its metadata: calibration, protocol, network settings) into an IR ``model-<precision>.xml`` +
``.bin`` beside the checkpoint (``deploy/openvino.py`` says what each precision means). INT8 is calibrated on
``EXPORT.calibration_images`` clips spread over the *training* videos of the run's dataset, never test videos.

Check, before anything is written: the IR runs (as predict will run it on this CPU, float32 segments included) on
the export's check clips, as one batch and as a batch of one, against PyTorch float32 on the same clips; the export
fails past ``TOLERANCES[precision]`` of the map range (maps) or of the raw score's training spread (scores), the units
the ONNX check uses. When the run's test videos are labelled, both also score them (the first ``EXPORT.check_videos``
of them) and the export prints the online frame AUROC of each, its change and how many frame alarms the IR changes at
the calibrated threshold.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from task.anomaly.unsupervised.data.video.clips import ClipDataset, Video, scan_videos
from task.anomaly.unsupervised.data.video.labels import attach_labels, load_frame_labels
from task.anomaly.unsupervised.deploy.ir_runner import PRECISIONS, IRRunner
from task.anomaly.unsupervised.deploy.onnx import check_exported_from
from task.anomaly.unsupervised.deploy.openvino import (
    OPENVINO_EXPORT,
    TOLERANCES,
    compress_weights_to_fp16,
    ir_filename,
    onnx_to_openvino,
    quantize_int8,
    save_ir,
    with_metadata,
)
from task.anomaly.unsupervised.engine.engine import LoadedModel
from task.anomaly.unsupervised.method import VideoMethod
from task.anomaly.unsupervised.scoring.protocols import online_frame_scores, online_protocol
from task.anomaly.unsupervised.scoring.settings import ProtocolParams
from task.anomaly.unsupervised.video.export import (
    FRAME_OUTPUTS,
    ExportedVideoGraph,
    PreparedVideoExport,
    clip_inputs,
    differences,
)
from task.anomaly.unsupervised.video.inference import FrameScores, run_clips
from task.common.config import Config
from task.common.errors import UserError

log = logging.getLogger("anomaly")

# Largest |IR - PyTorch fp32| of a raw score the export check accepts, relative to the score's training spread
# (high - low of the calibration). Maps use ``TOLERANCES`` (of the map range). fp32 is the ONNX tolerance. A raw score
# can be flat over normal training frames next to its value (the deformation score of a barely trained model: 2.5e-3,
# varying by 1.5e-5), where bf16 convolutions move it by a large part of that spread (measured: 0.44 for fp16, 1.35
# for int8 on the test suite's tiny model); the frame AUROC and alarm changes on labelled videos are what to judge
# such an IR by.
SCORE_TOLERANCES = {"fp32": TOLERANCES["fp32"], "fp16": 1.0, "int8": 3.0}


class OpenVinoVideoModel(ExportedVideoGraph):
    """An exported video IR compiled for this CPU (``deploy/openvino.IRRunner``: precision-sensitive parts float32),
    with what its metadata says about it; a ``ClipScorer`` like ``OnnxVideoModel``."""

    def __init__(self, source: Path | Any, name: str, threads: int, calibrated: bool = True) -> None:
        self.runner = IRRunner(source, name, threads)
        super().__init__(
            self.runner.metadata,
            self.runner,
            tuple(self.runner.input_names),
            tuple(self.runner.output_names),
            name,
            calibrated,
        )

    def run(self, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.run({n: np.ascontiguousarray(v, dtype=np.float32) for n, v in zip(self.inputs, inputs)})


def load_ir_video_model(path: Path, checkpoint: Path | None, threads: int) -> OpenVinoVideoModel:
    """The video IR at ``path``; refused when ``checkpoint`` exists and is not the file it was exported from."""
    model = OpenVinoVideoModel(path, str(path), threads)
    check_exported_from(path, model.metadata, checkpoint, OPENVINO_EXPORT)
    log.info("OpenVINO: %s (%s)", path, model.runner.description)
    return model


# --------------------------------------------------------------------------------------------- export
def calibration_clips(method: VideoMethod, cfg: Config, count: int) -> list[list[np.ndarray]]:
    """``count`` clips spread over the run's TRAINING videos, each as graph inputs (clip [1, T, C, H, W], target
    [1, C, H, W][, video input [1, C, H, W]])."""
    try:
        videos = scan_videos(cfg.DATASET, "train")
    except UserError as exc:
        raise UserError(
            "EXPORT.precision=int8 calibrates on clips of the training videos: point DATASET.datadir at the dataset "
            f"({exc})"
        ) from None
    inputs = clip_inputs(method, cfg, videos, count)
    return [[v[i : i + 1].numpy() for v in inputs] for i in range(len(inputs[0]))]


def labelled_test_videos(cfg: Config, limit: int | None) -> list[Video]:
    """The first ``limit`` (None: all) test videos of the run's dataset with their frame labels; [] without them."""
    ds = cfg.DATASET
    try:
        videos = scan_videos(ds, "test")
        videos = attach_labels(videos, load_frame_labels(ds, videos, ds.clip_length))  # labels span every video
    except UserError:
        return []
    return videos if limit is None else videos[:limit]


def _score(scorer: Any, method: VideoMethod, cfg: Config, videos: list[Video], batch_size: int) -> FrameScores:
    ds = cfg.DATASET
    clips = ClipDataset(videos, ds.clip_length, tuple(ds.resize), ds.grayscale, True)
    inputs = method.video_inputs(cfg, videos)
    loader = DataLoader(clips, batch_size=batch_size, shuffle=False)
    return run_clips(scorer, loader, videos, torch.device("cpu"), "none", "export check", None, inputs)


class ModuleScorer:
    """The PyTorch serving module of an export (float32, CPU) as a ``ClipScorer`` over the same graph inputs."""

    def __init__(self, prepared: PreparedVideoExport, names: tuple[str, ...], takes_video_input: bool) -> None:
        self.module, self.names = prepared.module, names
        self.keys = ("clip", "target", "video_input") if takes_video_input else ("clip", "target")

    def __call__(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        outputs = self.module(*(batch[k].float() for k in self.keys))
        scores = outputs[len(FRAME_OUTPUTS) :]
        return dict(zip(self.names, scores)), outputs[FRAME_OUTPUTS.index("error_map")]


def compare_on_videos(
    prepared: PreparedVideoExport,
    ir: OpenVinoVideoModel,
    method: VideoMethod,
    cfg: Config,
    videos: list[Video],
    batch_size: int,
) -> str:
    """Online frame AUROC of PyTorch and of the IR on the labelled ``videos``, its change and the alarms it changes."""
    params = ProtocolParams.from_config(ir.protocol)
    stats, threshold = ir.calibration.train_stats, ir.calibration.threshold
    online, aurocs = [], []
    for scorer in (ModuleScorer(prepared, ir.names, ir.takes_video_input), ir):
        scored = _score(scorer, method, cfg, videos, batch_size)
        raw = {n: scored.scores[n] for n in params.names}
        labels = [v.labels[f] for v, f in zip(scored.videos, scored.frames)]
        online.append(np.concatenate(online_frame_scores(raw, stats, params)))
        aurocs.append(online_protocol(raw, labels, stats, params)["frame_auroc_online"])
    before, after = aurocs
    change = (
        f"frame AUROC (online) {before:.4f} -> {after:.4f} ({after - before:+.4f})"
        if before is not None and after is not None
        else "frame AUROC undefined (the videos need normal and abnormal frames)"
    )
    flipped = int(((online[0] >= threshold) != (online[1] >= threshold)).sum())
    frames = len(online[0])
    return f"on {len(videos)} labelled test video(s), {frames} frames: {change}; {flipped} frame alarm(s) changed"


def convert_video_graph(
    data: bytes,
    metadata: dict[str, str],
    precision: str,
    samples: list[list[np.ndarray]],
    threads: int,
    calibrated: bool = True,
) -> tuple[Any, OpenVinoVideoModel]:
    """(OpenVINO model, compiled for this CPU) of the ONNX graph ``data`` at ``precision``; ``samples``: the int8
    calibration inputs (``calibration_clips``), unused for the other precisions."""
    assert precision in PRECISIONS, precision
    model = onnx_to_openvino(data)
    if precision == "int8":
        log.info("NNCF int8 calibration on %d clip(s) of the training videos", len(samples))
        names = [i.get_any_name() for i in model.inputs]
        model = quantize_int8(model, [dict(zip(names, clip)) for clip in samples])
    elif precision == "fp16":
        compress_weights_to_fp16(model)
    with_metadata(model, {**metadata, "precision": precision})
    return model, OpenVinoVideoModel(model, f"the converted {precision} IR", threads, calibrated)


def export_video_openvino(
    prepared: PreparedVideoExport,
    method: VideoMethod,
    loaded: LoadedModel,
    cfg: Config,
    threads: int,
    clips: list[list[np.ndarray]],
) -> Path:
    """Write ``model-<EXPORT.precision>.xml/.bin`` beside the checkpoint after checking the IR against PyTorch;
    ``clips``: the int8 calibration inputs (``calibration_clips``), unused for the other precisions."""
    precision = cfg.EXPORT.precision
    model, ir = convert_video_graph(prepared.data, prepared.metadata, precision, clips, threads)

    tolerances = {name: TOLERANCES[precision] for name in FRAME_OUTPUTS}
    found = differences(ir, prepared.inputs, prepared.reference, prepared.calibration)
    print(
        f"OpenVINO {precision} check on {len(prepared.inputs[0])} clip(s) ({ir.runner.description}) vs PyTorch "
        f"float32: {'; '.join(map(str, found))}; tolerance {TOLERANCES[precision]:g} of the map range, "
        f"{SCORE_TOLERANCES[precision]:g} of a raw score's training spread"
    )
    videos = labelled_test_videos(loaded.cfg, cfg.EXPORT.check_videos)
    if videos:
        start = time.perf_counter()
        summary = compare_on_videos(prepared, ir, method, loaded.cfg, videos, cfg.TEST.batch_size)
        print(f"OpenVINO {precision} vs PyTorch float32 {summary} ({time.perf_counter() - start:.0f}s)")
    failed = [d for d in found if not d.relative <= tolerances.get(d.name, SCORE_TOLERANCES[precision])]  # NaN too
    if failed:
        raise UserError(
            f"OpenVINO {precision} output differs from PyTorch beyond the tolerance ({'; '.join(map(str, failed))}); "
            "nothing was written; try a higher precision (EXPORT.precision=fp16 "
            "or fp32)"
        )
    target = prepared.checkpoint.parent / ir_filename(precision)
    size = save_ir(model, target)
    print(f"exported {target} and {target.with_suffix('.bin').name} ({size / 2**20:.1f} MiB)")
    return target
