"""Tests for MVTec scanning, the 8-bit preprocessing, the dataset and the synthetic demo dataset."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from task.anomaly.unsupervised.data.image.dataset import AnomalyDataset, Sample
from task.anomaly.unsupervised.data.image.mvtec import scan_mvtec
from task.anomaly.unsupervised.data.image.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_image,
    load_mask,
    resize_image,
    to_tensor,
)
from task.anomaly.unsupervised.data.image.synthetic import make_demo_dataset
from task.common.config import Config
from task.common.errors import UserError

# --------------------------------------------------------------------------- helpers


def _scan(datadir, category: str, split: str) -> list[Sample]:
    return scan_mvtec(Config({"datadir": str(datadir), "target": category}), split, 0)


def _img(path: Path, size=(40, 30), seed=0, mode="RGB"):
    """Write a random image of PIL size (w, h)."""
    rng = np.random.RandomState(seed)
    w, h = size
    arr = rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def _mask(path: Path, size=(40, 30), box=(5, 5, 20, 15)):
    w, h = size
    arr = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _mini(tmp_path: Path, category="widget") -> Path:
    """A tiny MVTec-layout dataset; files created in non-sorted order on purpose."""
    cat = tmp_path / "data" / category
    for i, name in enumerate(["b.png", "a.png", "c.PNG"]):
        _img(cat / "train" / "good" / name, seed=i)
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    for i, name in enumerate(["002.png", "000.jpg"]):
        _img(cat / "test" / "good" / name, seed=10 + i)
    for defect in ["zz_crack", "aa_hole"]:
        for i, stem in enumerate(["001", "000"]):
            _img(cat / "test" / defect / f"{stem}.png", seed=20 + i)
            _mask(cat / "ground_truth" / defect / f"{stem}_mask.png")
    return tmp_path / "data"


def _open(path, mode=None):
    with Image.open(path) as im:
        im.load()
        return im.convert(mode) if mode else im.copy()


def _tv_image(path, size):
    tf = transforms.Compose(
        [transforms.Resize(size), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    return tf(_open(path, "RGB"))


def _tv_mask(path, size):
    tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor()])
    gt = tf(_open(path))
    gt[gt > 0.5] = 1
    gt[gt <= 0.5] = 0
    return gt


# --------------------------------------------------------------------------- scanning


def test_scan_order_and_labels(tmp_path):
    root = _mini(tmp_path)
    train = _scan(root, "widget", "train")
    assert [Path(s.path).name for s in train] == ["a.png", "b.png", "c.PNG"]
    assert all(s.label == 0 and s.mask_path is None and s.defect == "good" for s in train)

    test = _scan(str(root), "widget", "test")
    assert [(s.defect, Path(s.path).name) for s in test] == [
        ("aa_hole", "000.png"),
        ("aa_hole", "001.png"),
        ("good", "000.jpg"),
        ("good", "002.png"),
        ("zz_crack", "000.png"),
        ("zz_crack", "001.png"),
    ]
    assert [s.label for s in test] == [1, 1, 0, 0, 1, 1]
    for s in test:
        if s.label:
            assert s.mask_path == str(root / "widget" / "ground_truth" / s.defect / f"{Path(s.path).stem}_mask.png")
        else:
            assert s.mask_path is None
    assert _scan(root, "widget", "test") == test  # deterministic
    assert isinstance(test[0], Sample)
    with pytest.raises(Exception):
        test[0].label = 0  # frozen


def test_missing_datadir(tmp_path):
    with pytest.raises(UserError) as e:
        _scan(tmp_path / "nope", "bottle", "train")
    msg = str(e.value)
    assert str(tmp_path / "nope") in msg and "mvtec.com" in msg and "demo.yaml" in msg
    assert "\n" not in msg


def test_missing_category_lists_available(tmp_path):
    root = _mini(tmp_path)
    (root / "bottle").mkdir()
    with pytest.raises(UserError) as e:
        _scan(root, "carpet", "train")
    msg = str(e.value)
    assert str(root / "carpet") in msg and "bottle" in msg and "widget" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad", ["../widget", "..", "a/b", "a\\b", "/etc", ".", ""])
def test_category_escaping_datadir(tmp_path, bad):
    root = _mini(tmp_path)
    with pytest.raises(UserError) as e:
        _scan(root, bad, "train")
    assert "category" in str(e.value)


def test_category_symlink_outside_datadir_is_accepted(tmp_path):
    """A category folder that is a symlink (e.g. to another disk) is scanned like a real folder."""
    root = _mini(tmp_path)
    outside = tmp_path / "elsewhere"
    _img(outside / "train" / "good" / "x.png")
    try:
        os.symlink(outside, root / "link", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not supported")
    samples = _scan(root, "link", "train")
    assert [s.path for s in samples] == [str(root / "link" / "train" / "good" / "x.png")]


def test_missing_split_folder(tmp_path):
    root = _mini(tmp_path)
    import shutil

    shutil.rmtree(root / "widget" / "test")
    with pytest.raises(UserError, match="split folder"):
        _scan(root, "widget", "test")


def test_empty_train_good(tmp_path):
    cat = tmp_path / "data" / "widget"
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(UserError) as e:
        _scan(tmp_path / "data", "widget", "train")
    assert str(cat / "train" / "good") in str(e.value)


def test_empty_test(tmp_path):
    cat = tmp_path / "data" / "widget"
    (cat / "test" / "good").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        _scan(tmp_path / "data", "widget", "test")


def test_missing_mask_names_both_paths(tmp_path):
    root = _mini(tmp_path)
    mask = root / "widget" / "ground_truth" / "aa_hole" / "001_mask.png"
    mask.unlink()
    with pytest.raises(UserError) as e:
        _scan(root, "widget", "test")
    msg = str(e.value)
    assert str(root / "widget" / "test" / "aa_hole" / "001.png") in msg and str(mask) in msg


# --------------------------------------------------------------------------- preprocessing


def test_grayscale_becomes_rgb(tmp_path):
    p = _img(tmp_path / "g.png", mode="L")
    img = load_image(p)
    assert img.mode == "RGB"
    arr = resize_image(img, (16, 12))
    assert arr.shape == (16, 12, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    t = to_tensor(arr)
    assert t.shape == (3, 16, 12) and t.dtype == torch.float32


@pytest.mark.parametrize("size", [(24, 17), (64, 64), (30, 40)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_matches_torchvision_pipeline(tmp_path, size, mode):
    p = _img(tmp_path / "x.png", size=(40, 30), seed=3, mode=mode)
    ours = to_tensor(resize_image(load_image(p), size))
    ref = _tv_image(p, size)
    assert ours.shape == ref.shape == (3, *size)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_mask_binarised_at_requested_size(tmp_path):
    img = _img(tmp_path / "x.png", size=(40, 30))
    m = _mask(tmp_path / "x_mask.png", size=(40, 30), box=(3, 4, 21, 17))
    t = load_mask(m, (13, 19), image_path=img)
    assert t.shape == (1, 13, 19) and t.dtype == torch.float32
    assert set(torch.unique(t).tolist()) == {0.0, 1.0}
    assert torch.equal(t, _tv_mask(m, (13, 19)))


def test_mask_size_mismatch(tmp_path):
    root = _mini(tmp_path)
    bad = _mask(root / "widget" / "ground_truth" / "zz_crack" / "000_mask.png", size=(41, 30))
    samples = _scan(root, "widget", "test")
    for cache in (True, False):
        for skip in (False, True):
            with pytest.raises(UserError) as e:
                AnomalyDataset(samples, (16, 16), cache=cache, skip_bad_images=skip)
            msg = str(e.value)
            assert str(bad) in msg and str(root / "widget" / "test" / "zz_crack" / "000.png") in msg


# --------------------------------------------------------------------------- dataset


def test_dataset_items_and_cache_equivalence(tmp_path):
    root = _mini(tmp_path)
    samples = _scan(root, "widget", "test")
    a = AnomalyDataset(samples, (20, 24), cache=True)
    b = AnomalyDataset(samples, (20, 24), cache=False)
    assert len(a) == len(b) == len(samples)
    assert a.labels == b.labels == [1, 1, 0, 0, 1, 1]
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert set(x) == {"image", "mask", "label", "path", "defect"}
        assert x["image"].shape == (3, 20, 24) and x["image"].dtype == torch.float32
        assert x["mask"].shape == (1, 20, 24) and x["mask"].dtype == torch.float32
        assert x["label"].dtype == torch.int64 and x["label"].ndim == 0
        assert x["path"] == samples[i].path and x["defect"] == samples[i].defect
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert torch.equal(x["label"], y["label"]) and x["path"] == y["path"]
        ref = _tv_image(samples[i].path, (20, 24))
        assert torch.allclose(x["image"], ref, atol=1e-6, rtol=0)
        if samples[i].label:
            assert torch.equal(x["mask"], _tv_mask(samples[i].mask_path, (20, 24)))
            assert x["mask"].sum() > 0
        else:
            assert x["mask"].sum() == 0
    assert torch.equal(a[-1]["image"], a[len(a) - 1]["image"])
    # Works with a DataLoader (default collate).
    batch = next(iter(torch.utils.data.DataLoader(a, batch_size=4)))
    assert batch["image"].shape == (4, 3, 20, 24) and batch["label"].tolist() == [1, 1, 0, 0]


def test_cached_dataset_survives_file_removal(tmp_path):
    root = _mini(tmp_path)
    samples = _scan(root, "widget", "train")
    ds = AnomalyDataset(samples, (8, 8), cache=True)
    first = ds[0]["image"].clone()
    Path(samples[0].path).unlink()
    assert torch.equal(ds[0]["image"], first)


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_image_raises_naming_file(tmp_path):
    root = _mini(tmp_path)
    samples = _scan(root, "widget", "train")
    bad = Path(samples[1].path)
    _truncate(bad)
    with pytest.raises(UserError) as e:
        load_image(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError) as e:
        AnomalyDataset(samples, (8, 8), cache=True)
    assert str(bad) in str(e.value)
    lazy = AnomalyDataset(samples, (8, 8), cache=False)
    with pytest.raises(UserError) as e:
        lazy[1]
    assert str(bad) in str(e.value)


def test_garbage_file_raises_naming_file(tmp_path):
    root = _mini(tmp_path)
    samples = _scan(root, "widget", "train")
    bad = Path(samples[0].path)
    bad.write_bytes(b"this is not an image at all")
    for cache in (True, False):
        with pytest.raises(UserError) as e:
            AnomalyDataset(samples, (8, 8), cache=cache)
        assert str(bad) in str(e.value)


@pytest.mark.parametrize("cache", [True, False])
def test_skip_bad_images(tmp_path, cache):
    root = _mini(tmp_path)
    samples = _scan(root, "widget", "test")
    bad = Path(samples[2].path)  # test/good/000.jpg
    _truncate(bad)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = AnomalyDataset(samples, (8, 8), cache=cache, skip_bad_images=True)
    assert ds.skipped == [str(bad)]
    assert len(ds) == len(samples) - 1
    assert str(bad) not in [ds[i]["path"] for i in range(len(ds))]
    assert ds.labels == [1, 1, 0, 1, 1]
    # Masks stay aligned with their images after the skip.
    for i in range(len(ds)):
        item = ds[i]
        s = ds.samples[i]
        assert item["path"] == s.path
        if s.mask_path:
            assert torch.equal(item["mask"], _tv_mask(s.mask_path, (8, 8)))


def test_no_skip_warning_when_all_good(tmp_path):
    root = _mini(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = AnomalyDataset(_scan(root, "widget", "train"), (8, 8), skip_bad_images=True)
    assert ds.skipped == [] and len(ds) == 3


# --------------------------------------------------------------------------- synthetic demo data


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_dataset_deterministic_and_idempotent(tmp_path):
    t0 = time.time()
    a = make_demo_dataset(tmp_path / "a")
    elapsed = time.time() - t0
    b = make_demo_dataset(tmp_path / "b")
    assert a == tmp_path / "a" / "demo"
    ta, tb = _tree(a), _tree(b)
    assert ta == tb
    assert (a / ".complete").is_file()
    assert sum(k.startswith("train/good/") for k in ta) == 60
    assert sum(k.startswith("test/good/") for k in ta) == 20
    assert sum(k.startswith("test/scratch/") or k.startswith("test/spot/") for k in ta) == 20
    assert elapsed < 10  # generous; ~1 s typically
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["demo"]  # no temp folders left behind

    # Idempotent: an existing complete dataset is returned untouched.
    victim = a / "train" / "good" / "000.png"
    victim.write_bytes(b"sentinel")
    assert make_demo_dataset(tmp_path / "a") == a
    assert victim.read_bytes() == b"sentinel"


def test_demo_dataset_scans_and_masks(tmp_path):
    root = tmp_path / "d"
    make_demo_dataset(root, n_train=4, n_test_good=3, n_test_defect=5, size=64, seed=1)
    train = _scan(root, "demo", "train")
    test = _scan(root, "demo", "test")
    assert len(train) == 4 and len(test) == 8
    assert sorted({s.defect for s in test}) == ["good", "scratch", "spot"]
    assert sum(s.label for s in test) == 5
    for s in test:
        if s.label:
            m = np.asarray(_open(s.mask_path))
            assert set(np.unique(m).tolist()) == {0, 255}
            assert 0.02 <= (m > 0).mean() <= 0.12  # visible, reasonably large defects
            assert _open(s.mask_path).size == _open(s.path).size
    ds = AnomalyDataset(test, (64, 64))
    assert all(ds[i]["mask"].sum() > 0 for i in range(len(ds)) if ds.labels[i])


def test_demo_dataset_seed_changes_content(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n_train=2, n_test_good=1, n_test_defect=2, size=32, seed=0)
    b = make_demo_dataset(tmp_path / "b", n_train=2, n_test_good=1, n_test_defect=2, size=32, seed=1)
    assert _tree(a) != _tree(b)


def test_demo_dataset_grayscale(tmp_path):
    root = tmp_path / "g"
    cat = make_demo_dataset(root, n_train=2, n_test_good=1, n_test_defect=2, size=48, grayscale=True)
    p = cat / "train" / "good" / "000.png"
    assert _open(p).mode == "L"
    ds = AnomalyDataset(_scan(root, "demo", "test"), (32, 32), cache=False)
    x = ds[0]["image"]
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, _tv_image(ds.samples[0].path, (32, 32)), atol=1e-6, rtol=0)


def test_demo_dataset_refuses_foreign_folder(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "something.txt").write_text("user data")
    with pytest.raises(UserError, match="not a complete demo dataset"):
        make_demo_dataset(tmp_path)
    assert (tmp_path / "demo" / "something.txt").read_text() == "user data"
