"""The VisA layout scanner: the official one-class split file drives everything.

Layout (``DATASET.datadir`` = the VisA root)::

    <root>/split_csv/1cls.csv                        columns object,split,label,image,mask
    <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png       {0, 255} or small integers; any non-zero = defect

CSV paths are relative to the root; ``label`` is ``normal`` or ``anomaly``; rows of ``DATASET.target`` with
``split`` train or test form the two splits. Normal images get the defect name "good", anomalous ones "anomaly".
"""

from __future__ import annotations

import csv
from pathlib import Path

from task.anomaly.unsupervised.data.image.dataset import ANOMALY, GOOD, Sample, check_split
from task.common.config import Config
from task.common.errors import UserError

__all__ = ["VISA_URL", "SPLIT_CSV", "scan_visa"]

VISA_URL = "https://github.com/amazon-science/spot-diff"
SPLIT_CSV = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def _read_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every data row of the split file, after checking its header."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(
                    f"VisA split file {csv_path} lacks column(s) {', '.join(missing)}; "
                    f"its header must be {','.join(_COLUMNS)}"
                )
            return [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read VisA split file {csv_path} ({e}); restore it from the VisA download") from e


def _existing(root: Path, relative: str, what: str, csv_path: Path, line: int) -> Path:
    path = root / relative
    if not path.is_file():
        raise UserError(f"{csv_path} line {line} lists {what} {path}, which does not exist; restore the VisA files")
    return path


def scan_visa(ds: Config, split: str, seed: int) -> list[Sample]:
    """The samples of ``split`` ('train' or 'test') of VisA object ``ds.target`` under the VisA root ``ds.datadir``.

    ``seed`` is unused: the split file fixes the split. Order: by defect name, then path. An anomaly row with an
    empty mask cell gets ``mask_path=None`` (the dataset warns); a listed file that does not exist is an error.
    """
    root = Path(ds.datadir).expanduser()
    if not root.is_dir():
        raise UserError(f"VisA folder {root} not found; download VisA from {VISA_URL} and set DATASET.datadir")
    check_split(split)
    csv_path = root / SPLIT_CSV
    if not csv_path.is_file():
        raise UserError(
            f"VisA split file {csv_path} not found; DATASET.datadir must be the VisA root that holds {SPLIT_CSV}"
        )
    rows = _read_rows(csv_path)
    objects = sorted({row["object"] for _, row in rows})
    if ds.target not in objects:
        raise UserError(
            f"VisA object {ds.target!r} is not in {csv_path}; set DATASET.target to one of: {', '.join(objects) or 'none'}"
        )

    samples: list[Sample] = []
    for line, row in rows:
        if row["object"] != ds.target or row["split"] != split:
            continue
        label = _LABELS.get(row["label"])
        if label is None:
            raise UserError(f"{csv_path} line {line} has label {row['label']!r}; use 'normal' or 'anomaly'")
        if label and split == "train":
            raise UserError(f"{csv_path} line {line} puts an anomalous image in the train split; training uses normal images only")
        image = _existing(root, row["image"], "image", csv_path, line)
        mask = (row["mask"] or "").strip()
        mask_path = str(_existing(root, mask, "mask", csv_path, line)) if label and mask else None
        samples.append(Sample(str(image), label, mask_path, ANOMALY if label else GOOD))
    if not samples:
        raise UserError(
            f"no {split} images of {ds.target} in {csv_path}; the file must list rows '{ds.target},{split},...'"
        )
    return sorted(samples, key=lambda s: (s.defect, s.path))
