"""The image half on OpenVINO: ``--mode export EXPORT.format=openvino`` and ``--backend openvino`` for predict.

Export converts the checked ONNX graph of ``export.py`` (the whole inference path, metadata included) into an IR
``model-<precision>.xml`` + ``.bin`` beside the checkpoint (``deploy/openvino.py`` says what each precision means).
INT8 is calibrated on ``EXPORT.calibration_images`` normal *training* images of the run's dataset, never test images.
Before anything is written, the IR runs (as predict will run it on this CPU) on the check images and is compared with
PyTorch float32: the export fails past ``TOLERANCES[precision]`` of the map range. When the run's labelled test split
is available, both also score the whole split and the export prints the image AUROC of each, its change, and how many
OK/NG verdicts (at the checkpoint's image threshold) the IR changes.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from task.anomaly.unsupervised.data.image.formats import scan_dataset
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
from task.anomaly.unsupervised.image.export import PreparedExport, compare, preprocess
from task.anomaly.unsupervised.image.predict import ExportedImageModel
from task.common.config import Config
from task.common.errors import UserError
from task.common.metrics import auroc
from task.common.spacing import spread

log = logging.getLogger("anomaly")

TIE = 1e-4  # relative distance from the image threshold within which a changed verdict is a tie, not a change


class OpenVinoImageModel(ExportedImageModel):
    """An exported IR on OpenVINO (``predict.ExportedImageModel``; the precision split of ``deploy/ir_runner.py``)."""

    def __init__(self, source: Path | object, name: str, threads: int) -> None:
        runner = IRRunner(source, name, threads)
        meta = runner.metadata
        super().__init__(
            meta,
            name,
            lambda: runner.output_names,
            lambda: [int(v) for v in json.loads(meta["image_size"])],
            "--mode export EXPORT.format=openvino",
        )
        self.runner = runner

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run({self.runner.input_names[0]: np.ascontiguousarray(images, dtype=np.float32)})


def load_ir_model(path: Path, checkpoint: Path | None, threads: int) -> OpenVinoImageModel:
    """The IR at ``path``; refused when ``checkpoint`` exists and is not the file it was exported from."""
    model = OpenVinoImageModel(path, str(path), threads)
    check_exported_from(path, model.metadata, checkpoint, OPENVINO_EXPORT)
    log.info("OpenVINO: %s (%s)", path, model.runner.description)
    return model


# --------------------------------------------------------------------------------------------- export
def calibration_batches(cfg: Config, count: int, raw: bool) -> list[np.ndarray]:
    """``count`` normal training images of the run's dataset, one [1, 3, H, W] array each, in the graph's input
    format."""
    try:
        samples = scan_dataset(cfg.DATASET, "train", cfg.SEED)
    except UserError as exc:
        raise UserError(
            "EXPORT.precision=int8 calibrates on the normal training images: point DATASET.datadir at the dataset "
            f"({exc})"
        ) from None
    paths = [Path(s.path) for s in spread(samples, count)]
    normalized, unit = preprocess(paths, tuple(cfg.DATASET.resize))
    images = unit if raw else normalized
    return [images[i : i + 1].numpy() for i in range(len(images))]


@dataclass
class HeldOut:
    """The labelled test split the export also scores with both models (AUROC and verdict changes)."""

    paths: list[Path]
    labels: Tensor  # [N] 1 = defective


def held_out_split(cfg: Config) -> HeldOut | None:
    try:
        samples = scan_dataset(cfg.DATASET, "test", cfg.SEED)
    except UserError:
        return None
    return HeldOut([Path(s.path) for s in samples], torch.tensor([s.label for s in samples])) if samples else None


def _scores(run, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat(
        [torch.as_tensor(np.asarray(run(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)]
    )


def compare_on_split(
    prepared: PreparedExport,
    ir: OpenVinoImageModel,
    held: HeldOut,
    size: tuple[int, int],
    batch_size: int,
    threshold: float,
) -> str:
    """Image AUROC of PyTorch and of the IR on the held-out split, the change, and the verdicts the IR changes."""
    normalized, unit = preprocess(held.paths, size)
    images = unit if ir.input_format == "raw" else normalized
    with torch.no_grad():
        reference = _scores(lambda x: prepared.module(x)[1], images, batch_size)
    scores = _scores(lambda x: ir.run(x.numpy())["score"], images, batch_size)
    try:
        before, after = auroc(reference, held.labels), auroc(scores, held.labels)
        change = f"image AUROC {before:.4f} -> {after:.4f} ({after - before:+.4f})"
    except ValueError:
        change = "image AUROC undefined (the split needs good and defective images)"
    flips = "verdicts not compared (the checkpoint has no image threshold)"
    if math.isfinite(threshold):
        flipped = (reference >= threshold) != (scores >= threshold)
        # The F1 threshold is one of the scores: that image's verdict flips on a difference of float rounding.
        at_threshold = (reference - threshold).abs() <= TIE * max(1.0, abs(threshold))
        flips = f"{int((flipped & ~at_threshold).sum())} of {len(scores)} OK/NG verdicts changed"
        if bool((flipped & at_threshold).any()):
            flips += f" (and {int((flipped & at_threshold).sum())} whose score lies within {TIE:g} of the threshold)"
    return f"on the {len(scores)} test images: {change}; {flips}"


def export_openvino(
    prepared: PreparedExport,
    loaded: LoadedModel,
    cfg: Config,
    check_count: int,
    threads: int,
    batches: list[np.ndarray],
) -> Path:
    """Write ``model-<EXPORT.precision>.xml/.bin`` beside the checkpoint after checking the IR against PyTorch;
    ``batches``: the int8 calibration inputs (``calibration_batches``), unused for the other precisions."""
    precision = cfg.EXPORT.precision
    assert precision in PRECISIONS, precision
    model = onnx_to_openvino(prepared.data)
    if precision == "int8":
        log.info("NNCF int8 calibration on %d normal training image(s)", len(batches))
        model = quantize_int8(model, [{model.inputs[0].get_any_name(): b} for b in batches])
    elif precision == "fp16":
        compress_weights_to_fp16(model)
    with_metadata(model, {**prepared.metadata, "precision": precision})
    ir = OpenVinoImageModel(model, "the converted IR", threads)

    tolerance = TOLERANCES[precision]
    differences = compare(ir, prepared.inputs.numpy(), prepared.reference)
    summary = "; ".join(str(d) for d in differences)
    print(
        f"OpenVINO {precision} check on {check_count} image(s) ({ir.runner.description}) vs PyTorch float32: "
        f"{summary}; tolerance {tolerance:g} relative"
    )
    held = held_out_split(loaded.cfg)
    if held is not None:
        threshold = float(loaded.thresholds.get("image", math.nan))
        print(
            f"OpenVINO {precision} vs PyTorch float32 "
            + compare_on_split(prepared, ir, held, tuple(loaded.cfg.DATASET.resize), cfg.TEST.batch_size, threshold)
        )
    failed = [d for d in differences if not d.relative <= tolerance]
    if failed:
        raise UserError(
            f"OpenVINO {precision} output differs from PyTorch beyond the tolerance {tolerance:g} "
            f"({'; '.join(map(str, failed))}); "
            "nothing was written; try a higher precision (EXPORT.precision=fp16 or fp32)"
        )
    target = loaded.path.parent / ir_filename(precision)
    size = save_ir(model, target)
    print(f"exported {target} and {target.with_suffix('.bin').name} ({size / 2**20:.1f} MiB)")
    return target
