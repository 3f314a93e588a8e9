"""Pictures of video anomaly scores: the frame score over time, and a GIF of frames with that plot under them.

Everything here is pure rendering (arrays in, uint8 RGB arrays or GIF bytes out) with OpenCV and numpy, no
plotting library. Colours, the heatmap overlay and the GIF encoder are the shared ones of ``drawing``,
so a heatmap colour means the same thing in both.

Plot geometry: the x axis of a score plot ``size = (H, W)`` runs from frame 0 at column ``plot_x(0, N, W)`` to
frame N - 1 at ``plot_x(N - 1, N, W)``; the margins depend on the width only, so a caller that knows the plot's
width knows where every frame is. ``render_video_frame`` takes the cursor as a fraction of that axis:
``cursor_x = frame_index / max(1, num_frames - 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from task.anomaly.unsupervised.drawing import FONT, GREEN, GREY, RED, TITLE_BG, WHITE, display_bounds, draw_pieces, encode_gif, fit_scale, heatmap_overlay
from task.common.io import atomic_write_bytes

__all__ = [
    "abnormal_ranges",
    "plot_x",
    "render_score_plot",
    "render_video_frame",
    "gif_frame_positions",
    "write_video_gif",
]

_BG = (255, 255, 255)
_INK = (30, 30, 30)
_AXIS = (90, 90, 90)
_GRID = (228, 228, 228)
_SHADE = (255, 205, 205)  # ground-truth abnormal frames: light red, so the red alarm dots stay visible on it
_LINE = (30, 100, 220)
_THRESHOLD = (245, 140, 0)
_CURSOR = (120, 0, 170)
_DASH, _GAP = 8, 5
_MIN_PANEL = 128  # frames smaller than this are upscaled so the panel names stay legible on them
_PANEL_HEIGHT = 0.3  # default largest panel height, as a fraction of the plot width
_MIN_SHRUNK = _MIN_PANEL  # write_video_gif shrinks panels no further than this to meet its byte budget
# Byte budget of a GIF frame at 800 px wide (60 frames < 2 MB); write_video_gif shrinks the panels to meet it.
_GIF_BYTES_PER_FRAME = 32_000


def abnormal_ranges(labels: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive ``[start, end]`` index runs where ``labels`` [N] (values in {0, 1, -1}) equals 1, in order."""
    flags = np.asarray(labels).reshape(-1) == 1
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def _x_span(width: int) -> tuple[int, int]:
    """First and last pixel column of the x axis of a plot ``width`` pixels wide (left margin holds y ticks)."""
    left = max(44, round(0.065 * width))
    right = width - 1 - max(10, round(0.02 * width))
    if right - left < 16:
        raise ValueError(f"a score plot needs to be wider than {width} px")
    return left, right


def _x_at(fraction: float, width: int) -> int:
    """Pixel column of ``fraction`` (0 = first frame, 1 = last) along the x axis of a plot ``width`` wide."""
    left, right = _x_span(width)
    return left + math.floor(min(1.0, max(0.0, fraction)) * (right - left) + 0.5)


def plot_x(frame_index: float, num_frames: int, plot_width: int) -> int:
    """Pixel column of frame ``frame_index`` (0 .. num_frames - 1) in a score plot ``plot_width`` pixels wide."""
    return _x_at(frame_index / max(1, num_frames - 1), plot_width)


@dataclass(frozen=True)
class _Layout:
    """Where things go in a plot of one size: the axis box (inclusive pixel bounds) and the text metrics."""

    x0: int
    x1: int
    y0: int
    y1: int
    scale: float
    row: int  # height of one text row in the margins


def _layout(height: int, width: int) -> _Layout:
    x0, x1 = _x_span(width)
    scale = min(0.7, max(0.33, 0.45 * min(height / 360, width / 800)))
    text_height = cv2.getTextSize("Ag", FONT, scale, 1)[0][1]
    row = text_height + max(7, text_height // 2 + 3)
    y0, y1 = 2 * row + 4, height - 1 - (2 * row + 2)  # title + legend above, tick labels + axis name below
    if y1 - y0 < 16:
        raise ValueError(f"a score plot needs to be taller than {height} px")
    return _Layout(x0, x1, y0, y1, scale, row)


def _value_range(scores: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """The y range: all scores and the threshold, padded 5% so neither sits on the frame of the axis box."""
    values = np.concatenate([scores, [threshold] if threshold is not None else []]).astype(np.float64)
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-9 * max(1.0, abs(high)):
        # Constant scores: centre them in a range of +-10% of their magnitude (or +-0.5 around 0).
        pad = 0.1 * abs(high) if high != 0 else 0.5
        low, high = low - pad, high + pad
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def _y_at(value: float, value_range: tuple[float, float], layout: _Layout) -> int:
    """Pixel row of ``value``: ``value_range`` spans the axis box from its bottom row to its top row."""
    low, high = value_range
    return layout.y1 - math.floor((value - low) / (high - low) * (layout.y1 - layout.y0) + 0.5)


def _nice_step(span: float, count: int, mantissas: Sequence[float] = (1, 2, 2.5, 5, 10)) -> float:
    """The smallest 1/2/2.5/5 x 10^k step that cuts ``span`` into at most ``count`` intervals."""
    raw = span / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in mantissas if m * magnitude >= raw * (1 - 1e-9))


def _tick_text(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / 10 ** math.floor(math.log10(step)), 6) == 2.5 else 0)
    if decimals > 5 or abs(value) >= 1e6:
        return f"{value:.3g}"
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text  # no "-0.00"


def _check_finite(name: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def _dashed_hline(canvas: np.ndarray, y: int, x0: int, x1: int, colour: tuple[int, int, int]) -> None:
    """A 2-pixel dashed line on rows ``y`` and ``y + 1`` from column ``x0`` to ``x1`` (inclusive)."""
    for start in range(x0, x1 + 1, _DASH + _GAP):
        canvas[y : y + 2, start : min(start + _DASH, x1 + 1)] = colour


def _text_box(canvas: np.ndarray, text: str, x: int, baseline: int, scale: float, colour, background) -> None:
    """``text`` on a filled box (so grid lines and curves do not run through it)."""
    (w, h), descent = cv2.getTextSize(text, FONT, scale, 1)
    cv2.rectangle(canvas, (x - 2, baseline - h - 2), (x + w + 2, baseline + descent), background, -1)
    cv2.putText(canvas, text, (x, baseline), FONT, scale, colour, 1, cv2.LINE_AA)


def _legend(canvas: np.ndarray, layout: _Layout, has_labels: bool, threshold: float | None) -> None:
    """One row of swatches under the title: only the items the plot actually shows."""
    items = [("line", "frame score")]
    if threshold is not None:
        items += [("dot", "score >= threshold"), ("dash", "threshold")]
    if has_labels:
        items.append(("box", "abnormal (ground truth)"))
    swatch, gap = 18, 14
    width = canvas.shape[1] - layout.x0 - 4
    text = " ".join(t for _, t in items)
    scale = fit_scale([text], width - len(items) * (swatch + 6 + gap), layout.scale)
    baseline = 2 * layout.row - 4
    middle = baseline - cv2.getTextSize("A", FONT, scale, 1)[0][1] // 2
    x = layout.x0
    for kind, label in items:
        if kind == "line":
            cv2.line(canvas, (x, middle), (x + swatch, middle), _LINE, 2, cv2.LINE_AA)
        elif kind == "dot":
            cv2.circle(canvas, (x + swatch // 2, middle), 3, RED, -1, cv2.LINE_AA)
        elif kind == "dash":
            _dashed_hline(canvas, middle, x, x + swatch, _THRESHOLD)
        else:
            cv2.rectangle(canvas, (x, middle - 5), (x + swatch, middle + 5), _SHADE, -1)
        x += swatch + 6
        cv2.putText(canvas, label, (x, baseline), FONT, scale, _INK, 1, cv2.LINE_AA)
        x += cv2.getTextSize(label, FONT, scale, 1)[0][0] + gap


def render_score_plot(
    scores: np.ndarray,
    frames: np.ndarray,
    num_frames: int,
    labels: np.ndarray | None,
    threshold: float | None,
    title: str,
    size: tuple[int, int] = (360, 960),
) -> np.ndarray:
    """The frame anomaly score of one video over time.

    Args:
        scores: [n] float frame scores (finite; n may be 0).
        frames: [n] int frame index (0 .. num_frames - 1) of each score; scored frames may skip some frames.
        num_frames: frames in the video; the x axis runs from frame 0 to num_frames - 1 (see ``plot_x``).
        labels: [num_frames] int in {0, 1, -1} (1 = abnormal, -1 = unknown): the runs of 1 are shaded light red;
            ``None``: no shading.
        threshold: the alarm threshold, drawn as a dashed line with its value; scores >= it get red dots.
        title: written above the plot.
        size: (height, width) of the picture.

    Returns:
        [height, width, 3] uint8 RGB.

    Raises:
        ValueError: NaN/inf scores or threshold, mismatched shapes, frame indices or labels out of range.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    frames = np.asarray(frames).reshape(-1)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if frames.shape != scores.shape:
        raise ValueError(f"{scores.size} scores but {frames.size} frame indices")
    if frames.size and (frames.min() < 0 or frames.max() >= num_frames):
        raise ValueError(f"frame indices must lie in 0 .. {num_frames - 1}")
    _check_finite("scores", scores)
    if threshold is not None:
        _check_finite("threshold", np.asarray([threshold], dtype=np.float64))
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.size != num_frames:
            raise ValueError(f"{labels.size} labels for {num_frames} frames")
    height, width = size
    layout = _layout(height, width)
    value_range = _value_range(scores, threshold)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = _BG

    if labels is not None:
        # A frame owns the columns nearer to it than to its neighbours, so adjacent runs stay apart and a
        # single abnormal frame is as wide as any other frame.
        per_frame = (layout.x1 - layout.x0) / max(1, num_frames - 1)
        for start, end in abnormal_ranges(labels):
            left = min(math.ceil(layout.x0 + (start - 0.5) * per_frame), plot_x(start, num_frames, width))
            right = max(math.ceil(layout.x0 + (end + 0.5) * per_frame) - 1, plot_x(end, num_frames, width))
            canvas[layout.y0 : layout.y1 + 1, max(left, layout.x0) : min(right, layout.x1) + 1] = _SHADE

    tick_scale = layout.scale * 0.9
    y_step = _nice_step(value_range[1] - value_range[0], max(3, (layout.y1 - layout.y0) // (2 * layout.row)))
    y_ticks = [k * y_step for k in range(math.ceil(value_range[0] / y_step), math.floor(value_range[1] / y_step) + 1)]
    y_texts = [_tick_text(v, y_step) for v in y_ticks]
    y_scale = fit_scale(y_texts, layout.x0 - 10, tick_scale) if y_texts else tick_scale
    for value, text in zip(y_ticks, y_texts):
        y = _y_at(value, value_range, layout)
        canvas[y, layout.x0 : layout.x1 + 1] = _GRID
        canvas[y, layout.x0 - 5 : layout.x0 - 1] = _AXIS
        (w, h), _ = cv2.getTextSize(text, FONT, y_scale, 1)
        cv2.putText(canvas, text, (layout.x0 - 8 - w, y + h // 2), FONT, y_scale, _INK, 1, cv2.LINE_AA)

    label_width = cv2.getTextSize(str(max(0, num_frames - 1)), FONT, tick_scale, 1)[0][0]
    max_ticks = max(1, (layout.x1 - layout.x0) // (3 * label_width + 10))
    x_step = max(1, int(_nice_step(max(1, num_frames - 1), max_ticks, (1, 2, 5, 10))))
    baseline = layout.y1 + layout.row
    for frame in range(0, num_frames, x_step):
        x = plot_x(frame, num_frames, width)
        canvas[layout.y1 + 2 : layout.y1 + 6, x] = _AXIS
        w = cv2.getTextSize(str(frame), FONT, tick_scale, 1)[0][0]
        cv2.putText(canvas, str(frame), (x - w // 2, baseline), FONT, tick_scale, _INK, 1, cv2.LINE_AA)
    w = cv2.getTextSize("frame", FONT, tick_scale, 1)[0][0]
    cv2.putText(canvas, "frame", ((layout.x0 + layout.x1 - w) // 2, baseline + layout.row - 2), FONT, tick_scale, _AXIS, 1, cv2.LINE_AA)
    # The frame goes around the data area, so the first and last frames' columns stay visible.
    cv2.rectangle(canvas, (layout.x0 - 1, layout.y0 - 1), (layout.x1 + 1, layout.y1 + 1), _AXIS, 1)

    if threshold is not None:
        y = _y_at(threshold, value_range, layout)
        _dashed_hline(canvas, y, layout.x0, layout.x1, _THRESHOLD)
        text = f"threshold {threshold:.4g}"
        w = cv2.getTextSize(text, FONT, tick_scale, 1)[0][0]
        # Above the line unless that leaves the axis box; the box hides curve pixels so the value stays readable.
        baseline = y - 5 if y - 5 - layout.row > layout.y0 else y + layout.row
        _text_box(canvas, text, layout.x1 - w - 6, baseline, tick_scale, _THRESHOLD, _BG)

    order = np.argsort(frames, kind="stable")
    xs = np.array([plot_x(int(f), num_frames, width) for f in frames[order]], dtype=np.int32)
    ys = np.array([_y_at(float(v), value_range, layout) for v in scores[order]], dtype=np.int32)
    if xs.size == 1:
        cv2.circle(canvas, (int(xs[0]), int(ys[0])), 2, _LINE, -1, cv2.LINE_AA)
    elif xs.size:
        cv2.polylines(canvas, [np.stack([xs, ys], axis=1)], False, _LINE, 2, cv2.LINE_AA)
    else:
        text = "no scored frames"
        (w, h), _ = cv2.getTextSize(text, FONT, layout.scale, 1)
        cv2.putText(canvas, text, ((layout.x0 + layout.x1 - w) // 2, (layout.y0 + layout.y1 + h) // 2), FONT, layout.scale, GREY, 1, cv2.LINE_AA)
    if threshold is not None:
        for x, y in zip(xs[scores[order] >= threshold], ys[scores[order] >= threshold]):
            cv2.circle(canvas, (int(x), int(y)), 3, RED, -1, cv2.LINE_AA)

    title_scale = fit_scale([title], width - layout.x0 - 4, layout.scale * 1.2)
    cv2.putText(canvas, title, (layout.x0, layout.row - 3), FONT, title_scale, _INK, 2 if title_scale >= 0.6 else 1, cv2.LINE_AA)
    _legend(canvas, layout, labels is not None, threshold)
    return canvas


def _panel_scale(height: int, width: int, plot_width: int, max_height: int | None) -> float:
    """Scale of a [height, width] video frame in the GIF.

    Native size, shrunk so that two panels fit ``plot_width`` and each is at most ``max_height`` tall (default
    ``_PANEL_HEIGHT`` x plot width): the panels' camera noise is what makes a GIF large. Frames under 128 px are
    upscaled by a whole factor instead, so their panel names stay legible.
    """
    smallest = min(height, width)
    if smallest < _MIN_PANEL:
        return float(math.ceil(_MIN_PANEL / smallest))
    max_height = round(_PANEL_HEIGHT * plot_width) if max_height is None else max_height
    return min(1.0, plot_width / (2 * width), max_height / height)


def _pad_width(image: np.ndarray, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` centred on a ``colour`` strip ``width`` wide (unchanged when it is at least that wide)."""
    extra = width - image.shape[1]
    if extra <= 0:
        return image
    out = np.empty((image.shape[0], width, 3), dtype=np.uint8)
    out[:] = colour
    out[:, extra // 2 : extra // 2 + image.shape[1]] = image
    return out


def render_video_frame(
    frame: np.ndarray,
    error_map: np.ndarray,
    bounds: tuple[float, float],
    plot: np.ndarray,
    cursor_x: float,
    score: float,
    threshold: float | None,
    label: int | None,
    caption: str,
    max_panel_height: int | None = None,
) -> np.ndarray:
    """One GIF frame: a title bar, the video frame | its prediction-error heatmap, the score plot with a cursor.

    Args:
        frame: [H, W, 3] uint8 RGB video frame.
        error_map: [h, w] float prediction error of that frame (resized to H x W; finite).
        bounds: (low, high) heatmap colour range, shared by every frame of the GIF (``display_bounds``).
        plot: [Hp, Wp, 3] uint8 ``render_score_plot`` of the video; it sets the picture's width.
        cursor_x: the frame's position along the plot's x axis in [0, 1]: ``frame_index / max(1, num_frames - 1)``.
        score: the frame's anomaly score; ALARM when ``score >= threshold``.
        threshold: alarm threshold, ``None``: no verdict.
        label: true label (1 abnormal, 0 normal, -1 unknown), ``None``: not shown.
        caption: first line of the title bar (video name, frame number).
        max_panel_height: largest height of the two panels (default 0.3 Wp); frames are never upscaled to it.

    Returns:
        [T + Ht + Hp, max(Wp, Wt), 3] uint8 RGB: title bar T, the frame | heatmap panels (native size, shrunk to
        fit Wp and ``max_panel_height``; frames under 128 px upscaled by a whole factor, nearest), then the
        plot; the narrower part is centred.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be [H, W, 3] uint8, got {frame.shape} {frame.dtype}")
    if error_map.ndim != 2:
        raise ValueError(f"error_map must be [h, w], got {error_map.shape}")
    _check_finite("error_map", error_map)
    _check_finite("score", np.asarray([score], dtype=np.float64))
    if not bounds[1] > bounds[0]:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}")
    height, width = frame.shape[:2]
    error = cv2.resize(error_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    scale = _panel_scale(height, width, plot.shape[1], max_panel_height)
    panels = np.concatenate([frame, heatmap_overlay(frame, error, bounds)], axis=1)
    if scale != 1.0:
        size = (2 * max(1, round(width * scale)), max(1, round(height * scale)))
        panels = cv2.resize(panels, size, interpolation=cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA)

    # Panel names in a dark box inside each panel's top-left corner: no extra row to pay for in the GIF.
    names = ["frame", f"prediction error {bounds[0]:.3g}..{bounds[1]:.3g}"]
    half = panels.shape[1] // 2
    name_scale = fit_scale(names, half - 12, max(0.35, min(0.6, half / 400 * 0.5)))
    name_height = cv2.getTextSize("Ag", FONT, name_scale, 1)[0][1]
    for i, name in enumerate(names):
        _text_box(panels, name, i * half + 6, name_height + 6, name_scale, WHITE, TITLE_BG)

    plot = plot.copy()
    layout = _layout(*plot.shape[:2])
    x = _x_at(cursor_x, plot.shape[1])
    plot[layout.y0 : layout.y1 + 1, x : x + 2] = _CURSOR

    out_width = max(panels.shape[1], plot.shape[1])
    if threshold is None:
        verdict, verdict_colour, thr = "n/a", GREY, ""
    else:
        verdict, verdict_colour = ("ALARM", RED) if score >= threshold else ("ok", GREEN)
        thr = f" / threshold {threshold:.4g}"
    pieces = [(f"score {score:.4g}{thr}  ", WHITE), (verdict, verdict_colour)]
    if label is not None:
        truth = {1: ("abnormal", RED), 0: ("normal", GREEN)}.get(int(label), ("unknown", GREY))
        pieces += [("  true ", WHITE), truth]
    margin = 8
    scale = fit_scale([caption, "".join(p for p, _ in pieces)], out_width - 2 * margin, max(0.4, min(0.75, out_width / 800 * 0.6)))
    thickness = 2 if scale >= 0.9 else 1
    line = cv2.getTextSize("Ag", FONT, scale, thickness)[0][1] + 12
    title = np.empty((2 * line, out_width, 3), dtype=np.uint8)
    title[:] = TITLE_BG
    draw_pieces(title, [(caption, WHITE)], margin, line - 6, scale, thickness)
    draw_pieces(title, pieces, margin, 2 * line - 8, scale, thickness)
    return np.concatenate([title, _pad_width(panels, out_width, TITLE_BG), _pad_width(plot, out_width, _BG)], axis=0)


def _spread(items: Sequence[int], count: int) -> list[int]:
    """``count`` evenly spaced entries of ``items`` (first and last included when count >= 2)."""
    if count <= 0 or not items:
        return []
    return [items[round(j)] for j in np.linspace(0, len(items) - 1, min(count, len(items)))]


def gif_frame_positions(n: int, scores: np.ndarray, labels_at_frames: np.ndarray | None, max_frames: int) -> list[int]:
    """Which of ``n`` scored frames a GIF shows: at most ``max_frames`` positions, sorted (time order).

    Always the highest-scoring frame (the first, on ties). With ``labels_at_frames`` [n] (1 = abnormal), the
    highest-scoring frame of every abnormal run and up to half the budget spread over abnormal frames, so events
    are shown as they unfold; the rest is spread evenly over the remaining frames. Deterministic.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size != n:
        raise ValueError(f"{scores.size} scores for {n} frames")
    _check_finite("scores", scores)
    if n <= max_frames:
        return list(range(n))
    picks = [int(np.argmax(scores))]
    if labels_at_frames is not None:
        labels_at_frames = np.asarray(labels_at_frames).reshape(-1)
        if labels_at_frames.size != n:
            raise ValueError(f"{labels_at_frames.size} labels for {n} frames")
        peaks = [s + int(np.argmax(scores[s : e + 1])) for s, e in abnormal_ranges(labels_at_frames)]
        picks += _spread(peaks, max_frames - 1)
        abnormal = np.flatnonzero(labels_at_frames == 1).tolist()
        picks += _spread(abnormal, max_frames // 2)
    chosen = set(list(dict.fromkeys(picks))[:max_frames])  # in priority order: the maximum is never dropped
    rest = [i for i in range(n) if i not in chosen]
    return sorted(chosen.union(_spread(rest, max_frames - len(chosen))))


def write_video_gif(
    frames: list[np.ndarray],
    error_maps: list[np.ndarray],
    scores: np.ndarray,
    frame_indices: np.ndarray,
    num_frames: int,
    labels: np.ndarray | None,
    threshold: float | None,
    title: str,
    targets: list[Path],
    max_frames: int = 60,
    max_width: int = 800,
    duration_ms: int = 120,
) -> list[int]:
    """Render a GIF of one video's scored frames and write the same bytes to every path in ``targets``.

    Args:
        frames: n [H, W, 3] uint8 RGB scored frames; ``error_maps``: their n [h, w] float prediction errors.
        scores: [n] frame scores; ``frame_indices``: [n] their frame numbers in the video (0 .. num_frames - 1).
        labels: [num_frames] {0, 1, -1} ground truth of the whole video, or ``None``.
        threshold, title: as for ``render_score_plot``.
        max_frames, max_width, duration_ms: GIF length, width in pixels (the plot is drawn at this width) and
            frame time.

    Returns:
        The positions (0 .. n - 1, sorted) of the frames shown, from ``gif_frame_positions``.
    """
    n = len(frames)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    frame_indices = np.asarray(frame_indices).reshape(-1)
    if n == 0:
        raise ValueError("a GIF needs at least one frame")
    if not len(error_maps) == scores.size == frame_indices.size == n:
        raise ValueError(f"{n} frames, {len(error_maps)} error maps, {scores.size} scores, {frame_indices.size} frame indices")
    plot = render_score_plot(scores, frame_indices, num_frames, labels, threshold, title, (max(200, round(0.3 * max_width)), max_width))
    labels_at = None if labels is None else np.asarray(labels).reshape(-1)[frame_indices]
    positions = gif_frame_positions(n, scores, labels_at, max_frames)
    chosen = [np.asarray(error_maps[p], dtype=np.float32) for p in positions]
    for m in chosen:
        _check_finite("error maps", m)
    bounds = display_bounds(torch.from_numpy(np.concatenate([m.reshape(-1) for m in chosen])))

    def render(picks: list[int], max_panel_height: int | None) -> list[np.ndarray]:
        pictures = []
        for p in picks:
            index = int(frame_indices[p])
            pictures.append(
                render_video_frame(
                    frames[p], chosen[positions.index(p)], bounds, plot, index / max(1, num_frames - 1),
                    float(scores[p]), threshold, None if labels_at is None else int(labels_at[p]),
                    f"{title}  frame {index} / {num_frames - 1}", max_panel_height,
                )
            )
        return pictures

    # A frame's bytes are the plot's (every frame re-encodes it: the cursor moves) plus the panels', which grow
    # with their area and the camera noise. Measure both on a few frames, then shrink the panels to the budget.
    budget = _GIF_BYTES_PER_FRAME * (max_width / 800) ** 2
    height, width = frames[positions[0]].shape[:2]
    panel_height = height * _panel_scale(height, width, plot.shape[1], None)
    sample = positions[:: max(1, len(positions) // 4)][:4]
    per_frame = len(encode_gif(render(sample, None), max_width, duration_ms)) / len(sample)
    fixed = len(encode_gif([plot], max_width, duration_ms))
    if per_frame > budget and panel_height > _MIN_SHRUNK:
        area = max(0.0, budget - fixed) / max(1.0, per_frame - fixed)
        panel_height = max(_MIN_SHRUNK, math.floor(panel_height * math.sqrt(area)))
        data = encode_gif(render(positions, panel_height), max_width, duration_ms)
    else:
        data = encode_gif(render(positions, None), max_width, duration_ms)
    for target in targets:
        atomic_write_bytes(target, lambda handle: handle.write(data))
    return positions
