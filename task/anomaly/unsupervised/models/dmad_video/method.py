"""DMAD-PDM (video) as a method of the anomaly engine: build, loss, optimiser groups, background templates, scores."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from task.anomaly.unsupervised.data.video.clips import Video
from task.anomaly.unsupervised.method import VideoMethod
from task.anomaly.unsupervised.models.registry import register_method
from task.common.config import Config, F
from task.common.errors import UserError
from task.common.io import ensure_dir

from .config import MODEL_SCHEMA
from .loss import LossWeights, VideoLoss
from .official_import import convert_official
from .presets import SCORE_SCHEMA
from .scores import ScoreSettings, error_map, frame_scores
from .serving import ServingModule, score_names
from .templates import background_for, templates_tensor
from .torch_model import VideoDMADModel, official_background_lr, optimizer_groups

OFFICIAL = "official_dmad_pdm"  # key of a converted official state dict in a foreign checkpoint's state

# The clip length is a property of the data (DATASET.clip_length) that the network is built for: one key, not two.
VIDEO_MODEL_SCHEMA = {
    **{k: v for k, v in MODEL_SCHEMA.items() if k != "clip_length"},
    "background_lr_factor": F(
        float, 50.0, min=0, help="the background template's lr = factor x OPTIMIZER.lr (official: 50, ShanghaiTech 10)"
    ),
    "background_lr_late_factor": F(
        float,
        20.0,
        nullable=True,
        min=0,
        help=(
            "from background_lr_switch_epoch on, the template's lr is fixed at this x OPTIMIZER.lr (official "
            "ped2/avenue); null: keep the schedule"
        ),
    ),
    "background_lr_switch_epoch": F(
        int, 6, nullable=True, min=0, help="0-based epoch where background_lr_late_factor starts"
    ),
}


def per_video(cfg: Config) -> bool:
    """One background template per video (ShanghaiTech) rather than one shared."""
    return cfg.DATASET.background == "per_video"


class DMADVideoMethod(VideoMethod):
    name = "dmad"
    checkpoint_format = "tnvision-dmad-video"
    model_schema = VIDEO_MODEL_SCHEMA
    extra_sections = {"SCORE": SCORE_SCHEMA}
    dataset_keys = {
        "background": F(
            str,
            "shared",
            choices=("shared", "per_video"),
            help="one background template, or one per video (ShanghaiTech)",
        ),
    }
    network_keys = tuple(
        f"MODEL.{k}"
        for k in (
            "channels",
            "memory_size",
            "memory_dim",
            "skip_ratio",
            "coarse_shift",
            "fine_shift",
            "pdm_width",
            "coarse_strides",
            "num_backgrounds",
            "background_input",
            "mask_source",
        )
    ) + ("DATASET.clip_length", "DATASET.resize", "DATASET.grayscale", "DATASET.background")
    scoring_keys = tuple(
        f"MODEL.{k}"
        for k in (
            "deformation_field",
            "deformation_window",
            "prediction_score",
            "prediction_window",
            "gradient_window",
            "object_score",
        )
    )
    resume_keys = tuple(
        f"MODEL.{k}"
        for k in (
            "vq_beta",
            "gradient_weight",
            "warped_gradient_weight",
            "vq_weight",
            "field_weight",
            "field_magnitude_weight",
            "smoothness_weight",
            "smoothness",
            "coarse_smooth_kernel",
            "fine_smooth_kernel",
            "foreground_weighting",
            "background_loss",
            "background_lr_factor",
            "background_lr_late_factor",
            "background_lr_switch_epoch",
        )
    )

    def validate(self, cfg: Config) -> None:
        # Grey frames may feed a 3-channel model (replicated, as the official Avenue/ShanghaiTech loaders do).
        if cfg.MODEL.channels == 1 and not cfg.DATASET.grayscale:
            raise UserError("MODEL.channels=1 needs grey frames; set DATASET.grayscale=true or MODEL.channels=3")
        height, width = cfg.DATASET.resize
        for key in ("deformation_window", "prediction_window", "gradient_window"):
            h, w = cfg.MODEL[key]
            if h > height or w > width:  # a box beyond the frame pads it by its size: hours of work for no score
                raise UserError(
                    f"MODEL.{key}={[h, w]} is larger than the frames (DATASET.resize={[height, width]}); "
                    f"use a window of at most [{height}, {width}] (the presets use [7, 18])"
                )
        per_video = cfg.DATASET.background == "per_video"
        if per_video != (cfg.MODEL.num_backgrounds is None):
            fix = (
                "MODEL.num_backgrounds=null" if per_video else "DATASET.background=per_video or MODEL.num_backgrounds=1"
            )
            raise UserError(
                f"DATASET.background={cfg.DATASET.background} and MODEL.num_backgrounds={cfg.MODEL.num_backgrounds} "
                f"disagree; set {fix}"
            )

    def build(self, cfg: Config, pretrained: bool | None = None, num_videos: int | None = None) -> VideoDMADModel:
        settings = {**cfg.to_dict()["MODEL"], "clip_length": cfg.DATASET.clip_length}
        return VideoDMADModel.from_config(settings, tuple(cfg.DATASET.resize), num_videos)

    def build_for_weights(self, cfg: Config, state_dict: dict[str, Tensor]) -> VideoDMADModel:
        template = state_dict.get("background.template")
        return self.build(cfg, num_videos=int(template.shape[0]) if isinstance(template, Tensor) else None)

    def criterion(self, cfg: Config) -> VideoLoss:
        return VideoLoss(LossWeights.from_config(cfg.to_dict()["MODEL"]))

    def optimizer_groups(self, cfg: Config, model: nn.Module) -> list[dict[str, Any]]:
        return optimizer_groups(model, cfg.OPTIMIZER.lr, cfg.MODEL.background_lr_factor)

    def on_epoch_end(self, cfg: Config, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """The official ped2/avenue schedule fixes the background's lr from a given epoch on."""
        lr = official_background_lr(
            epoch, cfg.OPTIMIZER.lr, cfg.MODEL.background_lr_late_factor, cfg.MODEL.background_lr_switch_epoch
        )
        if lr is not None:
            optimizer.param_groups[-1]["lr"] = lr

    def training_loss(
        self, model: nn.Module, criterion: nn.Module, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        clip, target = self._frames(model, batch)
        return criterion(model(clip, self._template_index(model, batch)), target)

    def score_batch(
        self, model: nn.Module, batch: dict[str, Tensor], settings: ScoreSettings
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Eval forward of one batch: (raw per-frame scores name -> [B], prediction-error maps [B, 1, H, W])."""
        clip, target = self._frames(model, batch)
        out = model(clip, self._template_index(model, batch))
        return frame_scores(out, target, settings), error_map(out, target)

    @staticmethod
    def _template_index(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """[B] row of each clip's background template: its video with one template per video, else the shared 0."""
        module = getattr(model, "module", model)  # DDP wraps the model
        video = batch["video"]
        return video if module.background.template.shape[0] > 1 else torch.zeros_like(video)

    @staticmethod
    def _frames(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(clip [B, T, C, H, W], target [B, C, H, W]) with grey frames replicated to the model's channels."""
        module = getattr(model, "module", model)  # DDP wraps the model
        clip, target = batch["clip"], batch["target"]
        if clip.shape[2] != module.channels:
            clip = clip.expand(-1, -1, module.channels, -1, -1)
            target = target.expand(-1, module.channels, -1, -1)
        return clip, target

    def score_settings(self, cfg: Config) -> ScoreSettings:
        return ScoreSettings.from_config(cfg.to_dict()["MODEL"])

    # The score variants and windows are not weights; the model carries the ones it was calibrated with, so a loaded
    # checkpoint knows them (see the settings rule in method.py).
    def apply_scoring(self, model: nn.Module, cfg: Config) -> None:
        model.scoring = self.config_scoring(cfg)

    def scoring_settings(self, model: nn.Module) -> dict[str, Any]:
        return dict(getattr(model, "scoring", {}))

    def score_names(self, cfg: Config, exportable: bool = False) -> tuple[str, ...]:
        return score_names(self.score_settings(cfg), exportable)

    def serving_module(self, model: nn.Module, cfg: Config) -> ServingModule:
        return ServingModule(model, self.score_settings(cfg), per_video(cfg))

    def prepare(self, model: nn.Module, cfg: Config, videos: list[Video], cache_dir: Path | None) -> None:
        """Background templates from the training frames: one shared median template, or one per video."""
        model.set_background(self._templates(cfg, videos, cache_dir).expand(-1, model.channels, -1, -1).contiguous())

    @contextlib.contextmanager
    def scoring_context(
        self, model: nn.Module, cfg: Config, videos: list[Video], cache_dir: Path | None
    ) -> Iterator[None]:
        """Per-video templates are learned for the training videos, so each scored video gets the median template of
        its own frames (as the official ShanghaiTech evaluation); the trained ones are put back afterwards, so
        training, calibration and the saved model.pt keep them. Shared templates are used as they are."""
        if not per_video(cfg):
            yield
            return
        module = getattr(model, "module", model)
        trained = module.background.template
        templates = self._templates(cfg, videos, cache_dir).to(trained.device)
        module.background.template = nn.Parameter(
            templates.expand(-1, module.channels, -1, -1).contiguous(), requires_grad=False
        )
        try:
            yield
        finally:
            module.background.template = trained

    def video_inputs(self, cfg: Config, videos: list[Video]) -> Tensor | None:
        """Each video's own median template [V, C, H, W] for a per-video run's graph (none for a shared template)."""
        return self._templates(cfg, videos, None) if per_video(cfg) else None

    @staticmethod
    def _templates(cfg: Config, videos: list[Video], cache_dir: Path | None) -> Tensor:
        ds = cfg.DATASET
        cache = cache_dir / ".background-cache" if cache_dir is not None else None
        if cache is not None:
            try:
                ensure_dir(cache)
            except Exception:  # noqa: BLE001  (a read-only dataset: compute without caching)
                cache = None
        return templates_tensor(background_for(videos, tuple(ds.resize), ds.grayscale, per_video(cfg), cache))

    def read_foreign_file(self, path: Path) -> dict | None:
        """An official DMAD-PDM ``model.pth`` (a whole-module pickle), read by a restricted unpickler that rebuilds
        tensors only (checkpoint.py): nothing pickled is executed."""
        try:
            weights = convert_official(path)
        except UserError:
            return None
        return {OFFICIAL: weights} if weights else None  # e.g. one of our image checkpoints: no module tensors

    def is_foreign_checkpoint(self, state: dict) -> bool:
        return isinstance(state.get(OFFICIAL), dict)

    def build_for_foreign(self, cfg: Config, state: dict) -> VideoDMADModel:
        return self.build_for_weights(cfg, state[OFFICIAL])

    def check_foreign_checkpoint(self, state: dict, path: Path, cfg: Config) -> None:
        template = state[OFFICIAL].get("background.template")
        if (
            isinstance(template, Tensor)
            and cfg.MODEL.num_backgrounds is not None
            and template.shape[0] != cfg.MODEL.num_backgrounds
        ):
            raise UserError(
                f"official checkpoint {path} holds {template.shape[0]} background templates; use the YAML of its "
                "dataset (MODEL.num_backgrounds)"
            )

    def load_foreign_checkpoint(self, model: nn.Module, state: dict, path: Path, cfg: Config) -> None:
        own = model.state_dict()
        weights = state[OFFICIAL]
        wrong = [k for k in own if k not in weights or tuple(weights[k].shape) != tuple(own[k].shape)]
        if wrong:
            found = tuple(weights[wrong[0]].shape) if wrong[0] in weights else "missing"
            raise UserError(
                f"official checkpoint {path} does not fit the configured model at {wrong[0]} ({found} vs "
                f"{tuple(own[wrong[0]].shape)}); "
                "use the YAML of the dataset it was trained on (configs/anomaly/unsupervised/dmad/<dataset>.yaml)"
            )
        model.load_state_dict({k: weights[k] for k in own})

    def describe(self, cfg: Config) -> dict[str, Any]:
        return {
            "memory_size": cfg.MODEL.memory_size,
            "memory_dim": cfg.MODEL.memory_dim,
            "channels": cfg.MODEL.channels,
        }


register_method(DMADVideoMethod())
