"""ROC and PR curve pictures of an evaluation: image, pixel (where masks exist) and frame level.

``write_curves`` writes ``<folder>/roc_<level>.png`` and ``<folder>/pr_<level>.png`` per level that has both classes;
a level may hold several named score series (e.g. the paper and online video protocols), drawn on the same axes
with their AUROC / AP in the legend (scikit-learn's ``roc_curve``, ``roc_auc_score``, ``precision_recall_curve``,
``average_precision_score``; positive class = anomalous). Pictures are small (400 x 400 px) and quick to draw.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import rc_context
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from task.anomaly.unsupervised.drawing import png_bytes
from task.anomaly.unsupervised.plotting import STYLE, figure_rgb, new_figure
from task.common.io import atomic_write_bytes

__all__ = ["MAX_POINTS", "Series", "has_both_classes", "image_levels", "render_curve", "run_curves", "write_curves"]

log = logging.getLogger("anomaly")

# (name, labels [n] in {0, 1}, scores [n] float; higher = more anomalous)
Series = tuple[str, np.ndarray, np.ndarray]

# Pixel-level sets run to millions of values: a regular subsample of this many keeps the curves and areas to about
# 1e-3 and the pictures quick; the reported metrics (metrics.json) are computed on every pixel elsewhere.
MAX_POINTS = 2_000_000
_DRAWN = 2_000  # points per drawn curve: more are invisible at this size
_COLOURS = ("#1e64dc", "#eb3c32", "#2ca02c", "#9467bd")


def _subsample(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if labels.size > MAX_POINTS:
        step = -(-labels.size // MAX_POINTS)
        labels, scores = labels[::step], scores[::step]
    return labels, scores


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most ``_DRAWN`` points of a curve, first and last kept."""
    if x.size <= _DRAWN:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, _DRAWN).round().astype(np.int64))
    return x[keep], y[keep]


def has_both_classes(labels: np.ndarray) -> bool:
    labels = np.asarray(labels).reshape(-1)
    return bool(labels.size) and 0 < int((labels != 0).sum()) < labels.size


def render_curve(kind: str, series: Sequence[Series], title: str, size: tuple[int, int] = (400, 400)) -> np.ndarray:
    """``kind`` "roc" (TPR over FPR, chance diagonal) or "pr" (precision over recall, chance = positive rate) of every
    series that has both classes -> [H, W, 3] uint8 RGB; the legend gives each series' AUROC or AP."""
    if kind not in ("roc", "pr"):
        raise ValueError(f"kind must be 'roc' or 'pr', got {kind!r}")
    height, width = size
    with rc_context(STYLE):
        figure = new_figure(height, width)
        axes = figure.add_axes((0.14, 0.12, 0.82, 0.78))
        for colour, (name, labels, scores) in zip(_COLOURS, series):
            y, s = _subsample(labels, scores)
            if not has_both_classes(y):
                continue
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y, s)
                x_values, y_values = _thin(fpr, tpr)
                axes.plot(
                    x_values, y_values, color=colour, linewidth=1.6, label=f"{name} AUROC {roc_auc_score(y, s):.3f}"
                )
            else:
                precision, recall, _ = precision_recall_curve(y, s)
                x_values, y_values = _thin(recall[::-1], precision[::-1])
                axes.step(
                    x_values,
                    y_values,
                    where="post",
                    color=colour,
                    linewidth=1.6,
                    label=f"{name} AP {average_precision_score(y, s):.3f}",
                )
                axes.axhline(y.mean(), color=colour, linestyle=":", linewidth=1.0)
        if kind == "roc":
            axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1.0)
            axes.set_xlabel("false positive rate")
            axes.set_ylabel("true positive rate")
        else:
            axes.set_xlabel("recall")
            axes.set_ylabel("precision")
        axes.set_xlim(-0.01, 1.01)
        axes.set_ylim(-0.01, 1.01)
        axes.set_aspect("equal", adjustable="box")
        axes.grid(True, color="#e4e4e4", linewidth=0.8)
        axes.set_title(title, loc="left")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="lower right" if kind == "roc" else "lower left", framealpha=0.9)
        return figure_rgb(figure)


def write_curves(folder: Path, levels: Mapping[str, Sequence[Series]], prefix: str = "") -> list[Path]:
    """``<folder>/roc_<level>.png`` and ``pr_<level>.png`` for every level with at least one series holding both
    classes (others are skipped: no curve exists); returns the written paths. ``prefix`` starts the titles."""
    written = []
    for level, series in levels.items():
        if not any(has_both_classes(labels) for _, labels, _ in series):
            continue
        for kind, what in (("roc", "ROC"), ("pr", "PR")):
            data = png_bytes(render_curve(kind, series, f"{prefix}{level}-level {what}"))
            target = folder / f"{kind}_{level}.png"
            atomic_write_bytes(target, lambda handle, data=data: handle.write(data))
            written.append(target)
    return written


def image_levels(
    scores: np.ndarray, labels: np.ndarray, anomaly_maps: np.ndarray | None = None, masks: np.ndarray | None = None
) -> dict[str, list[Series]]:
    """The levels of an image evaluation: ``image`` (scores [N], labels [N]) and, with masks [N, H, W], ``pixel``
    (anomaly maps [N, H, W] against the masks)."""
    levels = {"image": [("image score", np.asarray(labels), np.asarray(scores))]}
    if masks is not None and anomaly_maps is not None:
        levels["pixel"] = [("anomaly map", np.asarray(masks), np.asarray(anomaly_maps))]
    return levels


def run_curves(folder: Path, levels: Mapping[str, Sequence[Series]], prefix: str = "") -> list[Path]:
    """``write_curves`` for an evaluation's outputs: a failure is a warning (pictures are a by-product and the run's
    model and metrics are already saved), never a lost run."""
    try:
        written = write_curves(folder, levels, prefix)
    except Exception as exc:  # noqa: BLE001
        log.warning("ROC/PR curve pictures not written (%s: %s)", type(exc).__name__, exc)
        return []
    if written:
        log.info("%d ROC/PR curve pictures written to %s", len(written), folder)
    return written
