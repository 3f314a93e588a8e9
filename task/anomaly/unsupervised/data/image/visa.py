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
import posixpath
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

from task.anomaly.unsupervised.data.image.dataset import ANOMALY, GOOD, Sample, check_split
from task.common.array_files import check_file_size
from task.common.config import Config
from task.common.errors import UserError, short_text

__all__ = ["VISA_URL", "SPLIT_CSV", "scan_visa"]

VISA_URL = "https://github.com/amazon-science/spot-diff"
SPLIT_CSV = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}
_EXTRA = "\0extra"  # DictReader key of the fields beyond the header
MAX_CSV_BYTES = 64 << 20  # the official 1cls.csv is under 1 MB
_Rows = list[tuple[int, dict[str, str]]]  # (line number, row)


def _read_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every data row of the split file, after checking its size, header and row lengths."""
    fix = "restore it from the VisA download"
    check_file_size(csv_path, "VisA split file", fix, MAX_CSV_BYTES)
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, restkey=_EXTRA)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            missing = [c for c in _COLUMNS if c not in header]
            if missing:
                raise UserError(
                    f"VisA split file {csv_path} lacks column(s) {', '.join(missing)}; "
                    f"its header must be {','.join(_COLUMNS)}"
                )
            rows = []
            for row in reader:
                if None in row.values() or _EXTRA in row:
                    count = len(header) + len(row.get(_EXTRA, [])) - sum(v is None for v in row.values())
                    raise UserError(f"{csv_path} line {reader.line_num} has {count} field(s) but the header has "
                                    f"{len(header)}; every row needs {','.join(_COLUMNS)} "
                                    "(an empty mask cell still needs its comma)")
                rows.append((reader.line_num, {k: v.strip() for k, v in row.items()}))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read VisA split file {csv_path} ({e}); {fix}") from None
    if not rows:
        raise UserError(f"VisA split file {csv_path} has a header but no rows; {fix}")
    return rows


def _inside(relative: str, what: str, csv_path: Path, line: int) -> str:
    """``relative`` normalised; an absolute path or one that climbs out of the VisA root is refused."""
    text = relative.replace("\\", "/")
    normal = posixpath.normpath(text)
    absolute = PurePosixPath(text).is_absolute() or bool(PureWindowsPath(relative).drive)
    if absolute or normal == ".." or normal.startswith("../"):
        raise UserError(f"{csv_path} line {line} lists {what} {short_text(relative)!r} outside the VisA root; "
                        "paths must be relative to the root, without leading / or ..")
    return normal


def _existing(root: Path, relative: str, what: str, csv_path: Path, line: int) -> Path:
    path = root / relative
    if not path.is_file():
        raise UserError(f"{csv_path} line {line} lists {what} {path}, which does not exist; restore the VisA files")
    return path


def _target_rows(rows: _Rows, target: str, csv_path: Path) -> _Rows:
    """The rows of ``target`` once each: identical repeats are dropped with a warning; an image listed in two splits
    (train/test leakage) or twice with different labels/masks is refused with the count."""
    first: dict[str, tuple[int, dict[str, str]]] = {}
    kept, repeats, leaks, conflicts = [], 0, [], []
    for line, row in rows:
        if row["object"] != target:
            continue
        image = _inside(row["image"], "image", csv_path, line)
        if row["mask"]:
            _inside(row["mask"], "mask", csv_path, line)
        if image not in first:
            first[image] = (line, row)
            kept.append((line, row))
        elif first[image][1]["split"] != row["split"]:
            leaks.append((first[image][0], line, image))
        elif first[image][1] != row:
            conflicts.append((first[image][0], line, image))
        else:
            repeats += 1
    if leaks:
        a, b, image = leaks[0]
        raise UserError(f"{csv_path}: {len(leaks)} image(s) of {target} are listed in both train and test "
                        f"(leakage), e.g. {short_text(image)} on lines {a} and {b}; keep each image in one split")
    if conflicts:
        a, b, image = conflicts[0]
        raise UserError(f"{csv_path}: {len(conflicts)} image(s) of {target} are listed twice with different "
                        f"label or mask, e.g. {short_text(image)} on lines {a} and {b}; keep one row per image")
    if repeats:
        warnings.warn(f"{csv_path}: {repeats} duplicated row(s) of {target} ignored (each image is used once)",
                      stacklevel=3)
    return kept


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
    for line, row in _target_rows(rows, ds.target, csv_path):
        if row["split"] not in ("train", "test"):
            raise UserError(f"{csv_path} line {line} has split {short_text(row['split'])!r}; use 'train' or 'test'")
        if row["split"] != split:
            continue
        label = _LABELS.get(row["label"])
        if label is None:
            raise UserError(f"{csv_path} line {line} has label {short_text(row['label'])!r}; use 'normal' or 'anomaly'")
        if label and split == "train":
            raise UserError(f"{csv_path} line {line} puts an anomalous image in the train split; training uses normal images only")
        mask = row["mask"]
        if mask and not label:
            raise UserError(f"{csv_path} line {line} gives the mask {short_text(mask)} for a normal image; "
                            "a normal image has no defect: empty the mask cell or label the row 'anomaly'")
        image = _existing(root, row["image"], "image", csv_path, line)
        mask_path = str(_existing(root, mask, "mask", csv_path, line)) if mask else None
        samples.append(Sample(str(image), label, mask_path, ANOMALY if label else GOOD))
    if not samples:
        raise UserError(
            f"no {split} images of {ds.target} in {csv_path}; the file must list rows '{ds.target},{split},...'"
        )
    return sorted(samples, key=lambda s: (s.defect, s.path))
