"""Tests for task.common.metrics against sklearn, torchmetrics and a slow AUPRO reference."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score
from torchmetrics.functional.classification import binary_auroc

import task.common.exact_curve as exact_curve
import task.common.metrics as metrics_module
from task.common.exact_curve import label_regions
from task.common.metrics import aupro, auroc, compute_metrics, f1_max

METRIC_KEYS = set(metrics_module.METRIC_KEYS)
AT_THRESHOLD = ("threshold", "fpr", "tpr", "precision", "f1")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _tied_scores(rng: np.random.Generator, n: int, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """Scores on a coarse grid (many ties), spanning negative and positive values."""
    return torch.tensor(rng.integers(0, levels, size=n) / (levels / 4.0) - 2.0).to(dtype)


def _sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


def _f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    pred = scores >= threshold
    tp = np.sum(pred & labels)
    return 2 * tp / (pred.sum() + labels.sum())


def _blob_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """[n, size, size] bool masks of irregular blobs; the last image stays normal."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 1):
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=2.0)
        masks[i] = noise > np.quantile(noise, 0.85)
    return masks


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Slow, direct AUPRO: one threshold at a time, numpy only.

    Regions: scipy.ndimage.label with a 3x3 structure (8-connectivity), as in
    the official MVTec AD evaluation.  Thresholds: every distinct score.
    """
    regions = []
    for i in range(masks.shape[0]):
        labeled, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labeled == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(pred[normal].mean())
        pros.append(np.mean([pred[i][region].mean() for i, region in regions]))
    fprs.append(1.0)
    pros.append(1.0)

    # Trapezoids segment by segment, the last one cut at fpr_limit by linear
    # interpolation.
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            if x0 < fpr_limit:
                y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += 0.5 * (y0 + y_cut) * (fpr_limit - x0)
            break
    return area / fpr_limit


# --------------------------------------------------------------------------
# auroc
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(dtype: torch.dtype, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    scores = _tied_scores(rng, n, levels=int(rng.integers(2, 40)), dtype=dtype)
    labels = torch.tensor(rng.random(n) < rng.uniform(0.05, 0.6))
    labels[0], labels[1] = True, False  # both classes present
    expected = roc_auc_score(labels.numpy(), scores.double().numpy())
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auroc_continuous_scores_and_shapes() -> None:
    rng = np.random.default_rng(11)
    scores = torch.rand(4, 16, 16)
    labels = torch.tensor(rng.random((4, 16, 16)) < 0.2).long()
    expected = roc_auc_score(labels.numpy().ravel(), scores.numpy().ravel())
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert auroc(scores.reshape(-1), labels.float().reshape(-1)) == pytest.approx(expected, abs=1e-12)


def test_auroc_special_values() -> None:
    # +-inf, and -0.0 / +0.0 must form one tie (they compare equal).
    scores = torch.tensor([-math.inf, -0.0, 0.0, 0.0, -0.0, 1.5, math.inf, math.inf, -3.0, 2.0])
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0, 0, 1])
    # sklearn rejects inf; huge finite stand-ins keep the same order.
    expected = roc_auc_score(labels.numpy(), scores.double().clamp(-1e30, 1e30).numpy())
    for dtype in (torch.float32, torch.float64):
        assert auroc(scores.to(dtype), labels) == pytest.approx(expected, abs=1e-12)


def test_auroc_extremes() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auroc(torch.ones(4), labels) == 0.5


@pytest.mark.parametrize("labels", [torch.zeros(5), torch.ones(5), torch.zeros(0)])
def test_auroc_one_class_raises(labels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="one class"):
        auroc(torch.rand(labels.numel()), labels)


def test_auroc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([0.1, math.nan]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="binary"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 255]))
    with pytest.raises(ValueError, match="must match"):
        auroc(torch.rand(3), torch.tensor([0, 1]))


# --------------------------------------------------------------------------
# f1_max
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_f1_max_matches_sklearn(dtype: torch.dtype, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(10, 3000))
    if seed % 2:
        scores = _tied_scores(rng, n, levels=int(rng.integers(2, 30)), dtype=dtype)
    else:
        scores = torch.tensor(rng.standard_normal(n)).to(dtype)
    labels = torch.tensor(rng.random(n) < rng.uniform(0.05, 0.6))
    labels[0] = True
    s, y = scores.double().numpy(), labels.numpy()

    f1, threshold = f1_max(scores, labels)
    assert f1 == pytest.approx(_sklearn_f1_max(s, y), abs=1e-12)
    # The threshold is a score value that actually achieves the maximum.
    assert threshold in set(s.tolist())
    assert _f1_at(s, y, threshold) == pytest.approx(f1, abs=1e-12)


def test_f1_max_threshold_simple() -> None:
    scores = torch.tensor([0.1, 0.3, 0.35, 0.8, 0.7, 0.2])
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    f1, threshold = f1_max(scores, labels)
    assert f1 == pytest.approx(1.0)
    assert threshold == pytest.approx(0.35)


def test_f1_max_tie_returns_lowest_threshold() -> None:
    # F1 = 2/3 both at 0.9 (TP 1, FP 0) and at 0.6 (TP 2, FP 2): the lower wins,
    # as argmax over an ascending threshold list (anomalib) picks it.
    f1, threshold = f1_max(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 0, 1]))
    assert f1 == pytest.approx(2 / 3) and threshold == pytest.approx(0.6)


def test_f1_max_all_positive_and_no_positive() -> None:
    f1, threshold = f1_max(torch.tensor([0.3, 0.1, 0.2]), torch.ones(3))
    assert f1 == 1.0 and threshold == pytest.approx(0.1)
    with pytest.raises(ValueError, match="positive"):
        f1_max(torch.rand(4), torch.zeros(4))


# --------------------------------------------------------------------------
# aupro
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(200 + seed)
    masks = _blob_masks(rng, n=4, size=32)
    # Informative but imperfect maps: anomalies score higher on average.
    maps = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
    if seed % 2:
        maps = np.round(maps * 20) / 20  # coarse grid: many tied scores
    expected = _reference_aupro(maps, masks, fpr_limit)
    got = aupro(torch.from_numpy(maps), torch.from_numpy(masks), fpr_limit=fpr_limit)
    assert got == pytest.approx(expected, abs=1e-6)


def test_aupro_float64_and_channel_axis() -> None:
    rng = np.random.default_rng(7)
    masks = _blob_masks(rng, n=3, size=24)
    maps = rng.random(masks.shape) + 0.3 * masks
    expected = _reference_aupro(maps, masks, 0.3)
    got = aupro(torch.from_numpy(maps)[:, None], torch.from_numpy(masks).long()[:, None])
    assert got == pytest.approx(expected, abs=1e-6)


def test_aupro_perfect_detector_is_one() -> None:
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, n=4, size=32)
    maps = torch.from_numpy(rng.random(masks.shape) * 0.5 + masks)  # anomalies all above normals
    assert aupro(maps, torch.from_numpy(masks)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(maps, torch.from_numpy(masks), fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)


def test_aupro_worst_detector_is_zero() -> None:
    rng = np.random.default_rng(4)
    masks = _blob_masks(rng, n=3, size=16)
    maps = torch.from_numpy(rng.random(masks.shape) * 0.5 + (~masks))  # anomalies all below normals
    assert aupro(maps, torch.from_numpy(masks)) == pytest.approx(0.0, abs=1e-12)


def test_aupro_without_regions_is_none() -> None:
    assert aupro(torch.rand(2, 8, 8), torch.zeros(2, 8, 8)) is None
    assert aupro(torch.rand(2, 8, 8), torch.ones(2, 8, 8)) is None  # no normal pixel


def test_aupro_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(torch.rand(1, 4, 4), torch.ones(1, 4, 4), fpr_limit=0.0)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        aupro(torch.rand(1, 4, 4), torch.ones(1, 4, 5))


def test_regions_use_8_connectivity() -> None:
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 2, 2] = True  # one diagonal region
    masks[0, 4, 4] = True  # a second region
    masks[1, 0, 5] = masks[1, 5, 0] = True  # two more in the next image
    (n0, ids0), (n1, ids1) = label_regions(masks[0]), label_regions(masks[1])
    assert (n0, n1) == (2, 2)
    assert ids0[0, 0] == ids0[1, 1] == ids0[2, 2] != ids0[4, 4]
    assert ids1[0, 5] != ids1[5, 0]
    for m, ids in ((masks[0], ids0), (masks[1], ids1)):
        assert (ids[~m] == 0).all() and (ids[m] > 0).all()
    assert label_regions(np.zeros((3, 3), dtype=bool))[0] == 0


# --------------------------------------------------------------------------
# compute_metrics
# --------------------------------------------------------------------------


def _dataset(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, n=6, size=32)
    masks[3] = False  # a second good image
    maps = torch.from_numpy((rng.random(masks.shape) + 0.5 * masks).astype(np.float32))
    labels = torch.from_numpy(masks.reshape(len(masks), -1).any(1)).long()
    image_scores = maps.flatten(1).amax(1)
    return image_scores, labels, maps, torch.from_numpy(masks)


def test_compute_metrics_keys_and_values() -> None:
    image_scores, labels, maps, masks = _dataset(5)
    out = compute_metrics(image_scores, labels, maps, masks, {"image": 0.9, "pixel": 0.8})
    assert set(out) == METRIC_KEYS
    assert all(type(v) is float and math.isfinite(v) for v in out.values())
    # the rates at the given thresholds, counted directly
    for level, s, y, t in (("image", image_scores, labels.bool(), 0.9), ("pixel", maps, masks.bool(), 0.8)):
        alarm = s >= t
        tp, fp = int((alarm & y).sum()), int((alarm & ~y).sum())
        assert out[f"{level}_threshold"] == t
        assert out[f"{level}_fpr"] == fp / int((~y).sum()) and out[f"{level}_tpr"] == tp / int(y.sum())
        assert out[f"{level}_precision"] == tp / (tp + fp)
        assert out[f"{level}_f1"] == pytest.approx(2 * tp / (2 * tp + fp + int(y.sum()) - tp), abs=1e-15)
        assert out[f"{level}_f1"] <= out[f"{level}_f1_max"] + 1e-12

    assert out["image_auroc"] == pytest.approx(auroc(image_scores, labels), abs=1e-12)
    assert out["pixel_auroc"] == pytest.approx(auroc(maps, masks), abs=1e-12)
    assert out["image_f1_max"] == pytest.approx(f1_max(image_scores, labels)[0])
    assert out["pixel_f1_max"] == pytest.approx(f1_max(maps, masks)[0])
    assert out["pixel_aupro"] == pytest.approx(aupro(maps, masks), abs=1e-12)
    assert out["pixel_aupro"] == pytest.approx(_reference_aupro(maps.numpy(), masks.numpy(), 0.3), abs=1e-6)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.numpy().ravel(), maps.numpy().ravel()), abs=1e-12)


def test_compute_metrics_all_good_is_none(caplog: pytest.LogCaptureFixture) -> None:
    maps = torch.rand(3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="anomaly.metrics"):
        out = compute_metrics(maps.flatten(1).amax(1), torch.zeros(3), maps, torch.zeros(3, 8, 8))
    assert set(out) == METRIC_KEYS
    assert all(v is None for v in out.values())
    # One line per reason: no defective image, all masks empty.
    messages = [r.getMessage() for r in caplog.records if r.name == "anomaly.metrics"]
    assert len(messages) == 2
    assert "no defective test image" in messages[0] and "masks are empty" in messages[1]


def test_compute_metrics_without_masks(caplog: pytest.LogCaptureFixture) -> None:
    image_scores, labels, maps, _ = _dataset(8)
    with caplog.at_level(logging.WARNING, logger="anomaly.metrics"):
        out = compute_metrics(image_scores, labels, maps, None)
    assert set(out) == METRIC_KEYS
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels.numpy(), image_scores.numpy()), abs=1e-12)
    assert all(
        out[k] is None for k in ("pixel_auroc", "pixel_f1_max", "pixel_aupro", "pixel_threshold", "image_threshold")
    )
    assert [r.getMessage() for r in caplog.records] == ["no ground-truth masks: pixel metrics are null"]


def test_compute_metrics_all_defective(caplog: pytest.LogCaptureFixture) -> None:
    # No good image: image AUROC undefined, image F1 defined; pixels still mixed.
    image_scores, _, maps, masks = _dataset(6)
    keep = masks.flatten(1).any(1)
    with caplog.at_level(logging.WARNING, logger="anomaly.metrics"):
        out = compute_metrics(image_scores[keep], torch.ones(int(keep.sum())), maps[keep], masks[keep])
    assert out["image_auroc"] is None
    assert out["image_f1_max"] == 1.0
    assert out["image_fpr"] is None and out["image_tpr"] is None  # no threshold given
    for key in ("pixel_auroc", "pixel_f1_max", "pixel_aupro"):
        assert type(out[key]) is float and math.isfinite(out[key])
    assert [r.getMessage() for r in caplog.records] == ["no good test image: image_auroc is null"]


def test_compute_metrics_fully_anomalous_pixels() -> None:
    # Every pixel anomalous: pixel AUROC and AUPRO undefined (no normal pixel).
    maps = torch.rand(2, 4, 4)
    out = compute_metrics(torch.rand(2), torch.tensor([0, 1]), maps, torch.ones(2, 4, 4))
    assert out["pixel_auroc"] is None and out["pixel_aupro"] is None
    assert out["pixel_f1_max"] == 1.0


# --------------------------------------------------------------------------
# Bounded-memory streaming: exact against full-sort references
# --------------------------------------------------------------------------


@pytest.mark.parametrize("coarse", [False, True])
def test_streaming_pixel_metrics_are_exact(monkeypatch: pytest.MonkeyPatch, coarse: bool) -> None:
    """Tiny chunks force many streamed chunks; every metric must equal a one-shot full-sort reference.

    The references sort all pixels at once (sklearn) or try every threshold (slow AUPRO; the continuous
    case is covered against it by test_aupro_matches_slow_reference), so agreement shows the
    positive-table decomposition loses nothing.  AUROC and F1 come from integer counts (one
    final rounding each: 1e-12 is generous); AUPRO sums 1/area in a different order than the reference
    (float64 rounding ~1e-15 per term, far below 1e-9).
    """
    rng = np.random.default_rng(42)
    masks = _blob_masks(rng, n=40, size=24)
    masks[::3] = False  # good images too
    maps = (rng.random(masks.shape) + 0.4 * masks).astype(np.float32)
    if coarse:
        maps = np.round(maps * 10) / 10  # ties within and across chunks, between normal and anomalous pixels
    maps_t, masks_t = torch.from_numpy(maps), torch.from_numpy(masks)
    labels = masks_t.flatten(1).any(1).long()
    thresholds = {"image": 1.05, "pixel": 0.85}  # off the coarse grid: no float32 vs float64 tie question
    one_chunk = compute_metrics(maps_t.flatten(1).amax(1), labels, maps_t, masks_t, thresholds)
    monkeypatch.setattr(exact_curve, "_CHUNK", 1000)  # 40 maps of 24x24 -> 40 chunks of one map
    out = compute_metrics(maps_t.flatten(1).amax(1), labels, maps_t, masks_t, thresholds)
    assert out == pytest.approx(one_chunk, abs=1e-12)

    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["pixel_f1_max"] == pytest.approx(_sklearn_f1_max(s, y), abs=1e-12)
    assert _f1_at(s, y, 0.85) == pytest.approx(out["pixel_f1"], abs=1e-12)
    if coarse:  # the slow reference tries every distinct score: affordable with 11 of them
        assert out["pixel_aupro"] == pytest.approx(_reference_aupro(maps, masks, 0.3), abs=1e-9)
    # Independent AUROC implementation (torchmetrics, float32 internally: its trapezoids on float
    # rates carry ~1e-7 relative rounding, hence 1e-6).
    assert out["pixel_auroc"] == pytest.approx(float(binary_auroc(maps_t.ravel(), masks_t.ravel().long())), abs=1e-6)


def test_auroc_matches_torchmetrics() -> None:
    rng = np.random.default_rng(9)
    scores = torch.from_numpy(rng.standard_normal(5000).astype(np.float32))
    labels = torch.from_numpy(rng.random(5000) < 0.3)
    scores[labels] += 0.5
    # torchmetrics computes in float32 (see above): agreement to 1e-6.
    assert auroc(scores, labels) == pytest.approx(float(binary_auroc(scores, labels.long())), abs=1e-6)


def test_memory_script_reports_json() -> None:
    """The peak-memory probe runs end to end on a small set (the 1,000 x 512 x 512 run is in the README)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "metrics_memory.py"), "--images", "6", "--size", "64"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 6 and result["size"] == 64
    assert result["peak_rss_mb"] >= result["baseline_rss_mb"] > 0
    assert 0.5 < result["metrics"]["pixel_auroc"] <= 1.0
