"""Image evaluation and its outputs: calibrate on held-out normal images, predict the test set, metrics, files,
reporters.

Outputs of an evaluation go to one folder (the run directory, or a folder of their own when a foreign checkpoint is
tested): model.pt (with the calibration and thresholds), metrics.json, run.json, predictions.csv, optional maps,
pictures and the GIF. The thresholds come from the calibration scores and the false-alarm targets
(``engine/thresholds.py``); the test labels only measure them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from task.anomaly.unsupervised.curves import image_levels, run_curves
from task.anomaly.unsupervised.engine.checkpoints import make_payload
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.engine.thresholds import resolve
from task.anomaly.unsupervised.image.calibration import ImageCalibration, calibrate
from task.anomaly.unsupervised.image.inference import predict_loader
from task.anomaly.unsupervised.image.region_file import write_regions
from task.anomaly.unsupervised.image.visualize import save_result_images, select_frames, write_result_gif
from task.anomaly.unsupervised.records import Predictions
from task.common.conformal import GUARANTEE
from task.common.io import csv_cell, ensure_dir, save_checkpoint, write_json, write_text
from task.common.metrics import compute_metrics

log = logging.getLogger("anomaly")


def calibration_summary(calibration: ImageCalibration, record: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json says about the calibration: its source and size, and how each threshold was chosen."""
    out: dict[str, Any] = {"calibration_source": calibration.source, "calibration_images": calibration.images}
    for kind, chosen in record.items():
        conformal = chosen.get("conformal", chosen)
        out.update(
            {
                f"{kind}_threshold_source": chosen["given_by"],
                f"{kind}_target_fpr": conformal["alpha"],
                f"{kind}_calibration_n": conformal["n"],
                f"{kind}_threshold_rank": conformal["rank"],
                f"{kind}_threshold_capped": conformal["capped"],
                f"{kind}_fpr_bound": conformal["bound"] if kind == "image" else None,
            }
        )
    out["guarantee"] = GUARANTEE
    return out


def evaluate(
    engine: Engine,
    model: nn.Module,
    calibration_data: tuple[Any, str] | None,
    test_set,
    step: int | None = None,
    final: bool = False,
    out_dir: Path | None = None,
    calibration: ImageCalibration | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Calibrate (when ``calibration_data`` = (normal images, source) is given; else use ``calibration``), predict the
    test set, compute metrics at the calibrated thresholds, write outputs (rank 0)."""
    if not engine.dist.is_main:
        return {}
    if calibration_data is not None:
        calibration = calibrate(engine, model, *calibration_data)
    if calibration is None:
        raise ValueError("evaluate needs calibration images or a calibration")
    thresholds, record = resolve(engine.cfg, calibration.samples, "the calibration")
    start = time.perf_counter()
    preds = predict_loader(
        model, engine.eval_loader(test_set), engine.device, engine.amp, desc="test", channels_last=engine.channels_last
    )
    metrics = compute_metrics(preds.scores, preds.labels, preds.anomaly_maps, preds.masks, thresholds)
    log.info(
        "%s%s: %s (%.1fs)",
        engine.cfg.DATASET.target,
        f" step {step}" if step is not None else "",
        " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if v is not None),
        time.perf_counter() - start,
    )
    engine.reporters.log_eval(step, metrics)
    if final:
        summary = {**calibration_summary(calibration, record), **(extra or {})}
        write_outputs(
            engine, out_dir or engine.run_dir, model, preds, metrics, test_set, step, calibration, thresholds, summary
        )
    return metrics


def write_outputs(
    engine: Engine,
    out_dir: Path,
    model: nn.Module,
    preds: Predictions,
    metrics: dict[str, Any],
    test_set,
    step: int | None,
    calibration: ImageCalibration,
    thresholds: dict[str, float],
    summary: dict[str, Any],
) -> None:
    """model.pt, metrics.json, run.json, predictions.csv, optional maps, pictures + GIF, reporters."""
    cfg = engine.cfg
    ensure_dir(out_dir)
    payload = make_payload(engine.method, cfg, model, thresholds)
    payload["calibration"] = calibration.to_dict()
    save_checkpoint(payload, out_dir / "model.pt")
    write_json(out_dir / "metrics.json", {**{k: json_number(v) for k, v in metrics.items()}, **summary})
    write_json(out_dir / "run.json", run_info(engine, out_dir, step))
    write_text(out_dir / "predictions.csv", predictions_csv(preds, thresholds.get("image", math.nan)))
    # --- live: defect regions and ROC/PR curves (regions.json, curves/*.png)
    write_regions(out_dir / "regions.json", preds, thresholds.get("pixel", math.nan), cfg.TEST.region_min_area)
    masks = None if preds.masks is None else preds.masks.numpy()
    levels = image_levels(preds.scores.numpy(), preds.labels.numpy(), preds.anomaly_maps.numpy(), masks)
    curves = run_curves(out_dir / "curves", levels)
    # --- end live
    if cfg.TEST.save_maps:
        save_maps(preds, out_dir / "maps")
    sample: list[tuple[Path, str]] = []
    gif = None
    if cfg.TEST.save_images and test_set is not None:
        try:
            shown = {"image": thresholds.get("image", math.nan), "pixel": thresholds.get("pixel", math.nan)}
            images = save_result_images(preds, test_set, shown, out_dir / "images", cfg.TEST.region_min_area)
            sample = [
                (images[i], f"{preds.defects[i]}/{images[i].stem} score {float(preds.scores[i]):.3f}")
                for i in select_frames(preds.labels, 8)
            ]
            gif = write_gif(engine, out_dir, preds, test_set, shown)
        except Exception as exc:  # noqa: BLE001  (pictures are a by-product: never lose a finished run over them)
            log.warning(
                "result pictures not written (%s: %s); model.pt and metrics are saved, rerun with --mode gif",
                type(exc).__name__,
                exc,
            )
    engine.reporters.log_results(metrics, sample, gif, out_dir / "model.pt")
    engine.reporters.log_curves(curves)
    log.info("outputs written to %s", out_dir)


def run_info(engine: Engine, out_dir: Path, step: int | None) -> dict[str, Any]:
    """What run.json records for --mode report; an evaluation outside training keeps the recorded step count."""
    cfg = engine.cfg
    steps = step
    previous = out_dir / "run.json"
    if steps is None and previous.is_file():
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads(previous.read_text(encoding="utf-8"))
            steps = recorded.get("steps") if isinstance(recorded, dict) else None
    return {
        "method": engine.method.name,
        "modality": engine.method.modality,
        "category": cfg.DATASET.target,
        "format": cfg.DATASET.format,
        "exp_name": cfg.RESULT.exp_name,
        **engine.method.describe(cfg),
        "image_size": list(cfg.DATASET.resize),
        "steps": steps,
        "device": str(engine.device),
    }


def write_gif(engine: Engine, out_dir: Path, preds: Predictions, test_set, thresholds: dict[str, float]) -> Path:
    """<out_dir>/<target>.gif and, with RESULT.assets_dir set (and the run's own outputs), <assets_dir>/<target>.gif."""
    name = f"{engine.cfg.DATASET.target}.gif"
    targets = [out_dir / name]
    if engine.cfg.RESULT.assets_dir and out_dir == engine.run_dir:
        targets.append(Path(engine.cfg.RESULT.assets_dir) / name)
    result = write_result_gif(preds, test_set, thresholds, targets, min_area=engine.cfg.TEST.region_min_area)
    log.info("GIF with %d frames written to %s", len(result.frames), ", ".join(map(str, targets)))
    return targets[0]


def json_number(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def predictions_csv(preds: Predictions, image_threshold: float) -> str:
    """``path,label,score,prediction`` per test image (cells escaped against spreadsheet formulas)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "score", "prediction"])
    for path, label, score in zip(preds.paths, preds.labels.tolist(), preds.scores.tolist()):
        prediction = int(score >= image_threshold) if math.isfinite(image_threshold) else ""
        writer.writerow([csv_cell(path), label, f"{score:.6f}", prediction])
    return buffer.getvalue()


def save_maps(preds: Predictions, folder: Path) -> None:
    """maps/<defect>/<file name>.npz with float32 ``anomaly_map`` and every extra map at the input resolution."""
    for i, (path, defect) in enumerate(zip(preds.paths, preds.defects)):
        target = folder / defect / (Path(path).name + ".npz")
        target.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"anomaly_map": preds.anomaly_maps[i].numpy().astype(np.float32)}
        arrays.update({name: maps[i].numpy().astype(np.float32) for name, maps in preds.extras.items()})
        np.savez(target, **arrays)
