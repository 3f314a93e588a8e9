"""The modes of an image run, as an explicit table of functions with typed arguments.

``main.py`` turns the command line into ``ModeOptions`` and calls ``IMAGE_MODES[mode](engine, options)``; nothing
below main.py sees argparse. Each mode resolves what it needs once (checkpoint, model, thresholds, folders) and hands
plain values to the module that does the work (training.py, evaluation.py, export.py, predict.py, benchmark.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.engine.modes import ModeFunction, ModeOptions, mode_report, test_output_dir
from task.anomaly.unsupervised.engine.serving import apply_test_scoring, load_for_serving
from task.anomaly.unsupervised.engine.thresholds import resolve
from task.anomaly.unsupervised.image.calibration import ImageCalibration, calibrate
from task.anomaly.unsupervised.image.evaluation import evaluate, write_gif
from task.anomaly.unsupervised.image.inference import predict_loader
from task.common.errors import UserError
from task.common.io import ensure_dir, write_text

log = logging.getLogger("anomaly")


# ---------------------------------------------------------------------------------------------- modes
def mode_train(engine: Engine, options: ModeOptions) -> dict[str, Any]:
    """Train, then evaluate the last model (never a model chosen with test labels) and write every output."""
    from task.anomaly.unsupervised.engine.training import train

    with engine.owning_run_dir(), engine.reporting("train"):
        engine.prepare_data()
        train_set = engine.dataset("train")
        test_set = engine.dataset("test")
        calibration_data = engine.calibration_data()
        ensure_dir(engine.run_dir)
        engine.setup_log_file()
        if engine.dist.is_main:
            import yaml

            write_text(engine.run_dir / "config.yaml", yaml.safe_dump(engine.cfg.to_dict(), sort_keys=False))
        log.info(
            "%d training images, %d calibration images (%s), %d test images",
            len(train_set),
            len(calibration_data[0]),
            calibration_data[1],
            len(test_set),
        )
        return train(engine, train_set, evaluation_with_selection(engine, calibration_data, test_set))


def evaluation_with_selection(engine: Engine, calibration_data, test_set):
    """The training loop's evaluate(model, step, final); with TRAIN.validation=synthetic it also scores each evaluated
    model on synthetic defects and, at the end, puts back the best weights before the final evaluation."""
    from task.anomaly.unsupervised.image.validation import Selection, SyntheticSet, observe

    if engine.cfg.TRAIN.validation != "synthetic":
        return lambda model, step, final: evaluate(engine, model, calibration_data, test_set, step=step, final=final)
    if not engine.cfg.LOG.eval_interval:
        log.warning(
            "TRAIN.validation=synthetic chooses among evaluated checkpoints, but LOG.eval_interval is null: only the "
            "last is evaluated"
        )
    selection = Selection()
    synthetic = SyntheticSet(calibration_data[0], engine.cfg.SEED)

    def evaluate_and_select(model, step: int, final: bool) -> dict[str, Any]:
        if engine.dist.is_main:
            observe(engine, model, synthetic, selection, step)
            if final and selection.step != step:
                model.load_state_dict(selection.weights)
                log.info(
                    "TRAIN.validation=synthetic: keeping the weights of step %d (validation %.4f)",
                    selection.step,
                    selection.score,
                )
        extra = {"selected_step": selection.step, "synthetic_validation": selection.score} if final else None
        return evaluate(engine, model, calibration_data, test_set, step=step, final=final, extra=extra)

    return evaluate_and_select


def mode_test(engine: Engine, options: ModeOptions) -> dict[str, Any]:
    """Evaluate a checkpoint on the test split with the config's scoring settings."""
    path = engine.checkpoint_path(options.checkpoint)
    with engine.owning_run_dir(), engine.reporting("test"):
        ensure_dir(engine.run_dir)
        engine.setup_log_file()
        loaded = engine.load(path)
        engine.adopt(loaded.cfg)  # the data, outputs and saved config follow the checkpoint's network settings
        engine.prepare_data()
        test_set = engine.dataset("test")
        out_dir = test_output_dir(engine, path)
        recalibrate = apply_test_scoring(engine, loaded)
        engine.maybe_compile(loaded.model)
        calibration = ImageCalibration.from_dict(loaded.calibration)
        if calibration is None and loaded.calibrated:
            log.info(
                "%s holds no calibration scores (its thresholds came from its test set); "
                "calibrating on held-out normal images",
                path,
            )
        calibration_data = engine.calibration_data() if recalibrate or calibration is None else None
        if out_dir != engine.run_dir:
            log.info("testing a checkpoint from outside this run: outputs go to %s", out_dir)
        return evaluate(
            engine,
            loaded.model,
            calibration_data,
            test_set,
            final=True,
            out_dir=out_dir,
            calibration=calibration,
        )


def mode_gif(engine: Engine, options: ModeOptions) -> None:
    """Rebuild the result GIF from a saved checkpoint (--checkpoint or the run's model.pt), no training."""
    path = engine.checkpoint_path(options.checkpoint)
    with engine.owning_run_dir():
        _write_gif_from(engine, path)


def _write_gif_from(engine: Engine, path: Path) -> None:
    loaded = engine.load(path)
    engine.adopt(loaded.cfg)
    engine.prepare_data()
    test_set = engine.dataset("test")
    calibration = ImageCalibration.from_dict(loaded.calibration)
    if calibration is None:  # e.g. an official checkpoint: calibrate on held-out normal images (never the test set)
        calibration = calibrate(engine, loaded.model, *engine.calibration_data())
    preds = predict_loader(
        loaded.model,
        engine.eval_loader(test_set),
        engine.device,
        engine.amp,
        desc="gif",
        channels_last=engine.channels_last,
    )
    thresholds, _ = resolve(engine.cfg, calibration.samples, str(path))
    shown = {"image": thresholds.get("image", float("nan")), "pixel": thresholds.get("pixel", float("nan"))}
    write_gif(engine, test_output_dir(engine, path), preds, test_set, shown)


def mode_export(engine: Engine, options: ModeOptions) -> None:
    """Export the checkpoint's whole inference path to model.onnx beside it, checked against PyTorch."""
    from task.anomaly.unsupervised.image.export import check_image_paths, export_run, prepare_export

    cfg = engine.cfg
    loaded = load_for_serving(engine, options.checkpoint)
    paths = check_image_paths(loaded.cfg, options.input)
    openvino = cfg.EXPORT.format in ("openvino", "both")  # OpenVINO IR (issue 17)
    if openvino:
        from task.anomaly.unsupervised.image.openvino import calibration_batches, export_openvino

        # Before the (slow) trace: int8 needs the training images, and a missing dataset should stop the run at once.
        calibration = (
            calibration_batches(loaded.cfg, cfg.EXPORT.calibration_images, cfg.EXPORT.input == "raw")
            if cfg.EXPORT.precision == "int8"
            else []
        )
    prepared = prepare_export(
        loaded, paths, engine.method.extra_map_names(loaded.cfg), cfg.EXPORT.input, cfg.EXPORT.opset
    )
    if cfg.EXPORT.format in ("onnx", "both"):
        export_run(
            loaded, paths, engine.method.extra_map_names(loaded.cfg), cfg.EXPORT.input, cfg.EXPORT.opset, prepared
        )
    if openvino:
        export_openvino(prepared, loaded, cfg, len(paths), torch.get_num_threads(), calibration)


def mode_predict(engine: Engine, options: ModeOptions) -> None:
    """Maps, scores and OK/NG verdicts for unlabelled images, with PyTorch, ONNX Runtime or OpenVINO."""
    from task.anomaly.unsupervised.deploy.openvino import with_auto_backend
    from task.anomaly.unsupervised.image import predict

    if not options.input:
        raise UserError("--mode predict needs --input IMAGE_OR_FOLDER")
    options = with_auto_backend(options, engine.run_dir, engine.device.type)
    if options.backend == "onnx":
        source, paired = predict.onnx_source(options.checkpoint, engine.run_dir)
        model = predict.load_onnx_model(source, paired)
        asked = sorted(
            k
            for k in engine.overridden
            if k in ("TEST.target_fpr", "TEST.pixel_target_fpr", "TEST.image_threshold", "TEST.pixel_threshold")
        )
        if asked:
            log.warning(
                "%s: the ONNX file serves the thresholds it was exported with; export again with %s to change them",
                ", ".join(asked),
                asked[0],
            )
        runner = predict.Runner(model, model.image_size, model.thresholds, engine.cfg.TEST.batch_size)
    elif options.backend == "openvino":  # OpenVINO IR of EXPORT.precision (issue 17)
        from task.anomaly.unsupervised.deploy.openvino import ir_source
        from task.anomaly.unsupervised.image.openvino import load_ir_model

        source, paired = ir_source(options.checkpoint, engine.run_dir, engine.cfg.EXPORT.precision)
        model = load_ir_model(source, paired, torch.get_num_threads())
        runner = predict.Runner(model, model.image_size, model.thresholds, engine.cfg.TEST.batch_size)
    else:
        loaded = load_for_serving(engine, options.checkpoint)
        source = loaded.path
        runner = predict.Runner(
            loaded.model,
            tuple(loaded.cfg.DATASET.resize),
            loaded.thresholds,
            engine.cfg.TEST.batch_size,
            engine.device,
            engine.amp,
            engine.channels_last,
        )
    runner.region_min_area = engine.cfg.TEST.region_min_area
    out_dir = Path(options.output) if options.output else source.parent / "predict"
    if options.watch:  # live: score new images as they arrive
        from task.anomaly.unsupervised.image.watch import WatchLimits, watch_folder

        limits = WatchLimits.from_options(options)
        watch_folder(runner, Path(options.input), out_dir, f"{source} ({options.backend})", limits)
        return
    predict.predict_folder(runner, Path(options.input), out_dir, f"{source} ({options.backend})")


def mode_benchmark(engine: Engine, options: ModeOptions) -> None:
    """Time BENCHMARK.train_steps training steps (a fit method: one fit over that many batches) and one evaluation
    pass; print the result as one JSON line. With BENCHMARK.backends=true: one table of every inference backend
    instead (backend_table.py)."""
    from task.anomaly.unsupervised.engine.training import Stepper
    from task.anomaly.unsupervised.image.benchmark import run_benchmark

    if engine.cfg.DATASET.demo:
        engine.prepare_data()
    if engine.cfg.BENCHMARK.backends:  # one table of every inference backend (issue 17)
        from task.anomaly.unsupervised.image.backend_table import run_backend_table

        run_backend_table(engine, options.checkpoint)
        return
    model = engine.build_model()
    # a gradient-free method has no optimiser step to time: run_benchmark times its fit instead
    result = run_benchmark(engine, model, Stepper(engine, model) if engine.method.learning == "gradient" else None)
    if engine.dist.is_main:
        print(json.dumps(result), flush=True)
    engine.dist.barrier()


IMAGE_MODES: dict[str, ModeFunction] = {
    "train": mode_train,
    "test": mode_test,
    "gif": mode_gif,
    "report": mode_report,
    "export": mode_export,
    "predict": mode_predict,
    "benchmark": mode_benchmark,
}
