"""Timing helpers shared by the image and video benchmarks: peak memory and the timed training-step loop."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable

import torch
from torch import Tensor

from task.anomaly.unsupervised.engine.training import Stepper


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_steps(
    stepper: Stepper, batches: Iterable[dict[str, Tensor]], device: torch.device, warmup: int
) -> list[float]:
    """Seconds of each training step after the first ``warmup`` ones (the device synchronised around each step)."""
    times: list[float] = []
    for step, batch in enumerate(batches, start=1):
        synchronize(device)
        start = time.perf_counter()
        stepper(batch, step)
        synchronize(device)
        if step > warmup:
            times.append(time.perf_counter() - start)
    return times
