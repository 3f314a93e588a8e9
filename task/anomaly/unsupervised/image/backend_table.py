"""``--mode benchmark BENCHMARK.backends=true``: one table of every inference backend on the same inputs.

Rows: PyTorch float32 (the reference), PyTorch bf16 autocast (only where the CPU has bf16 units), ONNX Runtime float32,
OpenVINO fp32 / fp16 / int8 (``deploy/openvino.py``). All in this process, one after the other, with the same thread
count (``torch.get_num_threads()``), the same test batches (``TEST.batch_size``) and the same model: ``--checkpoint``
(a trained, calibrated model) or a freshly built one (``MODEL.*``; random weights with ``MODEL.pretrained=false``).
Inputs: the dataset's test split (``BENCHMARK.eval_images`` of it) when ``DATASET.datadir`` holds the target, else
seeded random tensors; INT8 calibrates on ``EXPORT.calibration_images`` training images (random ones without data).

Columns: images/s, the best (and the median) of ``TIMED_PASSES`` passes over the test batches after one untimed
warm-up batch (the best, because other processes sharing the CPU only ever slow a pass down; the passes after the
first run round-robin over the backends), latency of one image (median of 3 single-image
calls), the memory the backend adds: the process's peak RSS while it was built and run (the high-water mark is reset
before each backend on Linux) minus the RSS before (for PyTorch fp32: before the model was built), the largest map and
score difference
from PyTorch float32 (relative to the reference map range / to max(1, |score|)), image AUROC and its change, and
the time it took to prepare the backend (export, conversion, quantisation, compilation). Nothing is written to disk.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from task.anomaly.unsupervised.data.image.preprocess import IMAGENET_MEAN, IMAGENET_STD
from task.anomaly.unsupervised.deploy.backend_table import (
    Row,
    cpu_name,
    current_rss_mb,
    measure_backends,
    openvino_label,
    openvino_precisions,
    print_table,
)
from task.anomaly.unsupervised.deploy.ir_runner import has_bf16_units, openvino_core
from task.anomaly.unsupervised.deploy.onnx import with_metadata as onnx_with_metadata
from task.anomaly.unsupervised.deploy.openvino import (
    compress_weights_to_fp16,
    onnx_to_openvino,
    quantize_int8,
    with_metadata,
)
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.engine.serving import load_for_serving
from task.anomaly.unsupervised.image.benchmark import random_images, random_test_batches
from task.anomaly.unsupervised.image.export import ExportModule, export_onnx
from task.anomaly.unsupervised.image.inference import predict_loader
from task.anomaly.unsupervised.image.openvino import OpenVinoImageModel
from task.anomaly.unsupervised.image.predict import ONNX_FORMAT, OnnxModel
from task.anomaly.unsupervised.records import Predictions
from task.common.metrics import compute_metrics

log = logging.getLogger("anomaly")


def _inputs(engine: Engine) -> tuple[list[dict], list[torch.Tensor], str]:
    """(test batches with image/label[/mask], calibration images [1, 3, H, W] normalised, description of the data)."""
    cfg = engine.cfg
    size = tuple(cfg.DATASET.resize)
    data_root = Path(cfg.DATASET.datadir) / cfg.DATASET.target
    calibration_count = cfg.EXPORT.calibration_images
    if data_root.is_dir():
        test_set = engine.dataset("test")
        count = len(test_set) if cfg.BENCHMARK.eval_images is None else min(cfg.BENCHMARK.eval_images, len(test_set))
        # Spread over the split (which lists good images first), so that both classes are in it for the AUROC.
        picks = np.linspace(0, len(test_set) - 1, count).round().astype(int).tolist()
        batches = list(engine.eval_loader(Subset(test_set, picks)))
        train_set = engine.dataset("train")
        picks = np.linspace(0, len(train_set) - 1, min(calibration_count, len(train_set))).round().astype(int)
        calibration = [train_set[int(i)]["image"].unsqueeze(0) for i in picks]
        return (
            batches,
            calibration,
            f"{data_root} (test split: {count} images; int8 calibration: {len(calibration)} training images)",
        )
    generator = torch.Generator().manual_seed(cfg.SEED + 1)
    count = cfg.BENCHMARK.eval_images or 16
    batches = random_test_batches(count, size, cfg.TEST.batch_size, generator)
    calibration = list(random_images(calibration_count, size, torch.Generator().manual_seed(cfg.SEED + 2)).split(1))
    return (
        batches,
        calibration,
        f"random tensors ({count} test images; int8 calibration: {calibration_count} other random images)",
    )


CPU = torch.device("cpu")


def _pass(model: nn.Module, batches: list[dict], amp: str, channels_last: bool) -> tuple[Predictions, float]:
    """(predictions, images/s) of one pass over ``batches`` on the CPU."""
    start = time.perf_counter()
    preds = predict_loader(model, batches, CPU, amp, desc="benchmark", channels_last=channels_last)
    return preds, len(preds.scores) / (time.perf_counter() - start)


def _latency_ms(model: nn.Module, image: torch.Tensor, amp: str, channels_last: bool) -> float:
    """Median of 3 calls on one image [1, 3, H, W], in ms."""
    latencies = []
    for _ in range(3):
        start = time.perf_counter()
        predict_loader(model, [{"image": image}], CPU, amp, desc="latency", channels_last=channels_last)
        latencies.append(time.perf_counter() - start)
    return 1000 * float(np.median(latencies))


def _auroc(preds: Predictions) -> float | None:
    labels = preds.labels
    if labels.min() == labels.max():
        return None
    return compute_metrics(preds.scores, labels, preds.anomaly_maps, None)["image_auroc"]


def run_backend_table(engine: Engine, checkpoint: str | None) -> list[Row]:
    """Build, time and compare every backend; prints the table and returns its rows."""
    cfg = engine.cfg
    threads = torch.get_num_threads()
    base_rss = current_rss_mb()  # before the reference model: its memory counts for the PyTorch fp32 row
    if checkpoint:
        loaded = load_for_serving(engine, checkpoint)
        model, thresholds, source = loaded.model, loaded.thresholds, str(loaded.path)
    else:
        model, thresholds, source = (
            engine.method.build(cfg),
            {},
            f"a new {cfg.MODEL.backbone} model (MODEL.pretrained={cfg.MODEL.pretrained})",
        )
    model = model.float().cpu().eval()
    extra_names = engine.method.extra_map_names(cfg)
    batches, calibration, data = _inputs(engine)
    size = tuple(cfg.DATASET.resize)
    core = openvino_core()
    bf16 = has_bf16_units(core)

    def torch_bf16() -> tuple[nn.Module, str, bool]:
        return copy.deepcopy(model).to(memory_format=torch.channels_last), "bf16", True

    onnx_data: dict[str, bytes] = {}

    def onnx_bytes() -> bytes:
        if "data" not in onnx_data:
            module = ExportModule(model, True, extra_names).eval()
            example = torch.cat([b["image"] for b in batches])[:2] * torch.tensor(IMAGENET_STD).view(
                1, 3, 1, 1
            ) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            with torch.no_grad():
                module(example)  # fills the CoordConv caches, as the export does
            metadata = {
                "format": ONNX_FORMAT,
                "input": "raw",
                "image_size": json.dumps(list(size)),
                "thresholds": json.dumps(thresholds),
            }
            onnx_data["data"] = onnx_with_metadata(export_onnx(module, example, cfg.EXPORT.opset), metadata)
            onnx_data["metadata"] = metadata
        return onnx_data["data"]

    def openvino(precision: str) -> Callable[[], tuple[nn.Module, str, bool]]:
        def build() -> tuple[nn.Module, str, bool]:
            ir = onnx_to_openvino(onnx_bytes())
            if precision == "int8":
                raw = [
                    (
                        image * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
                        + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
                    ).numpy()
                    for image in calibration
                ]
                ir = quantize_int8(ir, [{ir.inputs[0].get_any_name(): x} for x in raw])
            elif precision == "fp16":
                compress_weights_to_fp16(ir)
            with_metadata(ir, {**onnx_data["metadata"], "precision": precision})
            wrapped = OpenVinoImageModel(ir, f"OpenVINO {precision}", threads)
            log.info("OpenVINO %s: %s", precision, wrapped.runner.description)
            return wrapped, "none", False

        return build

    backends: list[tuple[str, Callable[[], tuple[nn.Module, str, bool]]]] = [
        ("PyTorch fp32", lambda: (model, "none", False))
    ]
    if bf16:
        backends.append(("PyTorch bf16 (autocast, channels_last)", torch_bf16))
    backends += [
        ("ONNX Runtime fp32", lambda: (OnnxModel(onnx_bytes(), "the exported graph"), "none", False)),
    ]
    backends += [(openvino_label(p, bf16), openvino(p)) for p in openvino_precisions(engine.cfg.BENCHMARK.openvino)]

    def compare(preds: Predictions, reference: Predictions) -> tuple[float, float, float | None]:
        span = float(reference.anomaly_maps.max() - reference.anomaly_maps.min()) or float(np.finfo(np.float32).eps)
        map_diff = float((preds.anomaly_maps - reference.anomaly_maps).abs().max()) / span
        score_diff = float((preds.scores - reference.scores).abs().max()) / max(
            1.0, float(reference.scores.abs().max())
        )
        return map_diff, score_diff, _auroc(preds)

    rows = measure_backends(
        backends,
        lambda built: predict_loader(built[0], batches[:1], CPU, built[1], desc="warm-up", channels_last=built[2]),
        lambda built: _pass(built[0], batches, *built[1:]),
        lambda built: _latency_ms(built[0], batches[0]["image"][:1], *built[1:]),
        compare,
        base_rss,
    )
    print_table(
        rows,
        {
            "cpu": f"{cpu_name()} ({os.cpu_count()} logical CPUs; bf16 units: {'yes' if bf16 else 'no'})",
            "threads": threads,
            "model": f"{source}; {cfg.MODEL.backbone}, {size[0]}x{size[1]}",
            "data": data,
            "batch": cfg.TEST.batch_size,
            "load average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "torch": torch.__version__,
        },
        "image",
        "image AUROC",
        "of max(1, |score|)",
    )
    return rows
