"""Defect regions: the connected regions of a thresholded anomaly map, with bounding box, area and peak score.

Pure numpy/OpenCV functions shared by the test outputs, predict, watch folders and streams. Regions are found at the
resolution of the map (the model's), 8-connected, and regions smaller than ``min_area`` pixels are dropped (noise);
``scale_regions`` carries them to the input image's pixels. Boxes are ``[x, y, width, height]`` in pixels with
``x + width`` exclusive, so a box covers ``map[y : y + height, x : x + width]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

__all__ = ["Region", "box_iou", "find_regions", "mask_boxes", "regions_record", "scale_regions"]


@dataclass(frozen=True)
class Region:
    """One connected region of ``anomaly_map >= threshold``."""

    x: int
    y: int
    width: int
    height: int
    area: int  # pixels of the region itself (not of its box)
    peak: float  # highest anomaly score inside the region
    peak_x: int  # where the peak is
    peak_y: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.width, self.height


def find_regions(anomaly_map: np.ndarray, threshold: float, min_area: int = 1) -> list[Region]:
    """Connected regions of ``anomaly_map >= threshold`` with at least ``min_area`` pixels, highest peak first.

    Args:
        anomaly_map: [H, W] float anomaly scores (NaN counts as below the threshold).
        threshold: the pixel threshold; not finite -> no regions (no decision is possible).
        min_area: smallest region kept, in pixels of ``anomaly_map``.

    Returns:
        The regions sorted by peak score (descending), ties by position.
    """
    scores = np.asarray(anomaly_map, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"anomaly_map must be [H, W], got shape {scores.shape}")
    if not math.isfinite(threshold):
        return []
    with np.errstate(invalid="ignore"):
        binary = (scores >= threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    regions = []
    for index in range(1, count):  # 0 is the background
        x, y, width, height, area = (int(v) for v in stats[index])
        if area < max(1, min_area):
            continue
        window = np.where(
            labels[y : y + height, x : x + width] == index, scores[y : y + height, x : x + width], -np.inf
        )
        flat = int(np.argmax(window))
        peak_y, peak_x = divmod(flat, width)
        regions.append(Region(x, y, width, height, area, float(window.flat[flat]), x + peak_x, y + peak_y))
    return sorted(regions, key=lambda r: (-r.peak, r.y, r.x))


def scale_regions(regions: list[Region], sx: float, sy: float) -> list[Region]:
    """The regions in another resolution (``sx``, ``sy`` = new size / map size): boxes scaled outwards to whole
    pixels, areas by ``sx * sy`` (rounded), peaks at the centre of their scaled pixel."""
    out = []
    for r in regions:
        x0, y0 = math.floor(r.x * sx), math.floor(r.y * sy)
        x1, y1 = math.ceil((r.x + r.width) * sx), math.ceil((r.y + r.height) * sy)
        out.append(
            Region(
                x0,
                y0,
                x1 - x0,
                y1 - y0,
                max(1, round(r.area * sx * sy)),
                r.peak,
                math.floor((r.peak_x + 0.5) * sx),
                math.floor((r.peak_y + 0.5) * sy),
            )
        )
    return out


def mask_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes ``(x, y, width, height)`` of the 8-connected regions of a {0, 1} mask [H, W]."""
    count, _, stats, _ = cv2.connectedComponentsWithStats((np.asarray(mask) > 0).astype(np.uint8), connectivity=8)
    return [tuple(int(v) for v in stats[i][:4]) for i in range(1, count)]


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two ``(x, y, width, height)`` boxes (0 when both are empty)."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def regions_record(regions: list[Region]) -> list[dict]:
    """JSON-ready list: ``{"box": [x, y, w, h], "area", "peak", "peak_xy": [x, y]}`` per region, in order."""
    out = []
    for r in regions:
        d = asdict(r)
        out.append(
            {
                "box": [d["x"], d["y"], d["width"], d["height"]],
                "area": d["area"],
                "peak": round(d["peak"], 6),
                "peak_xy": [d["peak_x"], d["peak_y"]],
            }
        )
    return out
