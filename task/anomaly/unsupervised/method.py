"""What a method must tell the engine: the small, typed interface between "running a model" and "what DMAD is".

The engine (engine.py) owns modes, the loop, resume, DDP, evaluation, outputs and reporters; a method owns its
network, how it learns (``learning``: the engine's optimiser loop with the method's loss and optimiser groups, or one
gradient-free ``fit`` pass), score calibration, checkpoint conversion (optionally an official release's format), its
run defaults and the extra maps it adds to the shared inference record. A method module registers an instance with
``task.anomaly.unsupervised.models.registry.register_method``; shared code never imports a method's package.

Settings are sorted by what they define (the rule the README documents):

* ``network_keys`` define the network: at test/predict/export they come from the checkpoint; a command-line override
  that differs is an error naming both values, a differing YAML value is a warning and the checkpoint's value is used.
* ``scoring_keys`` define how maps become scores: ``--mode test`` applies the config's values and recalibrates;
  predict and export use the checkpoint's values (its thresholds belong to them), and an override that differs is an
  error telling the user to run ``--mode test`` with it first.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

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
    dataset_keys: Schema = {}  # DATASET keys of the method's own (e.g. DMAD-PDM's background templates)
    run_defaults: dict[str, Any] = {}  # dotted key -> the method's default for a shared key (e.g. OPTIMIZER.lr)
    network_keys: tuple[str, ...] = ()
    scoring_keys: tuple[str, ...] = ()
    resume_keys: tuple[str, ...] = ()  # MODEL keys that shape the optimisation (a resumed run must share them)
    # How the method learns. "gradient": the engine's optimiser loop (criterion, optimizer_groups, training_loss);
    # "fit": one gradient-free pass, ``fit`` (e.g. PatchCore's memory bank). Either way the engine then calibrates,
    # evaluates and saves the model.
    learning: str = "gradient"
    # Defaults of the shared run sections for this method, by dotted key (e.g. {"LOG.wandb_project": "dmad"}); they
    # replace the shared schema's defaults, and the YAML and KEY=VALUE overrides still win over them.
    run_defaults: ClassVar[dict[str, Any]] = {}

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

    # ---- learning = "gradient": the three hooks of the engine's optimiser loop
    def criterion(self, cfg: Config) -> nn.Module:
        """The training loss module."""
        raise NotImplementedError(f"{self.name} learns by {self.learning}: it has no training loss")

    def optimizer_groups(self, cfg: Config, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups for the optimiser (trainable parameters only; per-group ``lr`` where it differs)."""
        raise NotImplementedError(f"{self.name} learns by {self.learning}: it has no optimiser")

    def training_loss(
        self, model: nn.Module, criterion: nn.Module, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward one training batch (already on the device) and return (loss, named loss terms)."""
        raise NotImplementedError(f"{self.name} learns by {self.learning}: it has no training loss")

    # ---- learning = "fit": the one gradient-free pass
    def fit(self, cfg: Config, model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device) -> None:
        """Learn from one pass over ``batches`` of normal training data (dicts with ``image`` [B, 3, H, W], already on
        ``device``), in place. The engine calls it under ``torch.no_grad()`` and the run's autocast, with the model in
        eval mode, and calibrates, evaluates and saves the model afterwards."""
        raise NotImplementedError(f"{self.name} learns by {self.learning}, not by fit")

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

    # ---- an official release's checkpoint format (optional: by default a method has none)
    def is_foreign_checkpoint(self, state: dict) -> bool:
        """True for a checkpoint of an official release this method can import (it carries no config)."""
        return False

    def check_foreign_checkpoint(self, state: dict, path: Path, cfg: Config) -> None:
        """Raise a one-line UserError when a foreign ``state`` cannot fill the model ``cfg`` describes."""
        raise NotImplementedError(f"{self.name} imports no foreign checkpoint format")

    def load_foreign_checkpoint(self, model: nn.Module, state: dict, path: Path, cfg: Config) -> None:
        """Load an official release's weights into ``model`` (after ``check_foreign_checkpoint``)."""
        raise NotImplementedError(f"{self.name} imports no foreign checkpoint format")

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

    Batches are ClipDataset items ``{"clip", "target", "video", "frame", "label"}`` (``video`` indexes the list of
    videos being scored). The calibration is the statistics of the raw scores on held-out normal frames
    (video/evaluation.py),
    stored in the checkpoint. Shared video code reaches what the method keeps about the data (e.g. DMAD-PDM's
    background templates) only through ``prepare``, ``scoring_context`` and ``video_inputs``.
    """

    modality = "video"

    @abstractmethod
    def build(self, cfg: Config, pretrained: bool | None = None, num_videos: int | None = None) -> nn.Module:
        """The network for ``cfg``; ``num_videos`` sizes per-video state (e.g. one background template per video)."""

    @abstractmethod
    def score_settings(self, cfg: Config) -> Any:
        """What ``score_batch`` needs from the config (the score variants and windows)."""

    @abstractmethod
    def score_batch(
        self, model: nn.Module, batch: dict[str, Tensor], settings: Any
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Eval forward of one batch on the device: (raw scores name -> [B], prediction-error maps [B, 1, H, W])."""

    @abstractmethod
    def score_names(self, cfg: Config, exportable: bool = False) -> tuple[str, ...]:
        """The raw scores ``score_batch`` returns for ``cfg``; ``exportable``: only those an exported graph computes."""

    @abstractmethod
    def serving_module(self, model: nn.Module, cfg: Config) -> nn.Module:
        """The graph ``--mode export`` writes: an eval module ``(clip [B, T, C, H, W], target [B, C, H, W],
        video_input [B, C, H, W] or absent) -> (predicted_frame [B, Cm, H, W], error_map [B, 1, H, W], *raw scores [B]
        in score_names(cfg, exportable=True) order)``; it takes ``video_input`` when ``video_inputs`` gives one."""

    def prepare(self, model: nn.Module, cfg: Config, videos: list[Any], cache_dir: Path | None) -> None:
        """Set data-dependent state of a new model from its training ``videos`` (default: none)."""

    def scoring_context(
        self, model: nn.Module, cfg: Config, videos: list[Any], cache_dir: Path | None
    ) -> AbstractContextManager[None]:
        """State ``model`` needs while scoring ``videos`` it was not trained on, put back afterwards (default: none)."""
        return contextlib.nullcontext()

    def video_inputs(self, cfg: Config, videos: list[Any]) -> Tensor | None:
        """Per-video inputs [V, C, H, W] of the serving graph besides clip and target (default: None, none)."""
        return None
