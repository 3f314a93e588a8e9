"""The modes of a video run (``DATASET.format=video``), as an explicit table of functions with typed arguments.

Same commands as the image runs; the last epoch is the model (nothing is selected with test labels), and the
calibration (the held-out calibration frames' score statistics and the alarm threshold) is stored in model.pt.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from task.anomaly.unsupervised.data.video.clips import Video
from task.anomaly.unsupervised.data.video.synthetic import make_video_demo
from task.anomaly.unsupervised.deploy.openvino import with_auto_backend
from task.anomaly.unsupervised.engine.engine import Engine, LoadedModel
from task.anomaly.unsupervised.engine.modes import ModeFunction, ModeOptions, mode_report, test_output_dir
from task.anomaly.unsupervised.scoring.protocols import evaluate_scores
from task.anomaly.unsupervised.scoring.score_file import read_scores
from task.anomaly.unsupervised.scoring.settings import ProtocolParams
from task.anomaly.unsupervised.video.evaluation import (
    Calibration,
    calibrate,
    calibration_split,
    data_root,
    evaluate,
    video_split,
)
from task.anomaly.unsupervised.video.export import export_video_onnx, load_calibrated, prepare_video_export
from task.anomaly.unsupervised.video.live_source import is_live_source
from task.anomaly.unsupervised.video.openvino import calibration_clips, export_video_openvino
from task.anomaly.unsupervised.video.predict import predict_video, serving_from
from task.anomaly.unsupervised.video.stream import predict_stream
from task.common.errors import UserError
from task.common.io import ensure_dir, write_text

log = logging.getLogger("anomaly")


def prepare_video_data(engine: Engine) -> None:
    """Generate the synthetic surveillance demo when DATASET.demo is set (rank 0 writes, the others wait)."""
    ds = engine.cfg.DATASET
    if ds.demo:
        if engine.dist.is_main:
            make_video_demo(ds.datadir, ds.target, size=ds.resize[0], scene=ds.demo_scene)
        engine.dist.barrier()


def fresh_model(engine: Engine, train_videos: list[Video]) -> torch.nn.Module:
    """A new model for training (or timing it), its data-dependent state prepared from the training videos (e.g.
    DMAD-PDM's background templates); on the device, compiled with TRAIN.compile."""
    method = engine.method
    model = method.build(engine.cfg, num_videos=len(train_videos))
    method.prepare(model, engine.cfg, train_videos, data_root(engine))
    return engine.maybe_compile(method.to_device(model, engine.device, engine.channels_last))


def mode_train(engine: Engine, options: ModeOptions) -> dict[str, Any]:
    """Train on the training videos but the last ``DATASET.calibration_split`` of each, calibrate on those, evaluate
    the last model on the test videos."""
    from task.anomaly.unsupervised.engine.training import train

    with engine.owning_run_dir(), engine.reporting("train"):
        prepare_video_data(engine)
        train_videos, all_train = video_split(engine, "train")
        train_set, calibration_set, source = calibration_split(engine, all_train)
        test_videos, test_set = video_split(engine, "test")
        check_scoring(engine, test_videos)  # before training: a meaningless SCORE section would waste the run
        ensure_dir(engine.run_dir)
        engine.setup_log_file()
        if engine.dist.is_main:
            import yaml

            write_text(engine.run_dir / "config.yaml", yaml.safe_dump(engine.cfg.to_dict(), sort_keys=False))
        log.info(
            "%d training videos (%d clips, %d calibration clips: %s), %d test videos (%d clips)",
            len(train_videos),
            len(train_set),
            len(calibration_set),
            source,
            len(test_videos),
            len(test_set),
        )
        model = fresh_model(engine, train_videos)

        def evaluate_now(trained, step: int, final: bool) -> dict[str, Any]:
            if not engine.dist.is_main:
                return {}
            calibration = calibrate(engine, trained, train_videos, calibration_set, source)
            return evaluate(engine, trained, calibration, test_videos, test_set, step, None, final)

        return train(engine, train_set, evaluate_now, model=model)


def check_scoring(engine: Engine, test_videos: list[Video]) -> None:
    """The SCORE section against the test videos' lengths (``ProtocolParams.check_lengths``), before any work."""
    clip_length = engine.cfg.DATASET.clip_length
    lengths = [v.num_frames - clip_length for v in test_videos]
    ProtocolParams.from_config(engine.cfg.SCORE).check_lengths(lengths, "the test videos")


def _calibration(engine: Engine, loaded: LoadedModel) -> Calibration:
    """The checkpoint's calibration when it was fitted with this config's SCORE settings; else fitted anew."""
    calibration = Calibration.from_dict(loaded.calibration)
    engine.method.apply_scoring(loaded.model, engine.cfg)  # score with this command's settings
    if calibration is not None and calibration.fits(
        ProtocolParams.from_config(engine.cfg.SCORE), engine.method.config_scoring(engine.cfg)
    ):
        return calibration
    if calibration is not None:
        log.info(
            "the scoring settings differ from those %s was calibrated with; recalibrating on the calibration frames",
            loaded.path,
        )
    train_videos, all_train = video_split(engine, "train")
    _, calibration_set, source = calibration_split(engine, all_train)
    return calibrate(engine, loaded.model, train_videos, calibration_set, source)


def mode_test(engine: Engine, options: ModeOptions) -> dict[str, Any]:
    """Evaluate a checkpoint on the test videos (its stored calibration; recomputed when absent)."""
    path = engine.checkpoint_path(options.checkpoint)
    with engine.owning_run_dir(), engine.reporting("test"):
        ensure_dir(engine.run_dir)
        engine.setup_log_file()
        loaded = engine.load(path)
        engine.adopt(loaded.cfg)  # frame size, colour and clip length follow the checkpoint
        prepare_video_data(engine)
        test_videos, test_set = video_split(engine, "test")
        check_scoring(engine, test_videos)
        out_dir = test_output_dir(engine, path)
        calibration = _calibration(engine, loaded)
        return evaluate(engine, loaded.model, calibration, test_videos, test_set, None, out_dir, True)


def mode_gif(engine: Engine, options: ModeOptions) -> None:
    """Rebuild the score plots and the GIF from a checkpoint (no training; model.pt and metrics are left alone)."""
    from task.anomaly.unsupervised.scoring.protocols import online_frame_scores
    from task.anomaly.unsupervised.video.evaluation import scoring_unseen
    from task.anomaly.unsupervised.video.inference import score_clips
    from task.anomaly.unsupervised.video.outputs import write_plots_and_gif

    path = engine.checkpoint_path(options.checkpoint)
    with engine.owning_run_dir():
        loaded = engine.load(path)
        engine.adopt(loaded.cfg)
        prepare_video_data(engine)
        test_videos, test_set = video_split(engine, "test")
        calibration = _calibration(engine, loaded)
        with scoring_unseen(engine, loaded.model, test_videos):
            scored = score_clips(engine, loaded.model, test_set, test_videos, "gif")
            params = ProtocolParams.from_config(engine.cfg.SCORE)
            online = online_frame_scores({n: scored.scores[n] for n in params.names}, calibration.train_stats, params)
            write_plots_and_gif(
                engine, test_output_dir(engine, path), loaded.model, test_set, scored, online, calibration.threshold
            )


def mode_score(engine: Engine, options: ModeOptions) -> dict[str, Any]:
    """Recompute both protocols from a scores.npz (``--input``), with this YAML's SCORE settings."""
    if not options.input:
        raise UserError(
            "--mode score needs --input FILE.npz (a scores.npz written by a video test run, or converted official "
            "scores)"
        )
    scores = read_scores(Path(options.input))
    settings = scores.extra.get("protocol")
    if isinstance(settings, dict):
        # e.g. converted official files: their values already went through some protocol steps
        log.info(
            "%s carries its own SCORE settings (%s); they replace the YAML's SCORE section",
            options.input,
            scores.extra.get("source", "no source given"),
        )
        settings = with_command_line_score(engine, settings, options.input)
        params = ProtocolParams.from_config(settings)
    else:
        params = ProtocolParams.from_config(engine.cfg.SCORE)
    result = evaluate_scores(scores, params)
    print(json.dumps(result, indent=2, default=float))
    return {k: v for k, v in result.items() if isinstance(v, float)}


def with_command_line_score(engine: Engine, settings: dict[str, Any], source: str) -> dict[str, Any]:
    """A score file's own SCORE settings with the SCORE.* keys given explicitly on the command line applied on top
    (an explicit override is never ignored silently); each applied key is logged."""
    keys = sorted(k for k in engine.overridden if k.startswith("SCORE."))
    if not keys:
        return settings
    merged = json.loads(json.dumps(settings))  # a deep copy of plain JSON data
    for key in keys:
        *path, last = key.split(".")[1:]
        node: Any = merged
        for part in path:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else node
        value = engine.cfg.get(key)
        node[last] = value.to_dict() if hasattr(value, "to_dict") else value
    log.warning("%s: the command line's %s replace(s) the file's own SCORE settings", source, ", ".join(keys))
    return merged


def mode_export(engine: Engine, options: ModeOptions) -> None:
    """Export the checkpoint's clip-to-scores path beside it (``EXPORT.format``: model.onnx, the OpenVINO IR
    model-<EXPORT.precision>.xml/.bin, or both), each checked against PyTorch before it is written."""
    fmt = engine.cfg.EXPORT.format
    loaded, calibration = load_calibrated(engine, options.checkpoint)
    if fmt in ("openvino", "both"):  # OpenVINO IR (issue 17): video/openvino.py
        # Before the (slow) trace: int8 needs the training videos, and a missing dataset should stop the run at once.
        clips = (
            calibration_clips(engine.method, loaded.cfg, engine.cfg.EXPORT.calibration_images)
            if engine.cfg.EXPORT.precision == "int8"
            else []
        )
    prepared = prepare_video_export(engine, loaded, calibration, options.input)
    if fmt in ("onnx", "both"):
        export_video_onnx(prepared)
    if fmt in ("openvino", "both"):
        export_video_openvino(prepared, engine.method, loaded, engine.cfg, torch.get_num_threads(), clips)


def mode_predict(engine: Engine, options: ModeOptions) -> None:
    """Scores, alarms and an annotated GIF for one video (``--input``), with PyTorch, ONNX Runtime or OpenVINO."""
    if not options.input:
        raise UserError("--mode predict needs --input VIDEO (an .mp4/.avi file or a folder of numbered frames)")
    if options.watch:
        raise UserError(
            "--watch scores images as they arrive in a folder and needs an image run; for a video run pass a stream or "
            "camera as --input (rtsp://..., 0), or a video file or frame folder without --watch"
        )
    options = with_auto_backend(options, engine.run_dir, engine.device.type)
    if is_live_source(options.input):  # live: streams and cameras (stream.py)
        predict_stream(engine, options, serving_from(engine, options))
        return
    input_path = Path(options.input).expanduser()
    if not input_path.exists():
        raise UserError(
            f"--input {input_path} not found; pass a video file (.mp4, .avi) or a folder of numbered frames"
        )
    serving = serving_from(engine, options)
    out_dir = Path(options.output).expanduser() if options.output else serving.source.parent / "predict"
    predict_video(engine.method, serving, input_path, out_dir, engine.cfg.TEST.batch_size)


def mode_benchmark(engine: Engine, options: ModeOptions) -> None:
    """Clips/s for training steps and for evaluation (scores included), as one JSON line; with
    BENCHMARK.backends=true one table of every inference backend instead (backend_table.py)."""
    from task.anomaly.unsupervised.engine.benchmark import time_training_steps
    from task.anomaly.unsupervised.engine.training import Stepper
    from task.anomaly.unsupervised.video.inference import score_clips

    cfg = engine.cfg
    method = engine.method
    prepare_video_data(engine)
    train_videos, train_set = video_split(engine, "train")
    if cfg.BENCHMARK.backends:  # one table of every inference backend (issue 17)
        from task.anomaly.unsupervised.video.backend_table import run_video_backend_table

        if options.checkpoint:
            loaded, calibration = load_calibrated(engine, options.checkpoint)
            run_video_backend_table(engine, loaded.model, calibration, str(loaded.path), train_videos)
        else:
            run_video_backend_table(engine, fresh_model(engine, train_videos), None, "a fresh model", train_videos)
        return
    model = fresh_model(engine, train_videos)
    bench = cfg.BENCHMARK
    batch_size = cfg.DATALOADER.batch_size
    batches = (
        torch.utils.data.default_collate(
            [train_set[(step * batch_size + j) % len(train_set)] for j in range(batch_size)]
        )
        for step in range(bench.warmup + bench.train_steps)
    )
    model.train()
    times = time_training_steps(Stepper(engine, model), batches, engine.device, bench.warmup)
    count = len(train_set) if bench.eval_images is None else min(bench.eval_images, len(train_set))
    subset = torch.utils.data.Subset(train_set, list(range(count)))
    start = time.perf_counter()
    score_clips(engine, model, subset, train_videos, "benchmark")
    eval_s = time.perf_counter() - start
    train_s = sum(times) / len(times)
    result = {
        "train_s_per_step": train_s,
        "train_clips_per_s": batch_size / train_s,
        "eval_clips_per_s": count / eval_s,
        "eval_clips": count,
        "device": str(engine.device),
        "amp": engine.amp,
        "batch_size": batch_size,
        "eval_batch_size": cfg.TEST.batch_size,
        "image_size": list(cfg.DATASET.resize),
        "clip_length": cfg.DATASET.clip_length,
        "method": method.name,
        **method.describe(cfg),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if engine.dist.is_main:
        print(json.dumps(result), flush=True)
    engine.dist.barrier()


VIDEO_MODES: dict[str, ModeFunction] = {
    "train": mode_train,
    "test": mode_test,
    "gif": mode_gif,
    "report": mode_report,
    "score": mode_score,
    "predict": mode_predict,
    "export": mode_export,
    "benchmark": mode_benchmark,
}
