"""Video datasets for future-frame prediction: scanning the common layouts, decoding frames, clip samples.

Layouts under ``<DATASET.datadir>/<DATASET.target>`` (the first one holding videos wins, per split)::

    training/frames/<video>/<frame image>      testing/frames/<video>/<frame image>    (official DMAD / MNAD)
    training/videos/<video>.avi|mp4            testing/videos/<video>.avi|mp4          (ShanghaiTech ships training so)
    training_videos/<NN>.avi                   testing_videos/<NN>.avi                 (CUHK Avenue original)
    Train/Train001/001.tif                     Test/Test001/001.tif                    (UCSD Ped1/Ped2 original; *_gt skipped)

Frames are png/jpg/jpeg/bmp/tif/tiff, named by a number (the last run of digits in the file name: ``7.png``,
``0007.jpg``, ``img_0007.bmp``), 0- or 1-based, and ordered by that number, never by string. Videos are ordered
by a natural sort of their names, which equals the official ``sorted(glob(...))`` order for zero-padded names.

Colour: the official code decodes frames with ``cv2.imread`` and feeds the network BGR; this module decodes RGB.
Grey-level data (UCSD Ped2, Avenue with ``c=1``) is identical either way, but a colour checkpoint imported from the
official code (ShanghaiTech) needs its first-layer input channels and last-layer output channels (and its stored
background templates) reversed, or the frames flipped to BGR before the forward pass.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from task.common.config import F, Schema
from task.common.errors import UserError

log = logging.getLogger("anomaly")

__all__ = [
    "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "VIDEO_DATASET_KEYS", "Video", "ClipDataset",
    "scan_videos", "video_from_path", "frames_of", "check_length",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".avi", ".mp4")

VIDEO_DATASET_KEYS: Schema = {
    "clip_length": F(int, 4, min=1, help="input frames per clip; the frame after them is the prediction target"),
    "labels": F(str, None, nullable=True, help="test frame labels: a .npy, .m or folder; null: where the dataset keeps them"),
    "grayscale": F(bool, False, help="decode frames as one grey channel"),
    "demo_scene": F(
        str, "walkway", choices=("walkway", "crossing"), help="DATASET.demo: the synthetic scene (data/video/synthetic.py)"
    ),
}

# (folder under <root>/<name>, holds frame folders (True) or video files (False)) per split, in search order.
_LAYOUTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "train": (("training/frames", True), ("training/videos", False), ("training_videos", False), ("Train", True)),
    "test": (("testing/frames", True), ("testing/videos", False), ("testing_videos", False), ("Test", True)),
}


@dataclass(eq=False)
class Video:
    """One video: a folder of frame images or a single video file.

    ``frames`` holds the frame images in temporal order (empty for a video file); ``labels`` is an int64 array
    of 0/1 per frame (``[num_frames]``, 1 = abnormal) or None when unknown.
    """

    name: str
    source: Path
    frames: tuple[Path, ...]
    num_frames: int
    labels: np.ndarray | None = None

    @property
    def is_file(self) -> bool:
        return not self.frames


def _natural_key(text: str) -> list[Any]:
    """'Test2' < 'Test10': digit runs compare as numbers, the rest case-insensitively."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _frame_number(path: Path) -> int:
    digits = re.findall(r"\d+", path.stem)
    if not digits:
        raise UserError(f"frame {path} has no number in its name; name frames by their index, e.g. 0001.png or img_0001.jpg")
    return int(digits[-1])


def _check_frame_file(path: Path) -> None:
    """A listed frame must be a readable regular file: a dangling link, a FIFO or a folder named like a frame would
    otherwise be dropped and a clip would span the hole."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"frame {path} is a dangling symbolic link (its target is missing); "
                        "restore the frame or delete the link") from None
    except OSError as exc:
        raise UserError(f"cannot read frame {path} ({exc.strerror}); fix its permissions or delete it") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"frame {path} is a folder, not an image; move it out of {path.parent}")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"frame {path} is not a regular file (a FIFO, socket or device); "
                        "replace it with the image or delete it")


def _warn_gaps(folder: Path, numbered: list[tuple[int, Path]]) -> None:
    """One warning per folder whose frame numbers skip values (clips then span the gap)."""
    gaps = [(x, y) for x, y in itertools.pairwise(numbered) if y[0] - x[0] > 1]
    if gaps:
        (a, pa), (b, pb) = gaps[0]
        missing = sum(y[0] - x[0] - 1 for x, y in gaps)
        log.warning(
            "%s: %d frame number(s) missing in %d gap(s), the first between %s and %s (numbers %d-%d); clips span the "
            "gaps, so restore the missing frames if they exist",
            folder, missing, len(gaps), pa.name, pb.name, a + 1, b - 1,
        )


def _frame_paths(folder: Path) -> tuple[Path, ...]:
    """The image files of ``folder`` ordered by frame number (hidden files and other extensions ignored).

    An entry named like a frame that is not a readable regular file is a one-line error; gaps in the numbering
    are a warning."""
    try:
        entries = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    except OSError as exc:
        raise UserError(f"cannot list frames of {folder} ({exc.strerror}); fix its permissions") from None
    for path in entries:
        _check_frame_file(path)
    numbered = sorted((_frame_number(p), p) for p in entries)
    for (n_a, a), (n_b, b) in zip(numbered, numbered[1:]):
        if n_a == n_b:
            raise UserError(f"frames {a.name} and {b.name} in {folder} have the same number {n_a}; keep one of them")
    _warn_gaps(folder, numbered)
    return tuple(p for _, p in numbered)


def _video_file(path: Path) -> Video:
    capture = cv2.VideoCapture(str(path))
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()
    if count <= 0:
        raise UserError(f"cannot read video {path}: OpenCV finds no frames; re-encode it (e.g. to MJPG .avi) or extract its frames into a folder")
    return Video(name=path.stem, source=path, frames=(), num_frames=count)


def _frame_folder(path: Path) -> Video:
    frames = _frame_paths(path)
    return Video(name=path.name, source=path, frames=frames, num_frames=len(frames))


def check_length(video: Video, clip_length: int) -> None:
    """A video must hold at least one clip: ``clip_length`` input frames plus the target frame."""
    if video.num_frames < clip_length + 1:
        raise UserError(
            f"video {video.source} has {video.num_frames} frames but a clip needs {clip_length + 1} "
            f"(DATASET.clip_length={clip_length} inputs + 1 target); lower DATASET.clip_length or remove the video"
        )


def check_names(videos: Sequence[Video]) -> None:
    """Video names key every per-video output (scores.npz, frame_scores.csv, plots): they must be unique and plain,
    checked at scan time so that a run never fails after training over them."""
    for video in videos:
        if not video.name or video.name != video.name.strip() or not video.name.isprintable():
            raise UserError(f"video {str(video.source)!r} has a name with surrounding spaces or control characters; "
                            "rename it")
    counts = Counter(v.name for v in videos)
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:
        sources = [v.source.name for v in videos if v.name == repeated[0]]
        raise UserError(
            f"{len(repeated)} video name(s) repeat in {videos[0].source.parent}, e.g. {', '.join(sources)} are all "
            "named "
            f"{repeated[0]!r}; keep one file per name (outputs are keyed by it)"
        )


def scan_videos(ds_cfg: Any, split: str) -> list[Video]:
    """The videos of ``split`` ("train" | "test") under ``<ds_cfg.datadir>/<ds_cfg.target>``, naturally sorted.

    Every video is checked to hold at least ``ds_cfg.clip_length + 1`` frames.
    """
    if split not in _LAYOUTS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(ds_cfg.datadir).expanduser() / ds_cfg.target
    if not base.is_dir():
        raise UserError(f"dataset folder {base} not found; set DATASET.datadir and DATASET.target, or DATASET.demo=true for the synthetic demo")
    for sub, holds_frames in _LAYOUTS[split]:
        folder = base / sub
        if not folder.is_dir():
            continue
        if holds_frames:
            entries = [p for p in folder.iterdir() if p.is_dir() and not p.name.endswith("_gt") and not p.name.startswith(".")]
            videos = [_frame_folder(p) for p in sorted(entries, key=lambda p: _natural_key(p.name))]
        else:
            entries = [p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")]
            videos = [_video_file(p) for p in sorted(entries, key=lambda p: _natural_key(p.stem))]
        if not videos:
            continue  # e.g. an empty training/frames next to training/videos
        check_names(videos)
        for video in videos:
            check_length(video, ds_cfg.clip_length)
        return videos
    looked = ", ".join(str(base / sub) + ("/<video>/<frame>" if frames else "/*.avi|mp4") for sub, frames in _LAYOUTS[split])
    raise UserError(f"no {split} videos under {base}: looked for {looked}")


def video_from_path(path: str | Path) -> Video:
    """A ``Video`` from a user-given path: an .avi/.mp4 file or a folder of numbered frame images."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
        return _video_file(path)
    if path.is_dir():
        video = _frame_folder(path)
        if video.num_frames == 0:
            raise UserError(f"folder {path} holds no frame images ({', '.join(IMAGE_EXTENSIONS)}); pass a folder of frames or a video file")
        return video
    raise UserError(f"{path} is neither a video file ({', '.join(VIDEO_EXTENSIONS)}) nor a folder of frames; pass one of those")


def _convert(image: np.ndarray, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """One decoded OpenCV image (BGR or grey) -> uint8 [H, W, C], bilinear resize as the official ``cv2.resize``."""
    if image.ndim == 3 and grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif not grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    height, width = size
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return image[:, :, None] if image.ndim == 2 else image


def _read_image(path: Path, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    # IMREAD_GRAYSCALE matches the official grey path (np_load_frame with c=1) bit for bit.
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot read frame {path}: the file is damaged or not an image; replace or delete it")
    return _convert(image, size, grayscale)


def _read_video(video: Video, indices: np.ndarray, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """Frames ``indices`` (sorted, unique) of a video file in one sequential pass: seek to the first, grab onwards."""
    channels = 1 if grayscale else 3
    out = np.empty((len(indices), size[0], size[1], channels), dtype=np.uint8)
    capture = cv2.VideoCapture(str(video.source))
    try:
        if not capture.isOpened():
            raise UserError(f"cannot read video {video.source}: OpenCV cannot open it; re-encode it or extract its frames into a folder")
        position = int(indices[0]) if len(indices) else 0
        if position and not capture.set(cv2.CAP_PROP_POS_FRAMES, position):
            position = 0  # no seeking for this container: decode from the start
        slot = 0
        while slot < len(indices):
            if not capture.grab():
                raise UserError(
                    f"cannot read video {video.source}: decoding stopped at frame {position} of {video.num_frames}; "
                    "re-encode it or extract its frames into a folder"
                )
            if position == indices[slot]:
                ok, image = capture.retrieve()
                if not ok:
                    raise UserError(f"cannot read video {video.source}: frame {position} does not decode; re-encode it")
                out[slot] = _convert(image, size, grayscale)
                slot += 1
            position += 1
    finally:
        capture.release()
    return out


def frames_of(video: Video, size: tuple[int, int], grayscale: bool, indices: Sequence[int] | None = None) -> np.ndarray:
    """Decoded, resized frames as uint8 ``[N, H, W, C]`` (C = 1 grey, 3 RGB); all frames or just ``indices``.

    ``indices`` must be increasing. A video file is opened once and read sequentially.
    """
    wanted = np.arange(video.num_frames) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(wanted) and (wanted[0] < 0 or wanted[-1] >= video.num_frames or np.any(np.diff(wanted) <= 0)):
        raise ValueError(f"frame indices must increase within [0, {video.num_frames}), got {wanted.tolist()}")
    if video.is_file:
        return _read_video(video, wanted, tuple(size), grayscale)
    channels = 1 if grayscale else 3
    out = np.empty((len(wanted), size[0], size[1], channels), dtype=np.uint8)
    for slot, index in enumerate(wanted):
        out[slot] = _read_image(video.frames[index], tuple(size), grayscale)
    return out


class ClipDataset(Dataset):
    """Clips of ``clip_length`` consecutive frames with the next frame as the prediction target.

    Item ``i`` (in video order, then target-frame order) is a dict:

    * ``clip``: float32 ``[T, C, H, W]`` in [-1, 1] (``x / 127.5 - 1`` after a bilinear resize, as the official);
    * ``target``: float32 ``[C, H, W]``, the frame right after the clip;
    * ``video``: int64, index into ``videos``; ``frame``: int64, the target's frame index within its video
      (``clip_length .. num_frames - 1``: the first ``clip_length`` frames of a video are never targets);
    * ``label``: int64 0/1 of the target frame, -1 when the video has no labels;

    ``cache=True`` decodes every video once at construction and keeps one uint8 ``[N, H, W, C]`` array per video;
    overlapping clips are slices of it. ``cache=False`` decodes the ``T + 1`` frames of each item on demand (for a
    video file: one seek from the nearest key frame, so extracting frames to a folder is faster for huge sets).
    RGB, not the official BGR: see the module docstring.
    """

    def __init__(
        self,
        videos: Sequence[Video],
        clip_length: int,
        size: tuple[int, int],
        grayscale: bool,
        cache: bool,
    ) -> None:
        if clip_length < 1:
            raise ValueError(f"clip_length must be >= 1, got {clip_length}")
        for video in videos:
            check_length(video, clip_length)
        self.videos = list(videos)
        self.clip_length = int(clip_length)
        self.size = (int(size[0]), int(size[1]))
        self.grayscale = bool(grayscale)
        # One row (video index, target frame) per item: [M, 2] int64.
        rows = [(i, t) for i, v in enumerate(self.videos) for t in range(clip_length, v.num_frames)]
        self.index = np.array(rows, dtype=np.int64).reshape(-1, 2)
        self._frames = [frames_of(v, self.size, self.grayscale) for v in self.videos] if cache else None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        video_index, target = (int(x) for x in self.index[item])
        video = self.videos[video_index]
        start = target - self.clip_length
        if self._frames is not None:
            window = self._frames[video_index][start : target + 1]
        else:
            window = frames_of(video, self.size, self.grayscale, range(start, target + 1))
        # [T+1, H, W, C] uint8 -> contiguous [T+1, C, H, W] float (the slices below stay contiguous too).
        pixels = torch.from_numpy(window).permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)
        label = int(video.labels[target]) if video.labels is not None else -1
        return {
            "clip": pixels[:-1],
            "target": pixels[-1],
            "video": torch.tensor(video_index, dtype=torch.int64),
            "frame": torch.tensor(target, dtype=torch.int64),
            "label": torch.tensor(label, dtype=torch.int64),
        }
