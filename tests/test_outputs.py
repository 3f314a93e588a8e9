"""Result pictures, GIF, W&B offline logging and the results report, on a tiny generated dataset."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from task.anomaly.unsupervised.data.synthetic import make_demo_dataset
from task.anomaly.unsupervised.report import END_MARKER, MISSING, START_MARKER, write_report
from task.anomaly.unsupervised.visualize import render_result, select_frames

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/anomaly/unsupervised/dmad/demo.yaml"
SIZE = 64
N_GOOD, N_DEFECT = 3, 3


def _overrides(data: Path, savedir: Path, assets: Path) -> list[str]:
    return [
        f"DATASET.datadir={data}", "DATASET.demo=false", f"DATASET.resize=[{SIZE},{SIZE}]",
        "DATALOADER.batch_size=2", "TRAIN.num_training_steps=4", "LOG.log_interval=1", "TEST.batch_size=8",
        f"RESULT.savedir={savedir}", f"RESULT.assets_dir={assets}",
    ]


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "main.py", "--task_type", "anomaly", "--model_name", "dmad", "--yaml_config", str(CONFIG), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """One 4-step training run (resnet18, random init, 64x64) with W&B offline and the assets dir in tmp."""
    tmp = tmp_path_factory.mktemp("outputs")
    data = tmp / "data"
    make_demo_dataset(data, "demo", n_train=4, n_test_good=N_GOOD, n_test_defect=N_DEFECT, size=SIZE)
    savedir, assets = tmp / "runs", tmp / "assets"
    _cli(*_overrides(data, savedir, assets), "MODEL.pretrained=false", "LOG.wandb=true", "LOG.wandb_mode=offline")
    return {"tmp": tmp, "data": data / "demo", "run_dir": savedir / "dmad" / "demo", "assets": assets}


# --------------------------------------------------------------------------- pictures and GIF


def test_one_picture_per_test_image(run):
    test_images = sorted((run["data"] / "test").glob("*/*.png"))
    pictures = sorted((run["run_dir"] / "images").glob("*/*.png"))
    assert [p.relative_to(run["run_dir"] / "images") for p in pictures] == [p.relative_to(run["data"] / "test") for p in test_images]
    sizes = {Image.open(p).size for p in pictures}
    assert len(sizes) == 1
    width, height = sizes.pop()
    assert width == 4 * SIZE and SIZE < height <= 2 * SIZE  # four panels under a title bar

    title = height - SIZE
    defect_image = run["data"] / "test" / "scratch" / "000.png"
    picture = np.asarray(Image.open(run["run_dir"] / "images" / "scratch" / "000.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(defect_image).convert("RGB")).astype(int)
    mask = np.asarray(Image.open(run["data"] / "ground_truth" / "scratch" / "000_mask.png")) > 0
    assert np.abs(picture[title:, :SIZE] - original).max() <= 1  # de-normalised input panel
    assert np.array_equal(picture[title:, 3 * SIZE :, 0] > 127, mask)  # ground-truth panel


def test_gif_in_assets_and_run_dir(run):
    for path in (run["assets"] / "demo.gif", run["run_dir"] / "demo.gif"):
        assert path.is_file() and path.stat().st_size < 3 * 1024 * 1024
        with Image.open(path) as gif:
            assert gif.n_frames == N_GOOD + N_DEFECT
            assert gif.size[0] <= 800
            assert gif.info["loop"] == 0 and gif.info["duration"] == 700


def test_gif_mode_rebuilds_from_checkpoint(run):
    other = run["tmp"] / "gif_only"
    _cli("--mode", "gif", "--checkpoint", str(run["run_dir"] / "model.pt"), *_overrides(run["data"].parent, other / "runs", other / "assets"))
    rebuilt = other / "assets" / "demo.gif"
    assert rebuilt.is_file() and (other / "runs" / "dmad" / "demo" / "demo.gif").is_file()
    assert not (other / "runs" / "dmad" / "demo" / "model.pt").exists()  # nothing was trained
    with Image.open(rebuilt) as gif, Image.open(run["assets"] / "demo.gif") as original:
        assert gif.n_frames == original.n_frames and gif.size == original.size


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


def test_wandb_offline_run_holds_metrics(run):
    files = list((run["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))
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
    metrics = json.loads((run["run_dir"] / "metrics.json").read_text())
    assert json.loads(summary["image_auroc"]) == pytest.approx(metrics["image_auroc"])
    assert "artifact" in kinds  # model.pt


def test_wandb_failure_does_not_stop_training(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb, "init", broken_init)
    data = tmp_path / "data"
    make_demo_dataset(data, "demo", n_train=2, n_test_good=1, n_test_defect=1, size=SIZE)
    argv = ["--task_type", "anomaly", "--model_name", "dmad", "--yaml_config", str(CONFIG), *_overrides(data, tmp_path / "runs", tmp_path / "assets")]
    argv += ["TRAIN.num_training_steps=1", "LOG.wandb=true", "TEST.save_images=false"]
    assert main.main(argv) == 0
    assert (tmp_path / "runs" / "dmad" / "demo" / "metrics.json").is_file()
    warnings = [r for r in caplog.records if "W&B disabled" in r.getMessage()]
    assert len(warnings) == 1 and "no W&B today" in warnings[0].getMessage()


# --------------------------------------------------------------------------- report


def _fake_run(savedir: Path, category: str, metrics: dict, exp: str | None = None, mtime: float | None = None, info: bool = True) -> Path:
    run_dir = savedir / "dmad" / category / (exp or "")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if info:
        (run_dir / "run.json").write_text(json.dumps({"category": category, "backbone": "resnet18", "image_size": [64, 64], "steps": 4, "device": "cpu"}))
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


def test_report_updates_readme_between_markers(savedir, tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n" + START_MARKER + "\n", END_MARKER + "\n\n## Later\ntext\n"
    readme.write_text(before + "old table\n" + after)
    monkeypatch.chdir(tmp_path)
    argv = ["--task_type", "anomaly", "--model_name", "dmad", "--yaml_config", str(CONFIG), "--mode", "report", "--update-readme", f"RESULT.savedir={savedir}"]
    assert main.main(argv) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "old table" not in text
    assert "#### Image-Level AUC" in text and "#### Image-Level AUC" in capsys.readouterr().out

    readme.write_text("# no markers\n")
    assert main.main(argv) == 2
    assert re.search(r"error: .*README\.md lacks the markers", capsys.readouterr().err)
    assert readme.read_text() == "# no markers\n"
