"""Drawing helpers shared by the image and video pictures: colours, text, the heatmap overlay, PNG and GIF encoding.

Pure functions over uint8 RGB arrays (OpenCV and Pillow); a heatmap colour means the same thing in every picture.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
from PIL import Image
from torch import Tensor

FONT = cv2.FONT_HERSHEY_SIMPLEX


WHITE = (255, 255, 255)


GREY = (190, 190, 190)


RED = (235, 60, 50)


GREEN = (70, 200, 90)


TITLE_BG = (32, 32, 32)


# Subsample large pixel sets before taking percentiles: the bounds only need to be robust, not exact.
MAX_PIXELS_FOR_BOUNDS = 4_000_000


def display_bounds(anomaly_maps: Tensor, pixel_threshold: float | None = None) -> tuple[float, float]:
    """Heatmap colour range shared by a set of maps.

    Args:
        anomaly_maps: [N, H, W] (or any shape) anomaly scores of the whole set.
        pixel_threshold: the pixel decision threshold; when finite the range extends to include it, so every
            pixel at or above it is drawn in the warm end of the colormap.

    Returns:
        (low, high) with low < high: the 1st percentile and the larger of the 99.9th percentile and the threshold.
    """
    values = anomaly_maps.detach().float().reshape(-1).cpu().numpy()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    if values.size > MAX_PIXELS_FOR_BOUNDS:
        values = values[:: math.ceil(values.size / MAX_PIXELS_FOR_BOUNDS)]
    low, high = (float(v) for v in np.percentile(values, [1.0, 99.9]))
    if pixel_threshold is not None and math.isfinite(pixel_threshold):
        high = max(high, float(pixel_threshold))
    if not high > low:
        high = low + 1e-6
    return low, high


def heatmap_overlay(
    image: np.ndarray, anomaly_map: np.ndarray, bounds: tuple[float, float], alpha: float = 0.5
) -> np.ndarray:
    """Jet-coloured ``anomaly_map`` [H, W] blended over ``image`` [H, W, 3] uint8 RGB."""
    low, high = bounds
    scaled = np.clip((anomaly_map.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    jet = cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    jet = cv2.cvtColor(jet, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1.0 - alpha, jet, alpha, 0.0)


def fit_scale(texts: list[str], width: int, start: float) -> float:
    """The largest font scale <= ``start`` at which every text fits in ``width`` pixels."""
    scale = start
    while scale > 0.25 and max(cv2.getTextSize(t, FONT, scale, 1)[0][0] for t in texts) > width:
        scale *= 0.9
    return scale


def draw_pieces(
    canvas: np.ndarray,
    pieces: list[tuple[str, tuple[int, int, int]]],
    x: int,
    baseline: int,
    scale: float,
    thickness: int,
) -> None:
    """Write coloured text pieces one after another on one line."""
    for text, colour in pieces:
        cv2.putText(canvas, text, (x, baseline), FONT, scale, colour, thickness, cv2.LINE_AA)
        x += cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return encoded.tobytes()


def encode_gif(frames: list[np.ndarray], max_width: int = 800, duration_ms: int = 700) -> bytes:
    """Frames ([H, W, 3] uint8 RGB, same size) -> looping palette GIF bytes, downscaled to ``max_width``."""
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    height, width = frames[0].shape[:2]
    scale = min(1.0, max_width / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    images = []
    for frame in frames:
        if scale < 1.0:
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        # No dithering: flat panels and text compress far better, and the heatmap has few distinct colours.
        images.append(
            Image.fromarray(frame).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        )
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0, optimize=False
    )
    return buffer.getvalue()
