"""Modality -> mode table. The run's DATASET.format picks the modality (main.py); each table maps mode names to
functions ``(engine, options)``. Add a modality: its mode table module and one line here."""

from __future__ import annotations

from task.anomaly.unsupervised.engine.modes import ModeFunction
from task.anomaly.unsupervised.image.modes import IMAGE_MODES
from task.anomaly.unsupervised.video.modes import VIDEO_MODES

MODES_BY_MODALITY: dict[str, dict[str, ModeFunction]] = {"image": IMAGE_MODES, "video": VIDEO_MODES}


def modes_for(modality: str) -> dict[str, ModeFunction]:
    return MODES_BY_MODALITY[modality]
