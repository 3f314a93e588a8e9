"""DMAD (PPDM, images) as a method of the anomaly engine: build, loss, optimiser groups, calibration, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from task.anomaly.unsupervised.method import ImageMethod
from task.anomaly.unsupervised.models.registry import register_method
from task.anomaly.unsupervised.records import Predictions
from task.common.config import Config
from task.common.errors import UserError

from .anomaly_map import fuse_scores
from .config import MODEL_SCHEMA, deform_weight
from .loss import DMADLoss
from .official_import import check_official, convert_official, is_official, log_official_load
from .torch_model import DEFORMATION_MAP, DMADModel


class DMADImageMethod(ImageMethod):
    name = "dmad"
    checkpoint_format = "tnvision-dmad"
    model_schema = MODEL_SCHEMA
    network_keys = (
        "MODEL.backbone",
        "MODEL.pdm",
        "MODEL.vq",
        "MODEL.vq_num_embeddings",
        "MODEL.coarse_shift",
        "MODEL.fine_shift",
        "DATASET.resize",
    )
    scoring_keys = ("MODEL.sigma", "MODEL.deform_weight")
    resume_keys = ("MODEL.gamma", "MODEL.vq_beta")
    extra_maps = (DEFORMATION_MAP,)

    def extra_map_names(self, cfg: Config) -> tuple[str, ...]:
        return (DEFORMATION_MAP,) if cfg.MODEL.pdm else ()

    def build(self, cfg: Config, pretrained: bool | None = None) -> DMADModel:
        m = cfg.MODEL
        return DMADModel(
            backbone=m.backbone,
            pretrained=m.pretrained if pretrained is None else pretrained,
            backbone_weights=m.backbone_weights,
            vq=m.vq,
            num_embeddings=m.vq_num_embeddings,
            vq_beta=m.vq_beta,
            coarse_shift=m.coarse_shift,
            fine_shift=m.fine_shift,
            sigma=m.sigma,
            deform_weight=deform_weight(cfg),
            pdm=m.pdm,
        )

    def criterion(self, cfg: Config) -> DMADLoss:
        return DMADLoss(cfg.MODEL.gamma)

    def optimizer_groups(self, cfg: Config, model: nn.Module) -> list[dict[str, Any]]:
        """One group: the trainable parameters (the frozen encoder gets neither gradients nor optimiser state)."""
        return [{"params": model.trainable_parameters()}]

    def training_loss(
        self, model: nn.Module, criterion: nn.Module, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        images = batch["image"]
        out = model(images)
        return criterion(images, out.encoder_features, out.decoder_features, out.deformation, out.vq_loss)

    def calibrate(self, model: nn.Module, preds: Predictions) -> Tensor:
        deformation = preds.extra_max(DEFORMATION_MAP) if DEFORMATION_MAP in preds.extras else None
        model.set_score_stats(preds.anomaly_max, deformation)
        # the same fusion as the model's forward, on the maxima already at hand (the maps do not depend on the stats)
        stats, weight = model.score_stats.detach().cpu(), model.deform_weight.detach().cpu()
        return fuse_scores(preds.anomaly_max, deformation, stats, weight)

    def apply_scoring(self, model: nn.Module, cfg: Config) -> None:
        model.set_scoring(cfg.MODEL.sigma, deform_weight(cfg))

    def scoring_settings(self, model: nn.Module) -> dict[str, Any]:
        return model.scoring()

    def config_scoring(self, cfg: Config) -> dict[str, Any]:
        # float32 like the buffer that holds it, so an unchanged setting compares equal
        weight = float(torch.tensor(deform_weight(cfg), dtype=torch.float32))
        return {"MODEL.sigma": float(cfg.MODEL.sigma), "MODEL.deform_weight": weight}

    def is_foreign_checkpoint(self, state: dict) -> bool:
        return is_official(state)

    def check_foreign_checkpoint(self, state: dict, path: Path, cfg: Config) -> None:
        if not cfg.MODEL.pdm:
            raise UserError(f"official checkpoint {path} holds a PDM; remove MODEL.pdm=false")
        check_official(state, path, cfg)

    def load_foreign_checkpoint(self, model: nn.Module, state: dict, path: Path, cfg: Config) -> None:
        entries, ignored = convert_official(state)
        own = model.state_dict()
        wrong = [k for k in entries if k not in own or tuple(entries[k].shape) != tuple(own[k].shape)]
        if wrong:
            raise UserError(
                f"official checkpoint {path} does not fit the configured model (at {wrong[0]}); check MODEL.backbone "
                "and MODEL.vq"
            )
        missing = [k for k in own if k not in entries and not k.startswith(self.foreign_frozen_prefixes())]
        if missing:
            raise UserError(f"official checkpoint {path} lacks {missing[0]}; it is not a complete DMAD-PPDM checkpoint")
        model.load_state_dict(entries, strict=False)
        log_official_load(path, cfg, entries, ignored, state)

    def foreign_frozen_prefixes(self) -> tuple[str, ...]:
        # The official file holds no encoder (it is torchvision's ImageNet model) and no score statistics.
        return ("encoder.", "score_stats", "deform_weight")

    def describe(self, cfg: Config) -> dict[str, Any]:
        return {"backbone": cfg.MODEL.backbone, "pdm": cfg.MODEL.pdm, "vq": cfg.MODEL.vq}


register_method(DMADImageMethod())
