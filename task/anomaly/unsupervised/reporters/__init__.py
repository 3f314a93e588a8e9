"""Experiment reporters behind one small interface (base.py). Add one: a module here and one line in REPORTERS."""

from __future__ import annotations

from pathlib import Path

from task.common.config import Config

from .base import Reporter, Reporters
from .tensorboard import TensorBoardReporter
from .wandb import WandbReporter

# Each entry: from_config(cfg, run_dir, job_type, method_name) -> a reporter, or None when it is switched off.
REPORTERS = [WandbReporter, TensorBoardReporter]


def build_reporters(cfg: Config, run_dir: Path, job_type: str, method_name: str) -> Reporters:
    built = (factory.from_config(cfg, Path(run_dir), job_type, method_name) for factory in REPORTERS)
    return Reporters([r for r in built if r is not None])


__all__ = ["REPORTERS", "Reporter", "Reporters", "build_reporters"]
