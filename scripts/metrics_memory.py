"""Peak memory and time of ``compute_metrics`` on synthetic maps with blob-shaped defects.

Run it as its own process so that the peak resident set size (``ru_maxrss``) is that of one metrics call:

    python scripts/metrics_memory.py --images 1000 --size 512

Every second image gets one to three filled ellipses as its defect mask; the maps are uniform noise raised by
0.3 inside the defects, so nearly every pixel score is distinct (the worst case for a sort-based curve).
Prints one JSON line: sizes, resident memory before and after, the peak, wall time and the metrics.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from task.common.metrics import compute_metrics  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def blob_masks(n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """[n, size, size] uint8 {0, 1}: every second image holds 1-3 random filled ellipses."""
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(1, n, 2):
        for _ in range(int(rng.integers(1, 4))):
            center = tuple(int(c) for c in rng.integers(size // 8, size - size // 8, 2))
            axes = tuple(int(a) for a in rng.integers(max(1, size // 40), max(2, size // 8), 2))
            cv2.ellipse(masks[i], center, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    return torch.from_numpy(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    masks = blob_masks(args.images, args.size, rng)
    maps = torch.rand(args.images, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    for i in range(1, args.images, 2):  # in place, one map at a time: no full-size temporary
        maps[i].add_(masks[i], alpha=0.3)
    labels = masks.flatten(1).amax(1).long()
    scores = maps.flatten(1).amax(1)
    anomalous = int(torch.count_nonzero(masks))  # not masks.sum(): that widens all masks to int64 (2 GB)
    baseline, peak_before = rss_mb(), peak_rss_mb()

    start = time.perf_counter()
    metrics = compute_metrics(scores, labels, maps, masks)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "images": args.images,
                "size": args.size,
                "pixels": maps.numel(),
                "anomalous_pixels": anomalous,
                "input_mb": (maps.numel() * maps.element_size() + masks.numel()) / 2**20,
                "baseline_rss_mb": baseline,
                "peak_rss_before_metrics_mb": peak_before,
                "peak_rss_mb": peak,
                "metrics_extra_mb": peak - baseline,
                "seconds": seconds,
                "metrics": metrics,
            }
        )
    )


if __name__ == "__main__":
    main()
