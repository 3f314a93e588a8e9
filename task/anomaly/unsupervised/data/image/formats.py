"""Dataset formats: the table of layout scanners, the one entry point ``scan_dataset``, and their config keys."""

from __future__ import annotations

from typing import Callable

from task.anomaly.unsupervised.data.image.calibration import CalibrationSplit, split_calibration
from task.anomaly.unsupervised.data.image.dataset import Sample
from task.anomaly.unsupervised.data.image.folder import scan_folder
from task.anomaly.unsupervised.data.image.mvtec import scan_mvtec
from task.anomaly.unsupervised.data.image.visa import scan_visa
from task.common.config import Config, F, Field, defaults
from task.common.errors import UserError

__all__ = ["DATASET_SCHEMA_KEYS", "FORMATS", "scan_dataset", "scan_training"]

# format name -> scanner(DATASET config, split 'train'/'test', run seed) -> samples
FORMATS: dict[str, Callable[[Config, str, int], list[Sample]]] = {
    "mvtec": scan_mvtec,  # also BTAD and MPDD
    "visa": scan_visa,
    "folder": scan_folder,
}

# The DATASET keys the formats add to a run schema (datadir, target, resize, ... are the method's).
DATASET_SCHEMA_KEYS: dict[str, Field] = {
    "format": F(str, "mvtec", choices=("mvtec", "visa", "folder"), help="dataset layout (video: frame folders or video files); mvtec also reads BTAD and MPDD"),
    "normal_dir": F(str, None, nullable=True, help="folder format: normal images, relative to datadir"),
    "abnormal_dir": F(str, None, nullable=True, help="folder format: anomalous test images, relative to datadir"),
    "mask_dir": F(str, None, nullable=True, help="folder format: masks named like their images (null: no pixel metrics)"),
    "normal_test_dir": F(str, None, nullable=True, help="folder format: normal test images (null: hold out normal_split_ratio)"),
    "normal_split_ratio": F(
        float, 0.2, min=0, max=1, min_exclusive=True, max_exclusive=True,
        help="folder format: fraction of normal_dir held out for testing, chosen with SEED",
    ),
    "calibration_split": F(
        float, 0.1, min=0, max=0.5,
        help="fraction of the normal training images (at least 8) held out from training to calibrate scores and thresholds; 0: calibrate on the training images",
    ),
}


def scan_dataset(ds_cfg: Config, split: str, seed: int) -> list[Sample]:
    """The samples of ``split`` of the DATASET section ``ds_cfg``, by ``ds_cfg.format``: 'test', 'train' (the images
    that train the model) or 'calibration' (normal images held out from training, see calibration.py).

    Keys of ``DATASET_SCHEMA_KEYS`` missing from ``ds_cfg`` take their schema defaults (format: mvtec).
    """
    if split in ("train", "calibration"):
        parts = scan_training(ds_cfg, seed, warn=split == "calibration")
        return parts.train if split == "train" else parts.calibration
    return scan_format(ds_cfg, split, seed)


def scan_training(ds_cfg: Config, seed: int, warn: bool = True) -> CalibrationSplit:
    """The format's normal training images split into training and calibration images (``DATASET.calibration_split``)."""
    data = {**defaults(DATASET_SCHEMA_KEYS), **ds_cfg.to_dict()}
    return split_calibration(scan_format(ds_cfg, "train", seed), data["calibration_split"], seed, warn)


def scan_format(ds_cfg: Config, split: str, seed: int) -> list[Sample]:
    """The samples the format's scanner lists for 'train' (all normal training images) or 'test'."""
    data = {**defaults(DATASET_SCHEMA_KEYS), **ds_cfg.to_dict()}
    scanner = FORMATS.get(data["format"])
    if scanner is None:
        raise UserError(
            f"DATASET.format {data['format']!r} has no image scanner here; use one of: {', '.join(FORMATS)}"
        )
    return scanner(Config(data), split, seed)
