"""Matplotlib on its Agg canvas, without pyplot: figures of an exact pixel size rendered to uint8 RGB arrays.

No global backend is selected (``pyplot`` is never imported), so nothing here depends on a display or changes what a
user's own matplotlib code sees. Every chart of the toolkit (video score plots, ROC and PR curves) is drawn here.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
STYLE = {"font.size": 9.0, "axes.titlesize": 10.0, "legend.fontsize": 8.0}


def new_figure(height: int, width: int) -> Figure:
    """A white figure of ``height`` x ``width`` pixels with an Agg canvas attached."""
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)
    return figure


def figure_rgb(figure: Figure) -> np.ndarray:
    """Render ``figure`` -> [H, W, 3] uint8 RGB (a copy; the figure can be discarded)."""
    canvas = figure.canvas
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[:, :, :3])


def axes_pixels(figure: Figure, axes) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the axes' plotting area in the rendered picture's pixels, y downwards, bounds inclusive."""
    height = figure.bbox.height
    box = axes.get_window_extent()
    return round(box.x0), round(height - box.y1), round(box.x1) - 1, round(height - box.y0) - 1
