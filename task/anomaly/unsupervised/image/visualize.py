"""Result pictures and the demo GIF: input | heatmap overlay | predicted region | ground truth, with a title bar.

Rendering is pure numpy/OpenCV (titles with ``cv2.putText``) so it needs no plotting library. Heatmaps are
normalised with bounds shared by a whole set of images (``display_bounds``), never per image, so the same colour
means the same anomaly score in every picture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from torch import Tensor

from task.anomaly.unsupervised.data.image.dataset import AnomalyDataset
from task.anomaly.unsupervised.data.image.preprocess import IMAGENET_MEAN, IMAGENET_STD
from task.anomaly.unsupervised.drawing import (
    FONT,
    GREEN,
    GREY,
    RED,
    TITLE_BG,
    WHITE,
    display_bounds,
    draw_pieces,
    encode_gif,
    fit_scale,
    heatmap_overlay,
    png_bytes,
)
from task.anomaly.unsupervised.records import Predictions
from task.anomaly.unsupervised.regions import Region, find_regions
from task.common.io import atomic_write_bytes
from task.common.spacing import spread

__all__ = [
    "denormalize",
    "outline_regions",
    "render_prediction",
    "render_result",
    "save_result_images",
    "select_frames",
    "write_result_gif",
]

_CONTOUR = (255, 40, 40)
_BOX = (0, 230, 255)  # region boxes: cyan, apart from the red outline and from typical defect colours


def denormalize(image: Tensor) -> np.ndarray:
    """ImageNet-normalised [3, H, W] float tensor -> [H, W, 3] uint8 RGB."""
    # numpy rather than torch: per-image work this small is dominated by torch's threading overhead.
    chw = image.detach().float().cpu().numpy()
    rgb = chw.transpose(1, 2, 0) * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return np.ascontiguousarray(np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8))


def _region_outline(image: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """``image`` with the outline of ``anomaly_map >= pixel_threshold`` drawn on it (nothing when not finite)."""
    out = image.copy()
    if not math.isfinite(pixel_threshold):
        return out
    region = (anomaly_map >= pixel_threshold).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, _CONTOUR, max(1, image.shape[1] // 128))
    return out


def outline_regions(image: np.ndarray, regions: list[Region]) -> np.ndarray:
    """``image`` [H, W, 3] uint8 RGB with each region's box drawn and numbered 1, 2, ... (highest peak first), in
    the coordinates of ``image``."""
    out = image.copy()
    thickness = max(1, image.shape[1] // 256)
    scale = max(0.35, min(1.0, image.shape[1] / 512))
    for number, region in enumerate(regions, start=1):
        x, y, w, h = region.box
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), _BOX, thickness, cv2.LINE_8)
        text = str(number)
        (tw, th), _ = cv2.getTextSize(text, FONT, scale, 1)
        ty = y - 3 if y - th - 4 >= 0 else min(image.shape[0] - 1, y + h + th + 3)
        cv2.rectangle(out, (x, ty - th - 2), (x + tw + 3, ty + 2), _BOX, -1)
        cv2.putText(out, text, (x + 2, ty), FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _verdict(score: float, threshold: float) -> tuple[str, tuple[int, int, int]]:
    if not math.isfinite(threshold):
        return "n/a", GREY
    return ("NG", RED) if score >= threshold else ("OK", GREEN)


def render_result(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    bounds: tuple[float, float],
    score: float,
    image_threshold: float,
    pixel_threshold: float,
    mask: np.ndarray | None = None,
    label: int | None = None,
    defect: str | None = None,
    regions: list[Region] | None = None,
) -> np.ndarray:
    """One result picture: the panels side by side under a title bar.

    Args:
        image: [H, W, 3] uint8 RGB input, at the resolution of the map.
        anomaly_map: [H, W] float anomaly scores.
        bounds: (low, high) heatmap colour range from ``display_bounds`` (shared by the whole set).
        score: image anomaly score; the verdict is NG when ``score >= image_threshold``.
        image_threshold, pixel_threshold: decision thresholds (NaN: no verdict / no region drawn).
        mask: [H, W] {0, 1} ground truth; ``None`` (e.g. prediction on new images) omits the GT panel.
        label, defect: true label (1 = defective) and defect type, shown in the title when given.
        regions: defect regions in the picture's pixels, boxed and numbered on the prediction panel; ``None``:
            found here at the map's resolution (``find_regions``, every size kept).

    Returns:
        [T + H, P * W, 3] uint8 RGB, P = 4 panels with a mask and 3 without, T = title-bar height.
    """
    height, width = anomaly_map.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"image {image.shape[:2]} and anomaly map {(height, width)} differ in size")
    if regions is None:
        regions = find_regions(anomaly_map, pixel_threshold)
    outlined = outline_regions(_region_outline(image, anomaly_map, pixel_threshold), regions)
    panels = [image, heatmap_overlay(image, anomaly_map, bounds), outlined]
    captions = ["input", "heatmap", "prediction"]
    if mask is not None:
        panels.append(np.repeat((mask > 0).astype(np.uint8)[:, :, None] * 255, 3, axis=2))
        captions.append("ground truth")
    strip = np.concatenate(panels, axis=1)

    verdict, verdict_colour = _verdict(score, image_threshold)
    thr = f" / thr {image_threshold:.3f}" if math.isfinite(image_threshold) else ""
    pieces = [(f"score {score:.3f}{thr}  pred ", WHITE), (verdict, verdict_colour)]
    if label is not None:
        truth = "NG" if label else "OK"
        pieces += [("  true ", WHITE), (truth + (f" ({defect})" if label and defect else ""), RED if label else GREEN)]
    margin = max(2, width // 64)
    scale = fit_scale(["".join(p for p, _ in pieces)], strip.shape[1] - 2 * margin, max(0.35, height / 256 * 0.6))
    scale = min(scale, fit_scale(captions, width - 2 * margin, scale))
    thickness = 2 if scale >= 0.9 else 1
    line = cv2.getTextSize("Ag", FONT, scale, thickness)[0][1] + 2 * margin + 2
    title = np.empty((2 * line, strip.shape[1], 3), dtype=np.uint8)
    title[:] = TITLE_BG
    draw_pieces(title, pieces, margin, line - margin - 2, scale, thickness)
    for i, caption in enumerate(captions):
        text_width = cv2.getTextSize(caption, FONT, scale, thickness)[0][0]
        draw_pieces(
            title, [(caption, GREY)], i * width + (width - text_width) // 2, 2 * line - margin - 2, scale, thickness
        )
    return np.concatenate([title, strip], axis=0)


def _input_image(dataset: AnomalyDataset, preds: Predictions, index: int) -> np.ndarray:
    """The de-normalised input of prediction ``index``; checks that dataset and predictions are in the same order."""
    item = dataset[index]
    if preds.paths and item["path"] != preds.paths[index]:
        raise ValueError(f"predictions and dataset disagree at {index}: {preds.paths[index]} vs {item['path']}")
    return denormalize(item["image"])


def render_prediction(
    preds: Predictions,
    dataset: AnomalyDataset,
    index: int,
    thresholds: dict[str, float],
    bounds: tuple[float, float],
    min_area: int = 1,
) -> np.ndarray:
    """``render_result`` for entry ``index`` of ``preds`` (computed on ``dataset`` in order, unshuffled); regions of
    at least ``min_area`` pixels are boxed."""
    anomaly_map = preds.anomaly_maps[index].numpy()
    has_truth = preds.masks is not None
    return render_result(
        _input_image(dataset, preds, index),
        anomaly_map,
        bounds,
        float(preds.scores[index]),
        thresholds["image"],
        thresholds["pixel"],
        mask=preds.masks[index].numpy() if has_truth else None,
        label=int(preds.labels[index]) if has_truth else None,
        defect=preds.defects[index] if preds.defects else None,
        regions=find_regions(anomaly_map, thresholds["pixel"], min_area),
    )


def save_result_images(
    preds: Predictions, dataset: AnomalyDataset, thresholds: dict[str, float], folder: str | Path, min_area: int = 1
) -> list[Path]:
    """Write ``<folder>/<defect>/<file name>.png`` for every prediction (``a.jpg`` -> ``a.jpg.png``, so ``a.png`` and
    ``a.jpg`` never share a picture); returns the paths in prediction order."""
    folder = Path(folder)
    bounds = display_bounds(preds.anomaly_maps, thresholds["pixel"])
    written = []
    for i in range(len(preds.scores)):
        defect = preds.defects[i] if preds.defects else "images"
        target = folder / defect / (Path(preds.paths[i]).name + ".png")
        data = png_bytes(render_prediction(preds, dataset, i, thresholds, bounds, min_area))
        atomic_write_bytes(target, lambda handle, data=data: handle.write(data))
        written.append(target)
    return written


def select_frames(labels: Tensor, max_frames: int = 24) -> list[int]:
    """Indices for a GIF: normal and defective images alternating, evenly spread within each group.

    ``labels`` [N] (1 = defective) are in dataset order, which groups defects by type, so even spreading also
    covers the defect types. Deterministic; when one group runs out the other fills the remaining frames.
    """
    normal = [i for i, v in enumerate(labels.tolist()) if v == 0]
    defective = [i for i, v in enumerate(labels.tolist()) if v != 0]
    total = min(max_frames, len(labels))
    n_normal = min(len(normal), (total + 1) // 2)
    n_defective = min(len(defective), total - n_normal)
    n_normal = min(len(normal), total - n_defective)

    picks_normal, picks_defective = spread(normal, n_normal), spread(defective, n_defective)
    order = []
    for j in range(max(n_normal, n_defective)):
        order += picks_normal[j : j + 1] + picks_defective[j : j + 1]
    return order


@dataclass
class GifResult:
    """What ``write_result_gif`` wrote: the GIF files and the prediction indices shown, in frame order."""

    paths: list[Path]
    frames: list[int]


def write_result_gif(
    preds: Predictions,
    dataset: AnomalyDataset,
    thresholds: dict[str, float],
    targets: list[Path],
    max_frames: int = 24,
    max_width: int = 800,
    duration_ms: int = 700,
    min_area: int = 1,
) -> GifResult:
    """Render ``select_frames`` of the predictions and write the same GIF to every path in ``targets``."""
    bounds = display_bounds(preds.anomaly_maps, thresholds["pixel"])
    frames = select_frames(preds.labels, max_frames)
    pictures = [render_prediction(preds, dataset, i, thresholds, bounds, min_area) for i in frames]
    data = encode_gif(pictures, max_width, duration_ms)
    for target in targets:
        atomic_write_bytes(target, lambda handle: handle.write(data))
    return GifResult(list(targets), frames)
