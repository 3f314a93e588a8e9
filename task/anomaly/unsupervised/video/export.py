"""``--mode export`` of a video run: the method's clip-to-scores graph as one ONNX file, checked against PyTorch.

Graph inputs (float32, values in [-1, 1] as ``ClipDataset`` yields them; B dynamic, everything else fixed by the
checkpoint): ``clip`` [B, T, C, H, W] (T = ``DATASET.clip_length``, C = 1 for grey data, else 3), ``target``
[B, C, H, W] (the frame after the clip) and, where the method's ``video_inputs`` gives one, ``video_input``
[B, C, H, W]: a per-video input computed from the video's own frames (DMAD-PDM with one background template per video:
the video's median template). Outputs: ``predicted_frame`` [B, Cm, H, W], ``error_map`` [B, 1, H, W] and one raw score
[B] per name, ``score_<name>``: the method's ``serving_module``. Scores a graph cannot compute (``score_names(cfg,
exportable=True)`` leaves them out) are listed in ``unexported_scores``, and ``--backend onnx`` refuses a run whose
``SCORE.names`` needs them.

The fusion into one online score per frame stays outside (it is causal over a video's frames, not per clip): the
metadata carries the calibration (training statistics and threshold), the ``SCORE`` section it was fitted with and
the network settings, which ``video/predict.py`` applies to the ONNX outputs exactly as to PyTorch's.

Check: before anything is written, ONNX Runtime (CPU) runs the graph on ``CHECK_CLIPS`` real clips (spread over the
test videos of the dataset, or over ``--input``'s video) as one batch and as a batch of one, against PyTorch (CPU,
float32) on the same clips. A map fails when ``max |onnx - torch|`` exceeds ``TOLERANCE`` times its range over the
batch; a raw score fails when it exceeds ``TOLERANCE`` times its training spread (``high - low`` of the calibration),
the unit in which the online protocol uses it. Observed differences are around 1e-7 of that.

The graph is traced once (``trace_video_graph``, ``prepare_video_export``); ``EXPORT.format=openvino`` converts the
same graph into an OpenVINO IR with its own check (``video/openvino.py``), and ``ExportedVideoGraph`` reads the
metadata of either.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from task.anomaly.unsupervised.data.video.clips import ClipDataset, Video, scan_videos, video_from_path
from task.anomaly.unsupervised.deploy.onnx import (
    ONNX_FILENAME,
    TOLERANCE,
    Difference,
    check_exported_from,
    file_sha256,
    metadata_image_size,
    open_onnx,
    with_metadata,
)
from task.anomaly.unsupervised.engine.engine import Engine, LoadedModel
from task.anomaly.unsupervised.engine.serving import load_for_serving
from task.anomaly.unsupervised.method import VideoMethod
from task.anomaly.unsupervised.video.evaluation import Calibration, served_protocol
from task.common.config import Config
from task.common.errors import UserError
from task.common.io import atomic_write_bytes
from task.common.spacing import spread

log = logging.getLogger("anomaly")

# The contract between the export (writer) and ``OnnxVideoModel`` (reader).
VIDEO_ONNX_FORMAT = "tnvision-dmad-video-onnx"
FRAME_OUTPUTS = ("predicted_frame", "error_map")
CHECK_CLIPS = 4


# --------------------------------------------------------------------------------------------- the graph
def export_graph(
    module: nn.Module, example: tuple[Tensor, ...], opset: int, input_names: list[str], output_names: list[str]
) -> bytes:
    """Trace ``module`` on ``example`` (CPU) into ONNX bytes with a dynamic batch axis (TorchScript exporter, as
    export.py: the torch.export-based one needs onnxscript)."""
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its deprecation
        # Only the batch axis is dynamic: the shape checks and the coordinate/grid sizes that read T, C, H and W are
        # constants of the checkpoint, so the tracer's "treated as a constant" warnings are expected here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            module,
            example,
            buffer,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in input_names + output_names},
            opset_version=opset,
            do_constant_folding=True,
            **kwargs,
        )
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- ONNX Runtime
class ExportedVideoGraph:
    """What the metadata of an exported video graph says about it, checked against the graph; shared by the ONNX
    Runtime and the OpenVINO model of a video run.

    ``__call__(batch)`` is a ``ClipScorer`` (video/inference.py): the same batches as the PyTorch path, the same
    (raw scores, error maps) out, so predict runs any backend through ``run_clips``. Subclasses provide ``run``.
    """

    def __init__(
        self,
        meta: dict[str, str],
        graph: Any,
        input_names: tuple[str, ...],
        output_names: tuple[str, ...],
        name: str,
        calibrated: bool = True,
    ) -> None:
        """``graph``: anything with onnxruntime's ``get_inputs()`` (name and shape of each input), for the frame size
        check; ``input_names`` / ``output_names``: the graph's, in order; ``calibrated=False`` accepts a graph without
        a calibration (benchmarks of a fresh model; predict needs one)."""
        if meta.get("format") != VIDEO_ONNX_FORMAT:
            raise UserError(
                f"{name} is not a video model exported by this toolkit (no format={VIDEO_ONNX_FORMAT} metadata); "
                "export the video run with --mode export"
            )
        self.metadata: dict[str, str] = meta
        try:
            self.clip_length = int(meta["clip_length"])
            self.channels = int(meta["channels"])
            self.image_size: tuple[int, int] = metadata_image_size(meta, graph, name)  # ints, limits, graph
            self.grayscale = json.loads(meta["grayscale"]) is True
            self.names: tuple[str, ...] = tuple(json.loads(meta["scores"]))
            self.calibration = Calibration.from_dict(json.loads(meta["calibration"]))
            self.protocol: dict = json.loads(meta["protocol"])
            self.settings: dict[str, Any] = json.loads(meta.get("settings", "{}"))
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(
                f"{name} has incomplete metadata ({type(exc).__name__}: {str(exc)[:80]}); re-create it with --mode "
                "export"
            ) from None
        self.inputs = input_names
        self.takes_video_input = len(self.inputs) == 3  # clip, target and the per-video input
        self.outputs = FRAME_OUTPUTS + tuple(f"score_{n}" for n in self.names)
        if (
            (calibrated and self.calibration is None)
            or output_names != self.outputs
            or len(self.image_size) != 2
            or not isinstance(self.settings, dict)
        ):
            raise UserError(
                f"{name} has metadata or outputs this toolkit does not know (outputs {output_names[:6]}); re-create "
                "it with --mode export"
            )

    def run(self, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Float32 inputs in graph order (clip [B, T, C, H, W], target [B, C, H, W][, video input [B, C, H, W]]) ->
        the named outputs as arrays."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        keys = ("clip", "target", "video_input") if self.takes_video_input else ("clip", "target")
        out = self.run([batch[k].detach().float().cpu().numpy() for k in keys])
        return {n: torch.from_numpy(out[f"score_{n}"]) for n in self.names}, torch.from_numpy(out["error_map"])


class OnnxVideoModel(ExportedVideoGraph):
    """An exported video graph on ONNX Runtime's CPU provider, with what its metadata says about it."""

    def __init__(self, source: Path | bytes, name: str, calibrated: bool = True) -> None:
        self.session, meta = open_onnx(source, name)
        super().__init__(
            meta,
            self.session,
            tuple(i.name for i in self.session.get_inputs()),
            tuple(o.name for o in self.session.get_outputs()),
            name,
            calibrated,
        )

    def run(self, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in zip(self.inputs, inputs)}
        return dict(zip(self.outputs, self.session.run(list(self.outputs), feed)))


def load_onnx_video_model(path: Path, checkpoint: Path | None) -> OnnxVideoModel:
    """The video ONNX model at ``path``; refused when ``checkpoint`` exists and is not the file it was exported
    from (sha256 recorded at export), so a retrained run cannot silently serve its old graph."""
    model = OnnxVideoModel(path, str(path))
    check_exported_from(path, model.metadata, checkpoint, "--mode export")
    return model


# --------------------------------------------------------------------------------------------- the export
def load_calibrated(engine: Engine, checkpoint: str | None) -> tuple[LoadedModel, Calibration]:
    """A video model.pt with its calibration (a one-line error for anything else)."""
    loaded = load_for_serving(engine, checkpoint)
    calibration = Calibration.from_dict(loaded.calibration)
    if calibration is None:
        raise UserError(
            f"checkpoint {loaded.path} has no video calibration (training score statistics); "
            f"run --mode test --checkpoint {loaded.path} first and use the model.pt it writes"
        )
    return loaded, calibration


def clip_inputs(method: VideoMethod, cfg: Config, videos: list[Video], count: int) -> list[Tensor]:
    """Graph inputs (clip, target[, video input]) of ``count`` clips spread evenly over ``videos`` (per-video inputs
    are computed for the videos picked only)."""
    ds = cfg.DATASET
    every = ClipDataset(videos, ds.clip_length, tuple(ds.resize), ds.grayscale, False)
    items = [every[i] for i in spread(range(len(every)), count)]
    inputs = [torch.stack([x["clip"] for x in items]), torch.stack([x["target"] for x in items])]
    used = sorted({int(x["video"]) for x in items})
    per_video = method.video_inputs(cfg, [videos[v] for v in used])
    if per_video is not None:
        rows = dict(zip(used, per_video))
        inputs.append(torch.stack([rows[int(x["video"])] for x in items]))
    return inputs


def check_inputs(method: VideoMethod, cfg: Config, input_path: str | None) -> list[Tensor]:
    """Graph inputs of ``CHECK_CLIPS`` real clips spread over ``--input``'s video or the test videos."""
    if input_path:
        if not Path(input_path).exists():
            raise UserError(
                f"--input {input_path} not found; pass a video file or a folder of frames for the export check"
            )
        videos = [video_from_path(input_path)]
    else:
        try:
            videos = scan_videos(cfg.DATASET, "test")
        except UserError as exc:
            raise UserError(
                "the export check needs a few real clips: pass --input VIDEO, or point DATASET.datadir at the "
                f"dataset ({exc})"
            ) from None
    return clip_inputs(method, cfg, videos, CHECK_CLIPS)


def differences(
    graph: ExportedVideoGraph, inputs: list[Tensor], reference: dict[str, Tensor], calibration: Calibration
) -> list[Difference]:
    """``graph`` (ONNX Runtime or OpenVINO) on ``inputs`` as one batch and as a batch of one, against ``reference``:
    maps relative to their range, raw scores relative to their training spread."""
    arrays = [v.numpy() for v in inputs]
    full = graph.run(arrays)
    single = graph.run([v[:1] for v in arrays])
    out = []
    for name, expected_tensor in reference.items():
        expected = expected_tensor.numpy()
        worst = max(float(np.abs(full[name] - expected).max()), float(np.abs(single[name] - expected[:1]).max()))
        if name in FRAME_OUTPUTS:
            scale = float(expected.max() - expected.min())
        else:
            stats = calibration.train_stats.get(name.removeprefix("score_"))
            scale = float(stats["high"] - stats["low"]) if stats else float(np.abs(expected).max())
        out.append(Difference(name, worst, max(scale, float(np.finfo(np.float32).eps))))
    return out


@dataclass
class PreparedVideoExport:
    """What every export format of a video run starts from: the traced graph (ONNX bytes) and its metadata, the
    check clips (graph inputs clip [N, T, C, H, W], target [N, C, H, W][, video input [N, C, H, W]]) and PyTorch's
    outputs on them (the reference)."""

    module: nn.Module
    inputs: list[Tensor]
    reference: dict[str, Tensor]
    metadata: dict[str, str]
    data: bytes  # the ONNX graph without the metadata
    calibration: Calibration
    checkpoint: Path


@dataclass
class TracedGraph:
    """A video model's serving module traced to ONNX bytes (no metadata yet) with PyTorch's outputs on the inputs it
    was traced from, and the metadata that describes the graph itself (format, frame geometry, inputs, outputs)."""

    module: nn.Module
    data: bytes
    reference: dict[str, Tensor]
    metadata: dict[str, str]
    names: tuple[str, ...]  # the raw scores, in output order


def trace_video_graph(
    method: VideoMethod, model: nn.Module, cfg: Config, inputs: list[Tensor], opset: int
) -> TracedGraph:
    """Trace ``model``'s serving module (CPU, float32) on ``inputs`` (clip [N, T, C, H, W], target [N, C, H, W][, video
    input [N, C, H, W]]) after running PyTorch on them (the reference)."""
    module = method.serving_module(model, cfg).eval()  # eval: the exporter restores the mode it finds
    names = method.score_names(cfg, exportable=True)
    input_names = ["clip", "target", "video_input"][: len(inputs)]
    output_names = list(FRAME_OUTPUTS) + [f"score_{n}" for n in names]
    with torch.no_grad():
        reference = dict(zip(output_names, module(*inputs)))
    example = tuple(v[:2] if len(v) >= 2 else torch.cat([v] * 2) for v in inputs)
    size, length = tuple(cfg.DATASET.resize), cfg.DATASET.clip_length
    channels = 1 if cfg.DATASET.grayscale else 3
    metadata = {
        "format": VIDEO_ONNX_FORMAT,
        "clip_length": str(length),
        "channels": str(channels),
        "image_size": json.dumps(list(size)),
        "grayscale": json.dumps(bool(cfg.DATASET.grayscale)),
        "inputs": ", ".join(
            [
                f"clip float32 [B, {length}, {channels}, H, W] in [-1, 1] (x / 127.5 - 1)",
                f"target float32 [B, {channels}, H, W] in [-1, 1] (the next frame)",
            ]
            + (
                [f"video_input float32 [B, {channels}, H, W] in [-1, 1] (computed from the clip's own video)"]
                if len(inputs) == 3
                else []
            )
        ),
        "outputs": ", ".join(
            ["predicted_frame [B, C, H, W]", "error_map [B, 1, H, W]", *(f"score_{n} [B]" for n in names)]
        ),
        "scores": json.dumps(list(names)),
        "calibration": "null",
        "protocol": "{}",
    }
    data = export_graph(module, example, opset, input_names, output_names)
    return TracedGraph(module, data, reference, metadata, tuple(names))


def prepare_video_export(
    engine: Engine, loaded: LoadedModel, calibration: Calibration, input_path: str | None
) -> PreparedVideoExport:
    """Trace ``loaded``'s clip-to-scores path into ONNX bytes and run PyTorch on the check clips."""
    method, cfg, checkpoint = engine.method, loaded.cfg, loaded.path
    model = loaded.model.float().cpu().to(memory_format=torch.contiguous_format).eval()
    names = method.score_names(cfg, exportable=True)
    dropped = [n for n in method.score_names(cfg) if n not in names]
    if dropped:
        log.warning(
            "score(s) %s have no graph form and are not in the exported graph; --backend onnx/openvino cannot serve "
            "a SCORE.names that needs them",
            ", ".join(dropped),
        )
    inputs = check_inputs(method, cfg, input_path)
    size, opset = tuple(cfg.DATASET.resize), engine.cfg.EXPORT.opset
    log.info(
        "exporting %s (clips of %d, %dx%d, %s, opset %d)",
        checkpoint,
        cfg.DATASET.clip_length,
        size[0],
        size[1],
        "grey" if cfg.DATASET.grayscale else "colour",
        opset,
    )
    traced = trace_video_graph(method, model, cfg, inputs, opset)
    metadata = {
        **traced.metadata,
        "unexported_scores": json.dumps(dropped),
        "settings": json.dumps({key: cfg.get(key) for key in method.network_keys + method.scoring_keys}),
        "calibration": json.dumps(calibration.to_dict()),
        "protocol": json.dumps(
            served_protocol(calibration, cfg, checkpoint).to_config()
        ),  # what the threshold was fitted with
        "category": str(cfg.DATASET.target),
        "checkpoint_sha256": file_sha256(checkpoint),
    }
    return PreparedVideoExport(traced.module, inputs, traced.reference, metadata, traced.data, calibration, checkpoint)


def export_video_onnx(prepared: PreparedVideoExport) -> Path:
    """Write ``model.onnx`` beside the checkpoint after the ONNX Runtime check; returns the path."""
    data = with_metadata(prepared.data, prepared.metadata)
    found = differences(
        OnnxVideoModel(data, "the exported graph"), prepared.inputs, prepared.reference, prepared.calibration
    )
    print(
        f"ONNX check on {len(prepared.inputs[0])} clip(s), onnxruntime CPU vs PyTorch CPU: "
        f"{'; '.join(map(str, found))}; tolerance {TOLERANCE:g} relative"
    )
    failed = [d for d in found if not d.relative <= TOLERANCE]  # NaN fails too
    if failed:
        raise UserError(
            f"ONNX output differs from PyTorch beyond the tolerance {TOLERANCE:g} ({'; '.join(map(str, failed))}); "
            "nothing was written; report it with the checkpoint"
        )
    target = prepared.checkpoint.parent / ONNX_FILENAME
    atomic_write_bytes(target, lambda handle: handle.write(data))
    print(f"exported {target} ({len(data) / 2**20:.1f} MiB)")
    return target
