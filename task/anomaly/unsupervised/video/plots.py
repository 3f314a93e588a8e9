"""Pictures of video anomaly scores: the frame score over time, and a GIF of frames with that plot under them.

The score plot is drawn by matplotlib (Agg canvas, ``plotting``); the GIF frames put the video frame and its
prediction-error heatmap (the shared ``drawing`` helpers, so a heatmap colour means the same thing everywhere) above
that plot, whose cursor is painted into the rendered plot per frame, so the plot is drawn once per GIF.

Plot geometry: the axes of a score plot ``size = (H, W)`` sit at fixed pixel margins (``plot_area``); the x axis runs
from frame 0 at column ``plot_x(0, N, W)`` to frame N - 1 at ``plot_x(N - 1, N, W)``. ``render_video_frame`` takes the
cursor as a fraction of that axis: ``cursor_x = frame_index / max(1, num_frames - 1)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib import rc_context

from task.anomaly.unsupervised.drawing import (
    FONT,
    GREEN,
    GREY,
    RED,
    TITLE_BG,
    WHITE,
    display_bounds,
    draw_pieces,
    encode_gif,
    fit_scale,
    heatmap_overlay,
)
from task.anomaly.unsupervised.plotting import STYLE, figure_rgb, new_figure
from task.common.io import atomic_write_bytes
from task.common.spacing import spread

__all__ = [
    "abnormal_ranges",
    "gif_frame_positions",
    "plot_area",
    "plot_x",
    "render_score_plot",
    "render_video_frame",
    "write_video_gif",
]

_BG = (255, 255, 255)
_SHADE = "#ffcdcd"  # ground-truth abnormal frames: light red, so the red alarm dots stay visible on it
_LINE = "#1e64dc"
_THRESHOLD = "#f58c00"
_ALARM = "#eb3c32"
CURSOR = (120, 0, 170)
_MIN_PANEL = 128  # frames smaller than this are upscaled so the panel names stay legible on them
_PANEL_HEIGHT = 0.3  # default largest panel height, as a fraction of the plot width
_MIN_SHRUNK = _MIN_PANEL  # write_video_gif shrinks panels no further than this to meet its byte budget
# Byte budget of a GIF frame at 800 px wide (60 frames < 2 MB); write_video_gif shrinks the panels to meet it.
_GIF_BYTES_PER_FRAME = 32_000
# Pixel margins around the axes: y tick labels left, title above, x tick labels and the axis name below.
_LEFT, _RIGHT, _TOP, _BOTTOM = 54, 14, 44, 38


def abnormal_ranges(labels: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive ``[start, end]`` index runs where ``labels`` [N] (values in {0, 1, -1}) equals 1, in order."""
    flags = np.asarray(labels).reshape(-1) == 1
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def plot_area(height: int, width: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the axes of a score plot of ``height`` x ``width`` pixels, inclusive pixel bounds."""
    x0, x1, y0, y1 = _LEFT, width - 1 - _RIGHT, _TOP, height - 1 - _BOTTOM
    if x1 - x0 < 16 or y1 - y0 < 16:
        raise ValueError(f"a score plot needs more than {height} x {width} px")
    return x0, y0, x1, y1


def _x_at(fraction: float, width: int) -> int:
    """Pixel column of ``fraction`` (0 = first frame, 1 = last) along the x axis of a plot ``width`` wide."""
    x0, x1 = _LEFT, width - 1 - _RIGHT
    return x0 + math.floor(min(1.0, max(0.0, fraction)) * (x1 - x0) + 0.5)


def plot_x(frame_index: float, num_frames: int, plot_width: int) -> int:
    """Pixel column of frame ``frame_index`` (0 .. num_frames - 1) in a score plot ``plot_width`` pixels wide."""
    return _x_at(frame_index / max(1, num_frames - 1), plot_width)


def _value_range(scores: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """The y range: all scores and the threshold, padded 6% so neither sits on the frame of the axes."""
    values = np.concatenate([scores, [threshold] if threshold is not None else []]).astype(np.float64)
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-9 * max(1.0, abs(high)):
        # Constant scores: centre them in a range of +-10% of their magnitude (or +-0.5 around 0).
        pad = 0.1 * abs(high) if high != 0 else 0.5
        low, high = low - pad, high + pad
    pad = 0.06 * (high - low)
    return low - pad, high + pad


def _check_finite(name: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def _text_box(canvas: np.ndarray, text: str, x: int, baseline: int, scale: float, colour, background) -> None:
    """``text`` on a filled box (the GIF's panel names)."""
    (w, h), descent = cv2.getTextSize(text, FONT, scale, 1)
    cv2.rectangle(canvas, (x - 2, baseline - h - 2), (x + w + 2, baseline + descent), background, -1)
    cv2.putText(canvas, text, (x, baseline), FONT, scale, colour, 1, cv2.LINE_AA)


def render_score_plot(
    scores: np.ndarray,
    frames: np.ndarray,
    num_frames: int,
    labels: np.ndarray | None,
    threshold: float | None,
    title: str,
    size: tuple[int, int] = (360, 960),
    first_frame: int = 0,
) -> np.ndarray:
    """The frame anomaly score of one video over time (matplotlib).

    Args:
        scores: [n] float frame scores (finite; n may be 0).
        frames: [n] int frame numbers ``first_frame .. first_frame + num_frames - 1`` of the scores (scored frames
            may skip some frames).
        num_frames: frames on the x axis, which runs from ``first_frame`` to ``first_frame + num_frames - 1`` (see
            ``plot_x``; a live stream plots its latest window with ``first_frame`` > 0).
        labels: [num_frames] int in {0, 1, -1} (1 = abnormal, -1 = unknown) of the frames on the axis: the runs of
            1 are shaded light red; ``None``: no shading.
        threshold: the alarm threshold, a dashed line with its value in the legend; scores >= it get red dots.
        title: written above the plot.
        size: (height, width) of the picture.

    Returns:
        [height, width, 3] uint8 RGB.

    Raises:
        ValueError: NaN/inf scores or threshold, mismatched shapes, frame numbers or labels out of range.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    frames = np.asarray(frames).reshape(-1) - first_frame
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if frames.shape != scores.shape:
        raise ValueError(f"{scores.size} scores but {frames.size} frame indices")
    if frames.size and (frames.min() < 0 or frames.max() >= num_frames):
        raise ValueError(f"frame indices must lie in {first_frame} .. {first_frame + num_frames - 1}")
    _check_finite("scores", scores)
    if threshold is not None:
        _check_finite("threshold", np.asarray([threshold], dtype=np.float64))
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.size != num_frames:
            raise ValueError(f"{labels.size} labels for {num_frames} frames")
    height, width = size
    x0, y0, x1, y1 = plot_area(height, width)
    with rc_context(STYLE):
        figure = new_figure(height, width)
        # Axes at exact pixel margins: plot_x and the GIF cursor know where every frame is without asking matplotlib.
        axes = figure.add_axes((x0 / width, (height - 1 - y1) / height, (x1 - x0 + 1) / width, (y1 - y0 + 1) / height))
        last = max(1, num_frames - 1)
        axes.set_xlim(first_frame, first_frame + last)
        axes.set_ylim(*_value_range(scores, threshold))
        axes.grid(True, color="#e4e4e4", linewidth=0.8)
        axes.set_axisbelow(True)
        if labels is not None:
            for n, (start, end) in enumerate(abnormal_ranges(labels)):
                # A frame owns the half frame either side of it, so a single abnormal frame is as wide as any other.
                axes.axvspan(
                    first_frame + start - 0.5,
                    first_frame + end + 0.5,
                    color=_SHADE,
                    linewidth=0,
                    label="abnormal (ground truth)" if n == 0 else None,
                )
        order = np.argsort(frames, kind="stable")
        xs, ys = frames[order] + first_frame, scores[order]
        if xs.size:
            marker = "o" if xs.size == 1 else None
            axes.plot(xs, ys, color=_LINE, linewidth=1.6, marker=marker, markersize=3, label="frame score")
        else:
            axes.text(0.5, 0.5, "no scored frames", transform=axes.transAxes, ha="center", va="center", color="grey")
        if threshold is not None:
            axes.axhline(
                threshold, color=_THRESHOLD, linestyle=(0, (5, 3)), linewidth=1.6, label=f"threshold {threshold:.4g}"
            )
            alarm = ys >= threshold
            if alarm.any():
                axes.scatter(xs[alarm], ys[alarm], s=12, color=_ALARM, zorder=3, label="alarm (score >= threshold)")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.set_xlabel("frame", labelpad=1)
        figure.text(x0 / width, 1 - 4 / height, title, ha="left", va="top", fontsize=STYLE["axes.titlesize"])
        if axes.get_legend_handles_labels()[0]:
            # In the row between the title and the axes: the legend never hides a curve.
            axes.legend(
                loc="lower left",
                bbox_to_anchor=(0.0, 1.0),
                ncol=4,
                frameon=False,
                borderaxespad=0.1,
                borderpad=0.1,
                handlelength=1.6,
                columnspacing=1.2,
            )
        return figure_rgb(figure)


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
    _, y0, _, y1 = plot_area(*plot.shape[:2])
    x = _x_at(cursor_x, plot.shape[1])
    plot[y0 : y1 + 1, x : x + 2] = CURSOR

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
    scale = fit_scale(
        [caption, "".join(p for p, _ in pieces)], out_width - 2 * margin, max(0.4, min(0.75, out_width / 800 * 0.6))
    )
    thickness = 2 if scale >= 0.9 else 1
    line = cv2.getTextSize("Ag", FONT, scale, thickness)[0][1] + 12
    title = np.empty((2 * line, out_width, 3), dtype=np.uint8)
    title[:] = TITLE_BG
    draw_pieces(title, [(caption, WHITE)], margin, line - 6, scale, thickness)
    draw_pieces(title, pieces, margin, 2 * line - 8, scale, thickness)
    return np.concatenate([title, _pad_width(panels, out_width, TITLE_BG), _pad_width(plot, out_width, _BG)], axis=0)


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
        picks += spread(peaks, max_frames - 1)
        abnormal = np.flatnonzero(labels_at_frames == 1).tolist()
        picks += spread(abnormal, max_frames // 2)
    chosen = set(list(dict.fromkeys(picks))[:max_frames])  # in priority order: the maximum is never dropped
    rest = [i for i in range(n) if i not in chosen]
    return sorted(chosen.union(spread(rest, max_frames - len(chosen))))


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
        raise ValueError(
            f"{n} frames, {len(error_maps)} error maps, {scores.size} scores, {frame_indices.size} frame indices"
        )
    plot = render_score_plot(
        scores, frame_indices, num_frames, labels, threshold, title, (max(200, round(0.3 * max_width)), max_width)
    )
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
                    frames[p],
                    chosen[positions.index(p)],
                    bounds,
                    plot,
                    index / max(1, num_frames - 1),
                    float(scores[p]),
                    threshold,
                    None if labels_at is None else int(labels_at[p]),
                    f"{title}  frame {index} / {num_frames - 1}",
                    max_panel_height,
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
