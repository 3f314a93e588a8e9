"""The inference records every image method and every consumer share.

Every image method's eval-mode ``forward`` returns ``InferenceOutput``; ``image.inference.predict_loader`` gathers a
whole pass into ``Predictions``. Evaluation, calibration, pictures, the GIF, predict, benchmark and the ONNX check all
read these two records, so none of them knows which method produced the maps. Method-specific maps (DMAD:
``deformation_map``) travel in ``extras`` by name; a method without them simply leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class InferenceOutput:
    """One batch of eval-mode outputs."""

    anomaly_map: Tensor  # [B, 1, H, W] float32
    score: Tensor  # [B] image score (meaningful once the method's score calibration is set)
    extras: dict[str, Tensor] = field(default_factory=dict)  # named extra maps [B, 1, H, W]


@dataclass
class Predictions:
    """Per-image outputs of a pass over a dataset (CPU tensors)."""

    anomaly_maps: Tensor  # [N, H, W] float32
    scores: Tensor  # [N] image scores
    labels: Tensor  # [N] int64 (0 when unknown)
    masks: Tensor | None  # [N, H, W] uint8 {0, 1}; None when the data has no masks
    paths: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)  # name -> [N, H, W] float32

    @property
    def anomaly_max(self) -> Tensor:
        """[N] per-image maximum of the anomaly map."""
        return self.anomaly_maps.flatten(1).amax(1)

    def extra_max(self, name: str) -> Tensor:
        """[N] per-image maximum of the extra map ``name``."""
        return self.extras[name].flatten(1).amax(1)
