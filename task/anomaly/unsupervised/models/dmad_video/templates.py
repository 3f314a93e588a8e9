"""Static-background templates for the video model: the per-pixel temporal median of the training frames.

The official code ships ``bkg_ped2.jpg``/``bkg_avenue.jpg`` without the code that made them; for ShanghaiTech it
builds one template per video (``utils.gen_bkg``) as the per-pixel mode of a Gaussian-smoothed (13-tap) histogram of
grey values, with a Python loop per pixel, and the model then learns the template further (50x learning rate). We
use the per-pixel median instead: exact, parameter-free, robust while the background shows more than half the time,
and computed from per-pixel histograms in a few vectorised passes (about 3 s for 2000 frames of 256x256 RGB on one
core) for grey or colour frames alike.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from task.anomaly.unsupervised.data.video.clips import Video, frames_of
from task.common.errors import UserError

__all__ = ["build_background", "background_for", "MAX_FRAMES"]

MAX_FRAMES = 2000  # frames per template; longer inputs are subsampled evenly in time
_PIXELS_PER_PASS = 2048  # histogram block: N x 2048 int32 indices stay in cache-friendly tens of MB


def build_background(frames: np.ndarray) -> np.ndarray:
    """Per-pixel temporal median of uint8 ``frames [N, H, W, C]`` -> uint8 ``[H, W, C]``.

    Equals ``np.rint(np.median(frames, axis=0))``: for even N the mean of the two middle values, ties to even.
    """
    if frames.ndim != 4 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty uint8 [N, H, W, C] array, got {frames.dtype} {frames.shape}")
    count = len(frames)
    flat = frames.reshape(count, -1)
    low_rank, high_rank = (count - 1) // 2, count // 2
    offsets = np.arange(_PIXELS_PER_PASS, dtype=np.int32) * 256
    out = np.empty(flat.shape[1], dtype=np.uint8)
    for start in range(0, flat.shape[1], _PIXELS_PER_PASS):
        block = flat[:, start : start + _PIXELS_PER_PASS]
        width = block.shape[1]
        # One 256-bin histogram per pixel; the k-th smallest value is the first bin whose cumulative count exceeds k.
        counts = np.bincount((block + offsets[None, :width]).ravel(), minlength=width * 256).reshape(width, 256)
        cumulative = np.cumsum(counts, axis=1)
        low = np.argmax(cumulative > low_rank, axis=1)
        high = np.argmax(cumulative > high_rank, axis=1)
        out[start : start + width] = np.rint((low + high) / 2.0)
    return out.reshape(frames.shape[1:])


def _even_indices(num_frames: int, budget: int) -> np.ndarray:
    """At most ``budget`` frame indices spread evenly over ``[0, num_frames)``."""
    if num_frames <= budget:
        return np.arange(num_frames)
    return np.unique(np.linspace(0, num_frames - 1, max(1, budget)).round().astype(np.int64))


def _identity(path: Path) -> str:
    """Size and modification time (ns) of a file: a frame or video changed in place changes them."""
    try:
        info = path.stat()
    except OSError:  # unreadable: decoding will name it; never reuse a template for it
        return "?"
    return f"{info.st_size}:{info.st_mtime_ns}"


def _digest(videos: Sequence[Video]) -> str:
    """Hash of every video's path and frame count and of each of its files' size and mtime (one stat per frame)."""
    digest = hashlib.sha1()
    for v in videos:
        digest.update(f"{v.source.resolve()}:{v.num_frames}\n".encode())
        for path in v.frames or (v.source,):
            digest.update(f"{path.name}:{_identity(path)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:12]


def _cache_stem(name: str, videos: Sequence[Video], size: tuple[int, int], grayscale: bool) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    frames = sum(v.num_frames for v in videos)
    return f"bkg-median_{safe}_{_digest(videos)}_{size[0]}x{size[1]}{'g' if grayscale else 'c'}_{frames}f"


def _write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Write via a temporary sibling and rename, so a reader never sees half a file."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_png(path: str, picture: np.ndarray) -> None:
    if not cv2.imwrite(path, picture):
        raise OSError(f"OpenCV could not write {path}")


def _cached(
    stem: str, cache_dir: Path | None, shape: tuple[int, int, int], build: Callable[[], np.ndarray]
) -> np.ndarray:
    if cache_dir is None:
        return build()
    array_path = cache_dir / f"{stem}.npy"
    if array_path.is_file():
        try:
            template = np.load(array_path, allow_pickle=False)
        except (OSError, ValueError):
            template = None
        if template is None or template.shape != shape or template.dtype != np.uint8:
            raise UserError(
                f"cached background {array_path} is damaged (expected uint8 {list(shape)}); delete it to rebuild"
            )
        return template
    template = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(array_path, lambda tmp: np.save(tmp, template, allow_pickle=False))
    image_path = cache_dir / f"{stem}.png"  # for looking at; never read back
    if not image_path.exists():
        picture = template[:, :, 0] if template.shape[2] == 1 else cv2.cvtColor(template, cv2.COLOR_RGB2BGR)
        _write_atomic(image_path, lambda tmp: _write_png(tmp, picture))
    return template


def background_for(
    videos: Sequence[Video],
    size: tuple[int, int],
    grayscale: bool,
    per_video: bool,
    cache_dir: str | Path | None,
) -> np.ndarray:
    """Background templates uint8 ``[V, H, W, C]``: V = len(videos) with ``per_video``, else V = 1 (shared).

    The shared template is the median over all videos' frames (at most ``MAX_FRAMES``, taken evenly from each
    video in proportion to its length); a per-video template uses at most ``MAX_FRAMES`` of its own frames. Row v
    matches ``ClipDataset`` items whose ``background`` is v. With ``cache_dir`` each template is kept as ``.npy``
    (reused) and ``.png`` (to inspect), keyed by video name, source path, size, colour mode, frame count and every
    frame file's size and mtime (frames changed in place get a new template).
    """
    if not videos:
        raise ValueError("background_for needs at least one video")
    size = (int(size[0]), int(size[1]))
    shape = (size[0], size[1], 1 if grayscale else 3)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    if per_video:
        templates = [
            _cached(
                _cache_stem(v.name, [v], size, grayscale),
                cache,
                shape,
                lambda v=v: build_background(frames_of(v, size, grayscale, _even_indices(v.num_frames, MAX_FRAMES))),
            )
            for v in videos
        ]
        return np.stack(templates)

    def shared() -> np.ndarray:
        total = sum(v.num_frames for v in videos)
        parts = [
            frames_of(v, size, grayscale, _even_indices(v.num_frames, max(1, round(MAX_FRAMES * v.num_frames / total))))
            for v in videos
        ]
        return build_background(np.concatenate(parts))

    return _cached(_cache_stem("shared", videos, size, grayscale), cache, shape, shared)[None]


def templates_tensor(templates: np.ndarray) -> torch.Tensor:
    """uint8 templates [V, H, W, C] -> float [V, C, H, W] in [-1, 1], the scale of the clips (``x / 127.5 - 1``)."""
    return torch.from_numpy(templates).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
