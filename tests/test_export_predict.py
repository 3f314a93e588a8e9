"""--mode export (ONNX, checked against PyTorch) and --mode predict (torch and onnx backends) on a copy of the shared
run.

Everything runs on the CPU (conftest forces it): on a GPU, TF32 convolutions would differ from ONNX Runtime's CPU
float32
by more than the tolerance these tests hold the two backends to. Predict's and export's user mistakes are in the
table of test_robustness.py.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from helpers import CATEGORY, DEMO_YAML, SIZE, assert_ok, main_in_process, make_engine, train_overrides
from task.anomaly.unsupervised.data.image.formats import scan_dataset
from task.anomaly.unsupervised.data.image.preprocess import load_image, resize_image, to_tensor
from task.anomaly.unsupervised.deploy.onnx import TOLERANCE
from task.anomaly.unsupervised.image.export import export_run
from task.anomaly.unsupervised.image.predict import load_onnx_model


def _engine(exported_run, *extra: str):
    savedir = exported_run.run_dir.parents[1]
    return make_engine(*train_overrides(Path(_datadir(exported_run)), savedir), *extra)


def _datadir(exported_run) -> str:
    return next(a.split("=", 1)[1] for a in exported_run.args if a.startswith("DATASET.datadir="))


def test_export_writes_a_checked_onnx_with_metadata(exported_run) -> None:
    report = next(line for line in exported_run.export.stdout.splitlines() if line.startswith("ONNX check"))
    relatives = [float(v) for v in re.findall(r"max \|diff\| \S+ \((\S+) of", report)]
    assert len(relatives) == 3 and all(r <= TOLERANCE for r in relatives), report  # anomaly map, score, deformation map
    model = onnx.load(exported_run.run_dir / "model.onnx")
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score", "deformation_map"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["input"] == "raw"
    assert json.loads(meta["image_size"]) == [SIZE, SIZE]
    assert set(json.loads(meta["thresholds"])) == {"image", "pixel"}
    assert meta["category"] == CATEGORY and json.loads(meta["model"])["backbone"] == "resnet18"


def test_onnx_matches_torch_on_a_real_image(exported_run) -> None:
    engine = _engine(exported_run)
    loaded = engine.load(exported_run.run_dir / "model.pt")
    paths = [s.path for s in scan_dataset(engine.cfg.DATASET, "test", 0)][-3:]  # defect images
    arrays = [resize_image(load_image(p), tuple(loaded.cfg.DATASET.resize)) for p in paths]
    normalized = torch.stack([to_tensor(a) for a in arrays])
    raw = np.stack([a.transpose(2, 0, 1) for a in arrays]).astype(np.float32) / 255
    with torch.no_grad():
        expected = loaded.model(normalized)
    deformation = expected.extras["deformation_map"]
    session = ort.InferenceSession(str(exported_run.run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (slice(0, 1), slice(0, 3)):  # dynamic batch axis
        anomaly_map, score, deformation_map = session.run(
            ["anomaly_map", "score", "deformation_map"], {"image": raw[batch]}
        )
        reference = expected.anomaly_map[batch].numpy()
        assert anomaly_map.shape == reference.shape and score.shape == (reference.shape[0],)
        # The tolerance export.py itself enforces: TOLERANCE of the map's range, of max(1, |score|) for scores.
        span = float(expected.anomaly_map.max() - expected.anomaly_map.min())
        assert np.abs(anomaly_map - reference).max() <= TOLERANCE * span
        assert np.abs(deformation_map - deformation[batch].numpy()).max() <= TOLERANCE * float(
            deformation.max() - deformation.min()
        )
        assert np.abs(score - expected.score[batch].numpy()).max() <= TOLERANCE * max(
            1.0, float(expected.score.abs().max())
        )


def test_export_for_normalised_input_from_an_explicit_checkpoint(exported_run, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    shutil.copyfile(exported_run.run_dir / "model.pt", checkpoint)
    image = sorted((Path(_datadir(exported_run)) / CATEGORY / "test" / "scratch").iterdir())[0]
    engine = _engine(exported_run, "EXPORT.input=imagenet", "DATASET.datadir=/nonexistent")
    loaded = engine.load(checkpoint)
    # --input: the check needs no dataset
    target = export_run(loaded, [image], engine.method.extra_map_names(loaded.cfg), "imagenet", engine.cfg.EXPORT.opset)
    assert target == tmp_path / "model.onnx"
    onnx_model = load_onnx_model(target, checkpoint)
    assert onnx_model.input_format == "imagenet"
    batch = to_tensor(resize_image(load_image(image), (SIZE, SIZE))).unsqueeze(0)
    with torch.no_grad():
        expected, got = loaded.model.cpu()(batch), onnx_model(batch)
    assert torch.allclose(got.score, expected.score, atol=TOLERANCE)
    assert (got.anomaly_map - expected.anomaly_map).abs().max() <= TOLERANCE * float(
        expected.anomaly_map.max() - expected.anomaly_map.min()
    )
    assert set(got.extras) == {"deformation_map"}


def _write_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Grayscale and colour images of different sizes (some in a sub-folder, two sharing a stem, one whose name starts
    with '=' like a spreadsheet formula), plus files predict must skip."""
    rng = np.random.RandomState(0)
    sizes = {
        "=cmd.png": (40, 40),
        "gray.png": (70, 50),
        "sub/a.jpg": (60, 90),
        "sub/a.png": (64, 64),
        "sub/deeper/palette.bmp": (47, 33),
    }
    for name, (w, h) in sizes.items():  # (width, height)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
        image = (
            image.convert("L") if name.startswith("gray") else image.convert("P") if name.endswith(".bmp") else image
        )
        image.save(path)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"skipped: hidden")
    return sizes


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_with_both_backends_needs_no_dataset(exported_run, tmp_path: Path, caplog) -> None:
    inputs = tmp_path / "inputs"
    sizes = _write_inputs(inputs)
    # A datadir that does not exist, and a YAML whose resize differs from the checkpoint's: a network setting, so the
    # checkpoint's is used with a warning (as an override it would be an error: test_robustness.py).
    config = tmp_path / "other.yaml"
    config.write_text(DEMO_YAML.read_text().replace("resize: [128, 128]", "resize: [96, 96]"))
    args = [a for a in exported_run.args if not a.startswith(("DATASET.resize=", "DATASET.datadir="))]
    args[args.index("--yaml_config") + 1] = str(config)
    rows = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        with caplog.at_level(logging.WARNING):
            result = main_in_process(
                *args,
                "DATASET.datadir=/nonexistent",
                "--mode",
                "predict",
                "--input",
                str(inputs),
                "--backend",
                backend,
                "--output",
                str(out),
            )
        assert_ok(result)
        lines = [line for line in result.stdout.splitlines() if ": score=" in line]
        assert len(lines) == len(sizes)
        rows[backend] = _read_csv(out / "predictions.csv")
        assert [Path(r["path"]).relative_to(inputs).as_posix() for r in rows[backend]] == sorted(sizes)
        for row, (name, (w, h)) in zip(rows[backend], sorted(sizes.items())):
            assert row["verdict"] in ("OK", "NG") and row["prediction"] == ("1" if row["verdict"] == "NG" else "0")
            picture = name + ".png"  # the whole file name: sub/a.jpg and sub/a.png keep separate pictures
            assert row["picture"] == ("'" + picture if name.startswith("=") else picture)
            with Image.open(out / picture) as image:  # input | heatmap | region at the original size + title
                assert image.width == 3 * w and image.height > h
        # A cell starting with '=' would be a formula in a spreadsheet: escaped with a leading quote (the picture
        # column above); the unescaped file is the one written.
        assert rows[backend][0]["picture"] == "'=cmd.png.png" and (out / "=cmd.png.png").is_file()
        assert json.loads((out / ".predict-manifest.json").read_text()) == sorted(
            [n + ".png" for n in sizes] + ["predictions.csv"]
        )
    assert "DATASET.resize: using the checkpoint's [64, 64] (the config says [96, 96])" in caplog.text
    threshold = json.loads(
        {p.key: p.value for p in onnx.load(exported_run.run_dir / "model.onnx").metadata_props}["thresholds"]
    )["image"]
    for a, b in zip(rows["torch"], rows["onnx"]):
        # On the CPU the two backends agree to ~1e-6; export.py's tolerance bounds what its check lets through.
        assert abs(float(a["score"]) - float(b["score"])) <= TOLERANCE * max(1.0, abs(float(a["score"])))
        assert a["verdict"] == b["verdict"] or abs(float(a["score"]) - threshold) < 1e-4


def test_predict_reruns_into_its_own_output_folder(exported_run, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    _write_inputs(inputs)
    out = tmp_path / "out"
    args = [*exported_run.args, "--mode", "predict", "--input", str(inputs / "sub"), "--output", str(out)]
    assert_ok(main_in_process(*args))
    first = (out / "predictions.csv").read_text()
    assert_ok(main_in_process(*args))  # predict may replace the files it wrote itself
    assert (out / "predictions.csv").read_text() == first  # and is deterministic
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "a.jpg.png",
        "a.png.png",
        "deeper/palette.bmp.png",
    ]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_default_output_is_beside_the_checkpoint(exported_run, tmp_path: Path, backend: str) -> None:
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    for name in ("model.pt", "model.onnx"):
        shutil.copyfile(exported_run.run_dir / name, checkpoint_dir / name)
    image = tmp_path / "one.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(image)
    assert_ok(
        main_in_process(
            *exported_run.args,
            "--mode",
            "predict",
            "--input",
            str(image),
            "--backend",
            backend,
            "--checkpoint",
            str(checkpoint_dir / "model.pt"),
        )
    )
    assert (checkpoint_dir / "predict" / "one.png.png").is_file()
    assert [r["picture"] for r in _read_csv(checkpoint_dir / "predict" / "predictions.csv")] == ["one.png.png"]
