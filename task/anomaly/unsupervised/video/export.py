"""``--mode export`` of a video run: the clip-to-scores path of DMAD-PDM as one ONNX graph, checked against PyTorch.

Graph inputs (float32, values in [-1, 1] as ``ClipDataset`` yields them; B dynamic, everything else fixed by the
checkpoint): ``clip`` [B, T, C, H, W] (T = ``DATASET.clip_length``, C = 1 for grey data, else 3), ``target``
[B, C, H, W] (the frame after the clip; the scores compare the prediction with it) and, only for a run with one
background template per video (``DATASET.background=per_video``), ``background`` [B, C, H, W]: the video's own median
template, as the test evaluation builds it (``use_test_backgrounds``); the trained per-video templates belong to the
training videos, so an index into them would be of no use for a new video. A run with one shared template has it
baked into the graph. Outputs: ``predicted_frame`` [B, Cm, H, W] (Cm = the model's channels; grey data is replicated
for a colour model), ``error_map`` [B, 1, H, W] and one raw score [B] per name, ``score_<name>`` (deformation,
prediction, gradient). The ShanghaiTech ``object`` score is computed from OpenCV contours, which have no ONNX form:
it is left out (``unexported_scores`` in the metadata says so), and ``--backend onnx`` refuses a run whose
``SCORE.names`` needs it.

The graph is the evaluation's own ``method.score_batch`` traced once, so what it computes is what ``--mode test``
scores. The fusion into one online score per frame stays outside (it is causal over a video's frames, not per clip):
the metadata carries the calibration (training statistics and threshold) and the ``SCORE`` section it was fitted
with, which ``video_predict`` applies to the ONNX outputs exactly as to PyTorch's.

Check: before anything is written, ONNX Runtime (CPU) runs the graph on ``CHECK_CLIPS`` real clips (spread over the
test videos of the dataset, or over ``--input``'s video) as one batch and as a batch of one, against PyTorch (CPU,
float32) on the same clips. A map fails when ``max |onnx - torch|`` exceeds ``TOLERANCE`` times its range over the
batch; a raw score fails when it exceeds ``TOLERANCE`` times its training spread (``high - low`` of the calibration),
the unit in which the online protocol uses it. Observed differences are around 1e-7 of that.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from task.anomaly.unsupervised.data.video.clips import ClipDataset, Video, scan_videos, video_from_path
from task.anomaly.unsupervised.deploy.onnx import ONNX_FILENAME, TOLERANCE, Difference, file_sha256, open_onnx, with_metadata
from task.anomaly.unsupervised.engine.engine import Engine, LoadedModel
from task.anomaly.unsupervised.engine.modes import ModeOptions
from task.anomaly.unsupervised.engine.settings import load_for_serving
from task.anomaly.unsupervised.models.base import Method
from task.anomaly.unsupervised.models.dmad_video.templates import background_for, templates_tensor
from task.anomaly.unsupervised.video.evaluation import Calibration, served_protocol
from task.common.config import Config
from task.common.errors import UserError
from task.common.io import atomic_write_bytes

log = logging.getLogger("anomaly")

# The contract between the export (writer) and ``OnnxVideoModel`` (reader).
VIDEO_ONNX_FORMAT = "tnvision-dmad-video-onnx"
FRAME_OUTPUTS = ("predicted_frame", "error_map")
RAW_SCORES = ("deformation", "prediction", "gradient")
UNEXPORTABLE_SCORES = ("object",)  # OpenCV contours (scores.object_scores): no ONNX form
CHECK_CLIPS = 4


# --------------------------------------------------------------------------------------------- the graph
class _GivenBackground(nn.Module):
    """Stands in for the model's template store: ``select`` returns the templates it is handed ([B, C, H, W])."""

    def select(self, templates: Tensor) -> Tensor:
        return templates


class _KeepPrediction(nn.Module):
    """The video model, remembering the predicted frame of its last forward (``score_batch`` returns only scores
    and error maps). ``module`` is where ``score_batch`` looks for the wrapped model's channel count."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model
        self.prediction: Tensor | None = None

    def forward(self, clip: Tensor, background: Tensor | None) -> Any:
        out = self.module(clip, background)
        self.prediction = out.prediction
        return out


class VideoScoreModule(nn.Module):
    """A video run's per-clip scoring as a tuple-returning module: the graph ``--mode export`` writes and the
    PyTorch backend of ``--mode predict``.

    clip [B, T, C, H, W], target [B, C, H, W] (, background [B, C, H, W] with ``given_background``), all in [-1, 1]
    -> (predicted_frame [B, Cm, H, W], error_map [B, 1, H, W], *raw scores [B] in ``names`` order).
    """

    def __init__(self, method: Method, model: nn.Module, settings: Any, names: tuple[str, ...], given_background: bool) -> None:
        super().__init__()
        model = model.eval()
        if given_background:  # a copy: the caller's model keeps its trained templates
            model = copy.deepcopy(model)
            model.background = _GivenBackground()
        self.net = _KeepPrediction(model)
        self.method = method
        self.settings = settings
        self.names = names
        self.given_background = given_background

    def forward(self, clip: Tensor, target: Tensor, background: Tensor | None = None) -> tuple[Tensor, ...]:
        if background is not None:  # grey templates feed a colour model replicated, as the frames are
            background = background.expand(-1, self.net.module.channels, -1, -1)
        batch = {"clip": clip, "target": target, "background": background}
        scores, error_map = self.method.score_batch(self.net, batch, self.settings)
        return (self.net.prediction, error_map, *(scores[name] for name in self.names))


def score_module(method: Method, model: nn.Module, cfg: Config, onnx: bool = False) -> VideoScoreModule:
    """The scoring module of a loaded video model with ``cfg``'s score settings; ``onnx``: without the scores ONNX
    cannot express (``UNEXPORTABLE_SCORES``)."""
    settings = method.score_settings(cfg)
    if onnx:
        settings = dataclasses.replace(settings, object_score=False)
    names = RAW_SCORES + (("object",) if settings.object_score else ())
    return VideoScoreModule(method, model, settings, names, cfg.DATASET.background == "per_video")


def own_backgrounds(videos: list[Video], size: tuple[int, int], grayscale: bool) -> Tensor:
    """Each video's own median template [V, C, H, W] in [-1, 1] (as the test evaluation of a per-video run)."""
    return templates_tensor(background_for(videos, size, grayscale, True, None))


def export_graph(module: VideoScoreModule, example: tuple[Tensor, ...], opset: int, input_names: list[str], output_names: list[str]) -> bytes:
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
            module, example, buffer, input_names=input_names, output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in input_names + output_names},
            opset_version=opset, do_constant_folding=True, **kwargs,
        )
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- ONNX Runtime
class OnnxVideoModel:
    """An exported video graph on ONNX Runtime's CPU provider, with what its metadata says about it.

    ``__call__(clip, target, background)`` takes what ``VideoScoreModule`` takes (tensors) and returns the same
    tuple (CPU tensors), so ``video_predict`` runs either backend through one path.
    """

    def __init__(self, source: Path | bytes, name: str) -> None:
        self.session, meta = open_onnx(source, name)
        if meta.get("format") != VIDEO_ONNX_FORMAT:
            raise UserError(f"{name} is not a video model exported by this toolkit (no format={VIDEO_ONNX_FORMAT} metadata); export the video run with --mode export")
        self.metadata: dict[str, str] = meta
        try:
            self.clip_length = int(meta["clip_length"])
            self.channels = int(meta["channels"])
            self.image_size: tuple[int, int] = tuple(int(v) for v in json.loads(meta["image_size"]))
            self.grayscale = json.loads(meta["grayscale"]) is True
            self.per_video_background = json.loads(meta["per_video_background"]) is True
            self.names: tuple[str, ...] = tuple(json.loads(meta["scores"]))
            self.calibration = Calibration.from_dict(json.loads(meta["calibration"]))
            self.protocol: dict = json.loads(meta["protocol"])
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"{name} has incomplete metadata ({type(exc).__name__}: {str(exc)[:80]}); re-create it with --mode export") from None
        self.outputs = FRAME_OUTPUTS + tuple(f"score_{n}" for n in self.names)
        found = tuple(o.name for o in self.session.get_outputs())
        if self.calibration is None or found != self.outputs or len(self.image_size) != 2:
            raise UserError(f"{name} has metadata or outputs this toolkit does not know (outputs {found[:6]}); re-create it with --mode export")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named float32 inputs -> the named outputs as arrays."""
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        return dict(zip(self.outputs, self.session.run(list(self.outputs), feed)))

    def __call__(self, clip: Tensor, target: Tensor, background: Tensor | None = None) -> tuple[Tensor, ...]:
        inputs = {"clip": clip.detach().float().cpu().numpy(), "target": target.detach().float().cpu().numpy()}
        if self.per_video_background:
            inputs["background"] = background.detach().float().cpu().numpy()
        out = self.run(inputs)
        return tuple(torch.from_numpy(out[name]) for name in self.outputs)


def load_onnx_video_model(path: Path, checkpoint: Path | None) -> OnnxVideoModel:
    """The video ONNX model at ``path``; refused when ``checkpoint`` exists and is not the file it was exported
    from (sha256 recorded at export), so a retrained run cannot silently serve its old graph."""
    model = OnnxVideoModel(path, str(path))
    recorded = model.metadata.get("checkpoint_sha256")
    if recorded and checkpoint is not None and checkpoint.is_file() and file_sha256(checkpoint) != recorded:
        raise UserError(f"{path} was exported from a different {checkpoint.name} than {checkpoint}; rerun --mode export to refresh it")
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


def check_inputs(cfg: Config, input_path: str | None) -> dict[str, Tensor]:
    """Graph inputs of ``CHECK_CLIPS`` real clips spread over ``--input``'s video or the test videos: clip, target
    and, for a per-video run, each clip's own video template (only those videos' medians are computed)."""
    ds = cfg.DATASET
    if input_path:
        if not Path(input_path).exists():
            raise UserError(f"--input {input_path} not found; pass a video file or a folder of frames for the ONNX check")
        videos = [video_from_path(input_path)]
    else:
        try:
            videos = scan_videos(ds, "test")
        except UserError as exc:
            raise UserError(f"the ONNX check needs a few real clips: pass --input VIDEO, or point DATASET.datadir at the dataset ({exc})") from None
    every = ClipDataset(videos, ds.clip_length, tuple(ds.resize), ds.grayscale, False, False)
    picks = np.unique(np.linspace(0, len(every) - 1, min(len(every), CHECK_CLIPS)).round().astype(int))
    items = [every[int(i)] for i in picks]
    inputs = {"clip": torch.stack([x["clip"] for x in items]), "target": torch.stack([x["target"] for x in items])}
    if ds.background == "per_video":
        used = sorted({int(x["video"]) for x in items})
        templates = dict(zip(used, own_backgrounds([videos[v] for v in used], tuple(ds.resize), ds.grayscale)))
        inputs["background"] = torch.stack([templates[int(x["video"])] for x in items])
    return inputs


def differences(onnx_model: OnnxVideoModel, inputs: dict[str, Tensor], reference: dict[str, Tensor], calibration: Calibration) -> list[Difference]:
    """ONNX Runtime on ``inputs`` as one batch and as a batch of one, against ``reference``: maps relative to their
    range, raw scores relative to their training spread."""
    arrays = {k: v.numpy() for k, v in inputs.items()}
    full = onnx_model.run(arrays)
    single = onnx_model.run({k: v[:1] for k, v in arrays.items()})
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


def export_video_run(engine: Engine, loaded: LoadedModel, calibration: Calibration, input_path: str | None) -> Path:
    """Export ``loaded`` to ``model.onnx`` beside its checkpoint after the ONNX Runtime check; returns the path."""
    cfg, checkpoint = loaded.cfg, loaded.path
    model = loaded.model.float().cpu().to(memory_format=torch.contiguous_format).eval()
    module = score_module(engine.method, model, cfg, onnx=True)
    dropped = [n for n in UNEXPORTABLE_SCORES if n in score_module(engine.method, model, cfg).names]
    if dropped:
        log.warning("score(s) %s use OpenCV contours and are not in the ONNX graph; --backend onnx cannot serve a SCORE.names that needs them", ", ".join(dropped))
    inputs = check_inputs(cfg, input_path)
    input_names = ["clip", "target"] + (["background"] if module.given_background else [])
    output_names = list(FRAME_OUTPUTS) + [f"score_{n}" for n in module.names]
    with torch.no_grad():
        reference = dict(zip(output_names, module(*(inputs[k] for k in input_names))))
    count = len(inputs["clip"])
    example = tuple(inputs[k][:2] if count >= 2 else torch.cat([inputs[k]] * 2) for k in input_names)

    size, opset, length = tuple(cfg.DATASET.resize), engine.cfg.EXPORT.opset, cfg.DATASET.clip_length
    channels = 1 if cfg.DATASET.grayscale else 3
    log.info("exporting %s (clips of %d, %dx%d, %d channel(s), opset %d)", checkpoint, length, size[0], size[1], channels, opset)
    metadata = {
        "format": VIDEO_ONNX_FORMAT,
        "clip_length": str(length),
        "channels": str(channels),
        "model_channels": str(cfg.MODEL.channels),
        "image_size": json.dumps(list(size)),
        "grayscale": json.dumps(bool(cfg.DATASET.grayscale)),
        "per_video_background": json.dumps(module.given_background),
        "inputs": ", ".join(
            [f"clip float32 [B, {length}, {channels}, H, W] in [-1, 1] (x / 127.5 - 1)", f"target float32 [B, {channels}, H, W] in [-1, 1] (the next frame)"]
            + ([f"background float32 [B, {channels}, H, W] in [-1, 1] (the video's own median template)"] if module.given_background else [])
        ),
        "outputs": ", ".join([f"predicted_frame [B, {cfg.MODEL.channels}, H, W]", "error_map [B, 1, H, W]", *(f"score_{n} [B]" for n in module.names)]),
        "scores": json.dumps(list(module.names)),
        "unexported_scores": json.dumps(dropped),
        "score_settings": json.dumps(dataclasses.asdict(module.settings)),
        "calibration": json.dumps(calibration.to_dict()),
        "protocol": json.dumps(served_protocol(calibration, cfg, checkpoint).to_config()),  # what the threshold was fitted with
        "category": str(cfg.DATASET.target),
        "checkpoint_sha256": file_sha256(checkpoint),
    }
    data = with_metadata(export_graph(module, example, opset, input_names, output_names), metadata)
    found = differences(OnnxVideoModel(data, "the exported graph"), inputs, reference, calibration)
    print(f"ONNX check on {count} clip(s), onnxruntime CPU vs PyTorch CPU: {'; '.join(map(str, found))}; tolerance {TOLERANCE:g} relative")
    failed = [d for d in found if not d.relative <= TOLERANCE]  # NaN fails too
    if failed:
        raise UserError(f"ONNX output differs from PyTorch beyond the tolerance {TOLERANCE:g} ({'; '.join(map(str, failed))}); nothing was written; report it with the checkpoint")
    target = checkpoint.parent / ONNX_FILENAME
    atomic_write_bytes(target, lambda handle: handle.write(data))
    print(f"exported {target} ({len(data) / 2**20:.1f} MiB)")
    return target


def mode_export(engine: Engine, options: ModeOptions) -> None:
    """Export the checkpoint's clip-to-scores path to model.onnx beside it, checked against PyTorch."""
    if engine.cfg.EXPORT.format != "onnx":  # OpenVINO IR (issue 17): the image half only, so far
        raise UserError(f"EXPORT.format={engine.cfg.EXPORT.format} is available for image runs only; video runs export ONNX (EXPORT.format=onnx)")
    loaded, calibration = load_calibrated(engine, options.checkpoint)
    export_video_run(engine, loaded, calibration, options.input)
