"""The MVTec AD layout scanner. BTAD and MPDD ship in the same layout and use it too (``DATASET.format: mvtec``).

Layout::

    <datadir>/<target>/train/good/*.png
    <datadir>/<target>/test/<defect>/*.png            (``good`` = normal)
    <datadir>/<target>/ground_truth/<defect>/<stem>_mask.png

``<target>`` must be a plain folder name; the folder itself may be a symlink (e.g. to another disk).
"""

from __future__ import annotations

from pathlib import Path

from task.anomaly.unsupervised.data.image.dataset import GOOD, Sample, check_split
from task.anomaly.unsupervised.data.image.preprocess import IMAGE_EXTENSIONS, list_image_files
from task.common.config import Config
from task.common.errors import UserError

__all__ = ["MVTEC_URL", "scan_mvtec"]

MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
DEMO_CONFIG = "configs/anomaly/unsupervised/dmad/demo.yaml"


def _list_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:  # ".png" first: the MVTec AD convention
        for cand in (gt_dir / f"{stem}_mask{ext}", gt_dir / f"{stem}_mask{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _category_dir(datadir: Path, target: str) -> Path:
    """``datadir / target`` after checking that ``target`` is one plain folder name (symlinked folders are fine)."""
    parts = target.replace("\\", "/").split("/") if isinstance(target, str) else []
    if len(parts) != 1 or parts[0].strip() in ("", ".", "..") or ".." in target:
        raise UserError(
            f"invalid DATASET.target {target!r}: it must be a plain category folder name inside {datadir} "
            f"(no path separators or '..'); set it to one of the category folders, e.g. 'bottle'"
        )
    return datadir / target


def scan_mvtec(ds: Config, split: str, seed: int) -> list[Sample]:
    """The samples of ``split`` ('train' or 'test') of category ``ds.target`` under ``ds.datadir``.

    ``seed`` is unused: the layout fixes the split. Order is deterministic: defect folders by name, files by name.
    A defect image without its ``<stem>_mask.<ext>`` in ``ground_truth/<defect>`` is an error.
    """
    datadir = Path(ds.datadir).expanduser()
    if not datadir.is_dir():
        raise UserError(
            f"dataset folder {datadir} not found; download MVTec AD from {MVTEC_URL} "
            f"and set DATASET.datadir, or use {DEMO_CONFIG}"
        )
    catdir = _category_dir(datadir, ds.target)
    if not catdir.is_dir():
        available = [p.name for p in _list_dirs(datadir)]
        listing = ", ".join(available) if available else "none"
        raise UserError(
            f"category folder {catdir} not found; set DATASET.target to one of the available categories: {listing}"
        )
    check_split(split)
    splitdir = catdir / split
    if not splitdir.is_dir():
        raise UserError(
            f"split folder {splitdir} not found; {catdir} must follow the MVTec AD layout "
            f"(train/good, test/<defect>, ground_truth/<defect>)"
        )

    if split == "train":
        gooddir = splitdir / GOOD
        files = list_image_files(gooddir) if gooddir.is_dir() else []
        if not files:
            raise UserError(
                f"no images in {gooddir}; put the normal training images there "
                f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        return [Sample(str(f), 0, None, GOOD) for f in files]

    samples: list[Sample] = []
    gtroot = catdir / "ground_truth"
    for defect_dir in _list_dirs(splitdir):
        defect = defect_dir.name
        for f in list_image_files(defect_dir):
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
