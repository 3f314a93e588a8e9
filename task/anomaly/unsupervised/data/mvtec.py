"""MVTec AD layout scanning, preprocessing and the anomaly dataset.

Layout::

    <datadir>/<category>/train/good/*.png
    <datadir>/<category>/test/<defect>/*.png            (``good`` = normal)
    <datadir>/<category>/ground_truth/<defect>/<stem>_mask.png

Preprocessing mirrors the official DMAD code (torchvision ``Resize((h, w))`` on a
PIL image, ``ToTensor`` and ImageNet ``Normalize``; masks ``Resize`` + ``ToTensor``
and binarised at 0.5) but is implemented with PIL/numpy so images can be decoded
and resized once and cached as uint8 arrays.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from task.common.errors import UserError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MVTEC_URL",
    "Sample",
    "scan_split",
    "load_image",
    "resize_image",
    "to_tensor",
    "load_mask",
    "AnomalyDataset",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
DEMO_CONFIG = "configs/anomaly/unsupervised/dmad/demo.yaml"
GOOD = "good"

# Everything PIL raises for a missing, unreadable, truncated or corrupt file.
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    mask_path: str | None
    defect: str


# --------------------------------------------------------------------------- scanning


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _list_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for ext in (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"):
        for cand in (gt_dir / f"{stem}_mask{ext}", gt_dir / f"{stem}_mask{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _check_category_name(category: str, datadir: Path) -> Path:
    bad = (
        not isinstance(category, str)
        or not category.strip()
        or "/" in category
        or "\\" in category
        or (os.sep in category)
        or (os.altsep is not None and os.altsep in category)
        or ".." in category
        or category in (".",)
        or Path(category).is_absolute()
    )
    if not bad:
        root = datadir.resolve()
        target = (datadir / category).resolve()
        bad = target == root or root not in target.parents
    if bad:
        raise UserError(
            f"invalid DATASET.target {category!r}: it must be a plain folder name inside {datadir} "
            f"(no path separators or '..'); set it to one of the category folders, e.g. 'bottle'"
        )
    return datadir / category


def scan_split(datadir: str | Path, category: str, split: str) -> list[Sample]:
    """List the samples of ``split`` ('train' or 'test') of one MVTec AD category.

    Order is deterministic: defect folders sorted by name, files sorted by name.
    """
    datadir = Path(datadir).expanduser()
    if not datadir.is_dir():
        raise UserError(
            f"dataset folder {datadir} not found; download MVTec AD from {MVTEC_URL} "
            f"and set DATASET.datadir, or use {DEMO_CONFIG}"
        )
    catdir = _check_category_name(category, datadir)
    if not catdir.is_dir():
        available = [p.name for p in _list_dirs(datadir)]
        listing = ", ".join(available) if available else "none"
        raise UserError(
            f"category folder {catdir} not found; set DATASET.target to one of the available categories: {listing}"
        )
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; use 'train' or 'test'")
    splitdir = catdir / split
    if not splitdir.is_dir():
        raise UserError(
            f"split folder {splitdir} not found; {catdir} must follow the MVTec AD layout "
            f"(train/good, test/<defect>, ground_truth/<defect>)"
        )

    samples: list[Sample] = []
    if split == "train":
        gooddir = splitdir / GOOD
        files = _list_images(gooddir) if gooddir.is_dir() else []
        if not files:
            raise UserError(
                f"no images in {gooddir}; put the normal training images there "
                f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        return [Sample(str(f), 0, None, GOOD) for f in files]

    gtroot = catdir / "ground_truth"
    for defect_dir in _list_dirs(splitdir):
        defect = defect_dir.name
        for f in _list_images(defect_dir):
            if defect == GOOD:
                samples.append(Sample(str(f), 0, None, GOOD))
                continue
            gt_dir = gtroot / defect
            mask = _find_mask(gt_dir, f.stem)
            if mask is None:
                raise UserError(
                    f"defect image {f} has no mask {gt_dir / (f.stem + '_mask.png')}; "
                    f"add the ground-truth mask or remove the image"
                )
            samples.append(Sample(str(f), 1, str(mask), defect))
    if not samples:
        raise UserError(
            f"no images in {splitdir}; put test images in {splitdir}/<defect>/ (normal ones in {splitdir}/good)"
        )
    return samples


# --------------------------------------------------------------------------- preprocessing


def _open_decoded(path: str | Path, mode: str, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()  # force a full decode so truncated files fail here
            return img.convert(mode)
    except _READ_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {what} {path} ({msg}); replace or delete the file") from e


def _image_size(path: str | Path, what: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except _READ_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {what} {path} ({msg}); replace or delete the file") from e


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully decoded as RGB (grayscale/palette/RGBA become RGB)."""
    return _open_decoded(path, "RGB", "image")


def resize_image(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to ``size`` = (h, w); uint8 HxWx3 (= torchvision ``Resize((h, w))`` on PIL)."""
    h, w = int(size[0]), int(size[1])
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img.resize((w, h), Image.BILINEAR), dtype=np.uint8)  # writable copy


_MEAN_T = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD_T = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 [3, H, W], /255 then ImageNet-normalised (= ToTensor + Normalize)."""
    arr = np.asarray(arr, dtype=np.uint8)
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only arrays
        arr = arr.copy()
    t = torch.from_numpy(arr.transpose(2, 0, 1)).contiguous()
    t = t.to(torch.float32).div(255)
    return t.sub_(_MEAN_T).div_(_STD_T)


def _resize_mask_u8(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """'L' mask -> bilinear resize -> /255 > 0.5, as uint8 HxW of {0, 1}."""
    h, w = int(size[0]), int(size[1])
    arr = np.asarray(mask.resize((w, h), Image.BILINEAR), dtype=np.uint8)
    # ToTensor gives arr/255 in float32; binarise exactly like the official code.
    return (arr.astype(np.float32) / np.float32(255) > 0.5).astype(np.uint8)


def load_mask(path: str | Path, size: tuple[int, int], image_path: str | Path | None = None) -> torch.Tensor:
    """Load a ground-truth mask as float32 [1, H, W] of {0, 1}.

    With ``image_path`` the mask's original size must equal the image's original size.
    """
    if image_path is not None:
        _check_mask_size(image_path, path)
    m = _open_decoded(path, "L", "mask")
    return torch.from_numpy(_resize_mask_u8(m, size)).to(torch.float32).unsqueeze(0)


class _MaskSizeError(UserError):
    """Mask/image size mismatch: a data inconsistency, never skipped."""


def _check_mask_size(image_path: str | Path, mask_path: str | Path, image_size: tuple[int, int] | None = None):
    isz = image_size if image_size is not None else _image_size(image_path, "image")
    msz = _image_size(mask_path, "mask")
    if isz != msz:
        raise _MaskSizeError(
            f"mask {mask_path} is {msz[0]}x{msz[1]} but its image {image_path} is {isz[0]}x{isz[1]}; "
            f"fix or replace the mask so both have the same size"
        )


# --------------------------------------------------------------------------- dataset


class AnomalyDataset(torch.utils.data.Dataset):
    """Images (+ masks) of one split, preprocessed like the official DMAD code.

    ``cache=True`` decodes and resizes everything once at construction into one
    uint8 array per split; ``cache=False`` decodes in ``__getitem__``. Both return
    identical tensors. With ``skip_bad_images=True`` unreadable images (or masks)
    are dropped with a warning and listed in ``skipped``; otherwise a UserError is
    raised (at construction; with ``cache=False`` and no skipping, a file that
    becomes unreadable only after construction raises in ``__getitem__``).
    Mask/image size mismatches are always UserErrors.
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
        self.skipped: list[str] = []

        kept: list[Sample] = []
        h, w = self.size
        images = np.empty((len(samples), h, w, 3), dtype=np.uint8) if self.cache else None
        masks: dict[int, np.ndarray] = {}
        for s in samples:
            try:
                if self.cache:
                    img, mask = self._decode(s)
                    images[len(kept)] = img
                    if mask is not None:
                        masks[len(kept)] = mask
                else:
                    isz = _image_size(s.path, "image")
                    if s.mask_path is not None:
                        _check_mask_size(s.path, s.mask_path, isz)
                    if self.skip_bad_images:  # find bad files now, so `skipped` is complete
                        self._decode(s)
            except UserError as e:
                if not self.skip_bad_images or isinstance(e, _MaskSizeError):
                    raise
                self.skipped.append(s.path)
                log.warning("skipping unreadable sample %s: %s", s.path, e)
                continue
            kept.append(s)

        self.samples: list[Sample] = kept
        if self.cache:
            n = len(kept)
            self._images = images[:n] if n == len(samples) else images[:n].copy()
            # Only defect samples have masks; store them stacked, indexed by position.
            self._mask_index = {i: j for j, i in enumerate(sorted(masks))}
            self._masks = (
                np.stack([masks[i] for i in sorted(masks)]) if masks else np.zeros((0, h, w), dtype=np.uint8)
            )
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s) of {len(samples)}: "
                + ", ".join(self.skipped[:5])
                + (" ..." if len(self.skipped) > 5 else ""),
                stacklevel=2,
            )
        if not self.samples and samples:
            raise UserError(
                f"all {len(samples)} images were unreadable (first: {self.skipped[0]}); check the dataset files"
            )

    def _decode(self, s: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        img = load_image(s.path)
        arr = resize_image(img, self.size)
        mask = None
        if s.mask_path is not None:
            _check_mask_size(s.path, s.mask_path, img.size)
            mask = _resize_mask_u8(_open_decoded(s.mask_path, "L", "mask"), self.size)
        return arr, mask

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
            arr = self._images[idx]
            j = self._mask_index.get(idx)
            mask = self._masks[j] if j is not None else None
        else:
            arr, mask = self._decode(s)
        if mask is None:
            mask_t = torch.zeros((1, *self.size), dtype=torch.float32)
        else:
            mask_t = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32).unsqueeze(0)
        return {
            "image": to_tensor(arr),
            "mask": mask_t,
            "label": torch.tensor(s.label, dtype=torch.int64),
            "path": s.path,
            "defect": s.defect,
        }
