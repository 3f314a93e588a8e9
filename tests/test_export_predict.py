"""--mode export (ONNX, checked against PyTorch) and --mode predict (torch and onnx backends) on a tiny trained run."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from task.anomaly.unsupervised.data.mvtec import load_image, resize_image, scan_split, to_tensor
from task.anomaly.unsupervised.data.synthetic import make_demo_dataset
from task.anomaly.unsupervised.export import TOLERANCE, export_run
from task.anomaly.unsupervised.models.dmad.config import SCHEMA
from task.anomaly.unsupervised.models.dmad.trainer import DMADTrainer
from task.anomaly.unsupervised.predict import load_inference_model, load_onnx_model, onnx_source, predict_run
from task.common.config import load_config
from task.common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/anomaly/unsupervised/dmad/demo.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    """main.py in a subprocess, on the CPU: on a GPU, TF32 convolutions would differ from ONNX Runtime's CPU float32
    by more than the tolerance these tests hold the two backends to."""
    command = [sys.executable, "main.py", "--task_type", "anomaly", "--model_name", "dmad", "--yaml_config", str(CONFIG), *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@dataclass
class Run:
    overrides: list[str]
    run_dir: Path
    data: Path
    export: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A 3-step resnet18 run on 64x64 synthetic images, trained and exported through the CLI."""
    base = tmp_path_factory.mktemp("export_predict")
    make_demo_dataset(base / "data", "demo", n_train=4, n_test_good=2, n_test_defect=2, size=64)
    overrides = [
        f"DATASET.datadir={base / 'data'}", "DATASET.demo=false", "DATASET.resize=[64,64]", "DATALOADER.batch_size=2",
        "TRAIN.num_training_steps=3", "TEST.batch_size=4", "TEST.save_images=false", f"RESULT.savedir={base / 'runs'}",
    ]
    trained = cli("--mode", "train", *overrides)
    assert trained.returncode == 0, trained.stderr[-3000:]
    export = cli("--mode", "export", *overrides)
    return Run(overrides, base / "runs" / "dmad" / "demo", base / "data" / "demo", export)


def _trainer(run: Run, *extra: str, checkpoint: str | None = None) -> DMADTrainer:
    return DMADTrainer(load_config(SCHEMA, CONFIG, run.overrides + list(extra)), checkpoint=checkpoint)


def test_export_writes_a_checked_onnx_with_metadata(run: Run) -> None:
    assert run.export.returncode == 0, run.export.stderr[-3000:]
    report = next(line for line in run.export.stdout.splitlines() if line.startswith("ONNX check"))
    relatives = [float(v) for v in re.findall(r"max \|diff\| \S+ \((\S+) of", report)]
    assert len(relatives) == 3 and all(r <= TOLERANCE for r in relatives), report
    meta = {p.key: p.value for p in onnx.load(run.run_dir / "model.onnx").metadata_props}
    assert meta["input"] == "raw"
    assert json.loads(meta["image_size"]) == [64, 64]
    assert set(json.loads(meta["thresholds"])) == {"image", "pixel"}
    assert (meta["category"], meta["backbone"]) == ("demo", "resnet18")


def test_onnx_matches_torch_on_a_real_image(run: Run) -> None:
    model, _, cfg = load_inference_model(_trainer(run), run.run_dir / "model.pt")
    model = model.cpu()
    paths = [s.path for s in scan_split(run.data.parent, "demo", "test")][-3:]  # defect images
    arrays = [resize_image(load_image(p), tuple(cfg.DATASET.resize)) for p in paths]
    normalized = torch.stack([to_tensor(a) for a in arrays])
    raw = np.stack([a.transpose(2, 0, 1) for a in arrays]).astype(np.float32) / 255
    with torch.no_grad():
        expected = model(normalized)
    session = ort.InferenceSession(str(run.run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (slice(0, 1), slice(0, 3)):  # dynamic batch axis
        anomaly_map, score, deformation_map = session.run(["anomaly_map", "score", "deformation_map"], {"image": raw[batch]})
        reference = expected.anomaly_map[batch].numpy()
        assert anomaly_map.shape == reference.shape and score.shape == (reference.shape[0],)
        span = float(expected.anomaly_map.max() - expected.anomaly_map.min())
        assert np.abs(anomaly_map - reference).max() <= TOLERANCE * span
        assert np.abs(deformation_map - expected.deformation_map[batch].numpy()).max() <= TOLERANCE * float(expected.deformation_map.max())
        assert np.abs(score - expected.score[batch].numpy()).max() <= TOLERANCE * max(1.0, float(expected.score.abs().max()))


def test_export_for_normalised_input_from_an_explicit_checkpoint(run: Run, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    shutil.copyfile(run.run_dir / "model.pt", checkpoint)
    image = sorted((run.data / "test" / "scratch").iterdir())[0]
    trainer = _trainer(run, "EXPORT.input=imagenet", "DATASET.datadir=/nonexistent", checkpoint=str(checkpoint))
    target = export_run(trainer, str(image))  # --input: the check needs no dataset
    assert target == tmp_path / "model.onnx"
    onnx_model = load_onnx_model(target, checkpoint)
    assert onnx_model.input_format == "imagenet"
    model, _, _ = load_inference_model(trainer, checkpoint)
    batch = to_tensor(resize_image(load_image(image), (64, 64))).unsqueeze(0)
    with torch.no_grad():
        expected, got = model.cpu()(batch), onnx_model(batch)
    assert torch.allclose(got.score, expected.score, atol=TOLERANCE)
    assert (got.anomaly_map - expected.anomaly_map).abs().max() <= TOLERANCE * float(expected.anomaly_map.max() - expected.anomaly_map.min())


def _write_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Grayscale and colour images of different sizes (some in a sub-folder), plus files predict must skip."""
    rng = np.random.RandomState(0)
    sizes = {"gray.png": (70, 50), "sub/colour.jpg": (60, 90), "sub/deeper/palette.bmp": (47, 33)}  # (width, height)
    for name, (w, h) in sizes.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
        image = image.convert("L") if name.startswith("gray") else image.convert("P") if name.endswith(".bmp") else image
        image.save(path)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"skipped: hidden")
    return sizes


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_with_both_backends_needs_no_dataset(run: Run, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    sizes = _write_inputs(inputs)
    # A datadir that does not exist and a YAML resize that differs from the checkpoint: neither is needed.
    extra = ["DATASET.datadir=/nonexistent", "DATASET.resize=[96,96]"]
    rows = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        result = cli("--mode", "predict", "--input", str(inputs), "--backend", backend, "--output", str(out), *run.overrides, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [line for line in result.stdout.splitlines() if ": score=" in line]
        assert len(lines) == len(sizes)
        rows[backend] = _read_csv(out / "predictions.csv")
        assert [Path(r["path"]).relative_to(inputs).as_posix() for r in rows[backend]] == sorted(sizes)
        for row, (name, (w, h)) in zip(rows[backend], sorted(sizes.items())):
            assert row["verdict"] in ("OK", "NG") and row["prediction"] == ("1" if row["verdict"] == "NG" else "0")
            assert row["picture"] == str(Path(name).with_suffix(".png").as_posix())
            with Image.open(out / row["picture"]) as picture:  # input | heatmap | region at the original size + title
                assert picture.width == 3 * w and picture.height > h
    threshold = json.loads({p.key: p.value for p in onnx.load(run.run_dir / "model.onnx").metadata_props}["thresholds"])["image"]
    for a, b in zip(rows["torch"], rows["onnx"]):
        assert abs(float(a["score"]) - float(b["score"])) <= TOLERANCE * max(1.0, abs(float(a["score"])))
        assert a["verdict"] == b["verdict"] or abs(float(a["score"]) - threshold) < 1e-4


def test_predict_on_an_empty_folder_is_a_one_line_error(run: Run, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = cli("--mode", "predict", "--input", str(tmp_path / "empty"), *run.overrides)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no images in") and len(result.stderr.strip().splitlines()) == 1


def test_predict_user_errors(run: Run, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs --input"):
        predict_run(_trainer(run), None, "torch", None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
        predict_run(_trainer(run), str(bad), "torch", str(tmp_path / "out"))
    with pytest.raises(UserError, match="add --backend onnx"):
        predict_run(_trainer(run, checkpoint=str(run.run_dir / "model.onnx")), str(bad), "torch", None)
    # model.onnx was exported from model.pt: serving it for last.pt (another checkpoint) is refused.
    with pytest.raises(UserError, match="exported from a different"):
        load_onnx_model(*onnx_source(_trainer(run, checkpoint=str(run.run_dir / "last.pt"))))
    with pytest.raises(UserError, match="checkpoint not found"):
        predict_run(_trainer(run, "RESULT.savedir=/nonexistent"), str(bad), "torch", None)
