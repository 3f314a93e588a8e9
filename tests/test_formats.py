"""Dataset formats (mvtec, visa, folder), the image/mask decoder against true values, and mask warnings."""

from __future__ import annotations

import csv
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CONFIGS, assert_user_error, main_in_process
from task.anomaly.unsupervised.data.image.dataset import AnomalyDataset, Sample
from task.anomaly.unsupervised.data.image.formats import DATASET_SCHEMA_KEYS, FORMATS, scan_dataset
from task.anomaly.unsupervised.data.image.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    display_rgb,
    imagenet_normalize,
    load_image,
    load_mask,
    resize_image,
    to_tensor,
    to_unit_tensor,
)
from task.common.config import Config, defaults
from task.common.errors import UserError

W, H = 8, 6  # tiny images (PIL size order)


# --------------------------------------------------------------------------- helpers


def _rgb(path: Path, seed: int = 0, size: tuple[int, int] = (W, H)) -> Path:
    arr = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _mask(path: Path, value: int = 255, box: tuple[int, int, int, int] = (1, 1, 5, 4)) -> Path:
    arr = np.zeros((H, W), dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _cfg(**keys) -> Config:
    return Config({**defaults(DATASET_SCHEMA_KEYS), "target": "", **keys})


def _one_line_error(fn, *needles: str) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def _unit(img: Image.Image) -> torch.Tensor:
    """[3, h, w] in [0, 1] at the image's own size (a same-size resize is a copy in PIL)."""
    return to_unit_tensor(resize_image(img, (img.height, img.width)))


# --------------------------------------------------------------------------- mvtec


def _mvtec(root: Path, category: str = "widget") -> Path:
    cat = root / category
    for i in range(3):
        _rgb(cat / "train" / "good" / f"{i:03d}.png", seed=i)
    _rgb(cat / "test" / "good" / "000.png", seed=5)
    for i in range(2):
        _rgb(cat / "test" / "crack" / f"{i:03d}.png", seed=10 + i)
        _mask(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def test_mvtec_is_the_default_format(tmp_path):
    root = _mvtec(tmp_path / "mvtec")
    assert set(FORMATS) == {"mvtec", "visa", "folder"}
    cfg = Config({"datadir": str(root), "target": "widget"})  # no format key: schema default mvtec
    train = scan_dataset(cfg, "train", 0)
    test = scan_dataset(_cfg(format="mvtec", datadir=str(root), target="widget"), "test", 0)
    assert len(train) == 3 and all(s.label == 0 and s.mask_path is None for s in train)
    assert [(s.defect, s.label, s.name) for s in test] == [
        ("crack", 1, "000.png"),
        ("crack", 1, "001.png"),
        ("good", 0, "000.png"),
    ]
    assert test[0].mask_path == str(root / "widget" / "ground_truth" / "crack" / "000_mask.png")


def test_mvtec_symlinked_category_on_another_folder(tmp_path):
    real = _mvtec(tmp_path / "other_disk", "bottle") / "bottle"
    (tmp_path / "mvtec").mkdir()
    try:
        os.symlink(real, tmp_path / "mvtec" / "bottle", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not supported")
    test = scan_dataset(_cfg(datadir=str(tmp_path / "mvtec"), target="bottle"), "test", 0)
    assert len(test) == 3 and sum(s.label for s in test) == 2


@pytest.mark.parametrize("target", ["../widget", "widget/..", "a/b", "a\\b", "..", "/etc"])
def test_mvtec_refuses_paths_as_target(tmp_path, target):
    root = _mvtec(tmp_path / "mvtec")
    _one_line_error(lambda: scan_dataset(_cfg(datadir=str(root), target=target), "train", 0), "DATASET.target")


def test_mvtec_malformed_layouts(tmp_path):
    root = _mvtec(tmp_path / "mvtec")
    cfg = _cfg(datadir=str(root), target="widget")
    (root / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    _one_line_error(lambda: scan_dataset(cfg, "test", 0), "001.png", "001_mask.png")
    shutil.rmtree(root / "widget" / "test")
    _one_line_error(lambda: scan_dataset(cfg, "test", 0), str(root / "widget" / "test"), "MVTec AD layout")
    for f in (root / "widget" / "train" / "good").iterdir():
        f.unlink()
    _one_line_error(lambda: scan_dataset(cfg, "train", 0), str(root / "widget" / "train" / "good"), "no images")


# --------------------------------------------------------------------------- visa


def _visa(root: Path) -> Path:
    """candle: 3 train normals, 1 test normal, 2 test anomalies (masks {0,255} and {0,1,2}); a second object."""
    rows = []
    img_dir, mask_dir = Path("candle/Data/Images"), Path("candle/Data/Masks/Anomaly")
    for i in range(4):
        _rgb(root / img_dir / "Normal" / f"{i:04d}.JPG", seed=i)
        rows.append(["candle", "train" if i < 3 else "test", "normal", f"{img_dir}/Normal/{i:04d}.JPG", ""])
    for i, value in enumerate((255, 2)):
        _rgb(root / img_dir / "Anomaly" / f"{i:03d}.JPG", seed=10 + i)
        _mask(root / mask_dir / f"{i:03d}.png", value=value)
        rows.append(["candle", "test", "anomaly", f"{img_dir}/Anomaly/{i:03d}.JPG", f"{mask_dir}/{i:03d}.png"])
    _rgb(root / "fryum/Data/Images/Normal/0000.JPG")
    rows.append(["fryum", "train", "normal", "fryum/Data/Images/Normal/0000.JPG", ""])
    _write_csv(root, [["object", "split", "label", "image", "mask"], *rows])
    return root


def _write_csv(root: Path, rows: list[list[str]]) -> Path:
    path = root / "split_csv" / "1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def _read_csv(root: Path) -> list[list[str]]:
    with open(root / "split_csv" / "1cls.csv", newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_visa_scans_object_rows(tmp_path):
    root = _visa(tmp_path / "visa")
    cfg = _cfg(format="visa", datadir=str(root), target="candle")
    train = scan_dataset(cfg, "train", 0)
    test = scan_dataset(cfg, "test", 0)
    assert [s.name for s in train] == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)
    assert [(s.defect, s.label, s.name) for s in test] == [
        ("anomaly", 1, "000.JPG"),
        ("anomaly", 1, "001.JPG"),
        ("good", 0, "0003.JPG"),
    ]
    assert test[1].mask_path == str(root / "candle/Data/Masks/Anomaly/001.png")
    # Masks {0, 255} and {0, 2} both mark the same box as defect.
    ds = AnomalyDataset(test, (H, W))
    assert ds.has_masks
    assert torch.equal(ds[0]["mask"], ds[1]["mask"]) and ds[0]["mask"].sum() == 4 * 3
    assert ds[2]["mask"].sum() == 0


def _edit_rows(root: Path, edit) -> None:
    _write_csv(root, edit(_read_csv(root)))


def _set_cell(root: Path, row: int, column: int, value: str) -> None:
    rows = _read_csv(root)
    rows[row][column] = value
    _write_csv(root, rows)


def test_visa_byte_order_mark_and_duplicate_rows(tmp_path):
    """A BOM (spreadsheet export) is accepted; an identical repeated row is used once, with a warning and its count."""
    root = _visa(tmp_path / "visa")
    rows = _read_csv(root)
    _write_csv(root, rows + [rows[1], rows[5]])
    path = root / "split_csv" / "1cls.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    cfg = _cfg(format="visa", datadir=str(root), target="candle")
    with pytest.warns(UserWarning, match=r"2 duplicated row\(s\) of candle ignored"):
        train = scan_dataset(cfg, "train", 0)
    with pytest.warns(UserWarning):
        test = scan_dataset(cfg, "test", 0)
    assert len(train) == 3 and len(test) == 3


def _drop_column(root: Path) -> None:
    _write_csv(root, [row[:4] for row in _read_csv(root)])


def _bad_label(root: Path) -> None:
    rows = _read_csv(root)
    rows[1][2] = "defective"
    _write_csv(root, rows)


def _anomaly_in_train(root: Path) -> None:
    rows = _read_csv(root)
    rows[5][1] = "train"
    _write_csv(root, rows)


@pytest.mark.parametrize(
    "break_it, split, needles",
    [
        (lambda r: (r / "split_csv" / "1cls.csv").unlink(), "train", ["1cls.csv", "VisA root"]),
        (_drop_column, "train", ["1cls.csv", "mask"]),
        (
            lambda r: (r / "candle/Data/Images/Normal/0001.JPG").unlink(),
            "train",
            ["line 3", "0001.JPG", "does not exist"],
        ),
        (lambda r: (r / "candle/Data/Masks/Anomaly/000.png").unlink(), "test", ["line 6", "000.png", "does not exist"]),
        (_bad_label, "train", ["line 2", "defective"]),
        (_anomaly_in_train, "train", ["line 6", "anomalous"]),
        (lambda r: _edit_rows(r, lambda rows: rows[:1]), "train", ["1cls.csv", "header but no rows"]),
        (
            lambda r: _edit_rows(r, lambda rows: rows[:2] + [rows[2][:3]] + rows[3:]),
            "train",
            ["line 3", "has 3 field(s)", "header has 5"],
        ),
        (
            lambda r: _edit_rows(r, lambda rows: rows + [["candle", "test", "normal", rows[1][3], ""]]),
            "test",
            ["1 image(s) of candle are listed in both train and test", "0000.JPG", "lines 2 and 9"],
        ),
        (
            lambda r: _edit_rows(r, lambda rows: rows + [["candle", "train", "anomaly", rows[1][3], ""]]),
            "train",
            ["listed twice with different label or mask", "lines 2 and 9"],
        ),
        (
            lambda r: _set_cell(r, 1, 3, str(r / "candle/Data/Images/Normal/0000.JPG")),
            "train",
            ["line 2", "outside the VisA root"],
        ),
        (
            lambda r: _set_cell(r, 1, 3, "../visa/candle/Data/Images/Normal/0000.JPG"),
            "train",
            ["line 2", "'../visa/", "outside the VisA root"],
        ),
        (lambda r: _set_cell(r, 5, 4, "candle/../../etc/passwd"), "test", ["line 6", "outside the VisA root"]),
        (
            lambda r: _set_cell(r, 4, 4, "candle/Data/Masks/Anomaly/000.png"),
            "test",
            ["line 5", "mask", "for a normal image"],
        ),
        (lambda r: _set_cell(r, 4, 1, "val"), "test", ["line 5", "split 'val'"]),
    ],
)
def test_visa_malformed(tmp_path, break_it, split, needles):
    root = _visa(tmp_path / "visa")
    break_it(root)
    cfg = _cfg(format="visa", datadir=str(root), target="candle")
    _one_line_error(lambda: scan_dataset(cfg, split, 0), *needles)


def test_visa_unknown_object_and_empty_split(tmp_path):
    root = _visa(tmp_path / "visa")
    _one_line_error(
        lambda: scan_dataset(_cfg(format="visa", datadir=str(root), target="pcb1"), "train", 0), "candle, fryum"
    )
    _one_line_error(
        lambda: scan_dataset(_cfg(format="visa", datadir=str(root), target="fryum"), "test", 0),
        "no test images",
        "1cls.csv",
    )
    _one_line_error(
        lambda: scan_dataset(_cfg(format="visa", datadir=str(tmp_path / "nope"), target="x"), "test", 0), "nope"
    )


# --------------------------------------------------------------------------- folder


def _folder(root: Path, n_normal: int = 10, order: list[int] | None = None) -> Path:
    """good/ (n_normal), bad/ (a.png, a.jpg, b.png, c.png), masks/ (a.png, b.bmp); c has no mask."""
    for i in order if order is not None else range(n_normal):
        _rgb(root / "good" / f"n{i:02d}.png", seed=i)
    for i, name in enumerate(["a.png", "a.jpg", "b.png", "c.png"]):
        _rgb(root / "bad" / name, seed=20 + i)
    _mask(root / "masks" / "a.png")
    _mask(root / "masks" / "b.bmp", value=1)
    return root


def _folder_cfg(root: Path, **keys) -> Config:
    return _cfg(**{"format": "folder", "datadir": str(root), "normal_dir": "good", "abnormal_dir": "bad", **keys})


def test_folder_scan_with_held_out_normals(tmp_path):
    root = _folder(tmp_path / "f")
    cfg = _folder_cfg(root, mask_dir="masks")
    train, test = scan_dataset(cfg, "train", 7), scan_dataset(cfg, "test", 7)
    normals = {s.path for s in test if s.label == 0}
    assert len(train) == 8 and len(normals) == 2  # round(0.2 * 10) held out
    assert normals.isdisjoint(s.path for s in train)
    assert normals | {s.path for s in train} == {str(p) for p in (root / "good").iterdir()}
    # a.png and a.jpg stay two samples with distinct names (and share the mask named a).
    assert [(s.name, s.label, s.defect) for s in test[:4]] == [
        ("a.jpg", 1, "anomaly"),
        ("a.png", 1, "anomaly"),
        ("b.png", 1, "anomaly"),
        ("c.png", 1, "anomaly"),
    ]
    assert [s.mask_path for s in test[:4]] == [str(root / "masks" / "a.png")] * 2 + [
        str(root / "masks" / "b.bmp"),
        None,
    ]
    assert all(s.defect == "good" for s in test[4:])


def test_folder_split_is_seeded_and_independent_of_file_order(tmp_path):
    a = _folder(tmp_path / "a", order=list(range(10)))
    b = _folder(tmp_path / "b", order=[7, 3, 9, 0, 5, 1, 8, 2, 6, 4])  # created in another order

    def held(root: Path, seed: int) -> list[str]:
        return [s.name for s in scan_dataset(_folder_cfg(root), "test", seed) if s.label == 0]

    assert held(a, 3) == held(a, 3) == held(b, 3)
    assert len({tuple(held(a, seed)) for seed in range(6)}) > 1  # the seed matters
    cfg = _folder_cfg(a, normal_split_ratio=0.5)
    assert len(scan_dataset(cfg, "train", 0)) == 5 and sum(s.label == 0 for s in scan_dataset(cfg, "test", 0)) == 5


def test_folder_normal_test_dir_and_no_masks(tmp_path):
    root = _folder(tmp_path / "f")
    for i in range(2):
        _rgb(root / "good_test" / f"t{i}.png", seed=40 + i)
    cfg = _folder_cfg(root, normal_test_dir="good_test")
    train, test = scan_dataset(cfg, "train", 0), scan_dataset(cfg, "test", 0)
    assert len(train) == 10 and [s.name for s in test if s.label == 0] == ["t0.png", "t1.png"]
    assert all(s.mask_path is None for s in test)
    ds = AnomalyDataset(test, (H, W))
    assert not ds.has_masks and "mask" not in ds[0]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert set(batch) == {"image", "label", "path", "defect"}


def test_folder_warns_once_about_missing_and_empty_masks(tmp_path):
    root = _folder(tmp_path / "f")
    _mask(root / "masks" / "b.bmp", value=0)  # b's mask is now empty; c has none
    test = scan_dataset(_folder_cfg(root, mask_dir="masks"), "test", 0)
    for cache in (True, False):
        with pytest.warns(UserWarning) as record:
            ds = AnomalyDataset(test, (H, W), cache=cache)
        messages = [str(w.message) for w in record]
        assert len(messages) == 1 and messages[0].startswith("2 defective image(s)")
        assert str(root / "bad" / "b.png") in messages[0] and str(root / "bad" / "c.png") in messages[0]
        assert ds.unmasked == [str(root / "bad" / "b.png"), str(root / "bad" / "c.png")]
        assert ds.has_masks and ds[3]["mask"].sum() == 0 and ds[0]["mask"].sum() > 0


def test_unmasked_warning_lists_first_five(tmp_path):
    paths = [str(_rgb(tmp_path / f"{i}.png", seed=i)) for i in range(7)]
    mask = str(_mask(tmp_path / "m.png"))
    samples = [Sample(p, 1, None, "anomaly") for p in paths] + [Sample(paths[0], 1, mask, "anomaly")]
    with pytest.warns(UserWarning, match=r"^7 defective .* and 2 more$") as record:
        AnomalyDataset(samples, (H, W))
    assert all(p in str(record[0].message) for p in paths[:5]) and paths[5] not in str(record[0].message)


def test_no_warning_when_every_defect_has_a_mask(tmp_path):
    root = _mvtec(tmp_path / "mvtec")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = AnomalyDataset(scan_dataset(_cfg(datadir=str(root), target="widget"), "test", 0), (H, W))
    assert ds.unmasked == []


def _link_images(source: Path, folder: Path) -> None:
    folder.mkdir()
    for image in source.iterdir():
        (folder / image.name).symlink_to(image)


def _rm(path: Path) -> None:
    shutil.rmtree(path)


@pytest.mark.parametrize(
    "keys, break_it, split, needles",
    [
        ({"normal_dir": None}, None, "train", ["DATASET.normal_dir", "not set"]),
        ({"normal_dir": "nope"}, None, "train", ["DATASET.normal_dir", "nope", "not found"]),
        ({}, lambda r: [p.unlink() for p in (r / "good").iterdir()], "train", ["no images", "good", "normal_dir"]),
        ({"abnormal_dir": None}, None, "test", ["DATASET.abnormal_dir", "not set"]),
        ({}, lambda r: [p.unlink() for p in (r / "bad").iterdir()], "test", ["no images", "bad"]),
        ({"mask_dir": "masks"}, lambda r: _rm(r / "masks"), "test", ["DATASET.mask_dir", "masks", "not found"]),
        ({"mask_dir": "masks"}, lambda r: _mask(r / "masks" / "a.bmp"), "test", ["two masks for a", "a.bmp", "a.png"]),
        ({"mask_dir": "empty"}, lambda r: _mask(r / "empty" / "zzz.png"), "test", ["no mask in", "empty", "same stem"]),
        ({"normal_test_dir": "t"}, lambda r: (r / "t").mkdir(), "test", ["no images", "normal_test_dir"]),
        (
            {},
            lambda r: [p.unlink() for p in sorted((r / "good").iterdir())[1:]],
            "train",
            ["1 normal image", "normal_test_dir"],
        ),
        # overlapping roles: refused for both splits, before training
        ({"abnormal_dir": "good"}, None, "train", ["DATASET.normal_dir and DATASET.abnormal_dir are the same folder"]),
        ({"abnormal_dir": "./good/"}, None, "test", ["normal_dir and DATASET.abnormal_dir are the same folder"]),
        ({"mask_dir": "bad"}, None, "train", ["DATASET.abnormal_dir and DATASET.mask_dir are the same folder"]),
        ({"mask_dir": "good"}, None, "test", ["DATASET.normal_dir and DATASET.mask_dir are the same folder"]),
        ({"normal_test_dir": "good"}, None, "train", ["normal_dir and DATASET.normal_test_dir are the same folder"]),
        (
            {"abnormal_dir": "good/bad"},
            lambda r: shutil.copytree(r / "bad", r / "good" / "bad"),
            "train",
            ["DATASET.abnormal_dir", "lies inside DATASET.normal_dir"],
        ),
        (
            {"normal_test_dir": "alias"},
            lambda r: (r / "alias").symlink_to(r / "good"),
            "train",
            ["normal_dir and DATASET.normal_test_dir are the same"],
        ),
        (
            {"normal_test_dir": "t"},
            lambda r: _link_images(r / "good", r / "t"),
            "test",
            ["10 image(s) of DATASET.normal_test_dir", "normal_dir (links)"],
        ),
    ],
)
def test_folder_malformed(tmp_path, keys, break_it, split, needles):
    root = _folder(tmp_path / "f")
    if break_it is not None:
        break_it(root)
    _one_line_error(lambda: scan_dataset(_folder_cfg(root, **keys), split, 0), *needles)


# --------------------------------------------------------------------------- schema and dispatch


def test_schema_keys_validate():
    fields = DATASET_SCHEMA_KEYS
    assert set(fields) == {
        "format",
        "normal_dir",
        "abnormal_dir",
        "mask_dir",
        "normal_test_dir",
        "normal_split_ratio",
        "calibration_split",
    }
    assert fields["format"].check("DATASET.format", "visa") == "visa"
    assert fields["normal_test_dir"].check("DATASET.normal_test_dir", None) is None
    assert fields["normal_split_ratio"].default == 0.2
    for bad in (0, 1, 1.5):
        with pytest.raises(UserError, match="normal_split_ratio"):
            fields["normal_split_ratio"].check("DATASET.normal_split_ratio", bad)
    with pytest.raises(UserError, match="mvtec, visa, folder"):
        fields["format"].check("DATASET.format", "coco")


@pytest.mark.parametrize(
    ("yaml_name", "key", "value"),
    [("demo.yaml", "DATASET.clip_length", "4"), ("video_demo.yaml", "DATASET.normal_dir", "good")],
)
def test_each_modality_refuses_the_other_modalitys_keys(yaml_name: str, key: str, value: str) -> None:
    """An image run has no clip length and a video run no folder layout: the per-modality schemas refuse them."""
    result = main_in_process(
        "--task_type", "anomaly", "--model_name", "dmad", "--yaml_config", str(CONFIGS / yaml_name), f"{key}={value}"
    )
    assert_user_error(result, f"unknown config key {key}")


def test_an_unknown_format_is_refused_before_the_schema_is_chosen() -> None:
    result = main_in_process(
        "--task_type",
        "anomaly",
        "--model_name",
        "dmad",
        "--yaml_config",
        str(CONFIGS / "demo.yaml"),
        "DATASET.format=coco",
    )
    assert_user_error(result, "DATASET.format", "mvtec, visa, folder, video", "'coco'")


def test_unscanned_format_and_unknown_split(tmp_path):
    _one_line_error(
        lambda: scan_dataset(_cfg(format="video", datadir=str(tmp_path)), "train", 0), "video", "mvtec, visa, folder"
    )
    root = _mvtec(tmp_path / "mvtec")
    _one_line_error(lambda: scan_dataset(_cfg(datadir=str(root), target="widget"), "val", 0), "'val'")


# --------------------------------------------------------------------------- decoder: true values


def test_16bit_grey_png_keeps_its_range_and_precision(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    img = load_image(path)
    assert img.mode == "F"
    # Both sides are the correctly rounded float32 of v / 65535 (float64 then float32 rounds correctly for a
    # quotient, as 53 >= 2 * 24 + 2): exact.
    expected = (values / 65535).astype(np.float32)
    assert expected[0, 2] == pytest.approx(0.50001, abs=1e-5)
    unit = _unit(img)
    assert unit.shape == (3, 1, 4) and torch.equal(unit, torch.from_numpy(expected).expand(3, 1, 4))
    # Normalisation: float32 (x - mean) / std, the same operations as on the reference.
    ref = (torch.from_numpy(expected)[None] - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    assert torch.equal(to_tensor(resize_image(img, (1, 4))), ref)
    assert display_rgb(img)[0].tolist() == [[0] * 3, [4] * 3, [128] * 3, [255] * 3]


def test_16bit_big_endian_tiff_and_12bit_precision_through_resize(tmp_path):
    path = tmp_path / "b16.tif"
    data = np.array([[1000, 1001]], dtype=np.uint16)  # one 8-bit level apart would be 257
    Image.frombytes("I;16B", (2, 1), data.astype(">u2").tobytes()).save(path)
    img = load_image(path)
    assert img.mode == "F"
    up = resize_image(img, (1, 4))
    assert up.dtype == np.float32 and up.shape == (1, 4, 3)
    lo, hi = np.float32(1000 / 65535), np.float32(1001 / 65535)
    grey = up[0, :, 0]
    # Bilinear upsampling of [lo, hi] -> [lo, lo + d/4, hi - d/4, hi]; 8-bit quantisation would make all four equal.
    assert grey[0] == lo and grey[3] == hi and lo < grey[1] < grey[2] < hi


def test_float_resize_matches_torch_bilinear(tmp_path):
    grey = np.random.RandomState(0).rand(5, 7).astype(np.float32)
    path = tmp_path / "f.tif"
    Image.fromarray(grey, "F").save(path)
    img = load_image(path)
    for size, antialias in (((10, 14), False), ((3, 4), True)):
        ours = torch.from_numpy(np.array(resize_image(img, size)[..., 0]))  # copy: the view is read-only
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(grey)[None, None], size=size, mode="bilinear", align_corners=False, antialias=antialias
        )[0, 0]
        # Same kernel, different summation order and precision: a few float32 ulps at values <= 1.
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_float_tiff_values_kept_and_bad_ones_refused(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.5, 0.25, 1.0, 0.0]], dtype=np.float32), "F").save(path)
    assert _unit(load_image(path))[0, 0].tolist() == [0.5, 0.25, 1.0, 0.0]
    for name, bad, needle in (
        ("nan.tif", np.nan, "non-finite"),
        ("inf.tif", np.inf, "non-finite"),
        ("big.tif", 255.0, "[0.5, 255]"),
    ):
        p = tmp_path / name
        Image.fromarray(np.array([[0.5, bad]], dtype=np.float32), "F").save(p)
        _one_line_error(lambda: load_image(p), str(p), needle)


def test_float_colour_tiff_written_by_opencv(tmp_path):
    """Pillow cannot identify 3-channel float32 TIFFs (OpenCV writes them): decoded by OpenCV, exact for 8-bit data."""
    import cv2

    from task.anomaly.unsupervised.data.image.preprocess import image_size

    rgb = np.random.RandomState(0).randint(0, 256, (H, W, 3)).astype(np.uint8)
    path = tmp_path / "x.tiff"
    assert cv2.imwrite(str(path), rgb[:, :, ::-1].astype(np.float32) / 255)  # OpenCV takes BGR
    img = load_image(path)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgb) and image_size(path) == (W, H)
    bad = tmp_path / "bad.tiff"
    assert cv2.imwrite(str(bad), np.full((H, W, 3), 2.0, np.float32))
    _one_line_error(lambda: load_image(bad), str(bad), "[2, 2]", "[0, 1]")


def test_32bit_int_tiff(tmp_path):
    path = tmp_path / "i32.tif"
    top = 2**31 - 1
    Image.fromarray(np.array([[0, 2**30, top]], dtype=np.int32), "I").save(path)
    img = load_image(path)
    assert img.mode == "F"
    assert np.asarray(img)[0].tolist() == [0.0, np.float32(2**30 / top), 1.0]
    neg = tmp_path / "neg.tif"
    Image.fromarray(np.array([[-5, 3]], dtype=np.int32), "I").save(neg)
    _one_line_error(lambda: load_image(neg), str(neg), "negative")


def test_one_bit_png(tmp_path):
    path = tmp_path / "b.png"
    Image.fromarray(np.array([[False, True]])).save(path)
    assert _unit(load_image(path))[:, 0].tolist() == [[0.0, 1.0]] * 3


def test_palette_with_and_without_transparency(tmp_path):
    palette = [0, 0, 0, 200, 10, 30, 5, 250, 90] + [0] * (768 - 9)
    for name, kwargs in (("p.png", {}), ("pt.png", {"transparency": bytes([255, 0, 128])})):
        im = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
        im.putpalette(palette)
        im.save(tmp_path / name, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL's palette-transparency warning must not fire
            arr = resize_image(load_image(tmp_path / name), (1, 3))
        assert arr[0].tolist() == [[0, 0, 0], [200, 10, 30], [5, 250, 90]]


def test_alpha_dropped_and_cmyk(tmp_path):
    Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
    assert np.asarray(load_image(tmp_path / "a.png"))[0].tolist() == [[10, 20, 30], [40, 50, 60]]
    Image.fromarray(np.array([[[10, 0], [200, 255]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png"))[0].tolist() == [[10] * 3, [200] * 3]
    cmyk = Image.new("CMYK", (3, 1))
    for x, value in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), value)
    cmyk.save(tmp_path / "c.tif")
    # No ink = white, full cyan = (0, 255, 255), full black = black.
    assert np.asarray(load_image(tmp_path / "c.tif"))[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


def test_dataset_item_of_a_16bit_image(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((H, W), 32768, dtype=np.uint16)).save(path)
    samples = [Sample(str(path), 0, None, "good")]
    a, b = AnomalyDataset(samples, (4, 4), cache=True)[0], AnomalyDataset(samples, (4, 4), cache=False)[0]
    assert torch.equal(a["image"], b["image"])
    # A constant image stays constant through the resize (clipped convex weights): exact v / 65535.
    unit = torch.full((3, 4, 4), float(np.float32(32768 / 65535)))
    assert torch.equal(a["image"], imagenet_normalize(unit))


# --------------------------------------------------------------------------- decoder: masks


@pytest.mark.parametrize("value", [1, 2, 255])
def test_nonzero_mask_values_are_defects(tmp_path, value):
    m = load_mask(_mask(tmp_path / "m.png", value=value), (H, W))
    ref = np.zeros((H, W), dtype=np.float32)
    ref[1:4, 1:5] = 1
    assert torch.equal(m[0], torch.from_numpy(ref))


def test_palette_mask_uses_the_index(tmp_path):
    # Index 1 is painted black and index 0 white: the index, not the colour, decides.
    arr = np.zeros((H, W), dtype=np.uint8)
    arr[2:5, 3:7] = 1
    im = Image.fromarray(arr, "P")
    im.putpalette([255, 255, 255, 0, 0, 0] + [0] * (768 - 6))
    im.save(tmp_path / "p.png")
    assert torch.equal(load_mask(tmp_path / "p.png", (H, W))[0], torch.from_numpy(arr.astype(np.float32)))


def test_16bit_mask(tmp_path):
    arr = np.zeros((H, W), dtype=np.uint16)
    arr[0, 0] = 1
    Image.fromarray(arr).save(tmp_path / "m16.png")
    assert load_mask(tmp_path / "m16.png", (H, W)).sum() == 1
