"""``--mode benchmark``: time training steps and one evaluation pass with the configured settings.

The engine supplies the model (built, moved, optionally compiled) and the same ``Stepper`` training uses, so the
numbers are those of a real run. Without a dataset on disk the inputs are random tensors of the configured
size (and random rectangular masks for the metrics); nothing is written to disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Subset

from task.anomaly.unsupervised.engine.benchmark import peak_rss_mb, synchronize, time_training_steps
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.engine.training import Stepper, fit_batches
from task.anomaly.unsupervised.image.inference import predict_loader
from task.common.metrics import compute_metrics
from task.common.runtime import autocast

log = logging.getLogger("anomaly")

DTYPE_NAMES = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}


def random_images(n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """[n, 3, H, W] standard-normal images, the statistics of ImageNet-normalised inputs."""
    return torch.randn(n, 3, *size, generator=generator)


def random_test_batches(
    n: int, size: tuple[int, int], batch_size: int, generator: torch.Generator
) -> list[dict[str, Tensor]]:
    """Test batches as ``predict_loader`` reads them: every second image anomalous, with one random rectangle mask.

    Each batch: image [b, 3, H, W], label [b] (int64), mask [b, 1, H, W] (float {0, 1}).
    """
    height, width = size
    images = random_images(n, size, generator)
    labels = torch.arange(n) % 2
    masks = torch.zeros(n, 1, height, width)
    for i in range(1, n, 2):
        h, w = (int(torch.randint(d // 8, d // 3 + 1, (1,), generator=generator)) for d in (height, width))
        top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
        masks[i, 0, top : top + h, left : left + w] = 1
    return [
        {"image": images[i : i + batch_size], "label": labels[i : i + batch_size], "mask": masks[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]


def _training_batches(engine: Engine, count: int, use_data: bool) -> Iterable[dict[str, Tensor]]:
    """This process's share {"image": [b, 3, H, W]} of ``count`` global batches (cycling through the training set)."""
    cfg = engine.cfg
    batch_size = cfg.DATALOADER.batch_size
    if use_data:
        train_set = engine.dataset("train")
        for step in range(count):
            batch = [(step * batch_size + j) % len(train_set) for j in range(batch_size)]
            yield {"image": torch.stack([train_set[i]["image"] for i in engine.dist.shard(batch)])}
    else:
        generator = torch.Generator().manual_seed(cfg.SEED)
        for _ in range(count):
            images = random_images(batch_size, tuple(cfg.DATASET.resize), generator)
            yield {"image": images[engine.dist.shard(list(range(batch_size)))]}


def _test_batches(engine: Engine, use_data: bool) -> tuple[Any, int]:
    """(loader or list of batches, number of images) for the evaluation pass; 16 random images when unlimited."""
    cfg = engine.cfg
    limit = cfg.BENCHMARK.eval_images
    if use_data:
        test_set = engine.dataset("test")
        count = len(test_set) if limit is None else min(limit, len(test_set))
        return engine.eval_loader(Subset(test_set, range(count))), count
    generator = torch.Generator().manual_seed(cfg.SEED + 1)
    count = 16 if limit is None else limit
    return random_test_batches(count, tuple(cfg.DATASET.resize), cfg.TEST.batch_size, generator), count


def time_fit(engine: Engine, model: torch.nn.Module, use_data: bool) -> dict[str, Any]:
    """A gradient-free method: an untimed fit on BENCHMARK.warmup batches (first-call costs), then one timed fit on
    BENCHMARK.train_steps batches, as training runs it (no_grad, the run's autocast)."""
    cfg, device, bench = engine.cfg, engine.device, engine.cfg.BENCHMARK
    log.info(
        "%s learns by a gradient-free fit: timing one fit over %d batch(es) instead of optimiser steps",
        engine.method.name,
        bench.train_steps,
    )
    model.eval()
    seconds = 0.0
    for count, timed in ((bench.warmup, False), (bench.train_steps, True)):
        if not count:
            continue
        batches = list(_training_batches(engine, count, use_data))
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, engine.amp):
            engine.method.fit(cfg, model, fit_batches(engine, batches), device)
        synchronize(device)
        seconds = time.perf_counter() - start if timed else seconds
    images = bench.train_steps * cfg.DATALOADER.batch_size
    return {
        "train_s_per_step": None,
        "train_images_per_s": None,
        "train_steps": 0,
        "fit_s": seconds,
        "fit_images": images,
        "fit_images_per_s": images / seconds,
    }


def run_benchmark(engine: Engine, model: torch.nn.Module, stepper: Stepper | None) -> dict[str, Any]:
    """Warm-up + timed training steps, then one timed evaluation pass (maps, scores) and the metrics.

    ``model`` is on ``engine.device`` (and compiled when TRAIN.compile is set); ``stepper`` trains it, or is None for
    a gradient-free method, whose fit is timed instead (``time_fit``). Evaluation and the result are rank 0's; other
    ranks only train. Returns the JSON-ready result (``{}`` on ranks other than 0).
    """
    cfg = engine.cfg
    device = engine.device
    bench = cfg.BENCHMARK
    data_root = Path(cfg.DATASET.datadir) / cfg.DATASET.target
    use_data = data_root.is_dir()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if stepper is None:
        training = time_fit(engine, model, use_data)
    else:
        model.train()
        batches = _training_batches(engine, bench.warmup + bench.train_steps, use_data)
        times = time_training_steps(stepper, batches, device, bench.warmup)
        train_s = sum(times) / len(times)
        training = {
            "train_s_per_step": train_s,
            "train_images_per_s": cfg.DATALOADER.batch_size / train_s,
            "train_steps": len(times),
        }
    peak_train_mb = peak_rss_mb()
    if not engine.dist.is_main:
        return {}

    batches, count = _test_batches(engine, use_data)
    first = next(iter(batches))
    # One untimed batch: first-call costs (allocator, oneDNN primitive creation, compilation) are not throughput.
    predict_loader(model, [first], device, engine.amp, desc="warm-up", channels_last=engine.channels_last)
    synchronize(device)
    start = time.perf_counter()
    preds = predict_loader(model, batches, device, engine.amp, desc="benchmark", channels_last=engine.channels_last)
    synchronize(device)
    eval_s = time.perf_counter() - start
    start = time.perf_counter()
    compute_metrics(preds.scores, preds.labels, preds.anomaly_maps, preds.masks)
    metrics_s = time.perf_counter() - start

    return {
        **training,
        "eval_images_per_s": count / eval_s,
        "metrics_s": metrics_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_train_mb": peak_train_mb,
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "device": str(device),
        "dtype": DTYPE_NAMES[engine.amp],
        "batch_size": cfg.DATALOADER.batch_size,
        "image_size": list(cfg.DATASET.resize),
        "method": engine.method.name,
        **engine.method.describe(cfg),
        "eval_batch_size": cfg.TEST.batch_size,
        "eval_images": count,
        "channels_last": engine.channels_last,
        "compile": cfg.TRAIN.compile,
        "world_size": engine.dist.world_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": str(data_root) if use_data else "random",
    }
