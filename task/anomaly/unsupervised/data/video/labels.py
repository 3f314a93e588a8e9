"""Frame-level ground truth (0 = normal, 1 = abnormal) of test videos, in the formats the datasets ship.

``DATASET.labels`` names a file or folder; null looks where each dataset keeps its labels:

(a) one ``.npy`` of 0/1 for all test frames, videos concatenated in scan order. Two lengths are accepted: every
    frame (``sum(N_v)``, as the MNAD files), or without the first ``clip_length`` frames of each video
    (``sum(N_v - clip_length)``): the official ``DMAD-PDM/data/frame_labels_*.npy``, built for ``time_step=4``
    input frames (Ped2 1962 = 2010 - 12*4, Avenue 15240 = 15324 - 21*4, ShanghaiTech 40363 = 40791 - 107*4).
    Those first frames are never prediction targets; they get the label of the video's first target frame.
    Default places: ``<root>/<name>/frame_labels_<name>.npy``, ``<root>/frame_labels_<name>.npy``.
(b) ShanghaiTech: a folder of ``<video>.npy``, one 0/1 per frame (``<root>/<name>/testing/test_frame_mask``).
(c) UCSD Ped1/Ped2: the ``.m`` file with lines ``TestDataset.gt_frame{1} = [61:180];`` (1-based, inclusive,
    several ranges allowed; ``<root>/<name>/Test/*.m``). MATLAB comments (``% ...``, ``%{ ... %}``) are ignored; a
    repeated ``gt_frame{k}`` and a negative, fractional, stepped or non-numeric range are one-line errors.

Every file is measured before it is read (``array_files``): an empty, oversized or truncated file, or a ``.npy``
whose header declares more than ``MAX_ARRAY_BYTES``, is refused before anything is allocated.
(d) Avenue: a folder of ``<n>_label.mat`` whose ``volLabel`` holds one mask per frame; a frame is abnormal when its
    mask has a non-zero pixel (``<root>/<name>/ground_truth_demo/testing_label_mask``, or under ``<root>``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from task.anomaly.unsupervised.data.video.clips import Video
from task.common.array_files import check_file_size, load_npy
from task.common.errors import UserError, short_text

__all__ = ["load_frame_labels", "attach_labels"]

_NPY_FIX = "pass a .npy array of 0/1 per frame written by numpy.save"
# A UCSD .m label file is a few kB; an Avenue <n>_label.mat at most a few MB.
MAX_M_BYTES = 1 << 20
MAX_MAT_BYTES = 256 << 20
_M_FIX = "use the .m file of this dataset (lines like TestDataset.gt_frame{1} = [61:180];)"
_FORMATS = "a .npy of 0/1 per test frame, a folder of <video>.npy, a UCSD .m file or an Avenue testing_label_mask folder"


def _binary(values: Any, source: Path) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object or array.size and not np.isin(array, (0, 1)).all():
        raise UserError(f"frame labels in {source} must be 0 (normal) or 1 (abnormal); fix the file")
    return array.astype(np.int64)


def _load_npy(path: Path) -> np.ndarray:
    # The header's declared size is checked against the file and MAX_ARRAY_BYTES before anything is allocated.
    array = np.squeeze(load_npy(path, "labels", _NPY_FIX))  # MNAD stores [1, N]
    if array.ndim != 1:
        raise UserError(f"labels {path} must be a 1-D array of 0/1 per frame, got shape {np.shape(array)}")
    return _binary(array, path)


def _check_count(labels: np.ndarray, video: Video, source: Path) -> np.ndarray:
    if len(labels) != video.num_frames:
        raise UserError(f"labels {source} have {len(labels)} values but video {video.source} has {video.num_frames} frames; use the labels of this video")
    return labels


def _concatenated(path: Path, videos: Sequence[Video], clip_length: int) -> list[np.ndarray]:
    labels = _load_npy(path)
    full = sum(v.num_frames for v in videos)
    trimmed = full - clip_length * len(videos)
    if len(labels) not in (full, trimmed):
        raise UserError(
            f"labels {path} hold {len(labels)} values; the {len(videos)} test videos need {full} (every frame) "
            f"or {trimmed} (without the first clip_length={clip_length} frames of each video); check DATASET.clip_length and the test videos"
        )
    skip = clip_length if len(labels) == trimmed else 0
    out, offset = [], 0
    for video in videos:
        part = labels[offset : offset + video.num_frames - skip]
        offset += len(part)
        out.append(np.concatenate([np.full(skip, part[0], dtype=np.int64), part]) if skip else part)
    return out


def _per_video_npy(folder: Path, videos: Sequence[Video]) -> list[np.ndarray]:
    out = []
    for video in videos:
        path = folder / f"{video.name}.npy"
        if not path.is_file():
            raise UserError(f"no labels {path} for test video {video.name}; the folder needs one <video>.npy per test video")
        out.append(_check_count(_load_npy(path), video, path))
    return out


_ASSIGNMENT = re.compile(r"gt_frame\s*\{\s*([^}]*?)\s*\}\s*=\s*\[([^\]]*)\]")
_RANGE = re.compile(r"^(\d+)(?::(\d+))?$")


def _matlab_code(text: str) -> list[tuple[int, str]]:
    """(line number, code) of a MATLAB file without its comments: ``% ...`` to the end of a line and ``%{ ... %}``
    blocks (label files hold no strings, so every % starts a comment)."""
    lines, in_block = [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped == "%{":
            in_block += 1
        elif stripped == "%}" and in_block:
            in_block -= 1
        elif not in_block:
            lines.append((number, line.split("%", 1)[0]))
    return lines


def _parse_ranges(body: str, path: Path, key: int, line: int) -> list[tuple[int, int]]:
    """``61:180, 200`` -> [(61, 180), (200, 200)] (1-based, inclusive); anything else is a one-line error."""
    ranges = []
    for token in re.split(r"[\s,;]+", body.strip()):
        if not token:
            continue
        match = _RANGE.match(token)
        if match is None:
            if re.fullmatch(r"\d+:\d+:\d+", token):
                problem = (f"the stepped range {token} (first:step:last) is not supported; "
                           "list the abnormal frames as first:last ranges")
            elif token.startswith("-") or ":-" in token:
                problem = f"the range {short_text(token, 30)} has a negative frame; frames are numbered from 1"
            else:
                problem = (f"{short_text(token, 30)} is not a frame range; "
                           "use whole frame numbers first:last (1-based), e.g. [61:180]")
            raise UserError(f"{path} line {line}: gt_frame{{{key}}}: {problem}")
        first = int(match.group(1))
        ranges.append((first, int(match.group(2) or first)))
    return ranges


def _ucsd_ranges(path: Path, videos: Sequence[Video]) -> list[np.ndarray]:
    check_file_size(path, "labels", _M_FIX, MAX_M_BYTES)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read labels {path} ({exc.strerror}); {_M_FIX}") from None
    ranges: dict[int, tuple[int, str]] = {}
    for line, code in _matlab_code(text):
        for key_text, body in _ASSIGNMENT.findall(code):
            if not key_text.isdigit() or int(key_text) < 1:
                raise UserError(f"{path} line {line}: gt_frame{{{short_text(key_text, 20)}}} must be indexed by a "
                                f"video number 1, 2, ...; {_M_FIX}")
            key = int(key_text)
            if key in ranges:
                raise UserError(f"{path} line {line} gives gt_frame{{{key}}} again (first on line {ranges[key][0]}); "
                                "keep one line per video")
            ranges[key] = (line, body)
    if sorted(ranges) != list(range(1, len(videos) + 1)):
        raise UserError(f"{path} gives gt_frame{{k}} for {len(ranges)} videos but there are {len(videos)} test videos; use the .m file of this dataset")
    out = []
    for k, video in enumerate(videos, start=1):
        labels = np.zeros(video.num_frames, dtype=np.int64)
        line, body = ranges[k]
        for first, last in _parse_ranges(body, path, k, line):
            if not 1 <= first <= last <= video.num_frames:
                raise UserError(f"{path} line {line}: gt_frame{{{k}}} range {first}:{last} lies outside frames "
                                f"1..{video.num_frames} of {video.source}")
            labels[first - 1 : last] = 1  # 1-based inclusive
        out.append(labels)
    return out


def _avenue_mat(folder: Path, videos: Sequence[Video]) -> list[np.ndarray]:
    out = []
    for video in videos:
        names = [f"{video.name}_label.mat"] + ([f"{int(video.name)}_label.mat"] if video.name.isdigit() else [])
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            raise UserError(f"no label file {folder / names[-1]} for test video {video.name}; the folder needs one <n>_label.mat per test video")
        fix = "use the original Avenue ground_truth_demo files"
        check_file_size(path, "labels", fix, MAX_MAT_BYTES)
        try:
            cells = scipy.io.loadmat(str(path))["volLabel"]
        except (MatReadError, NotImplementedError, ValueError, OSError, TypeError, KeyError, EOFError, IndexError) as e:
            reason = f"{type(e).__name__}: {short_text(str(e), 60)}"
            raise UserError(f"cannot read volLabel from {path} ({reason}); {fix}") from None
        labels = np.array([bool(np.any(np.asarray(mask))) for mask in np.asarray(cells).ravel()], dtype=np.int64)
        out.append(_check_count(labels, video, path))
    return out


def _default_places(ds_cfg: Any) -> list[Path]:
    root = Path(ds_cfg.datadir).expanduser()
    base = root / ds_cfg.target
    ucsd = sorted((base / "Test").glob("*.m")) or [base / "Test" / f"{ds_cfg.target}.m"]
    return [
        base / "testing" / "test_frame_mask",
        *ucsd,
        base / "ground_truth_demo" / "testing_label_mask",
        root / "ground_truth_demo" / "testing_label_mask",
        base / f"frame_labels_{ds_cfg.target}.npy",
        root / f"frame_labels_{ds_cfg.target}.npy",
    ]


def load_frame_labels(ds_cfg: Any, videos: Sequence[Video], clip_length: int) -> list[np.ndarray]:
    """One int64 0/1 array ``[num_frames]`` per test video (1 = abnormal), from ``ds_cfg.labels`` or its default places."""
    if ds_cfg.labels is None:
        places = _default_places(ds_cfg)
        source = next((p for p in places if p.exists()), None)
        if source is None:
            raise UserError(f"no frame labels found for {ds_cfg.target}: looked for {', '.join(map(str, places))}; set DATASET.labels to {_FORMATS}")
    else:
        source = Path(ds_cfg.labels).expanduser()
        if not source.exists():
            raise UserError(f"DATASET.labels {source} not found; set it to {_FORMATS}")
    if source.is_file() and source.suffix.lower() == ".npy":
        return _concatenated(source, videos, clip_length)
    if source.is_file() and source.suffix.lower() == ".m":
        return _ucsd_ranges(source, videos)
    if source.is_dir() and (source / "testing_label_mask").is_dir():
        return _avenue_mat(source / "testing_label_mask", videos)
    if source.is_dir() and any(source.glob("*_label.mat")):
        return _avenue_mat(source, videos)
    if source.is_dir() and any(source.glob("*.npy")):
        return _per_video_npy(source, videos)
    raise UserError(f"labels {source} are in no known format; set DATASET.labels to {_FORMATS}")


def attach_labels(videos: Sequence[Video], labels: Sequence[np.ndarray]) -> list[Video]:
    """Copies of ``videos`` carrying ``labels`` (as returned by ``load_frame_labels``), for ``ClipDataset``."""
    if len(videos) != len(labels):
        raise ValueError(f"{len(videos)} videos but {len(labels)} label arrays")
    return [dataclasses.replace(video, labels=np.asarray(l, dtype=np.int64)) for video, l in zip(videos, labels)]
