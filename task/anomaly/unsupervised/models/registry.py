"""Explicit method registry keyed by (task_type, model_type, model_name, modality).

Method modules register an instance with ``register_method(...)``; ``main.py`` imports
``task.anomaly.unsupervised.models.available`` (a fixed list
of modules) and looks the key up here. Nothing is imported from a name the user typed. One ``--model_name`` may have
an image and a video variant (DMAD's PPDM and PDM); the run's ``DATASET.format`` picks the modality.
"""

from __future__ import annotations

from typing import Any

from task.common.errors import UserError

METHODS: dict[tuple[str, str, str, str], Any] = {}


def register_method(method: Any, task_type: str = "anomaly", model_type: str = "unsupervised") -> Any:
    """Register ``method`` (which has ``name`` and ``modality``) under (task_type, model_type, name, modality)."""
    key = (task_type, model_type, method.name, method.modality)
    if key in METHODS:
        raise RuntimeError(f"method {key} registered twice")
    METHODS[key] = method
    return method


def get_method(task_type: str, model_type: str, model_name: str, modality: str) -> Any:
    key = (task_type, model_type, model_name, modality)
    if key in METHODS:
        return METHODS[key]
    if any(k[:3] == key[:3] for k in METHODS):
        have = ", ".join(sorted(k[3] for k in METHODS if k[:3] == key[:3]))
        raise UserError(f"--model_name {model_name} has no {modality} variant (it has: {have}); check DATASET.format")
    known = ", ".join("/".join(k[:3]) for k in sorted(METHODS)) or "none"
    raise UserError(
        f"no method registered for --task_type {task_type} --model_type {model_type} --model_name {model_name}; "
        f"registered: {known}"
    )
