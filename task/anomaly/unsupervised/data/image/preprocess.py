"""The one image/mask decoder and the official DMAD preprocessing, shared by train, test, predict and export.

Images: ``to_tensor(resize_image(load_image(path), (h, w)))`` -> float32 [3, h, w], ImageNet-normalised. For
ordinary 8-bit files this is exactly the official pipeline (torchvision ``Resize((h, w))`` bilinear on a PIL RGB
image, ``ToTensor``, ``Normalize``), implemented with PIL/numpy so a dataset can decode and resize once and cache.

Every mode is mapped to [0, 1] by the range of its sample type, never by the image's own min/max:

* 8 bits or fewer per channel ("1", "L", "P" with or without transparency, "LA", "RGB", "RGBA", "CMYK", ...):
  PIL's conversion to "RGB"; alpha is dropped (not composited). 16-bit colour PNG/TIFF is decoded by PIL to
  8-bit "RGB" already (high byte), so it takes this path.
* 16-bit grey ("I;16", "I;16B", ...): value / 65535.
* 32-bit int ("I"): value / (2**bits - 1) with ``bits`` the stored sample size (16 for PNG, the TIFF
  BitsPerSample tag, at most 31 because PIL holds "I" as int32); negative values are refused.
* float ("F"): taken as intensities; values must be finite and in [0, 1] and are kept as they are.
* TIFFs Pillow cannot identify (3- or 4-channel float32, as OpenCV writes them) are decoded by OpenCV: colour
  floats in [0, 1] become 8-bit RGB (``rint(255 x)``, exact for images that were 8-bit), grey floats stay "F".

High-bit-depth sources are all single-channel in PIL. They are NOT quantised to 8 bits: ``load_image`` returns
them as a PIL "F" image (float32 grey in [0, 1]) and ``resize_image`` resizes that float image with the same
bilinear kernel, so a 12-bit sensor image stored in 16 bits keeps its 4096 levels up to the model input.

Masks: any non-zero value is a defect ({0, 1}, {0, 255} and small-integer label masks all work); for palette
masks ("P", VOC/labelme style) any non-zero palette INDEX is a defect, whatever its colour. The binary mask is
resized like the official code resizes {0, 255} masks (bilinear, then > 0.5), so those give identical results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from task.common.errors import UserError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MaskSizeError",
    "check_mask_size",
    "display_rgb",
    "image_size",
    "imagenet_normalize",
    "is_image_file",
    "list_image_files",
    "load_image",
    "load_mask",
    "read_mask",
    "resize_image",
    "to_tensor",
    "to_unit_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Built once; moved to the input's device/dtype on use.
_MEAN_T = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD_T = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)

# Everything PIL raises for a missing, unreadable, truncated, corrupt or oversized (decompression bomb) file.
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


# --------------------------------------------------------------------------- files


def is_image_file(path: Path) -> bool:
    """A visible regular file with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (independent of file-system order)."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def _read_error(path: str | Path, what: str, exc: Exception) -> UserError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"cannot read {what} {path} ({msg}); replace or delete the file")


def image_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels (a TIFF Pillow cannot read: OpenCV decodes it)."""
    try:
        with Image.open(path) as img:
            return img.size
    except _READ_ERRORS as e:
        fallback = _opencv_tiff(path, what) if isinstance(e, UnidentifiedImageError) else None
        if fallback is None:
            raise _read_error(path, what, e) from e
        return fallback.size


def _opencv_tiff(path: str | Path, what: str) -> Image.Image | None:
    """A TIFF that Pillow cannot identify, decoded by OpenCV (``IMREAD_UNCHANGED``), or None if OpenCV cannot either.

    The case: multi-channel float32 TIFFs, e.g. ``cv2.imwrite('x.tiff', img.astype(np.float32) / 255)``. Pillow has
    no float colour mode, so colour floats (which must lie in [0, 1]) become 8-bit "RGB" (``rint(255 x)``: exact for
    images that were 8-bit); single-channel floats become "F" as Pillow's own float path does.
    """
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    import cv2  # only for this fallback

    values = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if values is None or values.ndim not in (2, 3) or values.size == 0:
        return None
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if values.ndim == 3 and values.shape[2] not in (3, 4):
        return None
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise UserError(f"{what} {path} has non-finite pixels (NaN or inf); fix or remove the file")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise UserError(f"float {what} {path} has values in [{low:g}, {high:g}]; "
                            "float images must hold intensities in [0, 1]")
        if values.ndim == 2:
            return Image.fromarray(values.astype(np.float32), "F")
        values = np.rint(values.astype(np.float64) * 255).astype(np.uint8)
    elif values.dtype == np.uint16:
        values = (values >> 8).astype(np.uint8) if values.ndim == 3 else values
        if values.ndim == 2:
            return Image.fromarray((values.astype(np.float32) / np.float32(65535)), "F")
    elif values.dtype != np.uint8:
        return None
    if values.ndim == 2:
        return Image.fromarray(values, "L").convert("RGB")
    code = cv2.COLOR_BGRA2RGB if values.shape[2] == 4 else cv2.COLOR_BGR2RGB  # alpha dropped, as Pillow's path
    return Image.fromarray(np.ascontiguousarray(cv2.cvtColor(values, code)), "RGB")


# --------------------------------------------------------------------------- images


def _int_scale(img: Image.Image) -> int:
    """2**bits - 1 for an "I" image: bits stored per sample (PNG: 16; TIFF: BitsPerSample; else 32), capped at 31."""
    if img.format == "PNG":
        bits = 16
    else:
        tag = getattr(img, "tag_v2", {}).get(258, 32)  # TIFF BitsPerSample
        bits = int(tag[0] if isinstance(tag, tuple) else tag)
    return 2 ** min(bits, 31) - 1


def _unit_grey(img: Image.Image, path: str | Path) -> np.ndarray:
    """A high-bit-depth grey image ("I;16*", "I", "F") as float32 [H, W] in [0, 1] by its sample range."""
    values = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(values).all():
            raise UserError(f"image {path} has non-finite pixels (NaN or inf); fix or remove the file")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise UserError(
                f"float image {path} has values in [{low:g}, {high:g}]; float images must hold intensities in [0, 1]"
            )
        return values.astype(np.float32)
    if img.mode.startswith("I;16"):
        # uint16 is exact in float32, so one IEEE division gives the correctly rounded v / 65535.
        return values.astype(np.float32) / np.float32(65535)
    if values.min() < 0:
        raise UserError(f"integer image {path} has negative pixel values; save it as unsigned 8- or 16-bit")
    # int32 is not exact in float32: divide in float64, then round once to float32.
    return (values.astype(np.float64) / _int_scale(img)).astype(np.float32)


def load_image(path: str | Path) -> Image.Image:
    """Decode an image fully: PIL "RGB" for 8-bit sources, PIL "F" (float32 grey in [0, 1]) for high-bit-depth ones.

    See the module docstring for the per-mode mapping. Unreadable, truncated or oversized files, and non-finite or
    out-of-range float pixels, raise a one-line ``UserError`` naming the file.
    """
    try:
        with Image.open(path) as img:
            img.load()  # force a full decode so truncated files fail here
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                return Image.fromarray(_unit_grey(img, path), "F")
            if img.mode in ("P", "PA"):
                # Via RGBA: PIL warns when converting a palette with transparency straight to RGB; same colours.
                return img.convert("RGBA").convert("RGB")
            return img.convert("RGB")
    except _READ_ERRORS as e:
        fallback = _opencv_tiff(path, "image") if isinstance(e, UnidentifiedImageError) else None
        if fallback is None:
            raise _read_error(path, "image", e) from e
        return fallback


def resize_image(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to ``size`` = (h, w) (= torchvision ``Resize((h, w))`` on PIL) -> [h, w, 3] array.

    "RGB" (or any 8-bit mode) -> uint8; "F" (from ``load_image``) -> float32 in [0, 1], resized in float with the
    same kernel and returned as a read-only 3-channel broadcast view of one grey channel (no copy).
    """
    h, w = int(size[0]), int(size[1])
    if img.mode == "F":
        grey = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)
        # Bilinear weights are non-negative and sum to 1 only up to rounding: keep the result inside [0, 1].
        grey = np.clip(grey, 0.0, 1.0)
        return np.broadcast_to(grey[..., None], (h, w, 3))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img.resize((w, h), Image.BILINEAR), dtype=np.uint8)  # writable copy


def to_unit_tensor(arr: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 (/255, = ``ToTensor``) or float in [0, 1] (as is) -> float32 [3, H, W] in [0, 1]."""
    if np.issubdtype(arr.dtype, np.floating):
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1), dtype=np.float32))  # copy: views may be read-only
    arr = np.asarray(arr, dtype=np.uint8)
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only arrays
        arr = arr.copy()
    return torch.from_numpy(arr.transpose(2, 0, 1)).contiguous().to(torch.float32).div(255)


def imagenet_normalize(t: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] RGB in [0, 1] -> ImageNet-normalised (subtract the mean, then divide by the std)."""
    return (t - _MEAN_T.to(t.device, t.dtype)) / _STD_T.to(t.device, t.dtype)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """``resize_image`` output [H, W, 3] -> float32 [3, H, W] ImageNet-normalised (= ToTensor + Normalize)."""
    return imagenet_normalize(to_unit_tensor(arr))


def display_rgb(img: Image.Image) -> np.ndarray:
    """A ``load_image`` result as uint8 [H, W, 3] for pictures ("F" rounded to 8 bits, grey repeated)."""
    if img.mode == "F":
        grey = np.rint(np.asarray(img, dtype=np.float32) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(img.convert("RGB"), dtype=np.uint8)


# --------------------------------------------------------------------------- masks


class MaskSizeError(UserError):
    """Mask/image size mismatch: a data inconsistency, never skipped."""


def check_mask_size(image_path: str | Path, mask_path: str | Path, size: tuple[int, int] | None = None) -> None:
    """Raise ``MaskSizeError`` unless the mask's (width, height) equals the image's (``size``, else read)."""
    isz = size if size is not None else image_size(image_path)
    msz = image_size(mask_path, "mask")
    if isz != msz:
        raise MaskSizeError(
            f"mask {mask_path} is {msz[0]}x{msz[1]} but its image {image_path} is {isz[0]}x{isz[1]}; "
            f"fix or replace the mask so both have the same size"
        )


def _defect_pixels(img: Image.Image, path: str | Path) -> np.ndarray:
    """bool [H, W]: True where the mask marks a defect (non-zero value, or non-zero palette index)."""
    if img.mode in ("1", "L", "P", "I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img)  # "P": the palette indices, not their colours
    elif img.mode in ("LA", "La", "PA"):
        values = np.asarray(img)[..., 0]
    else:
        values = np.asarray(img.convert("RGB")).max(axis=2)  # any non-zero channel; alpha ignored
    if img.mode == "F" and not np.isfinite(values).all():
        raise UserError(f"mask {path} has non-finite values (NaN or inf); fix or remove the file")
    return values != 0


def read_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decode a mask and resize it to ``size`` = (h, w): uint8 [h, w] of {0, 1}.

    The defect pixels become a {0, 255} "L" image, bilinearly resized and kept where > 0.5 after /255, exactly as
    the official ``Resize`` + ``ToTensor`` + threshold does for {0, 255} masks.
    """
    try:
        with Image.open(path) as img:
            img.load()
            defects = _defect_pixels(img, path)
    except _READ_ERRORS as e:
        raise _read_error(path, "mask", e) from e
    h, w = int(size[0]), int(size[1])
    binary = Image.fromarray(np.where(defects, 255, 0).astype(np.uint8), "L")
    arr = np.asarray(binary.resize((w, h), Image.BILINEAR), dtype=np.uint8)
    # ToTensor gives arr/255 in float32; binarise exactly like the official code.
    return (arr.astype(np.float32) / np.float32(255) > 0.5).astype(np.uint8)


def load_mask(path: str | Path, size: tuple[int, int], image_path: str | Path | None = None) -> torch.Tensor:
    """A ground-truth mask as float32 [1, h, w] of {0, 1}; with ``image_path`` its size must equal the image's."""
    if image_path is not None:
        check_mask_size(image_path, path)
    return torch.from_numpy(read_mask(path, size)).to(torch.float32).unsqueeze(0)
