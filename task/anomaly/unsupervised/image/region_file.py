"""regions.json of an image evaluation: the defect regions of every test image and how well their boxes overlap the
ground-truth masks (``regions.find_regions`` at model resolution, the F1-optimal pixel threshold of the metrics)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from task.anomaly.unsupervised.records import Predictions
from task.anomaly.unsupervised.regions import Region, box_iou, find_regions, mask_boxes, regions_record
from task.common.io import write_json

log = logging.getLogger("anomaly")


def best_box_iou(regions: list[Region], mask: np.ndarray) -> tuple[float, float]:
    """(IoU of the top region's box, best IoU of any region's box) with the nearest ground-truth box of ``mask``
    [H, W] (its connected regions' boxes); 0 when there are no regions."""
    truth = mask_boxes(mask)
    if not regions or not truth:
        return 0.0, 0.0
    ious = [max(box_iou(r.box, t) for t in truth) for r in regions]
    return ious[0], max(ious)


def regions_of_test_set(preds: Predictions, pixel_threshold: float, min_area: int) -> dict[str, Any]:
    """The regions.json record: settings, per image its regions and, with masks, the box IoUs and their means over
    the defective images (``mean_top_box_iou``, ``mean_best_box_iou``)."""
    images, top, best = [], [], []
    for i, path in enumerate(preds.paths):
        regions = find_regions(preds.anomaly_maps[i].numpy(), pixel_threshold, min_area)
        entry: dict[str, Any] = {
            "path": path,
            "label": int(preds.labels[i]),
            "score": round(float(preds.scores[i]), 6),
            "regions": regions_record(regions),
        }
        if preds.defects:
            entry["defect"] = preds.defects[i]
        if preds.masks is not None and int(preds.labels[i]) == 1:
            entry["top_box_iou"], entry["best_box_iou"] = (
                round(v, 4) for v in best_box_iou(regions, preds.masks[i].numpy())
            )
            top.append(entry["top_box_iou"])
            best.append(entry["best_box_iou"])
        images.append(entry)
    summary = {
        "pixel_threshold": pixel_threshold if math.isfinite(pixel_threshold) else None,
        "min_area": min_area,
        "units": "pixels of the anomaly map (model resolution); box = [x, y, width, height]",
        "defective_images_with_masks": len(best),
        "mean_top_box_iou": round(float(np.mean(top)), 4) if top else None,
        "mean_best_box_iou": round(float(np.mean(best)), 4) if best else None,
    }
    return {**summary, "images": images}


def write_regions(target: Path, preds: Predictions, pixel_threshold: float, min_area: int) -> None:
    """Write regions.json (atomically) and log the mean box IoUs."""
    record = regions_of_test_set(preds, pixel_threshold, min_area)
    write_json(target, record)
    if record["mean_best_box_iou"] is not None:
        log.info(
            "defect regions: mean IoU with the ground-truth boxes over %d defective images: "
            "top box %.3f, best box %.3f (%s)",
            record["defective_images_with_masks"],
            record["mean_top_box_iou"],
            record["mean_best_box_iou"],
            target,
        )
