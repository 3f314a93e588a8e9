"""The "folder" layout scanner (anomalib style): plain folders of normal and abnormal images.

Keys (folders relative to ``DATASET.datadir``; images directly inside each folder)::

    normal_dir          normal images (training, and the test normals unless normal_test_dir is set)
    abnormal_dir        anomalous test images (defect name "anomaly")
    mask_dir            optional: masks named like their images (same stem, any image extension)
    normal_test_dir     optional: normal test images; else normal_split_ratio of normal_dir is held out
    normal_split_ratio  fraction of normal_dir held out for testing (default 0.2)

The held-out images are chosen by ranking file names on a hash of (seed, name): deterministic for a seed,
independent of file-system order and Python version, and adding images moves few others across the split.
Without ``mask_dir`` no sample has a mask, so the dataset has no masks and pixel metrics are skipped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from task.anomaly.unsupervised.data.image.dataset import ANOMALY, GOOD, Sample, check_split
from task.anomaly.unsupervised.data.image.preprocess import IMAGE_EXTENSIONS, list_image_files
from task.common.config import Config
from task.common.errors import UserError

__all__ = ["scan_folder"]


def _folder(root: Path, relative: str | None, key: str) -> Path:
    if not relative:
        raise UserError(f"DATASET.{key} is not set; the folder format needs it (a folder relative to {root})")
    folder = root / relative
    if not folder.is_dir():
        raise UserError(f"DATASET.{key} folder {folder} not found; create it or fix DATASET.{key}")
    return folder


def _images(root: Path, relative: str | None, key: str) -> list[Path]:
    folder = _folder(root, relative, key)
    files = list_image_files(folder)
    if not files:
        raise UserError(f"no images in {folder} (DATASET.{key}); add images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _held_out(images: list[Path], ratio: float, seed: int) -> set[Path]:
    """The ``round(ratio * n)`` (at least 1, at most n - 1) images ranked first by sha256 of "<seed>/<name>"."""
    n = len(images)
    if n < 2:
        raise UserError(
            f"{images[0].parent} has {n} normal image; holding some out for testing needs at least 2, "
            f"or set DATASET.normal_test_dir"
        )
    count = min(n - 1, max(1, round(ratio * n)))
    ranked = sorted(images, key=lambda p: (hashlib.sha256(f"{seed}/{p.name}".encode()).hexdigest(), p.name))
    return set(ranked[:count])


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    masks: dict[str, Path] = {}
    for path in list_image_files(folder):
        if path.stem in masks:
            raise UserError(f"two masks for {path.stem} in {folder}: {masks[path.stem].name} and {path.name}; keep one")
        masks[path.stem] = path
    return masks


_ROLES = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir")


def _check_separate(root: Path, ds: Config) -> None:
    """The folders of the layout must be distinct and not nested (symlinks resolved), and no image file may serve
    two of them: else the same images become normal and defective, masks, or training images tested as good."""
    folders = {key: (root / ds[key]).resolve() for key in _ROLES if ds[key] and (root / ds[key]).is_dir()}
    keys = list(folders)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            fa, fb = folders[a], folders[b]
            if fa == fb:
                raise UserError(f"DATASET.{a} and DATASET.{b} are the same folder {fa}; give each role its own folder")
            if fa in fb.parents or fb in fa.parents:
                inner, outer = (a, b) if fb in fa.parents else (b, a)
                raise UserError(f"DATASET.{inner} ({folders[inner]}) lies inside DATASET.{outer} ({folders[outer]}); "
                                "give each role a folder of its own, side by side")
    owner: dict[Path, str] = {}
    for key, folder in folders.items():
        shared = []
        for image in list_image_files(folder):
            real = image.resolve()
            if real in owner and owner[real] != key:
                shared.append((owner[real], image))
            owner.setdefault(real, key)
        if shared:
            other, example = shared[0]
            raise UserError(f"{len(shared)} image(s) of DATASET.{key} are the same files as images of DATASET.{other} "
                            f"(links), e.g. {example}; each image must have one role")


def scan_folder(ds: Config, split: str, seed: int) -> list[Sample]:
    """The samples of ``split`` ('train' or 'test'); ``seed`` picks the held-out normals. Order: defect, then name."""
    root = Path(ds.datadir).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder {root} not found; set DATASET.datadir to the folder holding your image folders")
    check_split(split)
    _check_separate(root, ds)
    normals = _images(root, ds.normal_dir, "normal_dir")
    held = set() if ds.normal_test_dir else _held_out(normals, ds.normal_split_ratio, seed)
    if split == "train":
        return [Sample(str(p), 0, None, GOOD) for p in normals if p not in held]

    test_normals: list[Path] | set[Path] = _images(root, ds.normal_test_dir, "normal_test_dir") if ds.normal_test_dir else held
    abnormals = _images(root, ds.abnormal_dir, "abnormal_dir")
    masks: dict[str, Path] = {}
    if ds.mask_dir:
        mask_folder = _folder(root, ds.mask_dir, "mask_dir")
        masks = _masks_by_stem(mask_folder)
        if not any(p.stem in masks for p in abnormals):
            raise UserError(
                f"no mask in {mask_folder} matches an image of {abnormals[0].parent}; "
                f"name each mask like its image (same stem, any image extension) or unset DATASET.mask_dir"
            )
    samples = [Sample(str(p), 1, str(masks[p.stem]) if p.stem in masks else None, ANOMALY) for p in abnormals]
    samples += [Sample(str(p), 0, None, GOOD) for p in sorted(test_normals, key=lambda p: p.name)]
    return samples
