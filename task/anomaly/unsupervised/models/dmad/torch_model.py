"""The DMAD torch model: PDM -> frozen encoder -> VQ bottleneck -> reverse decoder -> maps and score."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from task.anomaly.unsupervised.records import InferenceOutput

from .anomaly_map import AnomalyMapGenerator, fuse_scores
from .bottleneck import Bottleneck
from .decoder import ReverseDecoder
from .deformation import Deformation, PyramidDeformation
from .encoder import ResNetEncoder, backbone_spec

DEFORMATION_MAP = "deformation_map"


@dataclass
class TrainOutput:
    encoder_features: list[Tensor]  # [f1, f2, f3] of the warped image
    decoder_features: list[Tensor]  # reconstructions of the same shapes
    deformation: Deformation | None  # None without a PDM
    vq_loss: Tensor


class DMADModel(nn.Module):
    """Diversity-Measurable Anomaly Detection (PPDM variant) for images.

    Input: ImageNet-normalised images [B, 3, H, W], H and W multiples of 32.
    In ``train()`` mode ``forward`` returns ``TrainOutput``; after ``model.eval()`` it returns ``InferenceOutput``
    with ``extras["deformation_map"]`` [B, 1, H, W] when the PDM is on. ``pdm=False`` is the ablation without the
    deformation module (plain reverse distillation, with or without the codebook).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        backbone_weights: str | None = None,
        vq: bool = True,
        num_embeddings: int = 200,
        vq_beta: float = 0.25,
        coarse_shift: float = 8 / 256,
        fine_shift: float = 3 / 256,
        sigma: float = 4.0,
        deform_weight: float = 0.05,
        pdm: bool = True,
    ) -> None:
        super().__init__()
        spec = backbone_spec(backbone)
        self.deformation = PyramidDeformation(3, coarse_shift, fine_shift) if pdm else None
        self.encoder = ResNetEncoder(backbone, pretrained, backbone_weights)
        self.bottleneck = Bottleneck(spec, vq, num_embeddings, vq_beta)
        self.decoder = ReverseDecoder(spec)
        self.anomaly_map = AnomalyMapGenerator(sigma)
        # Normalisation statistics of normal training images: [anomaly min, max, deformation min, max].
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("deform_weight", torch.tensor(float(deform_weight)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def features(self, x: Tensor) -> TrainOutput:
        deformation = self.deformation(x) if self.deformation is not None else None
        encoder_features = self.encoder(deformation.warped if deformation is not None else x)
        embedding, vq_loss = self.bottleneck(encoder_features)
        decoder_features = self.decoder(embedding)
        return TrainOutput(encoder_features, decoder_features, deformation, vq_loss)

    def forward(self, x: Tensor) -> TrainOutput | InferenceOutput:
        out = self.features(x)
        if self.training:
            return out
        anomaly_map, deformation_map = self.anomaly_map(
            out.encoder_features, out.decoder_features, tuple(x.shape[-2:]), out.deformation
        )
        deformation_max = deformation_map.amax(dim=(1, 2, 3)) if deformation_map is not None else None
        score = fuse_scores(anomaly_map.amax(dim=(1, 2, 3)), deformation_max, self.score_stats, self.deform_weight)
        extras = {DEFORMATION_MAP: deformation_map} if deformation_map is not None else {}
        return InferenceOutput(anomaly_map, score, extras)

    def set_scoring(self, sigma: float, deform_weight: float) -> None:
        """The scoring settings (``MODEL.sigma``, ``MODEL.deform_weight``): how maps become scores, not weights."""
        with torch.no_grad():
            self.deform_weight.fill_(deform_weight)
        self.anomaly_map.sigma = sigma

    def scoring(self) -> dict[str, float]:
        """The scoring settings the model holds, by config key."""
        return {"MODEL.sigma": float(self.anomaly_map.sigma), "MODEL.deform_weight": float(self.deform_weight)}

    @torch.no_grad()
    def set_score_stats(self, anomaly_max: Tensor, deformation_max: Tensor | None) -> None:
        """Set the score normalisation from per-image maxima [N] of normal training images."""
        deform = deformation_max if deformation_max is not None else torch.tensor([0.0, 1.0])
        stats = torch.stack([anomaly_max.min(), anomaly_max.max(), deform.min(), deform.max()])
        self.score_stats.copy_(stats.to(self.score_stats))
