"""The settings rule, in one place: which settings a checkpoint decides and which the config may change.

* ``Method.network_keys`` define the network: at test/predict/export they come from the checkpoint; a command-line
  override that differs is an error naming both values, a differing YAML value is a warning and the checkpoint's
  value is used (``network_config``).
* ``Method.scoring_keys`` define how maps become scores: ``--mode test`` applies the config's values and recalibrates
  (``serving.apply_test_scoring``); predict and export serve the checkpoint's values, because its thresholds
  belong to them (``serving.load_for_serving``), and an override that differs is an error telling the user to run
  ``--mode test`` first.
* The false-alarm targets and explicit thresholds (``TEST.target_fpr``, ``TEST.pixel_target_fpr``,
  ``TEST.image_threshold``, ``TEST.pixel_threshold``) are neither: the thresholds are re-derived from the calibration
  scores the checkpoint stores (``thresholds.py``), in every mode, without retraining; predict/export log which
  threshold they serve.

Workers receive the resolved values (a ``LoadedModel`` whose ``cfg`` holds what is served), never the rule.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from task.common.config import Config
from task.common.errors import UserError

log = logging.getLogger("anomaly")


MISSING = object()


def dotted(data: Any, key: str, default: Any = MISSING) -> Any:
    """``data['A']['b']`` for ``key='A.b'``; ``default`` (or ``MISSING``) when absent, e.g. in an older config."""
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


def network_config(method, cfg: Config, state: dict, path: Path, overridden: frozenset[str]) -> Config:
    """``cfg`` with the network-defining settings of the checkpoint ``state`` (see method.py for the rule).

    The weights are inside the checkpoint, so MODEL.pretrained / MODEL.backbone_weights are cleared.
    """
    data = cfg.to_dict()
    saved = state["config"]
    for key in method.network_keys:
        value = dotted(saved, key)
        if value is MISSING:  # an older checkpoint: the schema default reproduces what it was trained with
            continue
        value = _schema_field(method, key).check(f"{key} stored in checkpoint {path}", value)
        current = cfg.get(key)
        if value == current:
            continue
        if key in overridden:
            raise UserError(
                f"{key}={current!r} was given on the command line but checkpoint {path} was trained with "
                f"{key}={value!r}; "
                "the network is defined by its weights: drop the override or pass a checkpoint trained with it"
            )
        log.warning(
            "%s: using the checkpoint's %r (the config says %r); network settings come from the checkpoint",
            key,
            value,
            current,
        )
        set_dotted(data, key, value)
    for key, value in (("MODEL.pretrained", False), ("MODEL.backbone_weights", None)):
        if dotted(data, key) is not MISSING:
            set_dotted(data, key, value)
    return Config(data)


def with_settings(cfg: Config, settings: dict[str, Any]) -> Config:
    """``cfg`` with the given dotted keys set to the given values."""
    data = cfg.to_dict()
    for key, value in settings.items():
        set_dotted(data, key, value)
    return Config(data)


def scoring_config(method, cfg: Config, state: dict) -> Config:
    """``cfg`` with the scoring settings the checkpoint was calibrated with (where its saved config records them)."""
    data = cfg.to_dict()
    for key in method.scoring_keys:
        value = dotted(state["config"], key)
        if value is not MISSING:
            set_dotted(data, key, _schema_field(method, key).check(f"{key} stored in checkpoint", value))
    return Config(data)


def _schema_field(method, key: str):
    """The schema Field of a dotted key: checkpoint values are validated like YAML values before use."""
    from task.anomaly.unsupervised.engine.schema import method_schema

    node = method_schema(method)
    for part in key.split("."):
        node = node[part]
    return node
