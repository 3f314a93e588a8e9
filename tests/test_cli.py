"""main.py end to end in a subprocess, config loading and validation, registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from task.anomaly.unsupervised.data.synthetic import make_demo_dataset
from task.anomaly.unsupervised.models.dmad.config import SCHEMA
from task.common.config import load_config, parse_override
from task.common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "anomaly" / "unsupervised" / "dmad"
MVTEC = ["carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper"]


def run_main(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def dmad_args(config: Path | str, *overrides: str, mode: str = "train") -> list[str]:
    return ["--task_type", "anomaly", "--model_name", "dmad", "--yaml_config", str(config), "--mode", mode, *overrides]


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, list[str]]:
    """A short CPU run on an MVTec-layout dataset with a custom category name."""
    root = tmp_path_factory.mktemp("cli")
    make_demo_dataset(root / "data", "widget", n_train=8, n_test_good=4, n_test_defect=4, size=64)
    overrides = [
        f"DATASET.datadir={root / 'data'}", "DATASET.target=widget", "DATASET.resize=[64,64]", "DATASET.demo=false",
        "TRAIN.num_training_steps=3", "DATALOADER.batch_size=4", "TEST.save_images=false", f"RESULT.savedir={root / 'runs'}",
    ]
    result = run_main(*dmad_args(CONFIGS / "demo.yaml", *overrides))
    return root, result, overrides


def test_cli_trains_and_writes_all_outputs(tiny_run) -> None:
    root, result, _ = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = root / "runs" / "dmad" / "widget"
    assert f"run directory: {run_dir}" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"image_auroc", "pixel_auroc", "pixel_f1", "image_f1", "pixel_aupro", "image_threshold", "pixel_threshold"}
    for key in ("image_auroc", "pixel_auroc", "pixel_f1", "image_f1", "pixel_aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    rows = (run_dir / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,label,score,prediction" and len(rows) == 1 + 8
    assert {r.split(",")[1] for r in rows[1:]} == {"0", "1"}
    assert (run_dir / "train.log").stat().st_size > 0
    ckpt = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["DATASET"]["target"] == "widget"
    assert set(ckpt["thresholds"]) == {"image", "pixel"}
    assert "model.score_stats" not in ckpt["state_dict"] and "score_stats" in ckpt["state_dict"]


def test_cli_test_mode_reproduces_metrics(tiny_run) -> None:
    root, _, overrides = tiny_run
    run_dir = root / "runs" / "dmad" / "widget"
    before = json.loads((run_dir / "metrics.json").read_text())
    result = run_main(*dmad_args(CONFIGS / "demo.yaml", *overrides, mode="test"))
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((run_dir / "metrics.json").read_text())
    for key in before:
        assert after[key] == pytest.approx(before[key], abs=1e-6)


def test_missing_dataset_is_one_line_error(tmp_path: Path) -> None:
    result = run_main(*dmad_args(CONFIGS / "bottle.yaml", f"DATASET.datadir={tmp_path / 'mvtec'}"))
    assert_user_error(result, str(tmp_path / "mvtec"), "MVTec AD")


def test_missing_category_lists_available(tmp_path: Path) -> None:
    (tmp_path / "mvtec" / "carpet").mkdir(parents=True)
    result = run_main(*dmad_args(CONFIGS / "bottle.yaml", f"DATASET.datadir={tmp_path / 'mvtec'}"))
    assert_user_error(result, "bottle", "carpet")


def test_unknown_key_and_wrong_type_exit_2() -> None:
    assert_user_error(run_main(*dmad_args(CONFIGS / "demo.yaml", "MODEL.backbon=resnet18")), "MODEL.backbon", "backbone")
    assert_user_error(run_main(*dmad_args(CONFIGS / "demo.yaml", "DATALOADER.batch_size=abc")), "DATALOADER.batch_size", "int")
    assert_user_error(run_main(*dmad_args(CONFIGS / "demo.yaml", "MODEL.backbone=vgg")), "MODEL.backbone", "wide_resnet50_2")


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("TRAIN:\n  num_trainig_steps: 5\n")
    assert_user_error(run_main(*dmad_args(cfg)), "TRAIN.num_trainig_steps", "num_training_steps")


def test_unknown_model_lists_registered() -> None:
    result = run_main("--task_type", "anomaly", "--model_name", "patchcore", "--yaml_config", str(CONFIGS / "demo.yaml"))
    assert_user_error(result, "anomaly/unsupervised/dmad")


def test_all_mvtec_configs_load_with_paper_settings() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(MVTEC + ["demo"])
    for category in MVTEC:
        cfg = load_config(SCHEMA, CONFIGS / f"{category}.yaml")
        assert cfg.DATASET.target == category
        assert cfg.MODEL.backbone == "wide_resnet50_2" and cfg.MODEL.vq and cfg.MODEL.pretrained
        assert cfg.DATASET.resize == [256, 256] and cfg.DATALOADER.batch_size == 8
        assert cfg.OPTIMIZER.lr == 0.005 and cfg.OPTIMIZER.betas == [0.5, 0.999] and cfg.TRAIN.epochs == 400
        assert cfg.MODEL.deform_weight == (0.2 if category in ("screw", "carpet", "metal_nut") else 0.05)


def test_overrides_are_yaml_typed_and_dotted() -> None:
    cfg = load_config(SCHEMA, CONFIGS / "bottle.yaml", ["DATASET.target=carpet", "DATASET.resize=[128,128]", "TRAIN.num_training_steps=50", "MODEL.gamma=2"])
    assert cfg.DATASET.target == "carpet" and cfg.DATASET.resize == [128, 128]
    assert cfg.TRAIN.num_training_steps == 50 and cfg.MODEL.gamma == 2.0
    assert parse_override("A.b=[1, 2]") == ("A.b", [1, 2])
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_override("DATASET.target")
    with pytest.raises(UserError, match="list of 2"):
        load_config(SCHEMA, None, ["DATASET.resize=[1,2,3]"])


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(SCHEMA, CONFIGS / "demo.yaml")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(SCHEMA, path).to_dict() == cfg.to_dict()
