"""``--mode benchmark BENCHMARK.backends=true``, the part both modalities share: measuring a list of inference
backends one after the other and then round-robin, the process memory each adds, and the printed table.

The image half (``image/backend_table.py``) times images, the video half (``video/backend_table.py``) clips; each
says how it builds its backends, runs one pass and compares a pass with the reference (the first backend, PyTorch
fp32). Columns: items/s, the best (and the median) of ``TIMED_PASSES`` passes after one untimed warm-up (the best,
because other processes sharing the CPU only ever slow a pass down; the passes after the first run round-robin over
the backends), latency of one item (median of 3 calls), the memory the backend adds (the process's peak RSS while it
was built and run, the high-water mark reset before each backend on Linux, minus the RSS before; for the first
backend: before its model was built), the largest map and score difference from the reference, AUROC and its change,
and the time it took to prepare the backend (export, conversion, quantisation, compilation).
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from task.anomaly.unsupervised.deploy.ir_runner import PRECISIONS
from task.anomaly.unsupervised.engine.benchmark import peak_rss_mb
from task.common.errors import UserError

log = logging.getLogger("anomaly")

TIMED_PASSES = 3


@dataclass
class Row:
    backend: str
    per_s: float  # items per second, the best of TIMED_PASSES passes (the machine may be shared)
    median_per_s: float
    latency_ms: float
    memory_mb: float  # peak RSS while built and run, minus the RSS before (its model, graph and working memory)
    map_diff: float  # max |map - reference| / reference map range
    score_diff: float  # max |score - reference| in the modality's unit (image: of max(1, |score|); video: of spread)
    auroc: float | None
    prepare_s: float


def openvino_precisions(requested: list[str]) -> list[str]:
    """``BENCHMARK.openvino`` checked: OpenVINO precisions of the table, in the order of ``PRECISIONS``."""
    unknown = [p for p in requested if p not in PRECISIONS]
    if unknown:
        raise UserError(
            f"BENCHMARK.openvino lists {unknown[0]!r}; use any of {', '.join(PRECISIONS)} (e.g. [fp32, fp16]) or [] "
            "for none"
        )
    return [p for p in PRECISIONS if p in requested]


def openvino_label(precision: str, bf16: bool) -> str:
    return f"OpenVINO {precision}" + (" (bf16 compute)" if bf16 and precision == "fp16" else "")


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs``); False where that is not possible."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    return False


def _status_mb(field: str) -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration), open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":")) / 1024
    return None


def current_peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else peak_rss_mb()


def current_rss_mb() -> float:
    return _status_mb("VmRSS") or 0.0


def cpu_name() -> str:
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as handle:
        return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    return platform.processor() or "unknown CPU"


def measure_backends(
    backends: list[tuple[str, Callable[[], Any]]],
    warm_up: Callable[[Any], None],
    one_pass: Callable[[Any], tuple[Any, float]],
    latency_ms: Callable[[Any], float],
    compare: Callable[[Any, Any], tuple[float, float, float | None]],
    base_rss: float,
) -> list[Row]:
    """Build and measure each backend, then run the remaining timed passes round-robin, so a burst of load from
    other processes hits every backend.

    ``build()`` -> a backend; ``warm_up(backend)``: an untimed first call; ``one_pass(backend)`` -> (predictions,
    items/s); ``compare(predictions, reference predictions)`` -> (map diff, score diff, AUROC).
    """
    built, rows, rates = [], [], []
    reference = None
    for name, build in backends:
        before = base_rss if not rows else current_rss_mb()
        reset_peak_rss()
        start = time.perf_counter()
        backend = build()
        prepare_s = time.perf_counter() - start
        warm_up(backend)  # first-call costs (allocator, primitive creation, compilation) are not throughput
        preds, rate = one_pass(backend)
        latency = latency_ms(backend)
        peak = current_peak_rss_mb() - before
        reference = reference if reference is not None else preds
        rows.append(Row(name, rate, rate, latency, peak, *compare(preds, reference), prepare_s))
        built.append(backend)
        rates.append([rate])
        log.info("%s: %.2f per s (first pass)", name, rate)
    for _ in range(TIMED_PASSES - 1):
        for backend, row_rates in zip(built, rates):
            row_rates.append(one_pass(backend)[1])
    for row, row_rates in zip(rows, rates):
        row.per_s, row.median_per_s = max(row_rates), float(np.median(row_rates))
        log.info("%s: %s per s", row.backend, ", ".join(f"{r:.2f}" for r in row_rates))
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(rows: list[Row], conditions: dict[str, Any], item: str, auroc: str, score_unit: str) -> None:
    """The table (markdown) and one line of conditions; ``item``: "image" / "clip", ``auroc``: the AUROC's name,
    ``score_unit``: what the score difference is relative to."""
    reference = rows[0]
    lines = [
        f"| backend | {item}s/s, best (median) of {TIMED_PASSES} | vs PyTorch fp32 | latency, 1 {item} (ms) | "
        f"memory added, peak (MB) | max map diff (of range) | max score diff ({score_unit}) | {auroc} | AUROC change | "
        "prepare (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        change = None if row.auroc is None or reference.auroc is None else row.auroc - reference.auroc
        lines.append(
            f"| {row.backend} | {row.per_s:.2f} ({row.median_per_s:.2f}) | "
            f"{row.per_s / reference.per_s:.2f}x | {row.latency_ms:.0f} | "
            f"{row.memory_mb:.0f} | {row.map_diff:.2e} | {row.score_diff:.2e} | {_fmt(row.auroc, '.4f')} | "
            f"{_fmt(change, '+.4f')} | {row.prepare_s:.1f} |"
        )
    print("\n".join(lines))
    print("conditions: " + "; ".join(f"{k}: {v}" for k, v in conditions.items()), flush=True)
