"""The engine's rules for runs and checkpoints: where outputs go, which settings a checkpoint decides, old files,
file names, and the MODEL.pdm=false ablation end to end."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from helpers import BASE, CATEGORY, DEMO_YAML, SIZE, assert_ok, main_in_process, make_engine, train_overrides
from task.anomaly.unsupervised.engine.engine import run_dir_for
from task.common.io import save_checkpoint


def test_testing_a_foreign_checkpoint_never_replaces_the_runs_files(trained_run, tmp_path: Path) -> None:
    run_dir = trained_run.copy_to(tmp_path / "runs")
    before = {
        name: (run_dir / name).read_bytes()
        for name in ("model.pt", "metrics.json", "predictions.csv", f"{CATEGORY}.gif")
    }
    other = tmp_path / "other" / "model.pt"
    other.parent.mkdir()
    shutil.copyfile(trained_run.run_dir / "model.pt", other)
    assert_ok(main_in_process(*trained_run.args(tmp_path / "runs"), "--mode", "test", "--checkpoint", str(other)))
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, name
    (out,) = (run_dir / "tests").glob("other-model-*")  # <folder>-<file>-<hash of the path>
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(
        json.loads((run_dir / "metrics.json").read_text()), abs=1e-6
    )
    assert {"model.pt", "predictions.csv", "run.json", f"{CATEGORY}.gif"} <= {p.name for p in out.iterdir()}


def test_same_stem_test_images_keep_separate_outputs_and_csv_cells_are_escaped(
    trained_run, tmp_path: Path, monkeypatch
) -> None:
    """test/good/a.png and a.jpg get images/good/a.png.png and a.jpg.png (and maps); path cells that start with '='
    (a relative datadir '=data') are escaped in predictions.csv."""
    monkeypatch.chdir(tmp_path)
    data = Path("=data")
    shutil.copytree(trained_run.category_dir, data / CATEGORY)
    rng = np.random.RandomState(1)
    for name in ("a.png", "a.jpg", "=b.png"):
        Image.fromarray(rng.randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
            data / CATEGORY / "test" / "good" / name
        )
    savedir = tmp_path / "runs"
    run_dir = savedir / "dmad" / CATEGORY
    run_dir.mkdir(parents=True)
    shutil.copyfile(trained_run.run_dir / "model.pt", run_dir / "model.pt")
    assert_ok(main_in_process(*BASE, *train_overrides(data, savedir), "--mode", "test"))
    for name in ("a.png", "a.jpg", "=b.png"):
        assert (run_dir / "images" / "good" / f"{name}.png").is_file(), name
        with np.load(run_dir / "maps" / "good" / f"{name}.npz") as maps:
            assert set(maps.files) == {"anomaly_map", "deformation_map"}
    assert not np.array_equal(
        np.load(run_dir / "maps" / "good" / "a.png.npz")["anomaly_map"],
        np.load(run_dir / "maps" / "good" / "a.jpg.npz")["anomaly_map"],
    )
    rows = (run_dir / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 7 + 3 and all(row.startswith("'=data/") for row in rows)
    assert "'" + str(data / CATEGORY / "test" / "good" / "=b.png") in [row.split(",")[0] for row in rows]


def test_savedir_with_tilde_is_expanded(trained_run, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    args = [a for a in trained_run.args(tmp_path / "unused") if not a.startswith("RESULT.savedir=")]
    assert_ok(
        main_in_process(
            *args, "RESULT.savedir=~/x", "--mode", "gif", "--checkpoint", str(trained_run.run_dir / "model.pt")
        )
    )
    assert (
        len(list((tmp_path / "home" / "x" / "dmad" / CATEGORY / "tests").glob(f"{CATEGORY}-model-*/{CATEGORY}.gif")))
        == 1
    )
    assert not (tmp_path / "~").exists()
    assert (
        run_dir_for(make_engine("RESULT.savedir=~/y", "RESULT.exp_name=trial1").cfg, "dmad")
        == tmp_path / "home" / "y" / "dmad" / "demo" / "trial1"
    )


def test_version_1_checkpoint_without_new_keys_loads(trained_run, tmp_path: Path) -> None:
    """A version-1 model.pt (saved before MODEL.pdm and DATASET.format existed) loads with the defaults that reproduce
    it, and computes exactly what the current file computes."""
    state = torch.load(trained_run.run_dir / "model.pt", map_location="cpu", weights_only=True)
    old = {**state, "version": 1, "config": json.loads(json.dumps(state["config"]))}
    del old["config"]["MODEL"]["pdm"], old["config"]["DATASET"]["format"]
    save_checkpoint(old, tmp_path / "old.pt")
    engine = make_engine(*train_overrides(trained_run.datadir, tmp_path / "runs"))
    current, loaded = engine.load(trained_run.run_dir / "model.pt"), engine.load(tmp_path / "old.pt")
    assert loaded.calibrated and loaded.thresholds == current.thresholds and loaded.cfg.MODEL.pdm is True
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = current.model(x), loaded.model(x)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.score, b.score)
    assert torch.equal(a.extras["deformation_map"], b.extras["deformation_map"])


@pytest.mark.parametrize(
    "change, key",
    [
        ("MODEL.deform_weight=0.5", "MODEL.deform_weight"),
        ("MODEL.sigma=2", "MODEL.sigma"),
    ],
)
def test_test_mode_applies_the_configs_scoring_and_recalibrates(
    change: str, key: str, trained_run, tmp_path: Path, caplog
) -> None:
    run_dir = trained_run.copy_to(tmp_path / "runs")
    with caplog.at_level(logging.INFO):
        assert_ok(main_in_process(*trained_run.args(tmp_path / "runs"), "--mode", "test", change))
    assert f"{key}: scoring with" in caplog.text and "recalibrating" in caplog.text
    engine = make_engine(*train_overrides(trained_run.datadir, tmp_path / "runs"))
    settings = engine.method.scoring_settings(engine.load(run_dir / "model.pt").model)
    assert settings[key] == float(change.split("=")[1])


def test_network_setting_in_the_yaml_is_a_warning_and_the_checkpoints_value_is_used(
    trained_run, tmp_path: Path, caplog
) -> None:
    engine = make_engine(
        *train_overrides(trained_run.datadir, tmp_path / "runs"),
        "MODEL.backbone=resnet34",
        "MODEL.vq_num_embeddings=50",
    )
    with caplog.at_level(logging.WARNING):
        loaded = engine.load(trained_run.run_dir / "model.pt")
    assert loaded.cfg.MODEL.backbone == "resnet18" and loaded.cfg.MODEL.vq_num_embeddings == 200
    assert "MODEL.backbone: using the checkpoint's 'resnet18' (the config says 'resnet34')" in caplog.text
    assert "MODEL.vq_num_embeddings: using the checkpoint's 200" in caplog.text


def test_without_pdm_trains_scores_and_exports(dataset: Path, tmp_path: Path) -> None:
    """MODEL.pdm=false end to end: no deformation loss term, no deformation map in the maps or the ONNX outputs."""
    savedir = tmp_path / "runs"
    args = [
        *BASE,
        *train_overrides(dataset, savedir),
        "MODEL.pdm=false",
        "TRAIN.num_training_steps=2",
        "TEST.save_images=false",
        "LOG.tensorboard=true",
    ]
    assert_ok(main_in_process(*args))
    run_dir = savedir / "dmad" / CATEGORY
    assert json.loads((run_dir / "run.json").read_text())["pdm"] is False
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    maps = sorted((run_dir / "maps").glob("*/*.npz"))
    assert maps and all(set(np.load(p).files) == {"anomaly_map"} for p in maps)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert state["config"]["MODEL"]["pdm"] is False and not any(
        k.startswith("deformation.") for k in state["state_dict"]
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    assert {"train/distillation", "train/vq", "train/loss"} <= tags and "train/deformation" not in tags

    export = main_in_process(*args, "--mode", "export")
    assert_ok(export)
    assert [o.name for o in onnx.load(run_dir / "model.onnx").graph.output] == ["anomaly_map", "score"]
    report = next(line for line in export.stdout.splitlines() if line.startswith("ONNX check"))
    assert "deformation_map" not in report and report.count("max |diff|") == 2


def test_test_mode_follows_the_checkpoints_network_settings(trained_run, tmp_path: Path, caplog) -> None:
    """A YAML whose resize differs from the checkpoint's: the data, the outputs and the config saved in the new model.pt
    follow the checkpoint (a warning says so), so the rewritten model.pt loads and tests again."""
    savedir = tmp_path / "runs"
    run_dir = trained_run.copy_to(savedir)
    config = tmp_path / "other.yaml"
    config.write_text(DEMO_YAML.read_text().replace("resize: [128, 128]", "resize: [96, 96]"))
    args = [a for a in trained_run.args(savedir) if not a.startswith("DATASET.resize=")]
    args[args.index("--yaml_config") + 1] = str(config)
    for _ in range(2):
        with caplog.at_level(logging.WARNING):
            assert_ok(main_in_process(*args, "--mode", "test"))
        assert "DATASET.resize: using the checkpoint's [64, 64] (the config says [96, 96])" in caplog.text
        saved = torch.load(run_dir / "model.pt", weights_only=True)
        assert saved["config"]["DATASET"]["resize"] == [64, 64]
        caplog.clear()
