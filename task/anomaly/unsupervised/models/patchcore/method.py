"""PatchCore as a method of the anomaly engine: build, the gradient-free fit (memory bank + coreset), calibration."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from task.anomaly.unsupervised.method import ImageMethod
from task.anomaly.unsupervised.models.registry import register_method
from task.anomaly.unsupervised.records import Predictions
from task.common.config import Config
from task.common.errors import UserError

from .config import MODEL_SCHEMA, RUN_DEFAULTS
from .coreset import select_coreset
from .embedding import patch_vectors
from .features import check_backbone
from .torch_model import PatchCoreModel

log = logging.getLogger("anomaly")


class PatchCoreImageMethod(ImageMethod):
    name = "patchcore"
    checkpoint_format = "tnvision-patchcore"
    model_schema = MODEL_SCHEMA
    run_defaults = RUN_DEFAULTS
    learning = "fit"
    # The memory bank is selected with these: the checkpoint's values describe its weights.
    network_keys = ("MODEL.backbone", "MODEL.layers", "MODEL.embedding_dim", "MODEL.coreset_ratio", "DATASET.resize")
    scoring_keys = ("MODEL.sigma", "MODEL.num_neighbors")

    def validate(self, cfg: Config) -> None:
        check_backbone(cfg.MODEL.backbone, cfg.MODEL.layers)

    def build(self, cfg: Config, pretrained: bool | None = None) -> PatchCoreModel:
        m = cfg.MODEL
        return PatchCoreModel(
            backbone=m.backbone,
            layers=m.layers,
            pretrained=m.pretrained if pretrained is None else pretrained,
            backbone_weights=m.backbone_weights,
            embedding_dim=m.embedding_dim,
            coreset_ratio=m.coreset_ratio,
            num_neighbors=m.num_neighbors,
            sigma=m.sigma,
        )

    def build_for_weights(self, cfg: Config, state_dict: dict[str, Tensor]) -> PatchCoreModel:
        """The network ``state_dict`` fills, its memory bank sized like the saved one."""
        model = self.build(cfg, pretrained=False)
        bank = state_dict.get("memory_bank")
        if isinstance(bank, Tensor) and bank.dim() == 2:
            model.resize_memory_bank(bank.shape[0])  # a wrong feature size is reported by the shape check
        return model

    def fit(self, cfg: Config, model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device) -> None:
        """Patch features of every training image, then the greedy coreset of them as the memory bank."""
        chunks = [patch_vectors(model.embed(batch["image"])) for batch in batches]
        if not chunks:
            raise UserError("PatchCore has no training images to fit on; check DATASET.datadir and DATASET.target")
        total = sum(len(c) for c in chunks)
        generator = torch.Generator().manual_seed(cfg.SEED)  # projection and start point: the same bank on every rerun
        model.set_memory_bank(select_coreset(chunks, model.coreset_ratio, generator))
        log.info(
            "memory bank: %d of %d patch features (MODEL.coreset_ratio %g), %d dims, %.1f MiB",
            len(model.memory_bank),
            total,
            model.coreset_ratio,
            model.dim,
            model.memory_bank.numel() * 4 / 2**20,
        )

    def calibrate(self, model: nn.Module, preds: Predictions) -> Tensor:
        # preds.scores were normalised with the statistics the model held; undo that to get the raw scores.
        raw = model.denormalize(preds.scores)
        model.set_score_stats(raw)
        return model.normalize(raw.to(model.score_stats.device)).cpu()

    def apply_scoring(self, model: nn.Module, cfg: Config) -> None:
        model.sigma = cfg.MODEL.sigma
        model.num_neighbors = cfg.MODEL.num_neighbors

    def scoring_settings(self, model: nn.Module) -> dict[str, Any]:
        return {"MODEL.sigma": float(model.sigma), "MODEL.num_neighbors": int(model.num_neighbors)}

    def config_scoring(self, cfg: Config) -> dict[str, Any]:
        return {"MODEL.sigma": float(cfg.MODEL.sigma), "MODEL.num_neighbors": int(cfg.MODEL.num_neighbors)}

    def describe(self, cfg: Config) -> dict[str, Any]:
        return {
            "backbone": cfg.MODEL.backbone,
            "layers": list(cfg.MODEL.layers),
            "coreset_ratio": cfg.MODEL.coreset_ratio,
        }


register_method(PatchCoreImageMethod())
