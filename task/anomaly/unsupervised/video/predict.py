"""``--mode predict`` of a video run: per-frame anomaly scores, alarms and an annotated GIF for one unlabelled video.

``--input`` is an .mp4/.avi file or a folder of numbered frame images (``data/video.video_from_path``). Every
predictable frame (``clip_length .. N - 1``: each needs the ``clip_length`` frames before it) is scored by the model
(``--backend torch``: the checkpoint on the run's device; ``--backend onnx``: model.onnx of ``--mode export`` on ONNX
Runtime's CPU provider; ``--backend openvino``: the IR model-<EXPORT.precision>.xml of ``EXPORT.format=openvino``;
``--backend auto``: ``deploy/openvino.with_auto_backend``), and its raw scores are fused with the ONLINE protocol
(``frame_scoring.online_frame_scores``): normalised with the TRAINING statistics of the calibration and smoothed
causally, so a frame's score depends only on itself and earlier frames, as a live camera would have it. The paper
protocol is never used here: it normalises by the min and max of the whole video, i.e. by the future. An alarm is
``score >= threshold`` of the calibration.

Everything the model needs comes from the checkpoint (or the ONNX metadata): clip length, frame size, grey or colour,
score settings, calibration. What the method needs to score a video it was not trained on (DMAD-PDM with one
background template per video: the video's own median template) comes from the method, for either backend, as for
the test videos. Both backends run through ``video/inference.run_clips``. The ``SCORE`` section that fuses
the scores is the config's for ``--backend torch`` (the one the run was calibrated with, when it is the run's YAML)
and the one recorded at export for ``--backend onnx`` and ``openvino``.

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

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from task.anomaly.unsupervised.data.video.clips import ClipDataset, Video, frames_of, video_from_path
from task.anomaly.unsupervised.deploy.openvino import ir_source
from task.anomaly.unsupervised.deploy.output_folder import OutputFolder
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.engine.modes import ModeOptions
from task.anomaly.unsupervised.engine.settings import with_settings
from task.anomaly.unsupervised.image.predict import onnx_source
from task.anomaly.unsupervised.method import VideoMethod
from task.anomaly.unsupervised.scoring.protocols import online_frame_scores
from task.anomaly.unsupervised.scoring.settings import ProtocolParams
from task.anomaly.unsupervised.video.evaluation import Calibration, served_protocol
from task.anomaly.unsupervised.video.export import ExportedVideoGraph, load_calibrated, load_onnx_video_model
from task.anomaly.unsupervised.video.inference import ClipScorer, FrameScores, MethodScorer, run_clips
from task.anomaly.unsupervised.video.plots import gif_frame_positions, write_video_gif
from task.common.config import Config
from task.common.errors import UserError
from task.common.io import write_together

log = logging.getLogger("anomaly")

MAX_GIF_FRAMES = 60


@dataclass
class VideoServing:
    """A calibrated video model and what it needs, from a checkpoint or from an ONNX file's metadata."""

    scorer: ClipScorer
    names: tuple[str, ...]  # the raw scores the scorer returns
    unexported: tuple[str, ...]  # scores the run computes but the scorer (an exported graph) cannot
    cfg: Config  # the run's settings the model was built and calibrated with (per-video inputs are computed with them)
    calibration: Calibration
    params: ProtocolParams
    source: Path  # the checkpoint or ONNX file
    backend: str
    model: torch.nn.Module | None = None  # the PyTorch model (None for ONNX)
    device: torch.device = torch.device("cpu")
    amp: str = "none"

    def check(self) -> None:
        """Every score ``SCORE.names`` fuses must come from the model and have training statistics."""
        for name in self.params.names:
            if name not in self.names:
                fix = (
                    "predict with --backend torch"
                    if name in self.unexported
                    else "use the SCORE section of the run's YAML"
                )
                raise UserError(
                    f"SCORE.names needs the score {name!r}, which {self.source} does not compute ({self.backend}); "
                    f"{fix}"
                )
            if name not in self.calibration.train_stats:
                raise UserError(
                    f"the calibration of {self.source} has no statistics for the score {name!r}; run --mode test with "
                    "this SCORE section and use the model.pt it writes"
                )


def serving_from(engine: Engine, options: ModeOptions) -> VideoServing:
    """The model ``--backend`` asks for: the checkpoint (``--checkpoint`` or the run's model.pt), or the model.onnx
    beside it (or ``--checkpoint FILE.onnx``)."""
    if options.backend in ("onnx", "openvino"):
        if options.backend == "onnx":
            path, paired = onnx_source(options.checkpoint, engine.run_dir)
            model: ExportedVideoGraph = load_onnx_video_model(path, paired)
        else:  # OpenVINO IR of EXPORT.precision (issue 17)
            from task.anomaly.unsupervised.video.openvino import load_ir_video_model

            path, paired = ir_source(options.checkpoint, engine.run_dir, engine.cfg.EXPORT.precision)
            model = load_ir_video_model(path, paired, torch.get_num_threads())
        unexported = tuple(json.loads(model.metadata.get("unexported_scores", "[]")))
        cfg = with_settings(engine.cfg, model.settings)
        return VideoServing(
            model,
            model.names,
            unexported,
            cfg,
            model.calibration,
            ProtocolParams.from_config(model.protocol),
            path,
            options.backend,
        )
    loaded, calibration = load_calibrated(engine, options.checkpoint)
    cfg = loaded.cfg
    scorer = MethodScorer(engine.method, loaded.model.eval(), engine.method.score_settings(cfg))
    return VideoServing(
        scorer,
        engine.method.score_names(cfg),
        (),
        cfg,
        calibration,
        served_protocol(calibration, cfg, loaded.path),
        loaded.path,
        "torch",
        loaded.model,
        engine.device,
        engine.amp,
    )


def score_video(
    method: VideoMethod,
    serving: VideoServing,
    dataset,
    video: Video,
    batch_size: int,
    keep_maps: set[tuple[int, int]] | None,
) -> FrameScores:
    """Raw scores of the clips of ``dataset`` (one video, or a Subset of its clips) with either backend."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if serving.model is None:  # the exported graph takes what the method computes per video as an input
        inputs = method.video_inputs(serving.cfg, [video]) if serving.scorer.takes_video_input else None
        return run_clips(serving.scorer, loader, [video], serving.device, serving.amp, "predict", keep_maps, inputs)
    with method.scoring_context(serving.model, serving.cfg, [video], None):
        return run_clips(serving.scorer, loader, [video], serving.device, serving.amp, "predict", keep_maps)


def predictions_csv(num_frames: int, frames: np.ndarray, scores: np.ndarray, threshold: float) -> str:
    """``frame,score,prediction`` for frames 0 .. num_frames - 1 (unscored frames: empty cells)."""
    by_frame = dict(zip(frames.tolist(), scores.tolist()))
    lines = ["frame,score,prediction"]
    for frame in range(num_frames):
        value = by_frame.get(frame)
        lines.append(f"{frame},," if value is None else f"{frame},{value:.6f},{int(value >= threshold)}")
    return "\n".join(lines) + "\n"


def predict_video(method: VideoMethod, serving: VideoServing, input_path: Path, out_dir: Path, batch_size: int) -> None:
    """Score the video at ``input_path`` and write ``<video>.csv`` and ``<video>.gif`` into ``out_dir``."""
    serving.check()
    video: Video = video_from_path(input_path)
    ds = serving.cfg.DATASET
    size, grayscale = tuple(ds.resize), ds.grayscale
    # Decodes the whole video now: an unreadable or too short video stops here, before anything is written.
    dataset = ClipDataset([video], ds.clip_length, size, grayscale, True)
    csv_name, gif_name = Path(f"{video.name}.csv"), Path(f"{video.name}.gif")
    OutputFolder(out_dir, input_path).claim([csv_name, gif_name])
    log.info("predicting %s (%d frames) with %s (%s)", input_path, video.num_frames, serving.source, serving.backend)

    # The GIF needs error maps only of the frames it shows. A short video shows every frame: keep them from the one
    # pass; a longer one scores the shown clips again rather than keeping every map.
    every = len(dataset) <= MAX_GIF_FRAMES
    all_frames = {(0, f) for f in range(video.num_frames)}
    scored = score_video(method, serving, dataset, video, batch_size, all_frames if every else None)
    frames = scored.frames[0]
    params, threshold = serving.params, serving.calibration.threshold
    online = online_frame_scores(
        {name: [scored.scores[name][0]] for name in params.names}, serving.calibration.train_stats, params
    )[0]
    csv_text = predictions_csv(video.num_frames, frames, online, threshold)  # written with the GIF, below

    positions = gif_frame_positions(len(frames), online, None, MAX_GIF_FRAMES)
    kept = scored.error_maps.get(0, {})
    if not every:
        shown_frames = {(0, int(frames[p])) for p in positions}
        kept = score_video(method, serving, Subset(dataset, positions), video, batch_size, shown_frames).error_maps.get(
            0, {}
        )
    pixels = frames_of(video, size, grayscale)
    placeholder = next(iter(kept.values()))
    maps = [kept.get(int(f), placeholder) for f in frames]  # write_video_gif reads only the shown positions
    pictures = [np.repeat(pixels[f], 3, axis=2) if pixels.shape[-1] == 1 else pixels[f] for f in frames.tolist()]
    # The pair is replaced together (io.write_together): a SIGTERM never leaves this input's csv beside an older gif.
    with tempfile.TemporaryDirectory(prefix="dmad-predict-") as scratch:
        rendered = Path(scratch) / gif_name
        shown = write_video_gif(
            pictures, maps, online, frames, video.num_frames, None, threshold, video.name, [rendered], MAX_GIF_FRAMES
        )
        if not every and shown != positions:  # the placeholders above would have been drawn
            raise RuntimeError(f"the GIF showed frames {shown[:5]}... but predict rendered {positions[:5]}...")
        gif_bytes = rendered.read_bytes()
    write_together(
        {
            out_dir / csv_name: lambda handle: handle.write(csv_text.encode("utf-8")),
            out_dir / gif_name: lambda handle: handle.write(gif_bytes),
        }
    )

    alarms = int((online >= threshold).sum())
    peak = int(np.argmax(online))
    print(
        f"{input_path}: {video.num_frames} frames, {len(frames)} scored, {alarms} alarm(s) (threshold "
        f"{threshold:.4f}), "
        f"max score {online[peak]:.4f} at frame {int(frames[peak])}; wrote {out_dir / csv_name} and "
        f"{out_dir / gif_name}"
    )
