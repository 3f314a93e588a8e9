"""The video calibration split: the last ``DATASET.calibration_split`` of each training video's scored frames.

Those frames are never prediction targets in training; the online protocol's statistics and the alarm threshold are
fitted on them (``video/evaluation.py``). Taking the end of every video (rather than whole videos) keeps every video's
background and every per-video template in training; the first frames of a calibration clip are training frames, its
target is not. Fallback: with ``calibration_split=0`` or fewer than ``MIN_CALIBRATION_FRAMES`` calibration frames in
all, nothing is held out and calibration uses the training clips (one warning; metrics.json says
``calibration_source: train``).
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger("anomaly")

# Fewer held-out frames than this cannot place a 1 % alarm threshold (conformal rank ceil((n + 1) 0.99) <= n needs 99).
MIN_CALIBRATION_FRAMES = 99


def split_rows(index: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray, str]:
    """(training item indices, calibration item indices, source) of a clip dataset's ``index`` [M, 2] rows
    (video, target frame), by the last ``fraction`` of each video's targets; every video keeps at least one
    training target."""
    videos = index[:, 0]
    calibration = np.zeros(len(index), dtype=bool)
    if fraction > 0:
        for v in np.unique(videos):
            rows = np.flatnonzero(videos == v)
            held = min(math.ceil(fraction * rows.size), rows.size - 1)
            if held > 0:
                calibration[rows[np.argsort(index[rows, 1])[-held:]]] = True
    if fraction > 0 and calibration.sum() >= MIN_CALIBRATION_FRAMES:
        return np.flatnonzero(~calibration), np.flatnonzero(calibration), "calibration_split"
    if fraction > 0:
        log.warning(
            "only %d frames would be held out for calibration (needs %d; raise DATASET.calibration_split or add "
            "training video); calibrating on the training frames instead, so alarm rates will exceed the target "
            "(calibration_source: train)",
            int(calibration.sum()), MIN_CALIBRATION_FRAMES,
        )
    everything = np.arange(len(index))
    return everything, everything, "train"
