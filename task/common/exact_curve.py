"""The exact ROC / PRO curve of anomaly scores against binary labels, in memory bounded by the positives.

Every distinct score is a threshold and a prediction is positive when ``score >= threshold``; ``metrics.py`` reads
AUROC, F1-max and AUPRO off these curves.

How (the "positive table"): between two consecutive distinct *positive* scores the true-positive count and
the per-region overlap are constant, so the negatives there only move the false-positive count along a
horizontal segment of the ROC / PRO curve.  The curve is therefore fully described by

* the distinct positive scores ``v_1 > ... > v_D`` with their positive count and summed region weight, and
* for every negative, the gap between two ``v`` it falls in, or the ``v`` it ties with.

The positives (anomalous pixels, a few percent of a test set) are sorted once; the negatives are streamed in
chunks of about 4M scores, each sorted and located in the table with a binary search, and only counted.
Memory is ``O(#anomalous pixels + chunk)`` instead of ``O(#pixels)``: 1,000 maps of 512x512 (262M pixels)
need well under 1 GB besides the input maps (``scripts/metrics_memory.py`` measures it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

# --------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------

# Score dtypes that float32 represents exactly; everything else is compared in float64.
_FLOAT32_EXACT = {torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.int8, torch.int16}

# Negatives are located in the positive table this many at a time (16 maps of 512x512): large enough to
# amortise numpy's per-call cost, small enough that the chunk's temporaries stay around 100 MB.
_CHUNK = 1 << 22


def scores_to_numpy(scores: torch.Tensor, name: str) -> np.ndarray:
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


def labels_to_numpy(labels: torch.Tensor, name: str) -> np.ndarray:
    """Flatten binary ``labels`` (bool or numbers in {0, 1}, any shape) to a 1-D bool array."""
    t = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if t.dtype != torch.bool:
        # Reject e.g. 0/255 masks or soft labels instead of guessing a cut-off.
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be binary (bool or values in {{0, 1}})")
        t = t != 0
    return t.numpy()


def check_same_size(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.size != b.size:
        raise ValueError(f"{name_a} has {a.size} elements but {name_b} has {b.size}; they must match")


def check_maps_and_masks(
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
class Curve:
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
) -> Curve:
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
    return Curve(tps, fps, pro, thresholds, at_positive)


def label_curve(scores: np.ndarray, labels: np.ndarray) -> Curve:
    """Exact curve of flat ``scores`` [M] with bool ``labels`` [M]."""
    values, counts, _ = _positive_table(scores[labels], None)
    negatives = (scores[i : i + _CHUNK][~labels[i : i + _CHUNK]] for i in range(0, scores.size, _CHUNK))
    return _assemble(values, counts, None, *_negative_counts(values, negatives))


def label_regions(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of regions, [H, W] int32 labels 1..n, 0 = normal) of one bool mask, 8-connected."""
    if not mask.any():
        return 0, np.zeros(mask.shape, dtype=np.int32)
    # 8-connectivity, as scipy.ndimage.label with a 3x3 structure in the official MVTec AD evaluation.
    n_labels, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return n_labels - 1, lab  # n_labels counts the background


def image_chunks(n_images: int, pixels_per_image: int) -> Iterator[range]:
    """Consecutive image index ranges of about ``_CHUNK`` pixels (at least one image)."""
    step = max(1, _CHUNK // max(1, pixels_per_image))
    return (range(i, min(i + step, n_images)) for i in range(0, n_images, step))


def pixel_curve(maps: torch.Tensor, masks: torch.Tensor, names: tuple[str, str]) -> tuple[Curve, int]:
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
    for idx in image_chunks(n, h * w):
        chunk_scores = scores_to_numpy(maps[idx.start : idx.stop], names[0]).reshape(-1, h, w)
        chunk_masks = labels_to_numpy(masks[idx.start : idx.stop], names[1]).reshape(-1, h, w)
        for scores, mask in zip(chunk_scores, chunk_masks):
            count, lab = label_regions(mask)
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
        for idx in image_chunks(n, h * w):
            chunk_scores = scores_to_numpy(maps[idx.start : idx.stop], names[0])
            chunk_masks = labels_to_numpy(masks[idx.start : idx.stop], names[1])
            yield chunk_scores[~chunk_masks]

    gaps, ties = _negative_counts(values, negatives())
    return _assemble(values, counts, sums, gaps, ties), n_regions
