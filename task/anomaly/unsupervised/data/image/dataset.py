"""``Sample`` (one image of a split, as every layout scanner returns it) and ``AnomalyDataset`` (decoded tensors)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from task.anomaly.unsupervised.data.image.preprocess import (
    MaskSizeError,
    check_mask_size,
    image_size,
    load_image,
    read_mask,
    resize_image,
    to_tensor,
)
from task.common.errors import UserError

__all__ = ["GOOD", "ANOMALY", "SPLITS", "Sample", "check_split", "AnomalyDataset"]

log = logging.getLogger(__name__)

GOOD = "good"  # defect name of normal images in every format
ANOMALY = "anomaly"  # defect name of anomalous images in formats without defect types (VisA, folder)
SPLITS = ("train", "test")
_LISTED = 5  # paths named in a warning before "... and N more"


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    ``label``: 0 normal, 1 anomalous. ``mask_path``: its ground-truth mask, None for normal images, for formats
    without masks, and for a defective image whose mask is missing. ``defect``: the defect type, ``GOOD`` for normal.
    """

    path: str
    label: int
    mask_path: str | None
    defect: str

    @property
    def name(self) -> str:
        """The file name with its extension: unique within a split's defect, so ``a.png`` and ``a.jpg`` stay apart."""
        return Path(self.path).name


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use 'train' or 'test'")


def _listing(paths: list[str]) -> str:
    more = len(paths) - _LISTED
    return ", ".join(paths[:_LISTED]) + (f" ... and {more} more" if more > 0 else "")


class AnomalyDataset(torch.utils.data.Dataset):
    """Images (+ masks) of one split, preprocessed like the official DMAD code.

    Items: ``{"image": float32 [3, H, W] ImageNet-normalised, "mask": float32 [1, H, W] of {0, 1},
    "label": int64 [], "path": str, "defect": str}``; "mask" only when ``has_masks``, which is True when any
    sample has a mask file (False for a format without masks, so pixel metrics are skipped downstream).

    ``cache=True`` decodes and resizes everything once at construction; ``cache=False`` decodes in ``__getitem__``
    (masks are still decoded once at construction, to find empty ones). Both return identical tensors. With
    ``skip_bad_images=True`` unreadable images (or masks) are dropped with a warning and listed in ``skipped``;
    otherwise a UserError is raised (at construction; with ``cache=False`` and no skipping, a file that becomes
    unreadable only after construction raises in ``__getitem__``). Mask/image size mismatches are always
    UserErrors. Defective images without a mask file, or whose mask is empty at (H, W), get one warning.
    """

    def __init__(
        self,
        samples: list[Sample],
        size: tuple[int, int],
        cache: bool = True,
        skip_bad_images: bool = False,
    ):
        if isinstance(size, int):
            size = (size, size)
        self.size = (int(size[0]), int(size[1]))
        if self.size[0] <= 0 or self.size[1] <= 0:
            raise UserError(f"invalid image size {size}; use positive (height, width), e.g. [256, 256]")
        self.cache = bool(cache)
        self.skip_bad_images = bool(skip_bad_images)
        self.has_masks = any(s.mask_path is not None for s in samples)
        self.skipped: list[str] = []
        self.unmasked: list[str] = []  # defective images with no mask file or an empty mask

        kept: list[Sample] = []
        # One array per sample: uint8 [H, W, 3] for 8-bit sources, float32 views for high-bit-depth ones.
        self._images: list[np.ndarray] = []
        self._masks: list[np.ndarray | None] = []
        for s in samples:
            try:
                if self.cache or self.skip_bad_images:  # lazy + skip: find bad files now, so `skipped` is complete
                    arr, mask = self._decode(s)
                else:
                    arr, mask = None, self._check(s)
            except UserError as e:
                if not self.skip_bad_images or isinstance(e, MaskSizeError):
                    raise
                self.skipped.append(s.path)
                log.warning("skipping unreadable sample %s: %s", s.path, e)
                continue
            kept.append(s)
            if self.cache:
                self._images.append(arr)
                self._masks.append(mask)
            if self.has_masks and s.label and (mask is None or not mask.any()):
                self.unmasked.append(s.path)

        self.samples: list[Sample] = kept
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s) of {len(samples)}: " + _listing(self.skipped),
                stacklevel=2,
            )
        if self.unmasked:
            h, w = self.size
            warnings.warn(
                f"{len(self.unmasked)} defective image(s) have no mask file or an empty mask at {h}x{w}, so pixel "
                f"metrics count all their pixels as normal: " + _listing(self.unmasked),
                stacklevel=2,
            )
        if not self.samples and samples:
            raise UserError(
                f"all {len(samples)} images were unreadable (first: {self.skipped[0]}); check the dataset files"
            )

    def _decode(self, s: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        """(image [H, W, 3] from ``resize_image``, mask uint8 [H, W] of {0, 1} or None)."""
        img = load_image(s.path)
        arr = resize_image(img, self.size)
        mask = None
        if s.mask_path is not None:
            check_mask_size(s.path, s.mask_path, img.size)
            mask = read_mask(s.mask_path, self.size)
        return arr, mask

    def _check(self, s: Sample) -> np.ndarray | None:
        """Lazy mode at construction: read the image header (and check the mask's size); decode only the mask."""
        if s.mask_path is None:
            image_size(s.path)
            return None
        check_mask_size(s.path, s.mask_path)
        return read_mask(s.mask_path, self.size)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if idx < 0:
            idx += len(self.samples)
        s = self.samples[idx]
        if self.cache:
            arr, mask = self._images[idx], self._masks[idx]
        else:
            arr, mask = self._decode(s)
        item: dict = {"image": to_tensor(arr)}
        if self.has_masks:
            item["mask"] = (
                torch.zeros((1, *self.size), dtype=torch.float32)
                if mask is None
                else torch.from_numpy(mask).to(torch.float32).unsqueeze(0)
            )
        item.update(label=torch.tensor(s.label, dtype=torch.int64), path=s.path, defect=s.defect)
        return item
