"""Image calibration: score normalisation and the calibration score samples, from held-out normal images.

``calibrate`` predicts the calibration images (``DATASET.calibration_split``, never trained on), lets the method set its
score normalisation from them, and keeps the resulting image scores and the pixel scores of their maps as
``ScoreSample``s. The decision thresholds are the conformal order statistics of those samples at the false-alarm
targets (``engine/thresholds.py``); test labels never enter. ``model.pt`` stores ``ImageCalibration.to_dict()`` under
``calibration``.

Guarantees: the image threshold bounds P(false alarm) by ``TEST.target_fpr`` for a normal image exchangeable with the
calibration images (normalisation statistics are symmetric functions of the calibration images, so the bound is exact
for a single-map score and close otherwise). The pixel threshold is the same order statistic over all pixels of the
calibration images; pixels of one image are not exchangeable, so it targets the expected fraction of normal pixels
flagged without a finite-sample bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.image.inference import predict_loader
from task.common.conformal import GUARANTEE, ScoreSample

log = logging.getLogger("anomaly")

PIXEL_NOTE = "pixels of one image are not exchangeable: the pixel target is an expected rate, not a finite-sample bound"


@dataclass(frozen=True)
class ImageCalibration:
    """Calibration score samples (image scores, pixel scores) and where the calibration images came from."""

    image: ScoreSample
    pixel: ScoreSample | None
    source: str  # "calibration_split" (held out) or "train" (the fallback: the training images themselves)
    images: int

    @property
    def samples(self) -> dict[str, ScoreSample]:
        return {"image": self.image, **({"pixel": self.pixel} if self.pixel is not None else {})}

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": {kind: sample.to_dict() for kind, sample in self.samples.items()},
            "source": self.source,
            "images": self.images,
            "guarantee": GUARANTEE,
            "pixel_note": PIXEL_NOTE,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ImageCalibration | None:
        if not isinstance(data, dict) or not isinstance(data.get("samples"), dict):
            return None
        image = ScoreSample.from_dict(data["samples"].get("image"))
        if image is None:
            return None
        pixel = ScoreSample.from_dict(data["samples"].get("pixel"))
        images = data.get("images")
        return cls(image, pixel, str(data.get("source", "unknown")), images if isinstance(images, int) else image.n)


def calibrate(engine: Engine, model: nn.Module, calibration_set, source: str) -> ImageCalibration:
    """Set the model's score normalisation from ``calibration_set`` (normal images) and sample their scores."""
    loader = engine.eval_loader(calibration_set)
    preds = predict_loader(model, loader, engine.device, engine.amp, "calibrate", engine.channels_last)
    scores = engine.method.calibrate(model, preds)
    where = "held out from training" if source == "calibration_split" else "the training images"
    log.info("calibrated on %d normal images (%s)", len(calibration_set), where)
    image, pixel = ScoreSample.of(scores.numpy()), ScoreSample.of(preds.anomaly_maps.numpy())
    return ImageCalibration(image, pixel, source, len(calibration_set))
