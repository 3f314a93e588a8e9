"""The calibration split: normal training images held out from training, for score statistics and thresholds.

``DATASET.calibration_split`` (a fraction) of the normal training images, at least ``MIN_CALIBRATION_IMAGES``, never
trains the model: score normalisation and the decision thresholds are fitted on them (``image/evaluation.py``). They
are chosen with the run's ``SEED`` from the images sorted by path, so the split does not depend on the order a file
system lists them in, and is the same for every format (MVTec, VisA, folder).

Fallback: when holding them out would leave fewer than ``MIN_TRAINING_IMAGES`` to train on (or with
``calibration_split=0``), nothing is held out, calibration uses the training images themselves (scores of images the
model fitted run low, so real false-alarm rates come out above the target), one warning says so, and metrics.json
records ``calibration_source: "train"``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from task.anomaly.unsupervised.data.image.dataset import Sample

__all__ = ["MIN_CALIBRATION_IMAGES", "MIN_TRAINING_IMAGES", "CalibrationSplit", "split_calibration"]

log = logging.getLogger("anomaly")

# Fewer calibration images than this bound the false-alarm rate only coarsely (1 / (n + 1) at best).
MIN_CALIBRATION_IMAGES = 8
# Holding out calibration images must leave at least this many to train on.
MIN_TRAINING_IMAGES = 8

HELD_OUT = "calibration_split"  # calibration_source values
TRAINING = "train"


@dataclass(frozen=True)
class CalibrationSplit:
    """The training samples, the calibration samples, and where the latter come from (``HELD_OUT`` or ``TRAINING``)."""

    train: list[Sample]
    calibration: list[Sample]
    source: str

    @property
    def held_out(self) -> bool:
        return self.source == HELD_OUT


def calibration_count(n: int, fraction: float) -> int:
    """How many of ``n`` normal training images are held out (0: fall back to calibrating on the training images)."""
    if fraction <= 0:
        return 0
    count = max(math.ceil(fraction * n), MIN_CALIBRATION_IMAGES)
    return count if n - count >= MIN_TRAINING_IMAGES else 0


def split_calibration(samples: list[Sample], fraction: float, seed: int, warn: bool = True) -> CalibrationSplit:
    """Split the normal training ``samples`` (see the module docstring); one warning when falling back."""
    count = calibration_count(len(samples), fraction)
    if count == 0:
        if warn and fraction > 0:
            log.warning(
                "only %d normal training images: too few to hold out a calibration split (needs %d + %d); "
                "calibrating on the training images instead, so false-alarm rates will exceed the target "
                "(calibration_source: train)",
                len(samples), MIN_CALIBRATION_IMAGES, MIN_TRAINING_IMAGES,
            )
        return CalibrationSplit(list(samples), list(samples), TRAINING)
    ordered = sorted(samples, key=lambda s: s.path)
    # A generator of its own: the split must not move the training run's random stream.
    picked = set(np.random.default_rng(seed).permutation(len(ordered))[:count].tolist())
    train = [s for i, s in enumerate(ordered) if i not in picked]
    calibration = [s for i, s in enumerate(ordered) if i in picked]
    return CalibrationSplit(train, calibration, HELD_OUT)
