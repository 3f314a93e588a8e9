"""Anomaly-detection metrics: AUROC, F1-max, AUPRO and a one-call summary.

All curves are exact (every distinct score is a threshold) and vectorised:
scores are sorted once, and true/false-positive counts (and, for AUPRO, the
per-region overlap) are cumulative sums over the sorted order.  A prediction
is positive when ``score >= threshold``.

``compute_metrics`` sorts the pixel scores a single time and derives pixel
AUROC, pixel F1-max and AUPRO from that one sort.

Definitions follow the usual references:

* ``auroc`` equals ``sklearn.metrics.roc_auc_score`` (ties included).
* ``f1_max`` is the maximum of ``F1 = 2PR / (P + R)`` over the thresholds of
  ``sklearn.metrics.precision_recall_curve`` (anomalib's F1-max / adaptive
  threshold).
* ``aupro`` is the MVTec AD per-region-overlap score: 8-connected ground-truth
  regions, PRO averaged over all regions of all images, FPR over all normal
  pixels of all images, PRO integrated over FPR in ``[0, fpr_limit]`` with the
  trapezoid rule (the curve linearly interpolated at ``fpr_limit``) and divided
  by ``fpr_limit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

__all__ = ["auroc", "f1_max", "aupro", "compute_metrics"]

# Score dtypes that float32 represents exactly; these take the fast sort path.
_FLOAT32_EXACT = {
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
}

_LOW32 = np.int64(0xFFFFFFFF)
_MAGNITUDE_BITS = np.int64(0x7FFFFFFF)


# --------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------


def _scores_to_numpy(scores: torch.Tensor, name: str) -> np.ndarray:
    """Flatten ``scores`` (any shape) to a 1-D float32 or float64 array.

    float32 is used whenever it is lossless (float32/16, bfloat16, small ints)
    so the fast packed sort applies; everything else becomes float64 so
    sklearn-exact tie handling is never broken by rounding.
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


# --------------------------------------------------------------------------
# Sorting and cumulative curve
# --------------------------------------------------------------------------


def _sort_desc(scores: np.ndarray, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort scores in descending order and carry an integer payload along.

    Args:
        scores: [M] float32 or float64, no NaN.
        payload: [M] non-negative integers < 2**32 (a label or a region id).

    Returns:
        ``(sorted_scores [M], sorted_payload [M] int64)``, scores descending.
        The order of equal scores is unspecified (curves only look at the
        boundaries between distinct scores).
    """
    if scores.dtype == np.float32:
        # Fast path: pack (score, payload) into one int64 key and value-sort it.
        # Value sorts of int64 are SIMD-accelerated in numpy and several times
        # faster than argsort + two gathers (about 0.1 s vs 0.4 s for 6.5M).
        # "+ 0" turns -0.0 into +0.0 so the two zeros form one threshold.
        bits = (scores + np.float32(0)).view(np.int32).astype(np.int64)
        # IEEE floats order like sign-magnitude integers; flipping the
        # magnitude bits of negatives makes them order like two's complement.
        bits ^= (bits >> 31) & _MAGNITUDE_BITS
        key = (bits << 32) | payload.astype(np.int64)
        key.sort()
        key = key[::-1]
        hi = key >> 32  # arithmetic shift: signed high half back
        hi ^= (hi >> 31) & _MAGNITUDE_BITS  # the flip is its own inverse
        return hi.astype(np.int32).view(np.float32), key & _LOW32
    # float64 scores leave no room in a 64-bit key: plain argsort.
    order = np.argsort(scores)[::-1]
    return scores[order], payload[order].astype(np.int64)


@dataclass
class _Curve:
    """Cumulative counts at each distinct threshold, thresholds descending.

    Attributes:
        thresholds: [T] distinct scores, descending.
        tps: [T] int64, positives with ``score >= thresholds[k]``.
        fps: [T] int64, negatives with ``score >= thresholds[k]``.
        pro: [T] float64 or None, sum over regions of the covered fraction of
            that region (divide by the region count for PRO).
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    pro: np.ndarray | None = None

    @property
    def n_pos(self) -> int:
        return int(self.tps[-1]) if self.tps.size else 0

    @property
    def n_neg(self) -> int:
        return int(self.fps[-1]) if self.fps.size else 0


def _curve(scores: np.ndarray, payload: np.ndarray, inv_area: np.ndarray | None = None) -> _Curve:
    """Build the exact threshold curve from one sort.

    Args:
        scores: [M] float scores.
        payload: [M] ints, 0 for a negative element and > 0 for a positive one
            (a plain label, or a ground-truth region id for AUPRO).
        inv_area: [R + 1] float64, ``1 / area`` of region ``r`` at index ``r``
            (index 0 unused, must be 0); when given, ``pro`` is filled in.
    """
    s, p = _sort_desc(scores, payload)
    if s.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _Curve(s, empty, empty, np.zeros(0) if inv_area is not None else None)
    # Last index of each run of equal scores: the curve only changes there.
    # (!= rather than diff so that inf - inf = nan cannot fake a boundary.)
    last = np.flatnonzero(s[1:] != s[:-1])
    last = np.append(last, s.size - 1)
    positive = p != 0
    tps = np.cumsum(positive, dtype=np.int64)[last]
    fps = (last + 1) - tps
    pro = None
    if inv_area is not None:
        # PRO(t) * R = sum over covered anomalous pixels of 1/area(region):
        # each region contributes exactly its covered fraction.
        pro = np.cumsum(inv_area[p])[last]
    return _Curve(s[last], tps, fps, pro)


# --------------------------------------------------------------------------
# Metrics on a curve
# --------------------------------------------------------------------------


def _auroc_from_curve(c: _Curve) -> float:
    """Exact ROC AUC; raises ValueError unless both classes are present."""
    n_pos, n_neg = c.n_pos, c.n_neg
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC is undefined with only one class present ({n_pos} positive, {n_neg} negative)"
        )
    # Trapezoids in integer counts: 2 * area * P * N is an exact integer, so the
    # single final division gives the correctly rounded AUC (ties become
    # diagonal segments, exactly as in sklearn).  The sum is at most 2 * P * N,
    # which fits int64 for up to ~4e9 elements.
    tps = np.concatenate(([0], c.tps))
    dfps = np.diff(np.concatenate(([0], c.fps)))
    twice_area = int(np.dot(dfps, tps[1:] + tps[:-1]))
    return twice_area / (2 * n_pos * n_neg)


def _f1_from_curve(c: _Curve) -> tuple[float, float]:
    """Max F1 and its threshold; raises ValueError when there is no positive."""
    n_pos = c.n_pos
    if n_pos == 0:
        raise ValueError("F1 is undefined without positive labels (recall has no denominator)")
    # 2PR/(P+R) == 2TP/(TP+FP+#pos); exact integer inputs give one rounding,
    # so equal F1 values compare equal.
    f1 = 2.0 * c.tps / (c.tps + c.fps + n_pos)
    # Thresholds are descending; among equal maxima take the lowest threshold,
    # as argmax over an ascending precision_recall_curve (anomalib) does.
    k = f1.size - 1 - int(np.argmax(f1[::-1]))
    return float(f1[k]), float(c.thresholds[k])


def _trapezoid_limited(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` on ``[x[0], x_max]``, ``x`` non-decreasing.

    When ``x_max`` is not a sample point the curve is linearly interpolated
    there (same rule as the MVTec AD evaluation code).
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


def _aupro_from_curve(c: _Curve, n_regions: int, fpr_limit: float) -> float:
    """Normalised AUPRO; nan when there is no region or no normal pixel."""
    if n_regions == 0 or c.n_neg == 0:
        return math.nan
    assert c.pro is not None
    fpr = np.clip(c.fps / c.n_neg, 0.0, 1.0)
    # Clip: float summation of 1/area may overshoot 1 by an ulp.
    pro = np.clip(c.pro / n_regions, 0.0, 1.0)
    # Anchor the curve at (0, 0) and (1, 1) like the MVTec reference code.
    fpr = np.concatenate(([0.0], fpr, [1.0]))
    pro = np.concatenate(([0.0], pro, [1.0]))
    return _trapezoid_limited(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------
# Ground-truth regions
# --------------------------------------------------------------------------


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected ground-truth regions with ids unique across images.

    Args:
        masks: [N, H, W] bool.

    Returns:
        ``(ids [N, H, W] int64, n_regions)``; 0 marks normal pixels and regions
        are numbered ``1..n_regions``.
    """
    ids = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i in range(masks.shape[0]):  # connected components are per image
        if not masks[i].any():
            continue
        # 8-connectivity, as scipy.ndimage.label with a 3x3 structure in the
        # official MVTec AD evaluation.
        n_labels, lab = cv2.connectedComponents(masks[i].astype(np.uint8), connectivity=8)
        ids[i] = np.where(lab > 0, lab.astype(np.int64) + n_regions, 0)
        n_regions += n_labels - 1  # n_labels counts the background
    return ids, n_regions


def _inverse_areas(ids: np.ndarray, n_regions: int) -> np.ndarray:
    """[n_regions + 1] float64 with ``1 / area`` per region and 0 at index 0."""
    area = np.bincount(ids.reshape(-1), minlength=n_regions + 1).astype(np.float64)
    inv = np.zeros_like(area)
    inv[1:] = 1.0 / area[1:]
    return inv


def _maps_and_masks(maps: torch.Tensor, masks: torch.Tensor, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate [N, H, W] (or [N, 1, H, W]) maps/masks; return flat scores and [N, H, W] bool masks."""
    maps_t, masks_t = torch.as_tensor(maps), torch.as_tensor(masks)
    # Tolerate a singleton channel axis, the usual layout of model outputs.
    if maps_t.dim() == 4 and maps_t.shape[1] == 1:
        maps_t = maps_t[:, 0]
    if masks_t.dim() == 4 and masks_t.shape[1] == 1:
        masks_t = masks_t[:, 0]
    if maps_t.dim() != 3 or maps_t.shape != masks_t.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must both be [N, H, W]; got {tuple(maps.shape)} and {tuple(masks.shape)}"
        )
    scores = _scores_to_numpy(maps_t, names[0])
    mask = _labels_to_numpy(masks_t, names[1]).reshape(tuple(masks_t.shape))
    return scores, mask


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Binary ROC AUC, identical to ``sklearn.metrics.roc_auc_score`` (ties included).

    Args:
        scores: any shape, higher = more anomalous; flattened.
        labels: same number of elements, bool or values in {0, 1}.

    Raises:
        ValueError: only one class present, NaN scores, non-binary labels or
            mismatched sizes.
    """
    s = _scores_to_numpy(scores, "scores")
    y = _labels_to_numpy(labels, "labels")
    _check_same_size(s, y, "scores", "labels")
    return _auroc_from_curve(_curve(s, y))


def f1_max(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Maximum F1 over all thresholds and the threshold reaching it.

    A sample is predicted positive when ``score >= threshold``; the candidate
    thresholds are the distinct scores (those of
    ``sklearn.metrics.precision_recall_curve``).  Among thresholds with equal
    F1 the lowest is returned.

    Args:
        scores: any shape; flattened.
        labels: same number of elements, bool or values in {0, 1}.

    Returns:
        ``(f1, threshold)``.

    Raises:
        ValueError: no positive label, NaN scores, non-binary labels or
            mismatched sizes.
    """
    s = _scores_to_numpy(scores, "scores")
    y = _labels_to_numpy(labels, "labels")
    _check_same_size(s, y, "scores", "labels")
    return _f1_from_curve(_curve(s, y))


def aupro(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve (MVTec AD AUPRO).

    Ground-truth regions are the 8-connected components of each mask.  For a
    threshold ``t``, PRO(t) is the mean over all regions of all images of the
    fraction of the region with ``score >= t``, and FPR(t) the fraction of all
    normal pixels (mask 0, every image) with ``score >= t``.  Every distinct
    score is a threshold.  PRO is integrated over FPR in ``[0, fpr_limit]``
    (trapezoids, curve interpolated at ``fpr_limit``) and divided by
    ``fpr_limit``, so a perfect detector scores 1.0.

    Args:
        maps: [N, H, W] float anomaly maps ([N, 1, H, W] accepted).
        masks: [N, H, W] ground truth, bool or values in {0, 1}.
        fpr_limit: upper FPR bound of the integral, in (0, 1].

    Returns:
        AUPRO in [0, 1]; nan when there is no anomalous region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, mask = _maps_and_masks(maps, masks, ("maps", "masks"))
    ids, n_regions = _region_ids(mask)
    if n_regions == 0:
        return math.nan
    c = _curve(scores, ids.reshape(-1), _inverse_areas(ids, n_regions))
    return _aupro_from_curve(c, n_regions, fpr_limit)


def compute_metrics(
    image_scores: torch.Tensor,
    image_labels: torch.Tensor,
    pixel_maps: torch.Tensor,
    pixel_masks: torch.Tensor,
) -> dict[str, float]:
    """All image- and pixel-level metrics in one pass.

    Args:
        image_scores: [N] image anomaly scores.
        image_labels: [N] 1 = defective, 0 = good.
        pixel_maps: [N, H, W] anomaly maps ([N, 1, H, W] accepted).
        pixel_masks: [N, H, W] ground-truth masks, bool or values in {0, 1}.

    Returns:
        Floats under exactly the keys ``image_auroc, pixel_auroc, pixel_f1,
        image_f1, pixel_aupro, image_threshold, pixel_threshold``.  A metric
        that is undefined for the data (e.g. AUROC without a defective image,
        AUPRO without any anomalous pixel) is ``nan``.  The F1 thresholds are
        the score values maximising F1 (``score >= threshold`` is anomalous).

    Raises:
        ValueError: malformed input (shapes, NaN scores, non-binary labels).
    """
    nan = math.nan
    out = {
        "image_auroc": nan,
        "pixel_auroc": nan,
        "pixel_f1": nan,
        "image_f1": nan,
        "pixel_aupro": nan,
        "image_threshold": nan,
        "pixel_threshold": nan,
    }

    img_s = _scores_to_numpy(image_scores, "image_scores")
    img_y = _labels_to_numpy(image_labels, "image_labels")
    _check_same_size(img_s, img_y, "image_scores", "image_labels")
    img = _curve(img_s, img_y)
    if img.n_pos > 0 and img.n_neg > 0:
        out["image_auroc"] = _auroc_from_curve(img)
    if img.n_pos > 0:
        out["image_f1"], out["image_threshold"] = _f1_from_curve(img)

    scores, mask = _maps_and_masks(pixel_maps, pixel_masks, ("pixel_maps", "pixel_masks"))
    ids, n_regions = _region_ids(mask)
    # One sort serves all pixel metrics: the payload is the region id, which
    # is > 0 exactly on anomalous pixels, so it doubles as the pixel label.
    pix = _curve(scores, ids.reshape(-1), _inverse_areas(ids, n_regions))
    if pix.n_pos > 0 and pix.n_neg > 0:
        out["pixel_auroc"] = _auroc_from_curve(pix)
    if pix.n_pos > 0:
        out["pixel_f1"], out["pixel_threshold"] = _f1_from_curve(pix)
    out["pixel_aupro"] = _aupro_from_curve(pix, n_regions, 0.3)
    return out
