"""What a method must tell the engine: the small, typed interface between "running a model" and "what DMAD is".

The engine (engine.py) owns modes, the loop, resume, DDP, evaluation, outputs and reporters; a method owns its
network, loss, optimiser groups, one training step's loss, score calibration, checkpoint conversion (including an
official release's format) and the extra maps it adds to the shared inference record. A method module registers an instance with
``task.anomaly.unsupervised.models.registry.register_method``; shared code never imports a method's package.

Settings are sorted by what they define (the rule the README documents):

* ``network_keys`` define the network: at test/predict/export they come from the checkpoint; a command-line override
  that differs is an error naming both values, a differing YAML value is a warning and the checkpoint's value is used.
* ``scoring_keys`` define how maps become scores: ``--mode test`` applies the config's values and recalibrates;
  predict and export use the checkpoint's values (its thresholds belong to them), and an override that differs is an
  error telling the user to run ``--mode test`` with it first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from task.anomaly.unsupervised.records import Predictions
from task.common.config import Config, Schema


class Method(ABC):
    """One anomaly-detection method. Instances are stateless; everything run-specific is passed in."""

    name: str  # the --model_name it answers to
    modality: str  # "image" (one image in, one map out) or "video" (a clip in, the next frame's scores out)
    checkpoint_format: str  # the "format" tag of this method's checkpoints
    model_schema: Schema  # the MODEL section of the run schema
    extra_sections: Schema = {}  # further sections of the method's own (e.g. video scoring)
    network_keys: tuple[str, ...] = ()
    scoring_keys: tuple[str, ...] = ()
    resume_keys: tuple[str, ...] = ()  # MODEL keys that shape the optimisation (a resumed run must share them)

    def validate(self, cfg: Config) -> None:
        """Raise a one-line UserError for settings this method cannot run (checked once, before any work)."""

    @abstractmethod
    def build(self, cfg: Config, pretrained: bool | None = None) -> nn.Module:
        """The network for ``cfg`` (``pretrained`` overrides MODEL.pretrained, e.g. False when weights follow)."""

    def build_for_weights(self, cfg: Config, state_dict: dict[str, Tensor]) -> nn.Module:
        """The network that ``state_dict`` (one of our checkpoints) fills; its encoder weights come with it."""
        return self.build(cfg, pretrained=False)

    def on_epoch_end(self, cfg: Config, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """Adjust the optimiser after the scheduler's step at the end of 0-based ``epoch`` (default: nothing)."""

    @abstractmethod
    def criterion(self, cfg: Config) -> nn.Module:
        """The training loss module."""

    @abstractmethod
    def optimizer_groups(self, cfg: Config, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups for the optimiser (trainable parameters only; per-group ``lr`` where it differs)."""

    @abstractmethod
    def training_loss(self, model: nn.Module, criterion: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward one training batch (already on the device) and return (loss, named loss terms)."""

    def apply_scoring(self, model: nn.Module, cfg: Config) -> None:
        """Set the scoring settings (``scoring_keys``) of ``cfg`` on ``model`` (default: the model holds none)."""

    def scoring_settings(self, model: nn.Module) -> dict[str, Any]:
        """The scoring settings ``model`` currently holds, by dotted key (for checks and export metadata)."""
        return {}

    def config_scoring(self, cfg: Config) -> dict[str, Any]:
        """The scoring settings ``cfg`` asks for, resolved as ``apply_scoring`` would apply them."""
        return {key: cfg.get(key) for key in self.scoring_keys}

    def read_foreign_file(self, path: Path) -> dict | None:
        """A foreign checkpoint file that ``torch.load(weights_only=True)`` refuses (e.g. a whole-module pickle),
        read without executing pickled code into a state ``is_foreign_checkpoint`` accepts; None when not one."""
        return None

    @abstractmethod
    def is_foreign_checkpoint(self, state: dict) -> bool:
        """True for a checkpoint of an official release this method can import (it carries no config)."""

    @abstractmethod
    def check_foreign_checkpoint(self, state: dict, path: Path, cfg: Config) -> None:
        """Raise a one-line UserError when a foreign ``state`` cannot fill the model ``cfg`` describes."""

    @abstractmethod
    def load_foreign_checkpoint(self, model: nn.Module, state: dict, path: Path, cfg: Config) -> None:
        """Load an official release's weights into ``model`` (after ``check_foreign_checkpoint``)."""

    def build_for_foreign(self, cfg: Config, state: dict) -> nn.Module:
        """The network an official checkpoint's ``state`` fills (default: the one ``cfg`` describes)."""
        return self.build(cfg)

    def foreign_frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes an official checkpoint does not hold (e.g. a pretrained encoder)."""
        return ()

    def describe(self, cfg: Config) -> dict[str, Any]:
        """A few settings for run.json and the report table (e.g. the backbone)."""
        return {}

    def num_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def to_device(self, model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
        model = model.to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model


class ImageMethod(Method):
    """A method that maps an image to an anomaly map and an image score (``InferenceOutput`` in eval mode)."""

    modality = "image"
    extra_maps: tuple[str, ...] = ()  # names a model may put in InferenceOutput.extras

    def extra_map_names(self, cfg: Config) -> tuple[str, ...]:
        """The extra maps the model built from ``cfg`` produces (a subset of ``extra_maps``)."""
        return self.extra_maps

    @abstractmethod
    def calibrate(self, model: nn.Module, preds: Predictions) -> Tensor:
        """Set the model's score normalisation from predictions on normal calibration images (never the test set);
        return the [N] image scores of ``preds`` under the new normalisation (what the model now scores them)."""


class VideoMethod(Method):
    """A method that scores the frame after each clip: raw per-frame scores, fused over time by the SCORE protocol.

    Its calibration is the statistics of those scores on held-out calibration frames (video/evaluation.py), stored in
    the checkpoint; batches are ClipDataset items ``{"clip", "target", "background", "video", "frame", "label"}``.
    """

    modality = "video"

    @abstractmethod
    def build(self, cfg: Config, pretrained: bool | None = None, num_videos: int | None = None) -> nn.Module:
        """The network for ``cfg``; ``num_videos`` sizes per-video state (e.g. one background template per video)."""

    @abstractmethod
    def score_settings(self, cfg: Config) -> Any:
        """What ``score_batch`` needs from the config (the score variants and windows)."""

    @abstractmethod
    def score_batch(self, model: nn.Module, batch: dict[str, Tensor], settings: Any) -> tuple[dict[str, Tensor], Tensor]:
        """Eval forward of one batch on the device: (raw scores name -> [B], prediction-error maps [B, 1, H, W])."""

    @abstractmethod
    def set_background(self, model: nn.Module, templates: Tensor) -> None:
        """Initialise the model's background templates [V, C, H, W] in [-1, 1] from the data."""
