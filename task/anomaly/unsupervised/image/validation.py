"""``TRAIN.validation: synthetic``: choose among the evaluated checkpoints by synthetic defects, never test labels.

At every evaluation during training (``LOG.eval_interval``) and at the end, the model scores the calibration images
and CutPaste versions of them (``data/image/synthetic_defects.py``, seeded by ``SEED`` so every checkpoint sees the
same defects); the validation score is the mean of the image AUROC and the pixel AUROC on that set. The weights with
the best score are kept and are the ones the final evaluation calibrates, tests and saves. Default off: the last
model. (Calibration images take part in the choice only through their scores, the same for every checkpoint.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from task.anomaly.unsupervised.data.image.synthetic_defects import cutpaste
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.image.inference import predict_loader
from task.common.metrics import auroc

log = logging.getLogger("anomaly")


class SyntheticSet(torch.utils.data.Dataset):
    """Each calibration image twice: as it is (label 0, empty mask) and with one CutPaste defect (label 1, its mask)."""

    def __init__(self, images, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(len(images)):
            image = images[i]["image"]
            defective, mask = cutpaste(image, generator)
            h, w = mask.shape
            self.items.append({"image": image, "mask": torch.zeros(1, h, w), "label": torch.tensor(0)})
            self.items.append({"image": defective, "mask": mask[None], "label": torch.tensor(1)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@dataclass
class Selection:
    """The best validation score so far and its weights (CPU copies)."""

    score: float = -1.0
    step: int | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def validation_score(engine: Engine, model: nn.Module, data: SyntheticSet) -> float:
    """Mean of image and pixel AUROC on the synthetic set (the model's score normalisation does not change AUROC)."""
    preds = predict_loader(
        model,
        engine.eval_loader(data),
        engine.device,
        engine.amp,
        desc="validate",
        channels_last=engine.channels_last,
    )
    return 0.5 * (auroc(preds.scores, preds.labels) + auroc(preds.anomaly_maps, preds.masks))


def observe(engine: Engine, model: nn.Module, data: SyntheticSet, selection: Selection, step: int) -> None:
    """Score the model at ``step``; keep its weights when they are the best so far."""
    score = validation_score(engine, model, data)
    best = score > selection.score
    note = " (best so far)" if best else f" (best {selection.score:.4f} at step {selection.step})"
    log.info("synthetic validation at step %d: %.4f%s", step, score, note)
    if best:
        selection.score, selection.step = score, step
        selection.weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
