"""The numpy building blocks of the frame-scoring protocols: normalisation, robust and causal smoothing, fusion and
the scalar Kalman filter. Pure functions over per-video arrays [n_v]."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from task.anomaly.unsupervised.scoring.settings import WindowParams
from task.common.errors import UserError, short_text


def normalize(
    videos: Sequence[np.ndarray], scope: str, eps: float, polarity: str, name: str = "score"
) -> list[np.ndarray]:
    """Min-max normalise oriented scores (higher = more anomalous) as the official code does.

    Args:
        videos: V arrays [n_v].
        scope: ``per_video`` (min/max of each whole video: uses future frames; computed in float64 like the
            official Python-float code), ``global`` (of all videos; float32 input stays float32, as the official
            Avenue arrays) or ``none`` (values unchanged).
        eps: added to ``max - min``.
        polarity: ``anomaly`` returns ``(x - min) / (max - min + eps)``; ``normality`` returns one minus that
            (official ``anomaly_score_inv``); with ``none``, ``x`` or ``-x``.
        name: score name for error messages.

    Returns:
        V arrays [n_v].
    """
    if scope == "none":
        return [v if polarity == "anomaly" else -v for v in videos]
    if scope == "global":
        everything = np.concatenate(list(videos))
        if everything.size == 0:
            return list(videos)
        bounds = [(everything.min(), everything.max())] * len(videos)
    else:
        # The official per-video code turns every score into a Python float first: float64 maths.
        videos = [np.asarray(v, dtype=np.float64) for v in videos]
        bounds = [(v.min(), v.max()) if v.size else (0.0, 0.0) for v in videos]
    out = []
    for v, (low, high) in zip(videos, bounds):
        if v.size == 0:
            out.append(v)
            continue
        denom = high - low + eps
        if denom == 0:
            span = scope.replace("_", " ")
            raise UserError(
                f"score '{short_text(name)}' is constant ({float(low)!r}) over a {span} span, so min-max "
                "normalisation divides by 0; set SCORE.norm_eps > 0"
            )
        scaled = (v - low) / denom
        out.append(scaled if polarity == "anomaly" else 1.0 - scaled)
    return out


def _robust_rows(windows: np.ndarray, keep: int, weights: np.ndarray) -> np.ndarray:
    """Robust weighted mean of each row: the ``keep`` entries closest to the row mean, weighted by position.

    Args:
        windows: [M, S] float, C-contiguous (row reductions then match the official 1-D reductions bit for bit).
        keep: entries kept per row, 1 <= keep <= S.
        weights: [S] float64 position weights, all > 0.

    Returns:
        [M] float64.
    """
    mean = windows.mean(axis=1, keepdims=True)
    nearest = np.argsort(np.abs(windows - mean), axis=1)[:, :keep]
    mask = np.zeros(windows.shape, dtype=windows.dtype)  # official: zeros_like(dif), so weight * mask is float64
    np.put_along_axis(mask, nearest, 1, axis=1)
    w = weights * mask
    return (windows * w).sum(axis=1) / w.sum(axis=1)


def robust_smooth(x: np.ndarray, window: WindowParams) -> np.ndarray:
    """One centred robust smoothing pass over a single sequence (official ``conf_avg``).

    Args:
        x: [N] float (its dtype is kept for the window mean, as in the official code).
        window: the pass; ``enabled`` and ``scope`` are ignored here.

    Returns:
        [N] float64. Window ``i`` (frames ``i .. i + size - 1``) writes position ``i + size // 2 + shift``;
        positions before the first / after the last written one take ``fill`` or the nearest written value
        (``edge_left`` / ``edge_right``). With ``N < size`` no window fits: the result is all ``fill`` when an
        edge is ``fill``, else ``x`` unchanged.
    """
    x = np.asarray(x)
    n, size = x.shape[0], window.size
    if n < size:
        if "fill" in (window.edge_left, window.edge_right):
            return np.full(n, window.fill, dtype=np.float64)
        return x.astype(np.float64)
    weights = np.ones(size) if window.weights is None else np.asarray(window.weights, dtype=np.float64)
    values = _robust_rows(np.ascontiguousarray(sliding_window_view(x, size)), window.keep, weights)
    out = np.empty(n, dtype=np.float64)
    first = size // 2 + window.shift
    last = first + values.size  # one past the last written position
    out[first:last] = values
    out[:first] = window.fill if window.edge_left == "fill" else values[0]
    out[last:] = window.fill if window.edge_right == "fill" else values[-1]
    return out


def smooth_sequences(videos: Sequence[np.ndarray], window: WindowParams) -> list[np.ndarray]:
    """Apply ``window`` to V arrays [n_v]: each alone (``scope=video``) or concatenated in order (``concat``,
    official: windows cross video boundaries). Disabled windows return the arrays unchanged."""
    if not window.enabled:
        return list(videos)
    if window.scope == "video":
        return [robust_smooth(v, window) for v in videos]
    lengths = [v.shape[0] for v in videos]
    smoothed = robust_smooth(np.concatenate(list(videos)), window)
    return np.split(smoothed, np.cumsum(lengths)[:-1])


def fuse(
    per_name: Mapping[str, Sequence[np.ndarray]], names: Sequence[str], weights: Sequence[float]
) -> list[np.ndarray]:
    """Weighted sum per video, added in ``names`` order (float addition order as in the official code).

    Args:
        per_name: name -> V arrays [n_v].

    Returns:
        V arrays [n_v]: ``((s0 * w0 + s1 * w1) + s2 * w2) ...``.
    """
    n_videos = len(per_name[names[0]])
    fused = []
    for v in range(n_videos):
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, in one line
            total = np.asarray(per_name[names[0]][v]) * weights[0]
            for name, weight in zip(names[1:], weights[1:]):
                total = total + np.asarray(per_name[name][v]) * weight
        if not np.all(np.isfinite(total)):  # e.g. huge weights on unnormalised scores
            raise UserError(
                "the fused score overflows to inf; scale SCORE.weights down (only their ratios matter) "
                "or normalise the scores (SCORE.normalize)"
            )
        fused.append(total)
    return fused


def kalman_filter(z: np.ndarray, process_var: float, measurement_std: float) -> np.ndarray:
    """Official scalar Kalman filter (``utils.filter``): causal, one video at a time.

    Starts from estimate 0 with variance 1 and updates from frame 1 on; the output's frame 0 is the raw
    ``z[0]`` (the recursion itself started from 0, as in the official code).

    Args:
        z: [n] measurements.

    Returns:
        [n] float64 filtered values.
    """
    values = np.asarray(z, dtype=np.float64).tolist()
    out = np.empty(len(values), dtype=np.float64)
    if not values:
        return out
    r = measurement_std**2  # official: R = R ** 2
    estimate, variance = 0.0, 1.0
    for k in range(1, len(values)):
        predicted_var = variance + process_var
        gain = predicted_var / (predicted_var + r)
        estimate = estimate + gain * (values[k] - estimate)
        variance = (1 - gain) * predicted_var
        out[k] = estimate
    out[0] = values[0]
    return out


def causal_smooth(x: np.ndarray, window: int, keep: int) -> np.ndarray:
    """Trailing robust mean: frame ``t`` averages the ``keep`` values closest to the mean of frames
    ``max(0, t - window + 1) .. t`` (all of them while fewer than ``keep`` exist). Never looks ahead.

    Args:
        x: [n] float.

    Returns:
        [n] float64.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    out = np.empty(n, dtype=np.float64)
    for t in range(min(window - 1, n)):  # the first frames of a video have a shorter past
        out[t] = _robust_rows(x[None, : t + 1], min(keep, t + 1), np.ones(t + 1))[0]
    if n >= window:
        out[window - 1 :] = _robust_rows(np.ascontiguousarray(sliding_window_view(x, window)), keep, np.ones(window))
    return out


# The running scale needs this many past frames of a video; before that the calibration's spread / 4 (about one
# standard deviation of normal frames) stands in. The scale never falls below 5 % of the calibration spread, so a
# video that happens to be nearly constant does not turn noise into alarms.
MIN_SCALE_FRAMES = 8
SCALE_FLOOR = 0.05


def robust_level(past: np.ndarray, spread: float) -> tuple[float, float]:
    """(median, scale) of the non-empty ``past`` [k]: scale = 1.4826 x MAD when ``k >= MIN_SCALE_FRAMES``, else
    ``spread / 4``; never below ``SCALE_FLOOR * spread`` (the online protocol's per-video standardisation)."""
    location = float(np.median(past))
    mad = 1.4826 * float(np.median(np.abs(past - location))) if past.size >= MIN_SCALE_FRAMES else spread / 4
    return location, max(mad, SCALE_FLOOR * spread)
