"""Anomaly-detection metrics: AUROC, F1-max, AUPRO and a one-call summary, exact and in bounded memory.

Every distinct score is a threshold and a prediction is positive when ``score >= threshold``.  Nothing is
approximated: the curves are the exact ones, built without sorting all scores at once.

How (the "positive table"): between two consecutive distinct *positive* scores the true-positive count and
the per-region overlap are constant, so the negatives there only move the false-positive count along a
horizontal segment of the ROC / PRO curve.  The curve is therefore fully described by

* the distinct positive scores ``v_1 > ... > v_D`` with their positive count and summed region weight, and
* for every negative, the gap between two ``v`` it falls in, or the ``v`` it ties with.

The positives (anomalous pixels, a few percent of a test set) are sorted once; the negatives are streamed in
chunks of about 4M scores, each sorted and located in the table with a binary search, and only counted.
Memory is ``O(#anomalous pixels + chunk)`` instead of ``O(#pixels)``: 1,000 maps of 512x512 (262M pixels)
need well under 1 GB besides the input maps (``scripts/metrics_memory.py`` measures it).

Definitions follow the usual references:

* ``auroc`` equals ``sklearn.metrics.roc_auc_score`` (ties included).
* ``f1_max`` is the maximum of ``F1 = 2PR / (P + R)`` over the thresholds of
  ``sklearn.metrics.precision_recall_curve`` (anomalib's F1-max / adaptive threshold).
* ``aupro`` is the MVTec AD per-region-overlap score: 8-connected ground-truth regions, PRO averaged over all
  regions of all images, FPR over all normal pixels of all images, PRO integrated over FPR in
  ``[0, fpr_limit]`` with the trapezoid rule (the curve linearly interpolated at ``fpr_limit``) and divided
  by ``fpr_limit``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import cv2
import numpy as np
import torch

__all__ = ["aupro", "auroc", "compute_metrics", "f1_max", "rates_at"]

log = logging.getLogger("anomaly.metrics")

# Score dtypes that float32 represents exactly; everything else is compared in float64.
_FLOAT32_EXACT = {torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.int8, torch.int16}

# Negatives are located in the positive table this many at a time (16 maps of 512x512): large enough to
# amortise numpy's per-call cost, small enough that the chunk's temporaries stay around 100 MB.
_CHUNK = 1 << 22

# Threshold-free metrics and the test-optimal F1 (an oracle: its threshold is chosen with the test labels, never
# served),
# then the rates at the deployed thresholds (calibrated on normal data), per level.
AT_THRESHOLD = ("threshold", "fpr", "tpr", "precision", "f1")
METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "pixel_aupro",
    "image_f1_max",
    "pixel_f1_max",
    *(f"image_{k}" for k in AT_THRESHOLD),
    *(f"pixel_{k}" for k in AT_THRESHOLD),
)


# --------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------


def _scores_to_numpy(scores: torch.Tensor, name: str) -> np.ndarray:
    """Flatten ``scores`` (any shape) to a 1-D float32 array, or float64 when float32 would round them.

    For a float32 CPU tensor this is a view, not a copy.
    """
    t = torch.as_tensor(scores).detach().cpu().reshape(-1)
    t = t.to(torch.float32 if t.dtype in _FLOAT32_EXACT else torch.float64)
    arr = t.numpy()
    # NaN has no place in an ordering; failing loudly beats a silent garbage curve.
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; metrics need finite or +-inf scores")
    return arr


def _labels_to_numpy(labels: torch.Tensor, name: str) -> np.ndarray:
    """Flatten binary ``labels`` (bool or numbers in {0, 1}, any shape) to a 1-D bool array."""
    t = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if t.dtype != torch.bool:
        # Reject e.g. 0/255 masks or soft labels instead of guessing a cut-off.
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be binary (bool or values in {{0, 1}})")
        t = t != 0
    return t.numpy()


def _check_same_size(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.size != b.size:
        raise ValueError(f"{name_a} has {a.size} elements but {name_b} has {b.size}; they must match")


def _check_maps_and_masks(
    maps: torch.Tensor, masks: torch.Tensor, names: tuple[str, str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate [N, H, W] (or [N, 1, H, W]) maps and masks; return both as [N, H, W] CPU tensors (no copy)."""
    maps_t, masks_t = torch.as_tensor(maps).detach().cpu(), torch.as_tensor(masks).detach().cpu()
    # Tolerate a singleton channel axis, the usual layout of model outputs.
    if maps_t.dim() == 4 and maps_t.shape[1] == 1:
        maps_t = maps_t[:, 0]
    if masks_t.dim() == 4 and masks_t.shape[1] == 1:
        masks_t = masks_t[:, 0]
    if maps_t.dim() != 3 or maps_t.shape != masks_t.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must both be [N, H, W]; got {tuple(maps.shape)} and {tuple(masks.shape)}"
        )
    return maps_t, masks_t


# --------------------------------------------------------------------------
# The exact curve from a positive table and streamed negatives
# --------------------------------------------------------------------------


@dataclass
class _Curve:
    """Vertices of the exact ROC / PRO curve, thresholds descending.

    Attributes:
        tps: [V] int64, positives with ``score >= threshold`` at each vertex.
        fps: [V] int64, negatives with ``score >= threshold`` at each vertex.
        pro: [V] float64 or None, sum over regions of the covered fraction of that region (divide by the
            region count for PRO).
        thresholds: [V] float64, the threshold of each vertex (only meaningful where ``at_positive``).
        at_positive: [V] bool, the vertex sits at a distinct positive score (the only thresholds where F1
            can peak: lowering the threshold past negatives alone adds false positives only).
    """

    tps: np.ndarray
    fps: np.ndarray
    pro: np.ndarray | None
    thresholds: np.ndarray
    at_positive: np.ndarray

    @property
    def n_pos(self) -> int:
        return int(self.tps[-1]) if self.tps.size else 0

    @property
    def n_neg(self) -> int:
        return int(self.fps[-1]) if self.fps.size else 0


def _positive_table(scores: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Distinct positive scores (ascending) with their count and summed weight.

    Args:
        scores: [P] float scores of the positives.
        weights: [P] float64 per-positive weight (1 / area of its region), or None.

    Returns:
        ``(values [D] ascending, counts [D] int64, weight_sums [D] float64 or None)``.
    """
    order = np.argsort(scores)
    s = scores[order]
    # "!=" (not diff) so that inf - inf = nan cannot fake a boundary; -0.0 == 0.0 form one value.
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1]))) if s.size else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.append(starts, s.size)).astype(np.int64)
    sums = None
    if weights is not None:
        sums = np.add.reduceat(weights[order], starts) if s.size else np.zeros(0)
    return s[starts], counts, sums


def _negative_counts(values: np.ndarray, negatives: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Where the negatives fall relative to the distinct positive scores.

    Args:
        values: [D] distinct positive scores, ascending.
        negatives: chunks of negative scores (1-D float arrays).

    Returns:
        ``(gaps [D + 1], ties [D])`` int64 in ascending order: ``gaps[j]`` counts negatives strictly between
        ``values[j - 1]`` and ``values[j]`` (``j = 0``: below all, ``j = D``: above all), ``ties[j]`` those equal
        to ``values[j]``.
    """
    d = values.size
    gaps = np.zeros(d + 1, dtype=np.int64)
    ties = np.zeros(d, dtype=np.int64)
    for chunk in negatives:
        if not chunk.size:
            continue
        # Sorted needles make the binary searches cache-friendly (about 5x faster than unsorted).
        chunk = np.sort(chunk)
        below = np.searchsorted(values, chunk, side="left")  # distinct positive scores < each negative
        tied = values[np.minimum(below, d - 1)] == chunk if d else np.zeros(chunk.size, dtype=bool)
        tied &= below < d
        gaps += np.bincount(below[~tied], minlength=d + 1)
        ties += np.bincount(below[tied], minlength=d)
    return gaps, ties


def _assemble(
    values: np.ndarray, counts: np.ndarray, sums: np.ndarray | None, gaps: np.ndarray, ties: np.ndarray
) -> _Curve:
    """The curve's vertices in descending-threshold order from the table and the negative counts.

    Vertex sequence: end of the gap above the highest positive score, then for each distinct positive score
    ``v_k`` (descending) the vertex at ``v_k`` (its positives and tied negatives included: a diagonal segment
    when both are present) and the end of the gap below it (a horizontal segment).  Vertices every other
    threshold would add lie on these segments, so areas are unchanged.
    """
    d = values.size
    tp_k = np.cumsum(counts[::-1])  # [D] positives >= v_k
    fp_gap = gaps[::-1]  # [D + 1], gap 0 lies above v_1
    fp_at = np.cumsum(fp_gap[:-1]) + np.cumsum(ties[::-1])  # [D] negatives >= v_k
    tps = np.zeros(2 * d + 1, dtype=np.int64)
    fps = np.empty(2 * d + 1, dtype=np.int64)
    fps[0] = fp_gap[0]
    tps[1::2], fps[1::2] = tp_k, fp_at
    tps[2::2], fps[2::2] = tp_k, fp_at + fp_gap[1:]
    pro = None
    if sums is not None:
        # PRO(t) * R = sum over covered anomalous pixels of 1/area(region): each region adds its covered fraction.
        pro = np.zeros(2 * d + 1)
        pro[1::2] = pro[2::2] = np.cumsum(sums[::-1])
    thresholds = np.full(2 * d + 1, math.inf)
    thresholds[1::2] = values[::-1]
    at_positive = np.zeros(2 * d + 1, dtype=bool)
    at_positive[1::2] = True
    return _Curve(tps, fps, pro, thresholds, at_positive)


def _label_curve(scores: np.ndarray, labels: np.ndarray) -> _Curve:
    """Exact curve of flat ``scores`` [M] with bool ``labels`` [M]."""
    values, counts, _ = _positive_table(scores[labels], None)
    negatives = (scores[i : i + _CHUNK][~labels[i : i + _CHUNK]] for i in range(0, scores.size, _CHUNK))
    return _assemble(values, counts, None, *_negative_counts(values, negatives))


def _label_regions(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of regions, [H, W] int32 labels 1..n, 0 = normal) of one bool mask, 8-connected."""
    if not mask.any():
        return 0, np.zeros(mask.shape, dtype=np.int32)
    # 8-connectivity, as scipy.ndimage.label with a 3x3 structure in the official MVTec AD evaluation.
    n_labels, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return n_labels - 1, lab  # n_labels counts the background


def _image_chunks(n_images: int, pixels_per_image: int) -> Iterator[range]:
    """Consecutive image index ranges of about ``_CHUNK`` pixels (at least one image)."""
    step = max(1, _CHUNK // max(1, pixels_per_image))
    return (range(i, min(i + step, n_images)) for i in range(0, n_images, step))


def _pixel_curve(maps: torch.Tensor, masks: torch.Tensor, names: tuple[str, str]) -> tuple[_Curve, int]:
    """Exact pixel curve with per-region overlap, image chunk by image chunk.

    Args:
        maps: [N, H, W] anomaly maps.
        masks: [N, H, W] binary masks, same shape.

    Returns:
        ``(curve, n_regions)``.

    Raises:
        ValueError: NaN in ``maps`` or non-binary ``masks``.
    """
    n, h, w = maps.shape
    pos_scores: list[np.ndarray] = []
    pos_weights: list[np.ndarray] = []
    n_regions = 0
    # Pass 1: the anomalous pixels, each with 1 / area of its region (per image: regions never span images).
    for idx in _image_chunks(n, h * w):
        chunk_scores = _scores_to_numpy(maps[idx.start : idx.stop], names[0]).reshape(-1, h, w)
        chunk_masks = _labels_to_numpy(masks[idx.start : idx.stop], names[1]).reshape(-1, h, w)
        for scores, mask in zip(chunk_scores, chunk_masks):
            count, lab = _label_regions(mask)
            if count == 0:
                continue
            n_regions += count
            lab = lab[mask]  # region labels 1..count of the anomalous pixels
            pos_scores.append(scores[mask])
            pos_weights.append((1.0 / np.bincount(lab)[1:])[lab - 1])
    dtype = np.float64 if maps.dtype not in _FLOAT32_EXACT else np.float32
    scores = np.concatenate(pos_scores) if pos_scores else np.zeros(0, dtype=dtype)
    weights = np.concatenate(pos_weights) if pos_weights else np.zeros(0)
    del pos_scores, pos_weights
    values, counts, sums = _positive_table(scores, weights)
    del scores, weights

    # Pass 2: the normal pixels are only counted.
    def negatives() -> Iterator[np.ndarray]:
        for idx in _image_chunks(n, h * w):
            chunk_scores = _scores_to_numpy(maps[idx.start : idx.stop], names[0])
            chunk_masks = _labels_to_numpy(masks[idx.start : idx.stop], names[1])
            yield chunk_scores[~chunk_masks]

    gaps, ties = _negative_counts(values, negatives())
    return _assemble(values, counts, sums, gaps, ties), n_regions


# --------------------------------------------------------------------------
# Metrics on a curve
# --------------------------------------------------------------------------


def _auroc_from_curve(c: _Curve) -> float:
    """Exact ROC AUC; raises ValueError unless both classes are present."""
    n_pos, n_neg = c.n_pos, c.n_neg
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC is undefined with only one class present ({n_pos} positive, {n_neg} negative)")
    # Trapezoids in integer counts: 2 * area * P * N is an exact integer, so the single final division gives
    # the correctly rounded AUC (ties become diagonal segments, exactly as in sklearn).  Python ints: no
    # overflow for any pixel count.
    # Trapezoids in integer counts: 2 * area * P * N is an exact integer, so the single final division gives
    # the correctly rounded AUC (ties become diagonal segments, exactly as in sklearn).  The sum is at most
    # 2 * P * N <= M^2 / 2, which fits int64 for up to ~4e9 scores.
    tps = np.concatenate(([0], c.tps))
    dfps = np.diff(np.concatenate(([0], c.fps)))
    twice_area = int(np.dot(dfps, tps[1:] + tps[:-1]))
    return twice_area / (2 * n_pos * n_neg)


def _f1_from_curve(c: _Curve) -> tuple[float, float]:
    """Max F1 and its threshold; raises ValueError when there is no positive."""
    n_pos = c.n_pos
    if n_pos == 0:
        raise ValueError("F1 is undefined without positive labels (recall has no denominator)")
    tps, fps, thresholds = c.tps[c.at_positive], c.fps[c.at_positive], c.thresholds[c.at_positive]
    # 2PR/(P+R) == 2TP/(TP+FP+#pos); exact integer inputs give one rounding, so equal F1 values compare equal.
    f1 = 2.0 * tps / (tps + fps + n_pos)
    # Thresholds are descending; among equal maxima take the lowest threshold, as argmax over an ascending
    # precision_recall_curve (anomalib) does.
    k = f1.size - 1 - int(np.argmax(f1[::-1]))
    return float(f1[k]), float(thresholds[k])


def _trapezoid_limited(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` on ``[x[0], x_max]``, ``x`` non-decreasing.

    When ``x_max`` is not a sample point the curve is linearly interpolated there (same rule as the MVTec AD
    evaluation code).
    """
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        if not 0 < ins < x.size:
            raise ValueError(f"x_max={x_max} is outside the curve's range [{x[0]}, {x[-1]}]")
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def _aupro_from_curve(c: _Curve, n_regions: int, fpr_limit: float) -> float | None:
    """Normalised AUPRO; None when there is no region or no normal pixel."""
    if n_regions == 0 or c.n_neg == 0:
        return None
    assert c.pro is not None
    fpr = np.clip(c.fps / c.n_neg, 0.0, 1.0)
    # Clip: float summation of 1/area may overshoot 1 by an ulp.
    pro = np.clip(c.pro / n_regions, 0.0, 1.0)
    # Anchor the curve at (0, 0) and (1, 1) like the MVTec reference code.
    fpr = np.concatenate(([0.0], fpr, [1.0]))
    pro = np.concatenate(([0.0], pro, [1.0]))
    return _trapezoid_limited(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Binary ROC AUC, identical to ``sklearn.metrics.roc_auc_score`` (ties included).

    Args:
        scores: any shape, higher = more anomalous; flattened.
        labels: same number of elements, bool or values in {0, 1}.

    Raises:
        ValueError: only one class present, NaN scores, non-binary labels or mismatched sizes.
    """
    s = _scores_to_numpy(scores, "scores")
    y = _labels_to_numpy(labels, "labels")
    _check_same_size(s, y, "scores", "labels")
    return _auroc_from_curve(_label_curve(s, y))


def f1_max(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Maximum F1 over all thresholds and the threshold reaching it.

    A sample is predicted positive when ``score >= threshold``; the candidate thresholds are the distinct
    scores (those of ``sklearn.metrics.precision_recall_curve``).  Among thresholds with equal F1 the lowest
    is returned.

    Args:
        scores: any shape; flattened.
        labels: same number of elements, bool or values in {0, 1}.

    Returns:
        ``(f1, threshold)``.

    Raises:
        ValueError: no positive label, NaN scores, non-binary labels or mismatched sizes.
    """
    s = _scores_to_numpy(scores, "scores")
    y = _labels_to_numpy(labels, "labels")
    _check_same_size(s, y, "scores", "labels")
    return _f1_from_curve(_label_curve(s, y))


def aupro(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the per-region-overlap curve (MVTec AD AUPRO).

    Ground-truth regions are the 8-connected components of each mask.  For a threshold ``t``, PRO(t) is the
    mean over all regions of all images of the fraction of the region with ``score >= t``, and FPR(t) the
    fraction of all normal pixels (mask 0, every image) with ``score >= t``.  Every distinct score is a
    threshold.  PRO is integrated over FPR in ``[0, fpr_limit]`` (trapezoids, curve interpolated at
    ``fpr_limit``) and divided by ``fpr_limit``, so a perfect detector scores 1.0.

    Args:
        maps: [N, H, W] float anomaly maps ([N, 1, H, W] accepted).
        masks: [N, H, W] ground truth, bool or values in {0, 1}.
        fpr_limit: upper FPR bound of the integral, in (0, 1].

    Returns:
        AUPRO in [0, 1]; None when there is no anomalous region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps_t, masks_t = _check_maps_and_masks(maps, masks, ("maps", "masks"))
    curve, n_regions = _pixel_curve(maps_t, masks_t, ("maps", "masks"))
    return _aupro_from_curve(curve, n_regions, fpr_limit)


def rates_at(counts: tuple[int, int, int, int]) -> dict[str, float | None]:
    """``fpr``, ``tpr`` (recall), ``precision`` and ``f1`` from ``(tp, fp, n_pos, n_neg)``; None where undefined."""
    tp, fp, n_pos, n_neg = counts
    return {
        "fpr": fp / n_neg if n_neg else None,
        "tpr": tp / n_pos if n_pos else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "f1": 2 * tp / (tp + fp + n_pos) if n_pos else None,
    }


def _image_counts(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    alarm = scores >= threshold
    return int((alarm & labels).sum()), int((alarm & ~labels).sum()), int(labels.sum()), int((~labels).sum())


def _pixel_counts(maps: torch.Tensor, masks: torch.Tensor, threshold: float) -> tuple[int, int, int, int]:
    """(tp, fp, n_pos, n_neg) of ``maps >= threshold`` against ``masks``, image chunk by image chunk."""
    n, h, w = maps.shape
    tp = fp = n_pos = n_neg = 0
    for idx in _image_chunks(n, h * w):
        s = _scores_to_numpy(maps[idx.start : idx.stop], "pixel_maps")
        y = _labels_to_numpy(masks[idx.start : idx.stop], "pixel_masks")
        counts = _image_counts(s, y, threshold)
        tp, fp, n_pos, n_neg = tp + counts[0], fp + counts[1], n_pos + counts[2], n_neg + counts[3]
    return tp, fp, n_pos, n_neg


def _usable(threshold: float | None) -> bool:
    return threshold is not None and math.isfinite(threshold)


def compute_metrics(
    image_scores: torch.Tensor,
    image_labels: torch.Tensor,
    pixel_maps: torch.Tensor,
    pixel_masks: torch.Tensor | None,
    thresholds: dict[str, float] | None = None,
) -> dict[str, float | None]:
    """All image- and pixel-level metrics in one pass, exact, in memory bounded by the anomalous pixels.

    Args:
        image_scores: [N] image anomaly scores.
        image_labels: [N] 1 = defective, 0 = good.
        pixel_maps: [N, H, W] anomaly maps ([N, 1, H, W] accepted).
        pixel_masks: [N, H, W] ground-truth masks, bool or values in {0, 1}; None when the test set has no
            masks (the pixel metrics are then None).
        thresholds: the deployed decision thresholds ``{"image": t, "pixel": t}`` (``score >= t`` is anomalous),
            chosen without the test labels; the rates at a missing one are None.

    Returns:
        ``METRIC_KEYS``, each a float or None (JSON null) when the data cannot define it: no defective test image
        (image AUROC, F1-max, TPR), no good test image (image AUROC, FPR), no masks or all masks empty (pixel
        metrics), no normal pixel (pixel AUROC, AUPRO). One line per such reason goes to the ``anomaly.metrics``
        logger. ``*_f1_max`` is the F1 at the test-optimal threshold (an oracle figure: that threshold is chosen
        with the test labels and is not returned); ``*_threshold``, ``*_fpr``, ``*_tpr``, ``*_precision`` and
        ``*_f1`` are measured at the given thresholds.

    Raises:
        ValueError: malformed input (shapes, NaN scores, non-binary labels).
    """
    out: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    thresholds = thresholds or {}

    img_s = _scores_to_numpy(image_scores, "image_scores")
    img_y = _labels_to_numpy(image_labels, "image_labels")
    _check_same_size(img_s, img_y, "image_scores", "image_labels")
    if _usable(thresholds.get("image")):
        out["image_threshold"] = float(thresholds["image"])
        out.update({f"image_{k}": v for k, v in rates_at(_image_counts(img_s, img_y, out["image_threshold"])).items()})
    img = _label_curve(img_s, img_y)
    if img.n_pos == 0:
        log.warning("no defective test image: image_auroc and image_f1_max are null")
    else:
        out["image_f1_max"] = _f1_from_curve(img)[0]
        if img.n_neg == 0:
            log.warning("no good test image: image_auroc is null")
        else:
            out["image_auroc"] = _auroc_from_curve(img)

    if pixel_masks is None:
        log.warning("no ground-truth masks: pixel metrics are null")
        return out
    maps_t, masks_t = _check_maps_and_masks(pixel_maps, pixel_masks, ("pixel_maps", "pixel_masks"))
    pix, n_regions = _pixel_curve(maps_t, masks_t, ("pixel_maps", "pixel_masks"))
    if pix.n_pos == 0:
        log.warning("all ground-truth masks are empty: pixel metrics are null")
        return out
    out["pixel_f1_max"] = _f1_from_curve(pix)[0]
    if _usable(thresholds.get("pixel")):
        out["pixel_threshold"] = float(thresholds["pixel"])
        out.update(
            {f"pixel_{k}": v for k, v in rates_at(_pixel_counts(maps_t, masks_t, out["pixel_threshold"])).items()}
        )
    if pix.n_neg == 0:
        log.warning("no normal pixel in the masks: pixel_auroc and pixel_aupro are null")
        return out
    out["pixel_auroc"] = _auroc_from_curve(pix)
    out["pixel_aupro"] = _aupro_from_curve(pix, n_regions, 0.3)
    return out
