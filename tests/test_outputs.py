"""Result pictures, maps, GIF, W&B offline and TensorBoard logging of the shared run, and the results report."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import BASE, CATEGORY, N_DEFECT, N_GOOD, SIZE, assert_ok, assert_user_error, main_in_process
from task.anomaly.unsupervised.engine.report import END_MARKER, MISSING, START_MARKER, write_report
from task.anomaly.unsupervised.image.visualize import render_result, select_frames

GIF = f"{CATEGORY}.gif"


# --------------------------------------------------------------------------- pictures and GIF


def test_one_picture_per_test_image(trained_run):
    run_dir, category = trained_run.run_dir, trained_run.category_dir
    test_images = sorted((category / "test").glob("*/*.png"))
    pictures = sorted((run_dir / "images").glob("*/*.png"))
    # Named by the whole file name: test/<defect>/000.png -> images/<defect>/000.png.png
    expected = [p.relative_to(category / "test").with_name(p.name + ".png") for p in test_images]
    assert [p.relative_to(run_dir / "images") for p in pictures] == expected
    sizes = {Image.open(p).size for p in pictures}
    assert len(sizes) == 1
    width, height = sizes.pop()
    assert width == 4 * SIZE and SIZE < height <= 2 * SIZE  # four panels under a title bar

    title = height - SIZE
    picture = np.asarray(Image.open(run_dir / "images" / "scratch" / "000.png.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(category / "test" / "scratch" / "000.png").convert("RGB")).astype(int)
    mask = np.asarray(Image.open(category / "ground_truth" / "scratch" / "000_mask.png")) > 0
    assert np.abs(picture[title:, :SIZE] - original).max() <= 1  # de-normalised input panel
    assert np.array_equal(picture[title:, 3 * SIZE :, 0] > 127, mask)  # ground-truth panel


def test_maps_saved_per_test_image(trained_run):
    run_dir, category = trained_run.run_dir, trained_run.category_dir
    maps = sorted((run_dir / "maps").glob("*/*.npz"))
    assert [p.relative_to(run_dir / "maps") for p in maps] == [
        p.relative_to(category / "test").with_name(p.name + ".npz") for p in sorted((category / "test").glob("*/*.png"))
    ]
    with np.load(maps[0]) as saved:
        assert set(saved.files) == {"anomaly_map", "deformation_map"}
        for name in saved.files:
            assert saved[name].dtype == np.float32 and saved[name].shape == (SIZE, SIZE)
            assert np.isfinite(saved[name]).all() and saved[name].min() >= 0


def test_gif_in_assets_and_run_dir(trained_run):
    for path in (trained_run.assets / GIF, trained_run.run_dir / GIF):
        assert path.is_file() and path.stat().st_size < 3 * 1024 * 1024
        with Image.open(path) as gif:
            assert gif.n_frames == N_GOOD + N_DEFECT
            assert gif.size[0] <= 800
            assert gif.info["loop"] == 0 and gif.info["duration"] == 700


def test_gif_mode_rebuilds_from_the_runs_checkpoint(trained_run, tmp_path):
    run_dir = trained_run.copy_to(tmp_path / "runs")
    (run_dir / GIF).unlink()
    weights = (run_dir / "model.pt").read_bytes()
    assert_ok(
        main_in_process(
            *trained_run.args(tmp_path / "runs"), "--mode", "gif", f"RESULT.assets_dir={tmp_path / 'assets'}"
        )
    )
    assert (run_dir / "model.pt").read_bytes() == weights  # nothing was trained or re-saved
    with Image.open(tmp_path / "assets" / GIF) as gif, Image.open(trained_run.assets / GIF) as original:
        assert gif.n_frames == original.n_frames and gif.size == original.size
    assert (run_dir / GIF).read_bytes() == (tmp_path / "assets" / GIF).read_bytes()


def test_gif_mode_from_another_runs_checkpoint_writes_a_folder_of_its_own(trained_run, tmp_path):
    savedir = tmp_path / "runs"
    checkpoint = trained_run.run_dir / "model.pt"
    result = main_in_process(
        *trained_run.args(savedir),
        "--mode",
        "gif",
        "--checkpoint",
        str(checkpoint),
        f"RESULT.assets_dir={tmp_path / 'assets'}",
    )
    assert_ok(result)
    own = savedir / "dmad" / CATEGORY
    (folder,) = (own / "tests").glob(f"{CATEGORY}-model-*")
    with Image.open(folder / GIF) as gif:
        assert gif.n_frames == N_GOOD + N_DEFECT
    assert not (own / "model.pt").exists() and not (own / GIF).exists()  # nothing trained, the run's own GIF untouched
    assert not (tmp_path / "assets").exists()  # a foreign checkpoint's GIF is not the category's


def test_select_frames_interleaves_and_is_deterministic():
    labels = torch.tensor([0] * 5 + [1] * 3)
    frames = select_frames(labels, 24)
    assert frames == [0, 5, 1, 6, 2, 7, 3, 4] and frames == select_frames(labels, 24)
    few = select_frames(torch.tensor([0] * 40 + [1] * 40), 24)
    assert len(few) == 24 and sum(int(i >= 40) for i in few) == 12


def test_render_without_ground_truth_has_three_panels():
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    picture = render_result(image, np.random.rand(SIZE, SIZE).astype(np.float32), (0.0, 1.0), 0.7, 0.5, 0.5)
    assert picture.shape[1] == 3 * SIZE and picture.dtype == np.uint8


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_hold_the_run(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((trained_run.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    scalars, images = set(), set()
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        scalars |= set(events.Tags()["scalars"])
        images |= set(events.Tags()["images"])
        if "train/loss" in events.Tags()["scalars"]:
            assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # LOG.log_interval=1
    for term in ("distillation", "deformation", "vq", "loss", "lr"):
        assert f"train/{term}" in scalars
    assert {"eval/image_auroc", "results/image_auroc"} <= scalars and "results/0" in images
    assert {"curves/roc_image", "curves/pr_image", "curves/roc_pixel", "curves/pr_pixel"} <= images


def test_regions_and_curves_of_the_run(trained_run):
    """regions.json lists every test image's regions (boxes inside the map) with the box IoUs of the defective ones;
    curves/ holds the image- and pixel-level ROC and PR pictures."""
    record = json.loads((trained_run.run_dir / "regions.json").read_text())
    assert len(record["images"]) == N_GOOD + N_DEFECT and record["min_area"] == 16
    assert record["defective_images_with_masks"] == N_DEFECT and 0.0 <= record["mean_best_box_iou"] <= 1.0
    for image in record["images"]:
        for region in image["regions"]:
            x, y, w, h = region["box"]
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and region["area"] >= 16
    curves = sorted(p.name for p in (trained_run.run_dir / "curves").iterdir())
    assert curves == ["pr_image.png", "pr_pixel.png", "roc_image.png", "roc_pixel.png"]


# --------------------------------------------------------------------------- W&B


def _wandb_records(path: Path):
    """Protobuf records of an offline ``.wandb`` file (LevelDB log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_metrics(trained_run):
    files = list((trained_run.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, summary, kinds = set(), {}, set()
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): item.value_json for item in record.summary.update})
    for term in ("distillation", "deformation", "vq", "loss", "lr"):
        assert f"train/{term}" in history
    assert "eval/image_auroc" in history and any(k.startswith("results/images") for k in history)
    assert any(k.startswith("curves/roc_image") for k in history)
    assert any(k.startswith("curves/pr_pixel") for k in history)
    metrics = json.loads((trained_run.run_dir / "metrics.json").read_text())
    assert json.loads(summary["image_auroc"]) == pytest.approx(metrics["image_auroc"])
    assert "artifact" in kinds  # model.pt


# (A W&B failure that must not stop training: test_robustness.py::test_failing_reporters_never_stop_training.)


# --------------------------------------------------------------------------- report


def _fake_run(
    savedir: Path, category: str, metrics: dict, exp: str | None = None, mtime: float | None = None, info: bool = True
) -> Path:
    run_dir = savedir / "dmad" / category / (exp or "")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if info:
        (run_dir / "run.json").write_text(
            json.dumps(
                {"category": category, "backbone": "resnet18", "image_size": [64, 64], "steps": 4, "device": "cpu"}
            )
        )
    if mtime is not None:
        os.utime(run_dir / "metrics.json", (mtime, mtime))
    return run_dir


def _table(report: str, title: str) -> list[str]:
    """The value row of the table under ``#### title``."""
    block = report.split(f"#### {title}\n", 1)[1]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    return [cell.strip() for cell in rows[2].strip("|").split("|")]


@pytest.fixture
def savedir(tmp_path) -> Path:
    savedir = tmp_path / "runs"
    _fake_run(savedir, "bottle", {"image_auroc": 0.5, "pixel_auroc": 0.5, "pixel_f1": 0.5}, exp="old", mtime=1_000_000)
    _fake_run(savedir, "bottle", {"image_auroc": 0.987, "pixel_auroc": 0.9812, "pixel_f1": 0.7049}, exp="new")
    _fake_run(savedir, "carpet", {"image_auroc": 0.901, "pixel_auroc": 0.9908, "pixel_f1": None}, info=False)
    _fake_run(savedir, "demo", {"image_auroc": 0.75, "pixel_auroc": 0.8, "pixel_f1": 0.25})
    return savedir


def test_report_tables(savedir):
    report = write_report(savedir)
    assert (savedir / "results.md").read_text() == report
    image = _table(report, "Image-Level AUC")
    assert len(image) == 16
    assert image[:7] == ["94.4", "90.1", MISSING, MISSING, MISSING, MISSING, "98.7"]  # Avg, Carpet, ..., Bottle
    assert image.count(MISSING) == 13
    pixel_auc = _table(report, "Pixel-Level AUC")
    assert pixel_auc[0] == "98.6" and pixel_auc[1] == "99.1" and pixel_auc[6] == "98.1"
    f1 = _table(report, "Pixel F1 Score")
    assert f1[0] == "70.5" and f1[1] == MISSING and f1[6] == "70.5"  # carpet's F1 is undefined: Avg over bottle only
    assert "_Avg over 2 of 15 categories._" in report and "_Avg over 1 of 15 categories._" in report
    assert "| demo | 75.0 | 80.0 | 25.0 |" in report  # non-MVTec category: own table, not in Avg
    assert "newest of 2 runs" in report and "bottle/new" in report


def test_report_updates_readme_between_markers(savedir, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n" + START_MARKER + "\n", END_MARKER + "\n\n## Later\ntext\n"
    readme.write_text(before + "old table\n" + after)
    monkeypatch.chdir(tmp_path)
    argv = [*BASE, "--mode", "report", "--update-readme", f"RESULT.savedir={savedir}"]
    result = main_in_process(*argv)
    assert_ok(result)
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "old table" not in text
    assert "#### Image-Level AUC" in text and "#### Image-Level AUC" in result.stdout

    readme.write_text("# no markers\n")
    line = assert_user_error(main_in_process(*argv))
    assert re.search(r"error: .*README\.md lacks the markers", line)
    assert readme.read_text() == "# no markers\n"
