"""A small deterministic synthetic video dataset in the frame-folder layout (for the demo and tests).

A fixed camera looks at a textured static scene (smooth colour noise plus a faint weave). Discs and squares in
strong colours walk left to right at 1.5-2.5 px/frame (at 64 px; speeds scale with ``size``), wrapping around.
Training videos hold only that (scene ``walkway``). Scene ``crossing`` is the same idea with other motion: objects
fall top to bottom at 1.0-2.0 px/frame while swaying sideways (a sine of 2-4 px amplitude), over another background.
Each test video adds one abnormal event, cycling over:

* ``fast``: a disc or square crossing at 8 px/frame (a large next-frame prediction error), without swaying;
* ``reverse``: a disc or square moving against the flow (right to left; ``crossing``: upwards);
* ``shape``: a cross, a shape never seen in training, moving with the flow.

The event object enters from an image edge after at least 16 normal frames and is gone at least 12 frames before
the end. A frame is labelled 1 exactly when the event object covers at least one pixel (objects have hard edges,
and the event object is drawn last, so those are exactly the frames that differ from the same video without it).

Written layout (frame numbers 0-based, zero-padded)::

    <root>/<name>/training/frames/01/000.png ...      6 videos x 72 frames
    <root>/<name>/testing/frames/01/000.png ...       6 videos x 72 frames
    <root>/<name>/frame_labels_<name>.npy             int64 0/1, every test frame (432 values, no frames dropped)
    <root>/<name>/.complete                           JSON: generator parameters and each test video's event
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from task.common.errors import UserError
from task.common.io import build_folder_atomically

__all__ = ["make_video_demo", "EVENTS", "SCENES", "NUM_TRAIN", "NUM_TEST", "NUM_FRAMES"]

EVENTS = ("fast", "reverse", "shape")
SCENES = ("walkway", "crossing")  # DATASET.demo_scene
NUM_TRAIN = 6
NUM_TEST = 6
NUM_FRAMES = 72
MARKER = ".complete"

_PALETTE = np.array([[230, 50, 40], [40, 70, 230], [250, 215, 30], [25, 25, 25], [250, 250, 250]], dtype=np.float64)
_NORMAL_SPEED = {"walkway": (1.5, 2.5), "crossing": (1.0, 2.0)}  # px/frame at 64 px
_SWAY = (2.0, 4.0)  # crossing: sideways amplitude in px at 64 px; period 12-24 frames
_FAST_SPEED = 8.0
_REVERSE_SPEED = 2.5
_SHAPE_SPEED = 2.0
_BEFORE, _AFTER = 16, 12  # normal frames at least before / after the event


@dataclass(frozen=True)
class _Mover:
    """An object at ``x0 + vx * (t - start)`` along its axis (x, or y when ``vertical``) and ``y + sway * sin(2 pi t /
    period)`` across it; wraps around the image unless it is an event object."""

    shape: str  # "disc" | "square" | "cross"
    radius: float
    y: float
    x0: float
    vx: float
    colour: tuple[float, float, float]
    start: int | None = None  # event objects only: first frame of their walk
    vertical: bool = False
    sway: float = 0.0
    period: float = 1.0


def _scene(rng: np.random.RandomState, size: int) -> np.ndarray:
    """The static background, float [H, W, 3] in 0..255: a mid-tone with smooth colour noise and a faint weave."""
    coarse = rng.uniform(-28.0, 28.0, size=(5, 5, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = max(4.0, size / 10.0)
    weave = 6.0 * np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)
    return np.array([120.0, 135.0, 110.0]) + smooth + weave[:, :, None]


def _motion(rng: np.random.RandomState, scene: str, scale: float) -> dict[str, float | bool]:
    """The crossing scene's fields of a normal mover (vertical, swaying); nothing for the walkway."""
    if scene == "walkway":
        return {}
    return {"vertical": True, "sway": rng.uniform(*_SWAY) * scale, "period": rng.uniform(12.0, 24.0)}


def _normal_movers(rng: np.random.RandomState, size: int, scene: str) -> list[_Mover]:
    scale = size / 64.0
    movers = []
    for _ in range(rng.randint(3, 5)):
        radius = rng.uniform(3.5, 5.0) * scale
        movers.append(_Mover(
            shape=("disc", "square")[rng.randint(2)],
            radius=radius,
            y=rng.uniform(radius + 2, size - radius - 2),
            x0=rng.uniform(0, size + 4 * radius),
            vx=rng.uniform(*_NORMAL_SPEED[scene]) * scale,
            colour=tuple(_PALETTE[rng.randint(len(_PALETTE))]),
            **_motion(rng, scene, scale),
        ))
    return movers


def _event_mover(rng: np.random.RandomState, size: int, event: str, scene: str) -> _Mover:
    scale = size / 64.0
    radius = rng.uniform(4.0, 5.0) * scale
    speed = {"fast": _FAST_SPEED, "reverse": _REVERSE_SPEED, "shape": _SHAPE_SPEED}[event] * scale
    crossing = int(np.ceil((size + 2 * radius + 2) / speed))
    start = rng.randint(_BEFORE, NUM_FRAMES - _AFTER - crossing + 1)
    leftward = event == "reverse"
    motion = _motion(rng, scene, scale)
    return _Mover(
        shape="cross" if event == "shape" else ("disc", "square")[rng.randint(2)],
        radius=radius,
        y=rng.uniform(radius + 2, size - radius - 2),
        x0=size + radius + 1 if leftward else -radius - 1,  # just outside the entry edge
        vx=-speed if leftward else speed,
        colour=tuple(_PALETTE[rng.randint(len(_PALETTE))]),
        start=start,
        **({**motion, "sway": 0.0} if event == "fast" else motion),
    )


def _mask(mover: _Mover, t: int, size: int) -> np.ndarray:
    """Bool [H, W]: pixels whose centre lies inside ``mover`` at frame ``t`` (hard edges)."""
    if mover.start is None:
        span = size + 4 * mover.radius  # wrap period: fully out on one side, back in on the other
        x = (mover.x0 + mover.vx * t) % span - 2 * mover.radius
    elif t < mover.start:
        return np.zeros((size, size), dtype=bool)
    else:
        x = mover.x0 + mover.vx * (t - mover.start)
    y = mover.y + mover.sway * np.sin(2 * np.pi * t / mover.period)
    if mover.vertical:
        x, y = y, x
    centres = np.arange(size) + 0.5
    dx, dy = np.abs(centres[None, :] - x), np.abs(centres[:, None] - y)  # broadcast to [H, W]
    r = mover.radius
    if mover.shape == "disc":
        return dx**2 + dy**2 <= r**2
    if mover.shape == "square":
        return (dx <= 0.85 * r) & (dy <= 0.85 * r)
    return ((dx <= r) & (dy <= r / 3)) | ((dy <= r) & (dx <= r / 3))


def _render(background: np.ndarray, movers: list[_Mover], size: int) -> np.ndarray:
    """uint8 RGB [NUM_FRAMES, H, W, 3]; movers painted in list order (later ones on top)."""
    frames = np.empty((NUM_FRAMES, size, size, 3), dtype=np.uint8)
    for t in range(NUM_FRAMES):
        frame = background.copy()
        for mover in movers:
            frame[_mask(mover, t, size)] = mover.colour
        frames[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return frames


def _event_labels(mover: _Mover, size: int) -> np.ndarray:
    return np.array([_mask(mover, t, size).any() for t in range(NUM_FRAMES)], dtype=np.int64)


def _write_frames(folder: Path, frames: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for t, frame in enumerate(frames):
        if not cv2.imwrite(str(folder / f"{t:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
            raise OSError(f"OpenCV could not write {folder / f'{t:03d}.png'}")


def _background(seed: int, size: int, scene: str) -> np.ndarray:
    return _scene(np.random.RandomState([seed, SCENES.index(scene)]), size)


def _test_scene(seed: int, index: int, size: int, scene: str) -> tuple[list[_Mover], _Mover]:
    """The normal movers and the event object of test video ``index`` (0-based)."""
    rng = np.random.RandomState([seed, 2, index] + ([SCENES.index(scene)] if scene != "walkway" else []))
    movers = _normal_movers(rng, size, scene)
    return movers, _event_mover(rng, size, EVENTS[index % len(EVENTS)], scene)


def _write(out: Path, name: str, size: int, seed: int, scene: str) -> dict[str, dict[str, object]]:
    background = _background(seed, size, scene)
    for i in range(NUM_TRAIN):
        extra = [SCENES.index(scene)] if scene != "walkway" else []
        movers = _normal_movers(np.random.RandomState([seed, 1, i] + extra), size, scene)
        _write_frames(out / "training" / "frames" / f"{i + 1:02d}", _render(background, movers, size))
    labels, events = [], {}
    for i in range(NUM_TEST):
        movers, anomaly = _test_scene(seed, i, size, scene)
        video = f"{i + 1:02d}"
        _write_frames(out / "testing" / "frames" / video, _render(background, movers + [anomaly], size))
        video_labels = _event_labels(anomaly, size)
        abnormal = np.flatnonzero(video_labels)
        events[video] = {"event": EVENTS[i % len(EVENTS)], "first": int(abnormal[0]), "last": int(abnormal[-1])}
        labels.append(video_labels)
    np.save(out / f"frame_labels_{name}.npy", np.concatenate(labels), allow_pickle=False)
    return events


def make_video_demo(
    root: str | Path, name: str = "demo", size: int = 64, seed: int = 0, scene: str = "walkway"
) -> Path:
    """Write (once) the synthetic video dataset of ``scene`` (``SCENES``) and return ``<root>/<name>``.

    An existing ``<root>/<name>/.complete`` with the same parameters means done. The data is written to a hidden
    temporary sibling and renamed into place with the marker already inside, so an interrupted run leaves no
    ``<root>/<name>`` behind and the next call generates it again.
    """
    root = Path(root).expanduser()
    if not name or any(c in name for c in ("/", "\\")) or name in (".", ".."):
        raise UserError(f"invalid demo name {name!r}; use a plain folder name such as 'demo'")
    if int(size) < 32:
        raise UserError(f"demo frame size must be >= 32, got {size}; pass e.g. size=64")
    if scene not in SCENES:
        raise UserError(f"unknown demo scene {scene!r}; use one of {', '.join(SCENES)}")
    params = {"name": name, "size": int(size), "seed": int(seed), "videos": [NUM_TRAIN, NUM_TEST], "frames": NUM_FRAMES}
    if scene != "walkway":  # walkway demos written before scenes existed keep their marker
        params["scene"] = scene
    target = root / name
    if (target / MARKER).is_file():
        found = json.loads((target / MARKER).read_text(encoding="utf-8")).get("params")
        if found != params:
            raise UserError(f"{target} holds a demo made with {found}, not {params}; delete it or use another DATASET.target")
        return target
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # an empty placeholder folder: fill it
    if target.exists():
        raise UserError(f"{target} exists but is not a complete video demo (no {MARKER}); delete it or use another folder")
    def build(tmp: Path) -> str:
        events = _write(tmp, name, int(size), int(seed), scene)
        return json.dumps({"params": params, "events": events}, sort_keys=True) + "\n"

    return build_folder_atomically(target, MARKER, build)
