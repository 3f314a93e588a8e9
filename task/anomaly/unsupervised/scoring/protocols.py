"""Frame-level scoring for video anomaly detection: the official DMAD-PDM protocol and an online protocol.

A video method gives every scored frame raw scores (DMAD-PDM: ``deformation``, ``prediction``, ``gradient``;
higher = more anomalous). Two protocols turn them into one anomaly score per frame and into frame AUROC / AUPR:

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

The official settings of each dataset are DMAD-PDM's presets (``models/dmad_video/presets.py``).

**Online protocol** (``online_protocol``): what a deployed camera can do. Each raw score is scaled causally (frame
t's value depends only on itself, earlier frames of its video and statistics of CALIBRATION frames, held-out normal
frames: ``fit_train_stats``, a historical name) by ``ONLINE.adapt`` (``adaptive.py``): ``range`` (default) by the
min and max of the video's earlier frames, the causal counterpart of the paper protocol's per-video min-max
normalisation (the first ``ONLINE.settle`` frames only set the range); ``running`` by their median and MAD; ``none``
by the calibration low/high quantiles only. Each scaled score is smoothed by a trailing robust window of
``ONLINE.window`` frames (``ONLINE.keep`` kept), fused with the same weights, smoothed causally again when the paper
protocol smooths the fused score, and Kalman-filtered (causal) when the paper protocol does. Per-video adaptation
assumes a video starts normal, and it follows an anomaly that lasts long enough (``ONLINE.memory``; ``adaptive.py``
says when); ``adapt: none`` never adapts, so a video's own level decides its alarms.
``fit_threshold`` picks the alarm threshold as the conformal order statistic of the fused online scores of the
calibration frames for the false-alarm target ``1 - ONLINE.threshold_quantile`` (frames of one video are not
exchangeable, so this targets the rate without a finite-sample guarantee).

Arrays: ``scores`` maps a score name to a list of V per-video arrays ``[n_v]`` (the scored frames only), and
``labels`` is a list of V arrays ``[n_v]`` in {0, 1} aligned with them (see ``score_file`` for the file layout,
where labels cover whole videos and ``frames`` gives the alignment).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from task.anomaly.unsupervised.scoring.adaptive import VideoLevel
from task.anomaly.unsupervised.scoring.filters import (
    causal_smooth,
    fuse,
    kalman_filter,
    normalize,
    smooth_sequences,
)
from task.anomaly.unsupervised.scoring.score_file import ScoreFile, from_arrays, read_scores
from task.anomaly.unsupervised.scoring.settings import ProtocolParams
from task.common.conformal import ScoreSample, Threshold
from task.common.errors import UserError, short_text

log = logging.getLogger("anomaly")

__all__ = [
    "evaluate_scores",
    "fit_threshold",
    "fit_train_stats",
    "online_frame_scores",
    "online_protocol",
    "paper_frame_scores",
    "paper_protocol",
]

ScoreDict = Mapping[str, Sequence[np.ndarray]]

# --------------------------------------------------------------------------
# Presets and schema
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Building blocks (pure numpy)
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Checks and metrics
# --------------------------------------------------------------------------


def _check_inputs(scores: ScoreDict, labels: Sequence[np.ndarray] | None, names: Sequence[str]) -> None:
    """``UserError`` naming the first missing score, length mismatch, non-finite value or non-binary label."""
    n_videos = len(labels) if labels is not None else len(scores[names[0]]) if names[0] in scores else 0
    for name in names:
        if name not in scores:
            raise UserError(
                f"no score '{short_text(name)}' (have: {', '.join(map(str, scores)) or 'none'}); set SCORE.names to "
                "the stored scores"
            )
        if len(scores[name]) != n_videos:
            raise UserError(
                f"score '{short_text(name)}' has {len(scores[name])} videos but labels have {n_videos}; give one "
                "array per video"
            )
        for v, values in enumerate(scores[name]):
            values = np.asarray(values)
            if labels is not None and values.shape != np.shape(labels[v]):
                raise UserError(
                    f"score '{short_text(name)}' of video {v} has shape {values.shape} but its labels "
                    f"{np.shape(labels[v])}; align labels with scored frames"
                )
            if not np.all(np.isfinite(values)):
                raise UserError(
                    f"score '{short_text(name)}' of video {v} has non-finite values (NaN or inf); fix the scoring run"
                )
    for v, lab in enumerate(labels or []):
        if np.any((np.asarray(lab) != 0) & (np.asarray(lab) != 1)):
            raise UserError(f"labels of video {v} must be 0 (normal) or 1 (abnormal) on every scored frame")


def _video_names(videos: Sequence[str] | None, n: int) -> list[str]:
    return list(videos) if videos is not None else [f"video_{v:03d}" for v in range(n)]


def _metrics(
    ranking: Sequence[np.ndarray], labels: Sequence[np.ndarray], higher_is_normal: bool, videos: list[str], suffix: str
) -> dict[str, Any]:
    """Frame AUROC / AUPR (anomaly = positive class) over all frames, and AUROC per video.

    ``higher_is_normal`` reproduces the official call ``roc_auc_score(1 - labels, normality)`` exactly.
    """
    y = np.concatenate([np.asarray(lab, dtype=np.int64) for lab in labels])
    s = np.concatenate(list(ranking))
    n_abnormal = int(y.sum())
    one_class = n_abnormal == 0 or n_abnormal == y.size

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
            notes[name] = (
                "no scored frames"
                if yy.size == 0
                else f"all {yy.size} scored frames are {'abnormal' if k else 'normal'}"
            )
    if one_class:  # as image runs without defective images: null metrics and the reason, never a made-up number
        kind = "abnormal" if n_abnormal == 0 else "normal"
        reason = f"no {kind} frame among the {y.size} scored frames, so frame AUROC/AUPR are undefined (null)"
        log.warning("%s; check the test labels (DATASET.labels)", reason)
        return {
            f"frame_auroc{suffix}": None,
            f"frame_aupr{suffix}": None,
            f"per_video_auroc{suffix}": per_video,
            f"per_video_note{suffix}": notes,
            f"note{suffix}": reason,
        }
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


def paper_protocol(
    scores: ScoreDict, labels: Sequence[np.ndarray], params: ProtocolParams, videos: Sequence[str] | None = None
) -> dict[str, Any]:
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


def fit_train_stats(
    train_scores: ScoreDict, quantiles: tuple[float, float] = (0.01, 0.99)
) -> dict[str, dict[str, float]]:
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
            raise UserError(
                f"no training frames for score '{short_text(name)}'; online statistics need training scores"
            )
        if not np.all(np.isfinite(x)):
            raise UserError(
                f"training score '{short_text(name)}' has non-finite values (NaN or inf); fix the scoring run"
            )
        low, high = (float(q) for q in np.quantile(x, quantiles))
        if not high > low:
            # A score that does not vary on normal frames (e.g. a deformation field still at zero after a short run):
            # any change at test time is informative, so keep it with a minimal range rather than stop the run.
            high = low + max(float(x.std()), 1e-6 * max(1.0, abs(low)))
            log.warning(
                "training score '%s' is constant between its %s quantiles; it is normalised with a minimal range",
                short_text(name),
                quantiles,
            )
        stats[name] = {
            "low": float(low),
            "high": float(high),
            "mean": float(x.mean()),
            "std": float(x.std()),
            "count": int(x.size),
        }
    return stats


def _online_fused(
    scores: ScoreDict, train_stats: Mapping[str, Mapping[str, float]], params: ProtocolParams
) -> list[np.ndarray]:
    for name in params.names:
        if name not in train_stats:
            raise UserError(
                f"train_stats has no entry for score '{short_text(name)}'; refit them with fit_train_stats on "
                "training scores"
            )
    o = params.online
    per_name = {
        name: [causal_smooth(VideoLevel(o, train_stats[name], sign).scale(v), o.window, o.keep) for v in scores[name]]
        for name, sign in zip(params.names, params.signs)
    }
    fused = fuse(per_name, params.names, params.weights)
    if params.post_smooth.enabled:
        fused = [causal_smooth(f, o.window, o.keep) for f in fused]
    if params.kalman.enabled:
        fused = [kalman_filter(f, params.kalman.process_var, params.kalman.measurement_std) for f in fused]
    return fused


def online_frame_scores(
    scores: ScoreDict, train_stats: Mapping[str, Mapping[str, float]], params: ProtocolParams
) -> list[np.ndarray]:
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


def fit_threshold(
    train_scores: ScoreDict, train_stats: Mapping[str, Mapping[str, float]], params: ProtocolParams
) -> Threshold:
    """Alarm threshold: the conformal order statistic (``task/common/conformal.py``) of the online scores of the
    calibration frames (all normal) for the false-alarm target ``1 - ONLINE.threshold_quantile``. With ``adapt:
    range`` the first ``ONLINE.settle`` frames of each calibration video score 0 by construction and are left out of
    the sample (they would only pad n)."""
    fused = online_frame_scores(train_scores, train_stats, params)
    o = params.online
    skip = o.settle if o.adapt == "range" else 0
    scored = np.concatenate([f[skip:] for f in fused])
    if scored.size == 0:
        longest = max((f.size for f in fused), default=0)
        raise UserError(
            f"no calibration frame is scored: the calibration videos have at most {longest} frame(s) and "
            f"SCORE.ONLINE.settle={o.settle}; lower SCORE.ONLINE.settle or raise DATASET.calibration_split"
        )
    return ScoreSample.of(scored).threshold(1.0 - o.threshold_quantile)


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
        result.update(
            {
                "online_threshold": float(threshold),
                "online_tpr": float(alarm[y].mean()) if y.any() else None,  # None: no abnormal frame to alarm on
                "online_fpr": float(alarm[~y].mean()) if not y.all() else None,
            }
        )
    return result


# --------------------------------------------------------------------------
# --mode score
# --------------------------------------------------------------------------


def evaluate_scores(
    source: str | Path | Mapping[str, np.ndarray] | ScoreFile, params: ProtocolParams
) -> dict[str, Any]:
    """Load and validate a ``scores.npz`` (path, key -> array mapping, or ``ScoreFile``) and run both protocols.

    Returns:
        ``dataset``, ``videos``, ``frames`` (scored), ``abnormal_frames``, the ``paper_protocol`` keys and,
        when the file carries ``train_stats``, the ``online_protocol`` keys (else ``online_note`` says why not).
        Raises ``UserError`` naming the first problem (missing key, length mismatch, non-finite values, a score
        the protocol needs but the file lacks, ...); with no abnormal or no normal frame the AUROC/AUPR are None
        and ``note`` / ``note_online`` say why (a warning is logged).
    """
    if isinstance(source, ScoreFile):
        sf = source
    elif isinstance(source, Mapping):
        sf = from_arrays(source)
    else:
        sf = read_scores(source)
    missing = [n for n in params.names if n not in sf.scores]
    if missing:
        raise UserError(
            f"the score file has no score '{short_text(missing[0])}' (it has: {', '.join(sf.score_names)}); "
            "set SCORE.names to stored scores"
        )
    labels = sf.aligned_labels()
    params.check_lengths([lab.size for lab in labels], f"score file {sf.dataset!r}")
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
        result["online_note"] = (
            "the file carries no train_stats, so the online protocol (training-frame normalisation) is skipped"
        )
    else:
        result.update(online_protocol(scores, labels, sf.train_stats, params, threshold=sf.threshold, videos=sf.videos))
    return result
