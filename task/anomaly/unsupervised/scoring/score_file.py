"""``scores.npz``: per-frame video anomaly scores and labels, one file per test run.

The file is a plain ``numpy.savez_compressed`` archive; ``np.load(path, allow_pickle=False)`` reads it. Keys:

========================  ================  ===============================================================
key                       dtype, shape      meaning
========================  ================  ===============================================================
``meta``                  str, 0-d          JSON object, see below
``videos``                str, [V]          video names in evaluation order (the official code sorts them)
``<score>/<video>``       float, [n_v]      raw score ``<score>`` of each scored frame of ``<video>``
``labels/<video>``        int8, [N_v]       one label per frame of the video: 1 abnormal, 0 normal,
                                            -1 unknown (allowed only on frames that have no score)
``frames/<video>``        int64, [n_v]      frame index (0-based, into the video's N_v frames) of each score
========================  ================  ===============================================================

``meta`` fields: ``format`` ("dmad-frame-scores"), ``version`` (1), ``dataset`` (e.g. "ped2"),
``clip_length`` (input frames per clip; the model predicts the next frame, so frames ``clip_length .. N_v - 1``
can be scored and ``frames/<video>`` is usually ``arange(clip_length, N_v)``), ``scores`` (the score names, e.g.
``["deformation", "prediction", "gradient"]``), and optionally ``train_stats`` (per score name the statistics of
the training frames' raw scores from ``frame_scoring.fit_train_stats``: ``low``, ``high``, ``mean``, ``std``,
``count``), ``threshold`` (an online alarm threshold fitted on training frames) and ``source`` (free text).

Raw scores are stored as the model produced them (float32 or float64, kept as is): normalisation, smoothing
and fusion happen at evaluation time (``frame_scoring``), so one file serves every protocol. Labels cover the
whole video so that the alignment of scores to frames is explicit: the evaluated labels are
``labels[frames]``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from task.common.array_files import load_npz
from task.common.errors import UserError, short_repr, short_text
from task.common.io import atomic_write_bytes

__all__ = [
    "FORMAT",
    "VERSION",
    "ScoreFile",
    "default_frames",
    "from_arrays",
    "read_scores",
    "to_arrays",
    "validate",
    "write_scores",
]

FORMAT = "dmad-frame-scores"
VERSION = 1
# Key prefixes that cannot be score names.
RESERVED = ("meta", "videos", "labels", "frames")
_STAT_KEYS = ("low", "high", "mean", "std", "count")


@dataclass
class ScoreFile:
    """The content of a ``scores.npz``.

    Attributes:
        dataset: dataset name, e.g. "ped2".
        clip_length: input frames per clip; frames ``clip_length .. N_v - 1`` can carry a score.
        videos: V video names, in evaluation order.
        scores: score name -> V arrays, ``scores[name][v]`` is [n_v] float (raw, as the model produced it).
        labels: V arrays, ``labels[v]`` is [N_v] int8 over ALL frames of the video (1/0/-1 unknown).
        frames: V arrays, ``frames[v]`` is [n_v] int64, the frame index of each score.
        train_stats: per score name ``{"low", "high", "mean", "std", "count"}`` of training frames, or None.
        threshold: online alarm threshold fitted on training frames, or None.
        extra: any other meta fields (e.g. ``source``), written back unchanged.
    """

    dataset: str
    clip_length: int
    videos: list[str]
    scores: dict[str, list[np.ndarray]]
    labels: list[np.ndarray]
    frames: list[np.ndarray]
    train_stats: dict[str, dict[str, float]] | None = None
    threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def score_names(self) -> list[str]:
        return list(self.scores)

    def aligned_labels(self) -> list[np.ndarray]:
        """V arrays [n_v] int8: the label of each scored frame (``labels[v][frames[v]]``), all in {0, 1}."""
        return [lab[fr] for lab, fr in zip(self.labels, self.frames)]


def default_frames(n_frames: int, clip_length: int) -> np.ndarray:
    """[max(N - clip_length, 0)] int64: the frames a model with ``clip_length`` input frames can score."""
    return np.arange(clip_length, n_frames, dtype=np.int64)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _fail(where: str, problem: str) -> UserError:
    return UserError(f"{where}: {problem}")


def _check_name(where: str, kind: str, name: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name or name != name.strip():
        raise _fail(
            where,
            f"{kind} name {short_repr(name)} is not valid; use a non-empty name without '/' or surrounding spaces",
        )


def _check_train_stats(where: str, stats: Any, names: list[str]) -> None:
    if not isinstance(stats, Mapping):
        raise _fail(where, f"meta train_stats must be a mapping from score name to statistics, got {short_repr(stats)}")
    for name in names:
        entry = stats.get(name)
        if not isinstance(entry, Mapping):
            raise _fail(
                where,
                f"meta train_stats has no entry for score '{short_text(name)}'; refit it with "
                "frame_scoring.fit_train_stats",
            )
        for key in _STAT_KEYS:
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _fail(
                    where,
                    f"meta train_stats['{short_text(name)}']['{key}'] must be a finite number, got {short_repr(value)}",
                )
        if not entry["high"] > entry["low"]:
            raise _fail(
                where,
                f"meta train_stats['{short_text(name)}'] has high <= low; the training scores are constant, so they "
                "cannot normalise",
            )


def validate(sf: ScoreFile, where: str = "scores") -> None:
    """Check a ``ScoreFile``; raise ``UserError`` (one line, prefixed with ``where``) naming the first problem.

    Checks: names, one array per video for every score/labels/frames, float scores that are all finite, integer
    labels in {-1, 0, 1} with no -1 on a scored frame, frame indices strictly increasing within
    ``[clip_length, N_v)`` and as many as the scores, optional train stats and threshold well formed.
    The class balance is not checked here (a file may hold only normal videos); the protocols check it.
    """
    if not isinstance(sf.dataset, str) or not sf.dataset:
        raise _fail(where, "meta dataset must be a non-empty string such as 'ped2'")
    if isinstance(sf.clip_length, bool) or not isinstance(sf.clip_length, int) or sf.clip_length < 0:
        raise _fail(
            where, f"meta clip_length must be an integer >= 0 (input frames per clip), got {short_repr(sf.clip_length)}"
        )
    if not sf.videos:
        raise _fail(where, "no videos; the file must list at least one video under 'videos'")
    for video in sf.videos:
        _check_name(where, "video", video)
    if len(set(sf.videos)) != len(sf.videos):
        raise _fail(where, "video names repeat; each video must appear once in 'videos'")
    if not sf.scores:
        raise _fail(where, "no scores; store at least one score such as 'prediction/<video>'")
    for name in sf.scores:
        _check_name(where, "score", name)
        if name in RESERVED:
            raise _fail(where, f"'{name}' is reserved and cannot be a score name; rename the score")
    n_videos = len(sf.videos)
    for what, arrays in [
        ("labels", sf.labels),
        ("frames", sf.frames),
        *((f"score '{n}'", a) for n, a in sf.scores.items()),
    ]:
        if len(arrays) != n_videos:
            raise _fail(where, f"{what} has {len(arrays)} arrays for {n_videos} videos; give one per video")
    for v, video in enumerate(sf.videos):
        labels, frames = np.asarray(sf.labels[v]), np.asarray(sf.frames[v])
        tag = f"video '{short_text(video)}'"
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise _fail(
                where,
                f"labels of {tag} must be a 1-D integer array (one label per frame), got {labels.dtype} {labels.shape}",
            )
        if labels.size and (labels.min() < -1 or labels.max() > 1):
            raise _fail(
                where,
                f"labels of {tag} must be 1 (abnormal), 0 (normal) or -1 (unknown); found "
                f"{int(labels.min())}..{int(labels.max())}",
            )
        if frames.ndim != 1 or not np.issubdtype(frames.dtype, np.integer):
            raise _fail(
                where,
                f"frames of {tag} must be a 1-D integer array of frame indices, got {frames.dtype} {frames.shape}",
            )
        if frames.size:
            if frames[0] < sf.clip_length or frames[-1] >= labels.size:
                raise _fail(
                    where,
                    f"frames of {tag} must lie in [clip_length={sf.clip_length}, {labels.size}) (the video has "
                    f"{labels.size} labels); found {int(frames.min())}..{int(frames.max())}",
                )
            if np.any(np.diff(frames) <= 0):
                raise _fail(where, f"frames of {tag} must be strictly increasing")
            if np.any(labels[frames] < 0):
                raise _fail(
                    where, f"{tag} has an unknown label (-1) on a scored frame; label every scored frame 0 or 1"
                )
        for name, arrays in sf.scores.items():
            values = np.asarray(arrays[v])
            if values.ndim != 1 or not np.issubdtype(values.dtype, np.floating):
                raise _fail(
                    where, f"score '{name}' of {tag} must be a 1-D float array, got {values.dtype} {values.shape}"
                )
            if values.size != frames.size:
                raise _fail(
                    where,
                    f"score '{name}' of {tag} has {values.size} values but frames has {frames.size}; store one score "
                    "per scored frame",
                )
            bad = int(np.count_nonzero(~np.isfinite(values)))
            if bad:
                raise _fail(
                    where, f"score '{name}' of {tag} has {bad} non-finite values (NaN or inf); fix the scoring run"
                )
    if sf.train_stats is not None:
        _check_train_stats(where, sf.train_stats, list(sf.scores))
    if sf.threshold is not None and (
        isinstance(sf.threshold, bool) or not isinstance(sf.threshold, (int, float)) or not math.isfinite(sf.threshold)
    ):
        raise _fail(where, f"meta threshold must be a finite number or absent, got {short_repr(sf.threshold)}")


# --------------------------------------------------------------------------
# Arrays <-> ScoreFile
# --------------------------------------------------------------------------


def to_arrays(sf: ScoreFile) -> dict[str, np.ndarray]:
    """The ``scores.npz`` key -> array mapping of a (validated) ``ScoreFile``."""
    validate(sf)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dataset": sf.dataset,
        "clip_length": sf.clip_length,
        "scores": sf.score_names,
    }
    if sf.train_stats is not None:
        meta["train_stats"] = {n: {k: float(sf.train_stats[n][k]) for k in _STAT_KEYS} for n in sf.score_names}
    if sf.threshold is not None:
        meta["threshold"] = float(sf.threshold)
    meta.update({k: v for k, v in sf.extra.items() if k not in meta})
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta)), "videos": np.array(sf.videos, dtype=str)}
    for v, video in enumerate(sf.videos):
        arrays[f"labels/{video}"] = np.asarray(sf.labels[v]).astype(np.int8)
        arrays[f"frames/{video}"] = np.asarray(sf.frames[v]).astype(np.int64)
        for name, per_video in sf.scores.items():
            arrays[f"{name}/{video}"] = np.asarray(
                per_video[v]
            )  # float32 or float64 kept: the protocols are dtype-exact
    return arrays


def from_arrays(arrays: Mapping[str, np.ndarray], where: str = "scores") -> ScoreFile:
    """Parse and validate a ``scores.npz`` key -> array mapping (an open ``NpzFile`` or a plain dict)."""
    keys = set(arrays.keys())
    for key in ("meta", "videos"):
        if key not in keys:
            raise _fail(where, f"key '{key}' is missing; write the file with score_file.write_scores")
    try:
        meta = json.loads(str(np.asarray(arrays["meta"]).item()))
    except (ValueError, TypeError):
        raise _fail(where, "key 'meta' is not a JSON string; write the file with score_file.write_scores") from None
    if not isinstance(meta, dict):
        raise _fail(where, "key 'meta' must hold a JSON object")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = f"format {short_repr(meta.get('format'))} version {short_repr(meta.get('version'))}"
        raise _fail(where, f"meta says {found}; expected '{FORMAT}' version {VERSION}")
    for key in ("dataset", "clip_length", "scores"):
        if key not in meta:
            raise _fail(where, f"meta field '{key}' is missing; write the file with score_file.write_scores")
    names = meta["scores"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _fail(where, f"meta scores must be a list of score names, got {short_repr(names)}")
    videos_arr = np.asarray(arrays["videos"])
    if videos_arr.ndim != 1 or videos_arr.dtype.kind != "U":
        raise _fail(where, "key 'videos' must be a 1-D array of video names")
    videos = [str(v) for v in videos_arr]
    counts = Counter(videos)
    repeated = sorted(v for v, c in counts.items() if c > 1)
    if repeated:
        raise _fail(
            where,
            f"video '{short_text(repeated[0])}' appears {counts[repeated[0]]} times in 'videos' "
            f"({len(repeated)} name(s) repeat); each video must appear once (rename one of them)",
        )
    for video in videos:
        _check_name(where, "video", video)  # before building keys from it
    for name in names:
        _check_name(where, "score", name)
    expected = {"meta", "videos"} | {f"{p}/{v}" for p in ["labels", "frames", *names] for v in videos}
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing:
        raise _fail(
            where,
            f"key '{short_text(missing[0])}' is missing; every video needs labels/, frames/ and one array per score "
            "in meta scores",
        )
    if unexpected:
        raise _fail(
            where,
            f"unexpected key '{short_text(unexpected[0])}'; list its video in 'videos' and its score in meta scores, "
            "or remove it",
        )
    sf = ScoreFile(
        dataset=meta["dataset"],
        clip_length=meta["clip_length"],
        videos=videos,
        scores={n: [np.asarray(arrays[f"{n}/{v}"]) for v in videos] for n in names},
        labels=[np.asarray(arrays[f"labels/{v}"]) for v in videos],
        frames=[np.asarray(arrays[f"frames/{v}"]) for v in videos],
        train_stats=meta.get("train_stats"),
        threshold=meta.get("threshold"),
        extra={
            k: v
            for k, v in meta.items()
            if k not in ("format", "version", "dataset", "clip_length", "scores", "train_stats", "threshold")
        },
    )
    validate(sf, where)
    return sf


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def write_scores(path: str | Path, sf: ScoreFile) -> Path:
    """Validate ``sf`` and write it to ``path`` (exactly that name) as a compressed ``.npz``; returns the path.

    Atomic (temp file + rename, ``io.atomic_write_bytes``): an interrupted write keeps the previous file, and a
    ``scores.npz`` that is a symlink is replaced by a file, never written through to the link's target.
    """
    arrays = to_arrays(sf)
    path = Path(path)
    atomic_write_bytes(path, lambda handle: np.savez_compressed(handle, **arrays))  # a handle: numpy adds no '.npz'
    return path


_READ_FIX = "pass --input with a scores.npz written by --mode test (or by score_file.write_scores)"


def read_scores(path: str | Path) -> ScoreFile:
    """Load and validate a ``scores.npz`` (no pickle); ``UserError`` names the first problem.

    Sizes are checked before anything is decompressed (``array_files.load_npz``: the zip directory's declared
    sizes and every member's .npy header against ``MAX_ARRAY_BYTES``).
    """
    path = Path(path)
    where = short_text(str(path))
    if path.is_dir():
        raise UserError(f"score file {where} is a directory; {_READ_FIX}, e.g. {where}/scores.npz")
    if not path.exists():
        raise UserError(f"score file not found: {where}; {_READ_FIX}")
    if path.is_file():  # a FIFO is not opened here: load_npz names it without reading
        try:
            with open(path, "rb") as handle:
                head = handle.read(4)
        except OSError as exc:
            raise UserError(f"cannot read score file {where} ({exc.strerror}); check its permissions") from None
        if head and not head.startswith(b"PK"):
            raise _fail(where, f"not a .npz archive; {_READ_FIX}")
    arrays = load_npz(path, "score file", _READ_FIX)
    return from_arrays(arrays, where)
