"""Every registered method through the same engine: a trained run (a session fixture per method), its checkpoint
loading with ``weights_only=True``, ONNX export with the parity check, and predict with both backends agreeing.

``CASES`` names, for each registered (task, type, name, modality), the fixture of its trained run: registering a method
without adding it here fails ``test_every_registered_method_has_a_case``.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import task.anomaly.unsupervised.models.available  # noqa: F401  (registers the methods)
from helpers import assert_ok, main_in_process, run_dir, video_args
from task.anomaly.unsupervised.models.registry import METHODS


@dataclass
class ContractRun:
    args: list[str]  # main.py arguments of the run (a later --mode wins)
    run_dir: Path
    predict_input: Path  # an image folder or a video
    rows_file: str  # predict's table, per input


CASES = {
    ("anomaly", "unsupervised", "dmad", "image"): "dmad_image_contract",
    ("anomaly", "unsupervised", "dmad", "video"): "dmad_video_contract",
    ("anomaly", "unsupervised", "patchcore", "image"): "patchcore_contract",
}


@pytest.fixture(scope="module")
def dmad_image_contract(trained_run, tmp_path_factory: pytest.TempPathFactory) -> ContractRun:
    savedir = tmp_path_factory.mktemp("contract-image") / "runs"
    out = trained_run.copy_to(savedir)
    return ContractRun(trained_run.args(savedir), out, trained_run.category_dir / "test", "predictions.csv")


@pytest.fixture(scope="module")
def dmad_video_contract(video_data: Path, video_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ContractRun:
    savedir = tmp_path_factory.mktemp("contract-video") / "runs"
    shutil.copytree(video_run, savedir, ignore=shutil.ignore_patterns(".lock"))
    # the first 10 frames of a test video: 6 scored clips keep export and both predicts short
    frames = tmp_path_factory.mktemp("contract-video-input") / "clip"
    frames.mkdir()
    for source in sorted((video_data / "video_demo" / "testing" / "frames" / "01").iterdir())[:10]:
        shutil.copy(source, frames / source.name)
    return ContractRun(video_args(video_data, savedir), run_dir(savedir), frames, "clip.csv")


@pytest.fixture(scope="module")
def patchcore_contract(patchcore_run, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> ContractRun:
    args, source, _ = patchcore_run
    savedir = tmp_path_factory.mktemp("contract-patchcore") / "runs"
    shutil.copytree(source, savedir / "patchcore" / source.name, ignore=shutil.ignore_patterns(".lock"))
    args = [a for a in args if not a.startswith("RESULT.savedir=")] + [f"RESULT.savedir={savedir}"]
    return ContractRun(args, savedir / "patchcore" / source.name, dataset / source.name / "test", "predictions.csv")


def test_every_registered_method_has_a_case() -> None:
    assert set(METHODS) == set(CASES)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("key", sorted(CASES), ids=lambda k: f"{k[2]}-{k[3]}")
def test_method_contract(key, request, tmp_path: Path) -> None:
    method = METHODS[key]
    run: ContractRun = request.getfixturevalue(CASES[key])
    state = torch.load(run.run_dir / "model.pt", weights_only=True)
    assert state["format"] == method.checkpoint_format and isinstance(state["state_dict"], dict)

    exported = main_in_process(*run.args, "--mode", "export")
    assert_ok(exported)
    assert "ONNX check" in exported.stdout and (run.run_dir / "model.onnx").is_file()

    rows = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        result = main_in_process(
            *run.args,
            "--mode",
            "predict",
            "--input",
            str(run.predict_input),
            "--output",
            str(out),
            "--backend",
            backend,
        )
        assert_ok(result)
        rows[backend] = [row for row in _rows(out / run.rows_file) if row["score"]]
        assert rows[backend], backend
    scores = {b: torch.tensor([float(row["score"]) for row in rows[b]], dtype=torch.float64) for b in rows}
    # Both backends compute in float32 on the CPU: scores agree to float32 rounding of the graph (1e-4 of their range).
    tolerance = 1e-4 * max(float(scores["torch"].max() - scores["torch"].min()), 1e-6)
    assert (scores["torch"] - scores["onnx"]).abs().max() <= tolerance
    # Verdicts agree except for a score within that rounding of the threshold (the lowest alarming torch score).
    alarming = [s for s, row in zip(scores["torch"].tolist(), rows["torch"]) if row["prediction"] == "1"]
    boundary = min(alarming) if alarming else float("inf")
    for score, a, b in zip(scores["torch"].tolist(), rows["torch"], rows["onnx"]):
        assert a["prediction"] == b["prediction"] or abs(score - boundary) <= tolerance
