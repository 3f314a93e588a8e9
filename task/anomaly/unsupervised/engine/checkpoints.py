"""This toolkit's checkpoints: what they hold, how they are read, and which settings they decide.

``model.pt`` = {format, version, config, state_dict, thresholds}; ``last.pt`` adds optimizer, scheduler, step and
rng_torch. All are read with ``torch.load(weights_only=True)``. Version 1 files (before ``MODEL.pdm`` and
``DATASET.format`` existed) load: a key missing from a saved config takes the schema default that reproduces the old
behaviour. Which settings a checkpoint decides is the rule of ``settings.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from task.anomaly.unsupervised.engine.settings import MISSING, dotted
from task.common.config import Config, validate_plain_data
from task.common.errors import UserError
from task.common.io import load_checkpoint

log = logging.getLogger("anomaly")

CHECKPOINT_VERSION = 2


def make_payload(method, cfg: Config, model: nn.Module, thresholds: dict[str, float] | None) -> dict[str, Any]:
    return {
        "format": method.checkpoint_format,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "thresholds": thresholds or {},
    }


def read_checkpoint(path: Path, method) -> dict:
    """The checkpoint's content: one of ours (checked) or an official release's the method can import."""
    state = load_checkpoint(path, "checkpoint")
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint of this toolkit (it holds a {type(state).__name__})")
    if "format" not in state:
        if method.is_foreign_checkpoint(state):
            return state
        keys = ", ".join(sorted(map(str, state))[:5])
        raise UserError(
            f"{path} is neither a {method.name} checkpoint of this toolkit nor an official one (keys: {keys})"
        )
    if state["format"] != method.checkpoint_format:
        raise UserError(
            f"{path} is a {str(state['format'])[:40]!r} checkpoint, not {method.checkpoint_format!r}; pass the "
            f"model.pt of a {method.name} {method.modality} run"
        )
    weights = state.get("state_dict")
    if (
        not isinstance(state.get("config"), dict)
        or not isinstance(weights, dict)
        or not all(isinstance(v, Tensor) for v in weights.values())
    ):
        raise UserError(
            f"{path} claims to be a {method.name} checkpoint but lacks its config or state_dict; re-create it by "
            "training or pass another file"
        )
    validate_plain_data(state["config"], f"the config stored in checkpoint {path}")
    return state


def load_weights(model: nn.Module, state: dict, path: Path) -> None:
    """Load our own checkpoint's state_dict; a tensor missing or of the wrong shape is a one-line error."""
    own = model.state_dict()
    entries = state["state_dict"]
    wrong = [k for k in entries if k in own and tuple(entries[k].shape) != tuple(own[k].shape)]
    unexpected = [k for k in entries if k not in own]
    missing = [k for k in own if k not in entries]
    if wrong or unexpected or missing:
        detail = (
            f"shape mismatch at {wrong[0]} ({tuple(entries[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})"
            if wrong
            else f"unexpected tensor {unexpected[0]}"
            if unexpected
            else f"missing tensor {missing[0]}"
        )
        raise UserError(
            f"checkpoint {path} does not fit the model its config describes ({detail}); the file is damaged or from "
            "another model"
        )
    model.load_state_dict(entries)


def resume_keys(method) -> tuple[str, ...]:
    """Settings a resumed run must share with its last.pt: the network's, and those that shape the optimisation (a
    loaded optimizer state would silently override a changed lr; batch size and seed fix the data order)."""
    return (
        tuple(method.network_keys)
        + tuple(method.resume_keys)
        + (
            "OPTIMIZER.name",
            "OPTIMIZER.lr",
            "OPTIMIZER.betas",
            "OPTIMIZER.weight_decay",
            "SCHEDULER.name",
            "DATALOADER.batch_size",
            "SEED",
        )
    )


def check_resumable(method, cfg: Config, state: Any, path: Path) -> None:
    """Raise a one-line UserError unless ``state`` is a complete last.pt of this method trained with ``cfg``'s
    settings."""
    fix = "delete it or set RESUME.option=false"
    if not isinstance(state, dict) or state.get("format") != method.checkpoint_format:
        raise UserError(f"{path} is not a resumable {method.name} training state; {fix}")
    absent = [k for k in ("config", "state_dict", "optimizer", "scheduler", "step", "rng_torch") if k not in state]
    if absent:
        raise UserError(f"{path} lacks {', '.join(absent)} (an incomplete training state); {fix}")
    if not isinstance(state["config"], dict):
        raise UserError(f"{path} holds a malformed config; {fix}")
    validate_plain_data(state["config"], f"the config stored in {path}")
    saved = state["config"]
    changed = [
        f"{k}={dotted(saved, k)!r} (config: {cfg.get(k)!r})"
        for k in resume_keys(method)
        if dotted(saved, k) is not MISSING and dotted(saved, k) != cfg.get(k)
    ]
    if changed:
        raise UserError(
            f"{path} was trained with {', '.join(changed)}; rerun with those settings to resume, "
            "or set RESUME.option=false or RESULT.exp_name to start a new run"
        )
