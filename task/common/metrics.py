"""Anomaly-detection metrics: AUROC, F1-max, AUPRO, the rates at a deployed threshold and a one-call summary.

Every distinct score is a threshold and a prediction is positive when ``score >= threshold``.  Nothing is
approximated: the metrics are read off the exact curves of ``exact_curve.py``.

The exact curves, built in memory bounded by the anomalous pixels, are ``exact_curve.py``.

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

import numpy as np
import torch

from task.common.exact_curve import (
    Curve,
    check_maps_and_masks,
    check_same_size,
    image_chunks,
    label_curve,
    labels_to_numpy,
    pixel_curve,
    scores_to_numpy,
)

__all__ = ["aupro", "auroc", "compute_metrics", "f1_max", "rates_at"]

log = logging.getLogger("anomaly.metrics")


# Threshold-free metrics and the test-optimal F1 (an oracle: its threshold is chosen with the test labels, never
# served), then the rates at the deployed thresholds (calibrated on normal data), per level.
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
# Metrics on a curve
# --------------------------------------------------------------------------


def _auroc_from_curve(c: Curve) -> float:
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


def _f1_from_curve(c: Curve) -> tuple[float, float]:
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


def _aupro_from_curve(c: Curve, n_regions: int, fpr_limit: float) -> float | None:
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
    s = scores_to_numpy(scores, "scores")
    y = labels_to_numpy(labels, "labels")
    check_same_size(s, y, "scores", "labels")
    return _auroc_from_curve(label_curve(s, y))


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
    s = scores_to_numpy(scores, "scores")
    y = labels_to_numpy(labels, "labels")
    check_same_size(s, y, "scores", "labels")
    return _f1_from_curve(label_curve(s, y))


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
    maps_t, masks_t = check_maps_and_masks(maps, masks, ("maps", "masks"))
    curve, n_regions = pixel_curve(maps_t, masks_t, ("maps", "masks"))
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
    for idx in image_chunks(n, h * w):
        s = scores_to_numpy(maps[idx.start : idx.stop], "pixel_maps")
        y = labels_to_numpy(masks[idx.start : idx.stop], "pixel_masks")
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

    img_s = scores_to_numpy(image_scores, "image_scores")
    img_y = labels_to_numpy(image_labels, "image_labels")
    check_same_size(img_s, img_y, "image_scores", "image_labels")
    if _usable(thresholds.get("image")):
        out["image_threshold"] = float(thresholds["image"])
        out.update({f"image_{k}": v for k, v in rates_at(_image_counts(img_s, img_y, out["image_threshold"])).items()})
    img = label_curve(img_s, img_y)
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
    maps_t, masks_t = check_maps_and_masks(pixel_maps, pixel_masks, ("pixel_maps", "pixel_masks"))
    pix, n_regions = pixel_curve(maps_t, masks_t, ("pixel_maps", "pixel_masks"))
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
