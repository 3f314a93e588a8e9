"""Frame-level scoring for video anomaly detection: the official DMAD-PDM protocol and an online protocol.

DMAD-PDM gives every scored frame raw scores (``deformation``, ``prediction``, ``gradient``; higher = more
anomalous). Two protocols turn them into one anomaly score per frame and into frame AUROC / AUPR:

**Paper protocol** (``paper_protocol``): the official evaluation's maths, step by step and bit for bit:

1. orient each score (``SCORE.signs``: +1 higher = more anomalous, -1 higher = more normal);
2. min-max normalise it with ``SCORE.normalize``: ``per_video`` (min and max over each whole test video, i.e.
   over frames that lie in the future), ``global`` (over the whole test set) or ``none``; with
   ``SCORE.polarity = normality`` the official code works on ``1 - normalised`` ("higher = more normal");
3. ``PRE_SMOOTH`` (optional, per score), then ``SMOOTH`` (per score): a centred robust weighted window;
4. fuse: ``sum_k weights[k] * score_k`` in ``SCORE.names`` order;
5. ``POST_SMOOTH`` (optional) of the fused score, then ``KALMAN`` (optional, per video);
6. AUROC (``sklearn.metrics.roc_auc_score``, as the official code) over all scored frames.

The robust window (official ``conf_avg``): for each full window of ``size`` frames, the ``keep`` values closest
to the window mean are averaged with the window's position weights; the result lands at index
``start + size // 2 + shift``; positions no full window reaches take the nearest window result (``replicate``)
or a constant (``fill``). With ``scope = concat`` the window runs over all test videos concatenated in order,
as the official code does, so it crosses video boundaries. Normalisation over whole videos and centred windows
use future frames: the paper protocol is an offline benchmark, not something a camera can run.

Official settings (``PAPER_PRESETS``; Evaluate_ped2.py, process_avenue.py, Evaluate_shanghai.py + utils.py):

=================  ===========================  ============================  =================================
step               ped2                         avenue                        shanghaitech
=================  ===========================  ============================  =================================
normalise          per video, eps 1e-8, 1 - x   global, eps 0                 per video, eps 1e-8, 1 - x
PRE_SMOOTH         -                            -                             per video, 69, keep 25, uniform,
                                                                              shift 1, fill 1 both edges
SMOOTH             concat, 11, keep 5, weights  concat, 11, keep 5, weights   concat, 55, keep 49, uniform,
                   1,1,1,1,1.2,1.6,1.2,1,1,1,1  .5,.8,.8,1,1,2.5,1,1,.8,.8,.5  shift 1, fill 1 both edges
                   edges: fill 1 / replicate    edges: replicate / replicate
fusion             .2 def + .4 pred + .6 grad   .2 def + .4 pred              .2 def + .4 pred + .6 grad
POST_SMOOTH        -                            = SMOOTH                      concat, 55, keep 27, uniform,
                                                                              shift 1, fill 1 both edges
KALMAN             -                            -                             per video, q 1e-5, r 0.01**2
=================  ===========================  ============================  =================================

Every dataset drops the first 4 frames of each video (``clip_length = 4`` input frames predict frame 4). The
official Avenue number is computed on two post-processed scores (``process_avenue.py``: static-object removal on
the prediction-error map -> ``prediction``, and on the deformation offsets -> ``deformation``), not on the raw
model scores.

**Online protocol** (``online_protocol``): what a deployed camera can do. Each score is normalised with
statistics of TRAINING frames only (``fit_train_stats``: robust low/high quantiles), smoothed causally (each
frame's value depends only on itself and earlier frames of its video: a trailing robust window of
``ONLINE.window`` frames, ``ONLINE.keep`` kept), fused with the same weights, smoothed causally again when the
paper protocol smooths the fused score, and Kalman-filtered (causal) when the paper protocol does.
``fit_threshold`` picks an alarm threshold as a high quantile of the fused online scores of training frames.

Arrays: ``scores`` maps a score name to a list of V per-video arrays ``[n_v]`` (the scored frames only), and
``labels`` is a list of V arrays ``[n_v]`` in {0, 1} aligned with them (see ``score_file`` for the file layout,
where labels cover whole videos and ``frames`` gives the alignment).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.metrics import average_precision_score, roc_auc_score

from task.anomaly.unsupervised.scoring.score_file import ScoreFile, from_arrays, read_scores
from task.common.config import F, Field, Schema
from task.common.errors import UserError, short_repr, short_text

log = logging.getLogger("anomaly")

__all__ = [
    "PAPER_PRESETS",
    "SCORE_SCHEMA",
    "KalmanParams",
    "OnlineParams",
    "ProtocolParams",
    "WindowParams",
    "causal_smooth",
    "evaluate_scores",
    "fit_threshold",
    "fit_train_stats",
    "fuse",
    "kalman_filter",
    "normalize",
    "online_frame_scores",
    "online_protocol",
    "paper_frame_scores",
    "paper_protocol",
    "robust_smooth",
    "smooth_sequences",
]

ScoreDict = Mapping[str, Sequence[np.ndarray]]

# --------------------------------------------------------------------------
# Presets and schema
# --------------------------------------------------------------------------

_NAMES = ["deformation", "prediction", "gradient"]
_OFF = {"enabled": False, "size": 1, "keep": 1, "weights": None, "scope": "video", "shift": 0,
        "edge_left": "replicate", "edge_right": "replicate", "fill": 0.0}


def _avenue_window() -> dict[str, Any]:
    # A fresh dict and list per use: shared objects would make yaml.safe_dump write &anchors, which configs refuse.
    return {"enabled": True, "size": 11, "keep": 5, "weights": [0.5, 0.8, 0.8, 1.0, 1.0, 2.5, 1.0, 1.0, 0.8, 0.8, 0.5],
            "scope": "concat", "shift": 0, "edge_left": "replicate", "edge_right": "replicate", "fill": 0.0}


# utils.conf_avg: output at start + (size + 1) // 2 (one past the centre), every other position stays 1.
_SHANGHAI_WINDOW = {"enabled": True, "scope": "concat", "weights": None, "shift": 1, "edge_left": "fill", "edge_right": "fill", "fill": 1.0}

PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "ped2": {
        "names": list(_NAMES), "weights": [0.2, 0.4, 0.6], "signs": [1, 1, 1],
        "normalize": "per_video", "norm_eps": 1e-8, "polarity": "normality",
        "PRE_SMOOTH": dict(_OFF),
        "SMOOTH": {"enabled": True, "size": 11, "keep": 5, "weights": [1.0, 1.0, 1.0, 1.0, 1.2, 1.6, 1.2, 1.0, 1.0, 1.0, 1.0],
                   "scope": "concat", "shift": 0, "edge_left": "fill", "edge_right": "replicate", "fill": 1.0},
        "POST_SMOOTH": dict(_OFF),
        "KALMAN": {"enabled": False, "process_var": 1e-5, "measurement_std": 0.01},
        "ONLINE": {"window": 6, "keep": 3, "threshold_quantile": 0.99},
    },
    "avenue": {
        "names": ["deformation", "prediction"], "weights": [0.2, 0.4], "signs": [1, 1],
        "normalize": "global", "norm_eps": 0.0, "polarity": "anomaly",
        "PRE_SMOOTH": dict(_OFF),
        "SMOOTH": _avenue_window(),
        "POST_SMOOTH": _avenue_window(),
        "KALMAN": {"enabled": False, "process_var": 1e-5, "measurement_std": 0.01},
        "ONLINE": {"window": 6, "keep": 3, "threshold_quantile": 0.99},
    },
    "shanghaitech": {
        "names": list(_NAMES), "weights": [0.2, 0.4, 0.6], "signs": [1, 1, 1],
        "normalize": "per_video", "norm_eps": 1e-8, "polarity": "normality",
        "PRE_SMOOTH": {**_SHANGHAI_WINDOW, "size": 69, "keep": 25, "scope": "video"},  # keep = round(69 * 0.36)
        "SMOOTH": {**_SHANGHAI_WINDOW, "size": 55, "keep": 49},  # keep = int(55 * 0.9)
        "POST_SMOOTH": {**_SHANGHAI_WINDOW, "size": 55, "keep": 27},  # keep = 55 // 2
        "KALMAN": {"enabled": True, "process_var": 1e-5, "measurement_std": 0.01},
        "ONLINE": {"window": 28, "keep": 14, "threshold_quantile": 0.99},
    },
}


def _window_schema(d: Mapping[str, Any]) -> Schema:
    return {
        "enabled": F(bool, d["enabled"], help="apply this smoothing pass"),
        "size": F(int, d["size"], min=1, help="window length in frames"),
        "keep": F(int, d["keep"], min=1, help="how many values closest to the window mean are averaged (<= size)"),
        "weights": F(list, d["weights"], nullable=True, item_type=float, min=0, min_exclusive=True,
                     help="position weights inside the window (size values); null: uniform"),
        "scope": F(str, d["scope"], choices=("concat", "video"),
                   help="concat: one sequence over all test videos in order (official); video: each video alone"),
        "shift": F(int, d["shift"], min=0, help="each window's result lands at its start + size // 2 + shift"),
        "edge_left": F(str, d["edge_left"], choices=("replicate", "fill"), help="positions before the first result"),
        "edge_right": F(str, d["edge_right"], choices=("replicate", "fill"), help="positions after the last result"),
        "fill": F(float, d["fill"], help="value of 'fill' edges, in the processing polarity (1 = most normal for normality)"),
    }


def _score_schema(d: Mapping[str, Any]) -> Schema:
    return {
        "names": F(list, d["names"], item_type=str, help="score names fused, in summation order"),
        "weights": F(list, d["weights"], item_type=float, min=0, help="fusion weight per name"),
        "signs": F(list, d["signs"], item_type=int, min=-1, max=1, help="per name: 1 higher = more anomalous, -1 higher = more normal"),
        "normalize": F(str, d["normalize"], choices=("per_video", "global", "none"), help="min-max scope of the paper protocol"),
        "norm_eps": F(float, d["norm_eps"], min=0, help="added to max - min (official: 1e-8 per video, 0 global)"),
        "polarity": F(str, d["polarity"], choices=("anomaly", "normality"),
                      help="normality: smooth and fuse 1 - normalised scores, as the official Ped2/ShanghaiTech code"),
        "PRE_SMOOTH": _window_schema(d["PRE_SMOOTH"]),
        "SMOOTH": _window_schema(d["SMOOTH"]),
        "POST_SMOOTH": _window_schema(d["POST_SMOOTH"]),
        "KALMAN": {
            "enabled": F(bool, d["KALMAN"]["enabled"], help="scalar Kalman filter of the final score, per video"),
            "process_var": F(float, d["KALMAN"]["process_var"], min=0, help="Q"),
            "measurement_std": F(float, d["KALMAN"]["measurement_std"], min=0, min_exclusive=True, help="sqrt(R)"),
        },
        "ONLINE": {
            "window": F(int, d["ONLINE"]["window"], min=1, help="causal window: the frame and window - 1 earlier frames"),
            "keep": F(int, d["ONLINE"]["keep"], min=1, help="values closest to the causal window's mean that are averaged"),
            "threshold_quantile": F(float, d["ONLINE"]["threshold_quantile"], min=0, max=1,
                                    help="alarm threshold = this quantile of fused online training scores"),
        },
    }


# The YAML section ``SCORE:``; defaults are the Ped2 preset.
SCORE_SCHEMA: Schema = _score_schema(PAPER_PRESETS["ped2"])


def _checked(schema: Schema, data: Any, prefix: str) -> dict[str, Any]:
    """Defaults of ``schema`` overlaid with ``data``, every key and value checked (``UserError`` on the first problem)."""
    if not isinstance(data, Mapping):
        raise UserError(f"config section {prefix} must be a mapping, got {short_repr(data)}")
    unknown = sorted(set(map(str, data)) - set(schema))
    if unknown:
        raise UserError(f"unknown config key {prefix}.{short_text(unknown[0])}; valid keys here: {', '.join(schema)}")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        if isinstance(spec, dict):
            out[key] = _checked(spec, data.get(key, {}), f"{prefix}.{key}")
        else:
            assert isinstance(spec, Field)
            out[key] = spec.check(f"{prefix}.{key}", data[key]) if key in data else spec.default
    return out


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowParams:
    """One robust smoothing pass (see the module docstring)."""

    enabled: bool
    size: int
    keep: int
    weights: tuple[float, ...] | None
    scope: str
    shift: int
    edge_left: str
    edge_right: str
    fill: float


@dataclass(frozen=True)
class KalmanParams:
    """Scalar Kalman filter: process variance ``q``, measurement variance ``measurement_std ** 2``."""

    enabled: bool
    process_var: float
    measurement_std: float


@dataclass(frozen=True)
class OnlineParams:
    """Causal smoothing window and the threshold quantile of the online protocol."""

    window: int
    keep: int
    threshold_quantile: float


@dataclass(frozen=True)
class ProtocolParams:
    """Everything that differs between datasets: the validated ``SCORE:`` section."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    signs: tuple[int, ...]
    normalize: str
    norm_eps: float
    polarity: str
    pre_smooth: WindowParams
    smooth: WindowParams
    post_smooth: WindowParams
    kalman: KalmanParams
    online: OnlineParams

    @classmethod
    def from_config(cls, section: Any) -> ProtocolParams:
        """From ``cfg.SCORE`` (a ``Config``) or a plain mapping such as ``PAPER_PRESETS["avenue"]``; missing keys
        take the schema defaults (the Ped2 preset). Raises ``UserError`` naming the first bad key."""
        data = section.to_dict() if hasattr(section, "to_dict") else section
        d = _checked(SCORE_SCHEMA, data, "SCORE")
        n = len(d["names"])
        if n == 0:
            raise UserError("config key SCORE.names must list at least one score name, e.g. [deformation, prediction, gradient]")
        if len(set(d["names"])) != n:
            raise UserError(f"config key SCORE.names repeats a name: {short_repr(d['names'])}")
        for key in ("weights", "signs"):
            if len(d[key]) != n:
                raise UserError(f"config key SCORE.{key} has {len(d[key])} values for {n} SCORE.names; give one per name")
        if any(s == 0 for s in d["signs"]):
            raise UserError(f"config key SCORE.signs must hold 1 or -1 per name, got {short_repr(d['signs'])}")
        windows = {}
        for key in ("PRE_SMOOTH", "SMOOTH", "POST_SMOOTH"):
            w = d[key]
            if w["enabled"]:
                if w["keep"] > w["size"]:
                    raise UserError(f"config key SCORE.{key}.keep ({w['keep']}) must be <= SCORE.{key}.size ({w['size']})")
                if w["weights"] is not None and len(w["weights"]) != w["size"]:
                    raise UserError(f"config key SCORE.{key}.weights has {len(w['weights'])} values; give SCORE.{key}.size = {w['size']} or null")
                limit = w["size"] - 1 - w["size"] // 2  # the last result must stay inside the sequence
                if w["shift"] > limit:
                    raise UserError(f"config key SCORE.{key}.shift ({w['shift']}) moves results past the window; use <= {limit}")
            windows[key] = WindowParams(**{**w, "weights": None if w["weights"] is None else tuple(w["weights"])})
        if d["ONLINE"]["keep"] > d["ONLINE"]["window"]:
            raise UserError(f"config key SCORE.ONLINE.keep ({d['ONLINE']['keep']}) must be <= SCORE.ONLINE.window ({d['ONLINE']['window']})")
        return cls(
            names=tuple(d["names"]), weights=tuple(d["weights"]), signs=tuple(d["signs"]),
            normalize=d["normalize"], norm_eps=d["norm_eps"], polarity=d["polarity"],
            pre_smooth=windows["PRE_SMOOTH"], smooth=windows["SMOOTH"], post_smooth=windows["POST_SMOOTH"],
            kalman=KalmanParams(**d["KALMAN"]), online=OnlineParams(**d["ONLINE"]),
        )

    def to_config(self) -> dict[str, Any]:
        """The ``SCORE:`` section as plain YAML-ready data (``from_config(p.to_config()) == p``)."""

        def window(w: WindowParams) -> dict[str, Any]:
            return {**w.__dict__, "weights": None if w.weights is None else list(w.weights)}

        return {
            "names": list(self.names), "weights": list(self.weights), "signs": list(self.signs),
            "normalize": self.normalize, "norm_eps": self.norm_eps, "polarity": self.polarity,
            "PRE_SMOOTH": window(self.pre_smooth), "SMOOTH": window(self.smooth), "POST_SMOOTH": window(self.post_smooth),
            "KALMAN": dict(self.kalman.__dict__), "ONLINE": dict(self.online.__dict__),
        }


# --------------------------------------------------------------------------
# Building blocks (pure numpy)
# --------------------------------------------------------------------------


def normalize(videos: Sequence[np.ndarray], scope: str, eps: float, polarity: str, name: str = "score") -> list[np.ndarray]:
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
            raise UserError(f"score '{short_text(name)}' is constant ({float(low)!r}) over a {span} span, so min-max "
                            "normalisation divides by 0; set SCORE.norm_eps > 0")
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


def fuse(per_name: Mapping[str, Sequence[np.ndarray]], names: Sequence[str], weights: Sequence[float]) -> list[np.ndarray]:
    """Weighted sum per video, added in ``names`` order (float addition order as in the official code).

    Args:
        per_name: name -> V arrays [n_v].

    Returns:
        V arrays [n_v]: ``((s0 * w0 + s1 * w1) + s2 * w2) ...``.
    """
    n_videos = len(per_name[names[0]])
    fused = []
    for v in range(n_videos):
        total = np.asarray(per_name[names[0]][v]) * weights[0]
        for name, weight in zip(names[1:], weights[1:]):
            total = total + np.asarray(per_name[name][v]) * weight
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


# --------------------------------------------------------------------------
# Checks and metrics
# --------------------------------------------------------------------------


def _check_inputs(scores: ScoreDict, labels: Sequence[np.ndarray] | None, names: Sequence[str]) -> None:
    """``UserError`` naming the first missing score, length mismatch, non-finite value or non-binary label."""
    n_videos = len(labels) if labels is not None else len(scores[names[0]]) if names[0] in scores else 0
    for name in names:
        if name not in scores:
            raise UserError(f"no score '{short_text(name)}' (have: {', '.join(map(str, scores)) or 'none'}); set SCORE.names to the stored scores")
        if len(scores[name]) != n_videos:
            raise UserError(f"score '{short_text(name)}' has {len(scores[name])} videos but labels have {n_videos}; give one array per video")
        for v, values in enumerate(scores[name]):
            values = np.asarray(values)
            if labels is not None and values.shape != np.shape(labels[v]):
                raise UserError(f"score '{short_text(name)}' of video {v} has shape {values.shape} but its labels "
                                f"{np.shape(labels[v])}; align labels with scored frames")
            if not np.all(np.isfinite(values)):
                raise UserError(f"score '{short_text(name)}' of video {v} has non-finite values (NaN or inf); fix the scoring run")
    for v, lab in enumerate(labels or []):
        if np.any((np.asarray(lab) != 0) & (np.asarray(lab) != 1)):
            raise UserError(f"labels of video {v} must be 0 (normal) or 1 (abnormal) on every scored frame")


def _video_names(videos: Sequence[str] | None, n: int) -> list[str]:
    return list(videos) if videos is not None else [f"video_{v:03d}" for v in range(n)]


def _metrics(ranking: Sequence[np.ndarray], labels: Sequence[np.ndarray], higher_is_normal: bool, videos: list[str], suffix: str) -> dict[str, Any]:
    """Frame AUROC / AUPR (anomaly = positive class) over all frames, and AUROC per video.

    ``higher_is_normal`` reproduces the official call ``roc_auc_score(1 - labels, normality)`` exactly.
    """
    y = np.concatenate([np.asarray(lab, dtype=np.int64) for lab in labels])
    s = np.concatenate(list(ranking))
    n_abnormal = int(y.sum())
    if n_abnormal == 0 or n_abnormal == y.size:
        kind = "abnormal" if n_abnormal == 0 else "normal"
        raise UserError(f"no {kind} frame among the {y.size} scored frames; frame AUROC needs both classes")

    def auc(yy: np.ndarray, ss: np.ndarray) -> float:
        return float(roc_auc_score(1 - yy, ss) if higher_is_normal else roc_auc_score(yy, ss))

    per_video: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    for name, yy, ss in zip(videos, labels, ranking):
        yy = np.asarray(yy, dtype=np.int64)
        k = int(yy.sum())
        if 0 < k < yy.size:
            per_video[name] = auc(yy, ss)
        else:
            per_video[name] = None
            notes[name] = "no scored frames" if yy.size == 0 else f"all {yy.size} scored frames are {'abnormal' if k else 'normal'}"
    return {
        f"frame_auroc{suffix}": auc(y, s),
        # Negation reverses the order exactly, so AP ranks frames as the AUROC does.
        f"frame_aupr{suffix}": float(average_precision_score(y, -s if higher_is_normal else s)),
        f"per_video_auroc{suffix}": per_video,
        f"per_video_note{suffix}": notes,
    }


# --------------------------------------------------------------------------
# Paper protocol
# --------------------------------------------------------------------------


def _paper_fused(scores: ScoreDict, params: ProtocolParams) -> list[np.ndarray]:
    """Fused paper-protocol values per video, in the processing polarity (higher = more normal for
    ``polarity=normality``)."""
    per_name: dict[str, list[np.ndarray]] = {}
    for name, sign in zip(params.names, params.signs):
        oriented = [np.asarray(v) if sign > 0 else -np.asarray(v) for v in scores[name]]
        values = normalize(oriented, params.normalize, params.norm_eps, params.polarity, name)
        values = smooth_sequences(values, params.pre_smooth)
        per_name[name] = smooth_sequences(values, params.smooth)
    fused = smooth_sequences(fuse(per_name, params.names, params.weights), params.post_smooth)
    if params.kalman.enabled:
        fused = [kalman_filter(f, params.kalman.process_var, params.kalman.measurement_std) for f in fused]
    return [np.asarray(f, dtype=np.float64) for f in fused]


def paper_frame_scores(scores: ScoreDict, params: ProtocolParams) -> list[np.ndarray]:
    """Paper-protocol anomaly score per scored frame (higher = more anomalous).

    Uses whole-video statistics (min-max over each video, including its future frames) and centred windows
    that cross video boundaries when ``scope=concat``: offline only.

    Args:
        scores: name -> V arrays [n_v] of raw scores.

    Returns:
        V arrays [n_v] float64; ``1 - fused`` when ``polarity=normality`` (rank-equivalent up to float rounding;
        ``paper_protocol`` ranks the fused values themselves, as the official code).
    """
    _check_inputs(scores, None, params.names)
    fused = _paper_fused(scores, params)
    return fused if params.polarity == "anomaly" else [1.0 - f for f in fused]


def paper_protocol(scores: ScoreDict, labels: Sequence[np.ndarray], params: ProtocolParams, videos: Sequence[str] | None = None) -> dict[str, Any]:
    """The official evaluation, exactly: normalise, smooth, fuse, smooth, filter, then AUROC.

    Uses whole-video statistics (per-video min-max over all of a video's frames, future ones included) and
    centred windows over the concatenated test set: an offline benchmark number, as in the paper.

    Args:
        scores: name -> V arrays [n_v] of raw scores of the scored frames.
        labels: V arrays [n_v] in {0, 1} (1 = abnormal), aligned with the scores.
        params: the dataset's ``SCORE`` settings.
        videos: V names for the per-video results (default ``video_000`` ...).

    Returns:
        ``frame_auroc``, ``frame_aupr`` (anomaly as positive class), ``per_video_auroc`` (name -> AUROC, or None
        where the video lacks a class) and ``per_video_note`` (name -> why it is None), values in [0, 1].
    """
    _check_inputs(scores, labels, params.names)
    fused = _paper_fused(scores, params)
    return _metrics(fused, labels, params.polarity == "normality", _video_names(videos, len(labels)), "")


# --------------------------------------------------------------------------
# Online protocol
# --------------------------------------------------------------------------


def fit_train_stats(train_scores: ScoreDict, quantiles: tuple[float, float] = (0.01, 0.99)) -> dict[str, dict[str, float]]:
    """Statistics of the raw scores of TRAINING frames, per score name (all videos pooled).

    Args:
        train_scores: name -> lists of [n_v] raw scores of training videos.
        quantiles: the robust ``low`` / ``high`` bounds used by the online normalisation.

    Returns:
        name -> ``{"low", "high", "mean", "std", "count"}`` (plain floats / int, JSON-ready); ``high > low`` always.
    """
    stats = {}
    for name, videos in train_scores.items():
        x = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in videos]) if len(videos) else np.empty(0)
        if x.size == 0:
            raise UserError(f"no training frames for score '{short_text(name)}'; online statistics need training scores")
        if not np.all(np.isfinite(x)):
            raise UserError(f"training score '{short_text(name)}' has non-finite values (NaN or inf); fix the scoring run")
        low, high = (float(q) for q in np.quantile(x, quantiles))
        if not high > low:
            # A score that does not vary on normal frames (e.g. a deformation field still at zero after a short run):
            # any change at test time is informative, so keep it with a minimal range rather than stop the run.
            high = low + max(float(x.std()), 1e-6 * max(1.0, abs(low)))
            log.warning("training score '%s' is constant between its %s quantiles; it is normalised with a minimal range", short_text(name), quantiles)
        stats[name] = {"low": float(low), "high": float(high), "mean": float(x.mean()), "std": float(x.std()), "count": int(x.size)}
    return stats


def _online_fused(scores: ScoreDict, train_stats: Mapping[str, Mapping[str, float]], params: ProtocolParams) -> list[np.ndarray]:
    for name in params.names:
        if name not in train_stats:
            raise UserError(f"train_stats has no entry for score '{short_text(name)}'; refit them with fit_train_stats on training scores")
    o = params.online
    per_name = {}
    for name, sign in zip(params.names, params.signs):
        low, high = train_stats[name]["low"], train_stats[name]["high"]
        per_name[name] = []
        for v in scores[name]:
            scaled = (np.asarray(v, dtype=np.float64) - low) / (high - low)
            per_name[name].append(causal_smooth(scaled if sign > 0 else 1.0 - scaled, o.window, o.keep))
    fused = fuse(per_name, params.names, params.weights)
    if params.post_smooth.enabled:
        fused = [causal_smooth(f, o.window, o.keep) for f in fused]
    if params.kalman.enabled:
        fused = [kalman_filter(f, params.kalman.process_var, params.kalman.measurement_std) for f in fused]
    return fused


def online_frame_scores(scores: ScoreDict, train_stats: Mapping[str, Mapping[str, float]], params: ProtocolParams) -> list[np.ndarray]:
    """Online anomaly score per scored frame (higher = more anomalous), causal within each video.

    Each score ``x`` becomes ``(x - low) / (high - low)`` with the TRAINING ``low`` / ``high`` (``1 -`` that for
    sign -1), is smoothed by ``causal_smooth``; the weighted sum is smoothed causally again when
    ``POST_SMOOTH`` is enabled and Kalman-filtered when ``KALMAN`` is. Frame ``t`` depends only on frames
    ``<= t`` of its own video.

    Args:
        scores: name -> V arrays [n_v] of raw scores.
        train_stats: from ``fit_train_stats``.

    Returns:
        V arrays [n_v] float64.
    """
    _check_inputs(scores, None, params.names)
    return _online_fused(scores, train_stats, params)


def fit_threshold(train_scores: ScoreDict, train_stats: Mapping[str, Mapping[str, float]], params: ProtocolParams) -> float:
    """Alarm threshold: the ``ONLINE.threshold_quantile`` quantile of the online scores of training frames
    (all normal), so about ``1 - quantile`` of normal frames raise an alarm."""
    fused = online_frame_scores(train_scores, train_stats, params)
    return float(np.quantile(np.concatenate(fused), params.online.threshold_quantile))


def online_protocol(
    scores: ScoreDict,
    labels: Sequence[np.ndarray],
    train_stats: Mapping[str, Mapping[str, float]],
    params: ProtocolParams,
    threshold: float | None = None,
    videos: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Frame AUROC / AUPR of ``online_frame_scores`` (training statistics, causal smoothing only).

    Args:
        scores: name -> V arrays [n_v] of raw scores; labels: V arrays [n_v] in {0, 1}, aligned.
        train_stats: from ``fit_train_stats``; threshold: optional alarm threshold (``fit_threshold``).

    Returns:
        ``frame_auroc_online``, ``frame_aupr_online``, ``per_video_auroc_online``, ``per_video_note_online``
        and, with a threshold, ``online_threshold``, ``online_tpr`` (abnormal frames alarmed) and ``online_fpr``
        (normal frames alarmed); an alarm is ``score >= threshold``.
    """
    _check_inputs(scores, labels, params.names)
    fused = _online_fused(scores, train_stats, params)
    result = _metrics(fused, labels, False, _video_names(videos, len(labels)), "_online")
    if threshold is not None:
        y = np.concatenate([np.asarray(lab, dtype=bool) for lab in labels])
        alarm = np.concatenate(fused) >= threshold
        result.update({
            "online_threshold": float(threshold),
            "online_tpr": float(alarm[y].mean()),
            "online_fpr": float(alarm[~y].mean()),
        })
    return result


# --------------------------------------------------------------------------
# --mode score
# --------------------------------------------------------------------------


def evaluate_scores(source: str | Path | Mapping[str, np.ndarray] | ScoreFile, params: ProtocolParams) -> dict[str, Any]:
    """Load and validate a ``scores.npz`` (path, key -> array mapping, or ``ScoreFile``) and run both protocols.

    Returns:
        ``dataset``, ``videos``, ``frames`` (scored), ``abnormal_frames``, the ``paper_protocol`` keys and,
        when the file carries ``train_stats``, the ``online_protocol`` keys (else ``online_note`` says why not).
        Raises ``UserError`` naming the first problem (missing key, length mismatch, non-finite values, a score
        the protocol needs but the file lacks, no abnormal or no normal frame, ...).
    """
    if isinstance(source, ScoreFile):
        sf = source
    elif isinstance(source, Mapping):
        sf = from_arrays(source)
    else:
        sf = read_scores(source)
    missing = [n for n in params.names if n not in sf.scores]
    if missing:
        raise UserError(f"the score file has no score '{short_text(missing[0])}' (it has: {', '.join(sf.score_names)}); "
                        "set SCORE.names to stored scores")
    labels = sf.aligned_labels()
    scores = {n: sf.scores[n] for n in params.names}
    n_frames = sum(lab.size for lab in labels)
    result: dict[str, Any] = {
        "dataset": sf.dataset,
        "videos": len(sf.videos),
        "frames": int(n_frames),
        "abnormal_frames": int(sum(int(np.count_nonzero(lab == 1)) for lab in labels)),
    }
    result.update(paper_protocol(scores, labels, params, videos=sf.videos))
    if sf.train_stats is None:
        result["online_note"] = "the file carries no train_stats, so the online protocol (training-frame normalisation) is skipped"
    else:
        result.update(online_protocol(scores, labels, sf.train_stats, params, threshold=sf.threshold, videos=sf.videos))
    return result
