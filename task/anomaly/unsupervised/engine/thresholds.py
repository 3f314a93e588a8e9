"""Which decision thresholds a model serves: derived from its calibration scores and the false-alarm targets.

A calibrated checkpoint stores, besides the thresholds it was written with, a small sample of the calibration scores
per kind (``calibration["samples"]``: image, pixel; ``task/common/conformal.py``). Video alarm thresholds follow
``SCORE.ONLINE.threshold_quantile`` (``video/evaluation.py``). The thresholds are a
function of those scores and of settings that are not the network's or the scoring's, so any mode may change them
without retraining or recalibrating:

* ``TEST.target_fpr`` (images) and ``TEST.pixel_target_fpr`` (pixels): the conformal order statistic
  of the calibration scores for that false-alarm target;
* ``TEST.image_threshold`` / ``TEST.pixel_threshold``: an explicit value, served as given.

Test labels never enter. A checkpoint without calibration scores (written before they existed, whose thresholds were
F1-optimal on its test set) serves its stored thresholds, with a warning.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from task.common.config import Config
from task.common.conformal import ScoreSample, Threshold

log = logging.getLogger("anomaly")

# kind -> (the config key of its false-alarm target, the config key of an explicit threshold or None)
KINDS: dict[str, tuple[str, str | None]] = {
    "image": ("TEST.target_fpr", "TEST.image_threshold"),
    "pixel": ("TEST.pixel_target_fpr", "TEST.pixel_threshold"),
}


def stored_samples(calibration: Any) -> dict[str, ScoreSample]:
    """The calibration score samples of a checkpoint's ``calibration`` entry, by kind (empty when it has none)."""
    samples = calibration.get("samples") if isinstance(calibration, dict) else None
    if not isinstance(samples, dict):
        return {}
    found = {kind: ScoreSample.from_dict(data) for kind, data in samples.items() if kind in KINDS}
    return {kind: sample for kind, sample in found.items() if sample is not None}


def derive(cfg: Config, samples: dict[str, ScoreSample]) -> dict[str, Threshold]:
    """The conformal threshold of each kind at the config's false-alarm target."""
    return {kind: sample.threshold(float(cfg.get(KINDS[kind][0]))) for kind, sample in samples.items()}


def explicit(cfg: Config, kind: str) -> float | None:
    key = KINDS[kind][1]
    value = cfg.get(key) if key else None
    return float(value) if value is not None and math.isfinite(value) else None


def resolve(cfg: Config, samples: dict[str, ScoreSample], what: str) -> tuple[dict[str, float], dict[str, Any]]:
    """(thresholds by kind, a record of how each was chosen for metrics.json / export metadata); one log line per kind.

    ``what`` names the model in the log lines (e.g. the checkpoint path).
    """
    values: dict[str, float] = {}
    record: dict[str, Any] = {}
    for kind, threshold in derive(cfg, samples).items():
        given = explicit(cfg, kind)
        if given is not None:
            values[kind] = given
            record[kind] = {"value": given, "given_by": KINDS[kind][1], "conformal": threshold.to_dict()}
            log.info(
                "%s threshold %.6g: given by %s (%s at its target would be %s)",
                kind,
                given,
                KINDS[kind][1],
                what,
                threshold.describe(),
            )
            continue
        values[kind] = threshold.value
        record[kind] = {**threshold.to_dict(), "given_by": KINDS[kind][0]}
        if threshold.capped:
            log.warning(
                "%s threshold: %s has %d calibration scores, too few for %s=%g (needs %d); using the largest one, "
                "which bounds false alarms at 1/(n+1) = %.3g",
                kind,
                what,
                threshold.n,
                KINDS[kind][0],
                threshold.alpha,
                math.ceil(1 / threshold.alpha - 1 - 1e-9),
                threshold.bound,
            )
        log.info("%s threshold %s", kind, threshold.describe())
    return values, record


def served(
    cfg: Config,
    calibration: Any,
    stored: dict[str, float],
    what: str,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The thresholds predict/export serve: re-derived from the stored calibration scores at the config's targets (or
    given explicitly); a checkpoint without calibration scores serves its stored ones, with a warning."""
    samples = stored_samples(calibration)
    if not samples:
        if stored and not isinstance(calibration, dict):  # (a video calibration keeps its threshold itself)
            log.warning(
                "%s holds no calibration scores (an older model.pt, whose thresholds were chosen on its test labels); "
                "serving them as stored: rerun --mode test to calibrate them on held-out normal images",
                what,
            )
        return dict(stored), {}
    values, record = resolve(cfg, samples, what)
    changed = {k: (stored.get(k), v) for k, v in values.items() if stored.get(k) != v}
    for kind, (old, new) in changed.items():
        log.info(
            "serving %s threshold %.6g instead of the %s stored in %s "
            "(re-derived from its calibration scores; no retraining)",
            kind,
            new,
            "none" if old is None else f"{old:.6g}",
            what,
        )
    return {**stored, **values}, record
