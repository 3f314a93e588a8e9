"""``--mode predict`` of a video run: per-frame anomaly scores, alarms and an annotated GIF for one unlabelled video.

``--input`` is an .mp4/.avi file or a folder of numbered frame images (``data/video.video_from_path``). Every
predictable frame (``clip_length .. N - 1``: each needs the ``clip_length`` frames before it) is scored by the model
(``--backend torch``: the checkpoint on the run's device; ``--backend onnx``: model.onnx of ``--mode export`` on ONNX
Runtime's CPU provider), and its raw scores are fused with the ONLINE protocol (``frame_scoring.online_frame_scores``):
normalised with the TRAINING statistics of the calibration and smoothed causally, so a frame's score depends only on
itself and earlier frames, as a live camera would have it. The paper protocol is never used here: it normalises by
the min and max of the whole video, i.e. by the future. An alarm is ``score >= threshold`` of the calibration.

Everything the model needs comes from the checkpoint (or the ONNX metadata): clip length, frame size, grey or colour,
score settings, calibration. A run with one shared background template uses it; a run with per-video templates
(ShanghaiTech) gets the input video's own median template, as its test videos do. The ``SCORE`` section that fuses
the scores is the config's for ``--backend torch`` (the one the run was calibrated with, when it is the run's YAML)
and the one recorded at export for ``--backend onnx``.

Outputs, in ``--output`` (default: ``predict/`` next to the checkpoint or ONNX file), named after the video:

* ``<video>.csv``: ``frame,score,prediction`` for every frame; the first ``clip_length`` frames have no score and no
  prediction (empty cells); prediction 1 = alarm;
* ``<video>.gif``: up to ``MAX_GIF_FRAMES`` frames (the highest-scoring one always) with their prediction-error
  heatmap and the score curve with a moving cursor (``video_visualize.write_video_gif``).

The output folder may not be, or be inside, an input folder, and only files predict wrote itself are replaced
(``predict.OutputFolder``). Memory: the video is decoded once at model resolution (N x H x W x C bytes); error maps
are kept for the GIF's frames only (a video longer than the GIF scores those clips a second time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from task.anomaly.unsupervised.data.video.clips import ClipDataset, Video, video_from_path
from task.anomaly.unsupervised.deploy.output_folder import OutputFolder
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.engine.modes import ModeOptions
from task.anomaly.unsupervised.image.predict import onnx_source
from task.anomaly.unsupervised.scoring.protocols import online_frame_scores
from task.anomaly.unsupervised.scoring.settings import ProtocolParams
from task.anomaly.unsupervised.video.evaluation import Calibration, served_protocol
from task.anomaly.unsupervised.video.export import FRAME_OUTPUTS, UNEXPORTABLE_SCORES, load_calibrated, load_onnx_video_model, own_backgrounds, score_module
from task.anomaly.unsupervised.video.plots import gif_frame_positions, write_video_gif
from task.common.errors import UserError
from task.common.io import write_text
from task.common.runtime import autocast

log = logging.getLogger("anomaly")

MAX_GIF_FRAMES = 60

# clip [B, T, C, H, W], target [B, C, H, W], background [B, C, H, W] or None, in [-1, 1]
# -> (predicted_frame [B, Cm, H, W], error_map [B, 1, H, W], *raw scores [B]); VideoScoreModule or OnnxVideoModel.
Scorer = Callable[[Tensor, Tensor, "Tensor | None"], tuple[Tensor, ...]]


@dataclass
class VideoServing:
    """A calibrated video model and what it needs, from a checkpoint or from an ONNX file's metadata."""

    scorer: Scorer
    names: tuple[str, ...]  # the raw scores the scorer returns, in order
    clip_length: int
    size: tuple[int, int]
    grayscale: bool
    per_video_background: bool
    calibration: Calibration
    params: ProtocolParams
    source: Path  # the checkpoint or ONNX file
    backend: str
    device: torch.device = torch.device("cpu")
    amp: str = "none"

    def check(self) -> None:
        """Every score ``SCORE.names`` fuses must come from the model and have training statistics."""
        for name in self.params.names:
            if name not in self.names:
                fix = "predict with --backend torch" if name in UNEXPORTABLE_SCORES else "use the SCORE section of the run's YAML"
                raise UserError(f"SCORE.names needs the score {name!r}, which {self.source} does not compute ({self.backend}); {fix}")
            if name not in self.calibration.train_stats:
                raise UserError(f"the calibration of {self.source} has no statistics for the score {name!r}; run --mode test with this SCORE section and use the model.pt it writes")


def serving_from(engine: Engine, options: ModeOptions) -> VideoServing:
    """The model ``--backend`` asks for: the checkpoint (``--checkpoint`` or the run's model.pt), or the model.onnx
    beside it (or ``--checkpoint FILE.onnx``)."""
    if options.backend == "openvino":  # OpenVINO IR (issue 17): the image half only, so far
        raise UserError("--backend openvino is available for image runs only; video runs predict with --backend torch or onnx")
    if options.backend == "onnx":
        path, paired = onnx_source(options.checkpoint, engine.run_dir)
        model = load_onnx_video_model(path, paired)
        return VideoServing(
            model, model.names, model.clip_length, model.image_size, model.grayscale, model.per_video_background,
            model.calibration, ProtocolParams.from_config(model.protocol), path, "onnx",
        )
    loaded, calibration = load_calibrated(engine, options.checkpoint)
    cfg = loaded.cfg
    module = score_module(engine.method, loaded.model, cfg)
    return VideoServing(
        module, module.names, cfg.DATASET.clip_length, tuple(cfg.DATASET.resize), cfg.DATASET.grayscale, module.given_background,
        calibration, served_protocol(calibration, cfg, loaded.path), loaded.path, "torch", engine.device, engine.amp,
    )


@torch.no_grad()
def run_scorer(serving: VideoServing, dataset, background: Tensor | None, batch_size: int, keep_pictures: bool) -> tuple[dict[str, np.ndarray], np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Score every clip of ``dataset`` (a ClipDataset of one video, or a Subset of one).

    Returns raw scores name -> [n] float64, target frame indices [n] int64 and, with ``keep_pictures``, per clip its
    error map [H, W] float32 and target frame [H, W, 3] uint8 RGB (for the GIF; else two empty lists).
    """
    scores: dict[str, list[np.ndarray]] = {name: [] for name in serving.names}
    frames, maps, pictures = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        clip, target = batch["clip"].to(serving.device), batch["target"].to(serving.device)
        given = None if background is None else background.to(serving.device).expand(len(clip), -1, -1, -1)
        with autocast(serving.device, serving.amp):
            outputs = serving.scorer(clip, target, given)
        for name, values in zip(serving.names, outputs[len(FRAME_OUTPUTS):]):
            scores[name].append(values.float().cpu().double().numpy())
        frames.append(batch["frame"].numpy())
        if keep_pictures:
            maps.extend(outputs[1][:, 0].float().cpu().numpy())
            # Targets are x / 127.5 - 1 of uint8 frames: undo that exactly rather than decoding the frames again.
            pixels = batch["target"].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            pictures.extend(np.repeat(p, 3, axis=2) if p.shape[2] == 1 else p for p in pixels)
    return {k: np.concatenate(v) for k, v in scores.items()}, np.concatenate(frames).astype(np.int64), maps, pictures


def predictions_csv(num_frames: int, frames: np.ndarray, scores: np.ndarray, threshold: float) -> str:
    """``frame,score,prediction`` for frames 0 .. num_frames - 1 (unscored frames: empty cells)."""
    by_frame = dict(zip(frames.tolist(), scores.tolist()))
    lines = ["frame,score,prediction"]
    for frame in range(num_frames):
        value = by_frame.get(frame)
        lines.append(f"{frame},," if value is None else f"{frame},{value:.6f},{int(value >= threshold)}")
    return "\n".join(lines) + "\n"


def predict_video(serving: VideoServing, input_path: Path, out_dir: Path, batch_size: int) -> None:
    """Score the video at ``input_path`` and write ``<video>.csv`` and ``<video>.gif`` into ``out_dir``."""
    serving.check()
    video: Video = video_from_path(input_path)
    # Decodes the whole video now: an unreadable or too short video stops here, before anything is written.
    dataset = ClipDataset([video], serving.clip_length, serving.size, serving.grayscale, True, False)
    background = own_backgrounds([video], serving.size, serving.grayscale) if serving.per_video_background else None
    csv_name, gif_name = Path(f"{video.name}.csv"), Path(f"{video.name}.gif")
    OutputFolder(out_dir, input_path).claim([csv_name, gif_name])
    log.info("predicting %s (%d frames) with %s (%s)", input_path, video.num_frames, serving.source, serving.backend)

    # The GIF needs error maps and pictures only of the frames it shows. A short video shows every frame: keep them
    # from the one pass; a longer one scores the shown clips again rather than keeping every map.
    every = len(dataset) <= MAX_GIF_FRAMES
    raw, frames, maps, pictures = run_scorer(serving, dataset, background, batch_size, every)
    params, threshold = serving.params, serving.calibration.threshold
    online = online_frame_scores({name: [raw[name]] for name in params.names}, serving.calibration.train_stats, params)[0]
    write_text(out_dir / csv_name, predictions_csv(video.num_frames, frames, online, threshold))

    positions = gif_frame_positions(len(frames), online, None, MAX_GIF_FRAMES)
    if not every:
        # write_video_gif picks the same positions from the same arguments: the other entries are never read.
        _, _, shown_maps, shown_pictures = run_scorer(serving, Subset(dataset, positions), background, batch_size, True)
        maps, pictures = [shown_maps[0]] * len(frames), [shown_pictures[0]] * len(frames)
        for slot, position in enumerate(positions):
            maps[position], pictures[position] = shown_maps[slot], shown_pictures[slot]
    shown = write_video_gif(pictures, maps, online, frames, video.num_frames, None, threshold, video.name, [out_dir / gif_name], MAX_GIF_FRAMES)
    if not every and shown != positions:  # the placeholders above would have been drawn
        raise RuntimeError(f"the GIF showed frames {shown[:5]}... but predict rendered {positions[:5]}...")

    alarms = int((online >= threshold).sum())
    peak = int(np.argmax(online))
    print(
        f"{input_path}: {video.num_frames} frames, {len(frames)} scored, {alarms} alarm(s) (threshold {threshold:.4f}), "
        f"max score {online[peak]:.4f} at frame {int(frames[peak])}; wrote {out_dir / csv_name} and {out_dir / gif_name}"
    )


def mode_predict(engine: Engine, options: ModeOptions) -> None:
    """Scores, alarms and an annotated GIF for one video (``--input``), with PyTorch or ONNX Runtime."""
    if not options.input:
        raise UserError("--mode predict needs --input VIDEO (an .mp4/.avi file or a folder of numbered frames)")
    input_path = Path(options.input).expanduser()
    if not input_path.exists():
        raise UserError(f"--input {input_path} not found; pass a video file (.mp4, .avi) or a folder of numbered frames")
    serving = serving_from(engine, options)
    out_dir = Path(options.output).expanduser() if options.output else serving.source.parent / "predict"
    predict_video(serving, input_path, out_dir, engine.cfg.TEST.batch_size)
