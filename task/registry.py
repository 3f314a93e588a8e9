"""Explicit trainer registry keyed by (task_type, model_type, model_name).

Trainers register themselves with ``@register_trainer(...)``; ``main.py`` imports ``task.trainers`` (a fixed
list of modules) and looks the triple up here. Nothing is imported from a name the user typed.
"""

from __future__ import annotations

from typing import Callable

from task.common.errors import UserError

TRAINERS: dict[tuple[str, str, str], type] = {}


def register_trainer(task_type: str, model_type: str, model_name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        key = (task_type, model_type, model_name)
        if key in TRAINERS:
            raise RuntimeError(f"trainer {key} registered twice")
        TRAINERS[key] = cls
        return cls

    return decorate


def get_trainer(task_type: str, model_type: str, model_name: str) -> type:
    key = (task_type, model_type, model_name)
    if key not in TRAINERS:
        known = ", ".join("/".join(k) for k in sorted(TRAINERS)) or "none"
        raise UserError(
            f"no trainer registered for --task_type {task_type} --model_type {model_type} --model_name {model_name}; registered: {known}"
        )
    return TRAINERS[key]
