"""The settings rule (``settings.py``) applied to a loaded model: ``--mode test`` applies the config's scoring
settings, predict and export serve the checkpoint's (a differing override is an error, a differing YAML value a
warning)."""

from __future__ import annotations

import logging

from task.anomaly.unsupervised.engine.engine import Engine, LoadedModel
from task.anomaly.unsupervised.engine.settings import with_settings
from task.anomaly.unsupervised.engine.thresholds import served
from task.common.errors import UserError

log = logging.getLogger("anomaly")


# ---------------------------------------------------------------------------------------------- settings at test time
def apply_test_scoring(engine: Engine, loaded: LoadedModel) -> bool:
    """``--mode test``: score with the config's settings. Returns True when they differ from the checkpoint's (the
    model must then be recalibrated)."""
    method = engine.method
    before = method.scoring_settings(loaded.model)
    method.apply_scoring(loaded.model, loaded.cfg)
    after = method.scoring_settings(loaded.model)
    changed = {k: (before[k], after[k]) for k in after if before.get(k) != after[k]}
    for key, (old, new) in changed.items():
        log.info(
            "%s: scoring with %r from the config (the checkpoint was calibrated with %r); recalibrating", key, new, old
        )
    return bool(changed) and loaded.calibrated


def check_served_scoring(engine: Engine, loaded: LoadedModel) -> None:
    """predict/export serve the checkpoint's scoring (its thresholds belong to it): an override that differs is an
    error, a YAML value that differs is a warning."""
    held = engine.method.scoring_settings(loaded.model)
    wanted = engine.method.config_scoring(loaded.cfg)
    for key, value in held.items():
        asked = wanted.get(key, value)
        if asked == value:
            continue
        if key in engine.overridden:
            raise UserError(
                f"{key}={asked!r} differs from the {value!r} checkpoint {loaded.path} was calibrated with; "
                f"run --mode test {key}={asked} first and use the model.pt it writes"
            )
        log.warning(
            "%s: serving the checkpoint's %r (the config says %r); a calibrated model keeps its scoring settings",
            key,
            value,
            asked,
        )


def load_for_serving(engine: Engine, checkpoint: str | None) -> LoadedModel:
    """A calibrated model for predict/export, with the checkpoint's scoring settings."""
    path = engine.checkpoint_path(checkpoint)
    if path.suffix.lower() == ".onnx":
        raise UserError(
            f"--checkpoint {path} is an ONNX file; predict from it with --backend onnx, export from a model.pt"
        )
    loaded = engine.load(path)
    if not loaded.calibrated:
        raise UserError(
            f"checkpoint {path} has no score calibration or thresholds; run --mode test --checkpoint {path} first "
            "and use the model.pt it writes"
        )
    check_served_scoring(engine, loaded)
    loaded.thresholds, _ = served(engine.cfg, loaded.calibration, loaded.thresholds, str(path))
    # what is served (and written into an export's metadata) is the calibrated scoring the model holds
    loaded.cfg = with_settings(loaded.cfg, engine.method.scoring_settings(loaded.model))
    return loaded
