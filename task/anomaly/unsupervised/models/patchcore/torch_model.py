"""The PatchCore torch model: frozen backbone -> patch embedding -> nearest memory-bank neighbour -> map, score."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import Tensor, nn

from task.anomaly.unsupervised.records import InferenceOutput
from task.common.errors import UserError

from .embedding import PatchEmbedding, patch_vectors
from .features import FeatureExtractor
from .neighbours import nearest_neighbour
from .scoring import anomaly_map, reweighted_score

log = logging.getLogger("anomaly")


def float32_region(device_type: str):
    """Autocast off: distances, smoothing and scores are computed in float32 under any run precision."""
    return (
        torch.autocast(device_type, enabled=False)
        if torch.is_autocast_enabled(device_type)
        else contextlib.nullcontext()
    )


def bank_rows(bank: Tensor) -> int:
    """The number of memory-bank features as a Python int. Under ONNX tracing it becomes a constant of the graph,
    which is right: an exported model's bank is fixed (the tracer's warning about it is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(bank.shape[0])


class PatchCoreModel(nn.Module):
    """PatchCore for images.

    Input: ImageNet-normalised images [B, 3, H, W]. ``embed`` gives the patch embedding [B, D, h, w] (h, w: the
    first layer's grid, H/8 x W/8 for layer2). ``forward`` (any mode) returns ``InferenceOutput``: the anomaly map
    [B, 1, H, W] (distance of each patch to its nearest memory-bank feature, upsampled and smoothed) and the
    re-weighted image score [B], min-max normalised with the statistics of normal training images (``score_stats``).

    The memory bank [M, D] and the score statistics are buffers, so checkpoints hold them; the bank is empty until
    ``set_memory_bank`` (the method's fit).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: tuple[str, ...] | list[str] = ("layer2", "layer3"),
        pretrained: bool = True,
        backbone_weights: str | None = None,
        embedding_dim: int | None = None,
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.features = FeatureExtractor(backbone, list(layers), pretrained, backbone_weights)
        self.embedding = PatchEmbedding(self.features.channels, embedding_dim)
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.sigma = sigma
        self.register_buffer("memory_bank", torch.zeros(0, self.embedding.dim))
        # Normalisation of the raw image score on normal training images: [min, max].
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0]))

    @property
    def dim(self) -> int:
        return self.embedding.dim

    def embed(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> patch embedding [B, D, h, w], float32."""
        return self.embedding(self.features(images)).float()

    @torch.no_grad()
    def set_memory_bank(self, bank: Tensor) -> None:
        """Replace the memory bank by ``bank`` [M, D]."""
        if bank.dim() != 2 or bank.shape[1] != self.dim:
            raise ValueError(f"memory bank must be [M, {self.dim}], got {tuple(bank.shape)}")
        self.memory_bank = bank.detach().to(self.memory_bank.device, torch.float32).contiguous()

    def resize_memory_bank(self, rows: int) -> None:
        """An empty-valued bank of ``rows`` features, to be filled by ``load_state_dict``."""
        self.memory_bank = torch.zeros(rows, self.dim, device=self.memory_bank.device)

    def normalize(self, raw: Tensor) -> Tensor:
        """Raw image scores [B] -> (raw - min) / (max - min) with the training statistics."""
        low, high = self.score_stats[0], self.score_stats[1]
        return (raw - low) / (high - low).clamp_min(torch.finfo(torch.float32).eps)

    def denormalize(self, scores: Tensor) -> Tensor:
        """The inverse of ``normalize`` (scores [N] that came out of this model -> raw scores)."""
        low, high = self.score_stats[0].cpu(), self.score_stats[1].cpu()
        return scores * (high - low).clamp_min(torch.finfo(torch.float32).eps) + low

    @torch.no_grad()
    def set_score_stats(self, raw: Tensor) -> None:
        """Set the normalisation from raw image scores [N] of normal training images."""
        low, high = float(raw.min()), float(raw.max())
        if not high - low > 1e-6 * max(1.0, abs(high)):
            # e.g. MODEL.coreset_ratio=1: every training patch is in the bank, so every training score is 0.
            log.warning(
                "the training images' PatchCore scores are all %.4g, which gives no scale; "
                "image scores are left unscaled (shifted by it only)",
                low,
            )
            high = low + 1.0
        self.score_stats.copy_(torch.tensor([low, high]))

    def forward(self, images: Tensor) -> InferenceOutput:
        bank = self.memory_bank
        rows = bank_rows(bank)
        if rows == 0:
            raise UserError(
                "the PatchCore memory bank is empty (the model was never fitted); train it first with --mode train"
            )
        embedding = self.embed(images)
        _, dim, height, width = embedding.shape
        with float32_region(images.device.type):
            patches = patch_vectors(embedding)  # [B * h * w, D]
            distances, indices = nearest_neighbour(patches, bank)
            distances = distances.reshape(-1, height * width)
            indices = indices.reshape(-1, height * width)
            raw = reweighted_score(
                distances, indices, patches.reshape(-1, height * width, dim), bank, min(self.num_neighbors, rows)
            )
            maps = anomaly_map(distances.reshape(-1, 1, height, width), tuple(images.shape[-2:]), self.sigma)
            return InferenceOutput(maps, self.normalize(raw))
