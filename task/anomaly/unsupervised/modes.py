"""The modes of an image run, as an explicit table of functions with typed arguments.

``main.py`` turns the command line into ``ModeOptions`` and calls ``IMAGE_MODES[mode](engine, options)``; nothing
below main.py sees argparse. Each mode resolves what it needs once (checkpoint, model, thresholds, folders) and hands
plain values to the module that does the work (training.py, evaluation.py, export.py, predict.py, benchmark.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from task.anomaly.unsupervised.checkpoints import with_settings
from task.anomaly.unsupervised.engine import Engine, LoadedModel
from task.anomaly.unsupervised.evaluation import calibrate, evaluate, thresholds_from, write_gif
from task.anomaly.unsupervised.inference import predict_loader
from task.anomaly.unsupervised.report import write_report
from task.common.errors import UserError
from task.common.io import ensure_dir, write_text
from task.common.metrics import compute_metrics

log = logging.getLogger("anomaly")


@dataclass(frozen=True)
class ModeOptions:
    """The command-line options a mode may use (the config carries everything else)."""

    checkpoint: str | None = None  # --checkpoint: test/gif/export/predict (default: the run's model.pt)
    input: str | None = None  # --input: predict's images/video; export's check images; score's scores.npz
    backend: str = "torch"  # --backend: predict with "torch" or "onnx"
    output: str | None = None  # --output: predict's output folder
    update_readme: bool = False  # --update-readme: report rewrites README.md's tables


ModeFunction = Callable[[Engine, ModeOptions], "dict[str, Any] | None"]


# ---------------------------------------------------------------------------------------------- settings at test time
def apply_test_scoring(engine: Engine, loaded: LoadedModel) -> bool:
    """``--mode test``: score with the config's settings. Returns True when they differ from the checkpoint's (the
    model must then be recalibrated)."""
    method = engine.method
    before = method.scoring_settings(loaded.model)
    method.apply_scoring(loaded.model, loaded.cfg)
    after = method.scoring_settings(loaded.model)
    changed = {k: (before[k], after[k]) for k in after if before.get(k) != after[k]}
    for key, (old, new) in changed.items():
        log.info("%s: scoring with %r from the config (the checkpoint was calibrated with %r); recalibrating", key, new, old)
    return bool(changed) and loaded.calibrated


def check_served_scoring(engine: Engine, loaded: LoadedModel) -> None:
    """predict/export serve the checkpoint's scoring (its thresholds belong to it): an override that differs is an
    error, a YAML value that differs is a warning."""
    held = engine.method.scoring_settings(loaded.model)
    wanted = engine.method.config_scoring(loaded.cfg)
    for key, value in held.items():
        asked = wanted.get(key, value)
        if asked == value:
            continue
        if key in engine.overridden:
            raise UserError(
                f"{key}={asked!r} differs from the {value!r} checkpoint {loaded.path} was calibrated with; "
                f"run --mode test {key}={asked} first and use the model.pt it writes"
            )
        log.warning("%s: serving the checkpoint's %r (the config says %r); a calibrated model keeps its scoring settings", key, value, asked)


# ---------------------------------------------------------------------------------------------- modes
def mode_train(engine: Engine, options: ModeOptions) -> dict[str, Any]:
    """Train, then evaluate the last model (never a model chosen with test labels) and write every output."""
    from task.anomaly.unsupervised.training import train

    with engine.owning_run_dir(), engine.reporting("train"):
        engine.prepare_data()
        train_set = engine.dataset("train")
        test_set = engine.dataset("test")
        ensure_dir(engine.run_dir)
        engine.setup_log_file()
        if engine.dist.is_main:
            import yaml

            write_text(engine.run_dir / "config.yaml", yaml.safe_dump(engine.cfg.to_dict(), sort_keys=False))
        log.info("%d training images, %d test images", len(train_set), len(test_set))
        return train(engine, train_set, lambda model, step, final: evaluate(engine, model, train_set, test_set, step=step, final=final))


def test_output_dir(engine: Engine, checkpoint: Path) -> Path:
    """The run directory for its own model.pt; a folder of its own under ``tests/`` for any other checkpoint, so a
    foreign model never replaces the run's files."""
    if engine.is_own_checkpoint(checkpoint):
        return engine.run_dir
    # the hash of the resolved path keeps two checkpoints with the same folder and file names apart
    digest = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{checkpoint.parent.name}-{checkpoint.stem}-{digest}")
    return engine.run_dir / "tests" / name


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
        train_set = engine.dataset("train") if recalibrate or not loaded.calibrated else None
        if out_dir != engine.run_dir:
            log.info("testing a checkpoint from outside this run: outputs go to %s", out_dir)
        return evaluate(engine, loaded.model, train_set, test_set, final=True, out_dir=out_dir)


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
    if not loaded.calibrated:
        calibrate(engine, loaded.model, engine.dataset("train"))
    preds = predict_loader(loaded.model, engine.eval_loader(test_set), engine.device, engine.amp, desc="gif", channels_last=engine.channels_last)
    thresholds = loaded.thresholds
    if not {"image", "pixel"} <= thresholds.keys():  # e.g. an official checkpoint: thresholds from this test set
        thresholds = thresholds_from(compute_metrics(preds.scores, preds.labels, preds.anomaly_maps, preds.masks))
    shown = {"image": thresholds.get("image", float("nan")), "pixel": thresholds.get("pixel", float("nan"))}
    write_gif(engine, test_output_dir(engine, path), preds, test_set, shown)


def mode_report(engine: Engine, options: ModeOptions) -> None:
    """Tables of this method's runs under RESULT.savedir -> stdout and <savedir>/results.md (+ README.md with
    --update-readme, between the method's own markers when the README has them)."""
    readme = Path("README.md") if options.update_readme else None
    savedir = Path(engine.cfg.RESULT.savedir).expanduser()
    print(write_report(savedir, readme, engine.method.name), end="")
    log.info("report written to %s%s", savedir / "results.md", f" and {readme}" if readme else "")


def load_for_serving(engine: Engine, checkpoint: str | None) -> LoadedModel:
    """A calibrated model for predict/export, with the checkpoint's scoring settings."""
    path = engine.checkpoint_path(checkpoint)
    if path.suffix.lower() == ".onnx":
        raise UserError(f"--checkpoint {path} is an ONNX file; predict from it with --backend onnx, export from a model.pt")
    loaded = engine.load(path)
    if not loaded.calibrated:
        raise UserError(
            f"checkpoint {path} has no score calibration or thresholds; run --mode test --checkpoint {path} first "
            "and use the model.pt it writes"
        )
    check_served_scoring(engine, loaded)
    # what is served (and written into an export's metadata) is the calibrated scoring the model holds
    loaded.cfg = with_settings(loaded.cfg, engine.method.scoring_settings(loaded.model))
    return loaded


def mode_export(engine: Engine, options: ModeOptions) -> None:
    """Export the checkpoint's whole inference path to model.onnx beside it, checked against PyTorch."""
    from task.anomaly.unsupervised.export import check_image_paths, export_run

    loaded = load_for_serving(engine, options.checkpoint)
    paths = check_image_paths(loaded.cfg, options.input)
    export_run(loaded, paths, engine.method.extra_map_names(loaded.cfg), engine.cfg.EXPORT.input, engine.cfg.EXPORT.opset)


def mode_predict(engine: Engine, options: ModeOptions) -> None:
    """Maps, scores and OK/NG verdicts for unlabelled images, with PyTorch or ONNX Runtime."""
    from task.anomaly.unsupervised import predict

    if not options.input:
        raise UserError("--mode predict needs --input IMAGE_OR_FOLDER")
    if options.backend == "onnx":
        source, paired = predict.onnx_source(options.checkpoint, engine.run_dir)
        model = predict.load_onnx_model(source, paired)
        runner = predict.Runner(model, model.image_size, model.thresholds, engine.cfg.TEST.batch_size)
    else:
        loaded = load_for_serving(engine, options.checkpoint)
        source = loaded.path
        runner = predict.Runner(
            loaded.model, tuple(loaded.cfg.DATASET.resize), loaded.thresholds, engine.cfg.TEST.batch_size,
            engine.device, engine.amp, engine.channels_last,
        )
    out_dir = Path(options.output) if options.output else source.parent / "predict"
    predict.predict_folder(runner, Path(options.input), out_dir, f"{source} ({options.backend})")


def mode_benchmark(engine: Engine, options: ModeOptions) -> None:
    """Time BENCHMARK.train_steps training steps (a fit method: one fit over that many batches) and one evaluation
    pass; print the result as one JSON line."""
    from task.anomaly.unsupervised.benchmark import run_benchmark
    from task.anomaly.unsupervised.training import Stepper

    if engine.cfg.DATASET.demo:
        engine.prepare_data()
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

