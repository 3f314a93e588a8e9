"""--mode predict and --mode export of a video run, on a copy of the suite's trained video run (conftest).

The inputs: a 7-frame grey 64x64 video (a textured background with a square moving across it) as an mp4 and as a
frame folder. Everything runs on the CPU, where ONNX Runtime and PyTorch agree to float32 rounding.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from helpers import VIDEO_YAML, assert_ok, assert_user_error, main_in_process, run_dir, video_args
from task.anomaly.unsupervised.deploy.onnx import TOLERANCE
from task.anomaly.unsupervised.video.export import VIDEO_ONNX_FORMAT

SIZE, CLIP = 64, 4
INPUT_FRAMES = 7  # the predict input: 3 scored frames


def _frames(count: int, speed: int, seed: int) -> np.ndarray:
    """uint8 [count, SIZE, SIZE]: a fixed smooth texture with camera noise and a bright 8x8 square moving right by
    ``speed`` px/frame (row set by ``seed``)."""
    rng = np.random.default_rng(seed)
    texture = cv2.GaussianBlur(np.random.default_rng(0).integers(40, 120, (SIZE, SIZE)).astype(np.uint8), (5, 5), 0)
    out = texture[None] + rng.integers(-12, 13, (count, SIZE, SIZE))
    row = 8 + 12 * seed
    for t in range(count):
        x = (2 + speed * t) % (SIZE - 8)
        out[t, row : row + 8, x : x + 8] = 230
    return out.clip(0, 255).astype(np.uint8)


def _write_folder(folder: Path, frames: np.ndarray, first: int = 0) -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i + first:03d}.png"), frame)
    return folder


def _write_mp4(path: Path, frames: np.ndarray) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (SIZE, SIZE))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


@dataclass
class VideoRun:
    args: list[str]  # BASE + overrides of the trained run
    run_dir: Path
    root: Path

    def call(self, *extra: str):
        return main_in_process(*self.args, *extra)


def _video_engine(overrides: list[str]):
    """An Engine for the DMAD-PDM video method on the CPU with the video demo config and ``overrides``."""
    import task.anomaly.unsupervised.models.available  # noqa: F401  (registers the methods)
    from task.anomaly.unsupervised.engine.engine import Engine
    from task.anomaly.unsupervised.engine.schema import method_schema
    from task.anomaly.unsupervised.models.registry import get_method
    from task.common.config import load_config

    method = get_method("anomaly", "unsupervised", "dmad", "video")
    cfg = load_config(method_schema(method), str(VIDEO_YAML), overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        return Engine(method, cfg)


@pytest.fixture(scope="module")
def video_run(video_data: Path, video_run: Path, tmp_path_factory: pytest.TempPathFactory) -> VideoRun:
    """A copy of the suite's trained video run (conftest: grey 64x64 demo, clips of 4), which predict and export
    write beside."""
    root = tmp_path_factory.mktemp("video-serving")
    savedir = root / "runs"
    shutil.copytree(video_run, savedir, ignore=shutil.ignore_patterns(".lock"))
    return VideoRun(video_args(video_data, savedir), run_dir(savedir), root)


@pytest.fixture(scope="module")
def inputs(video_run: VideoRun) -> dict[str, Path]:
    """The same 7-frame event video as an mp4 and as a 1-based frame folder."""
    frames = _frames(INPUT_FRAMES, 5, 1)
    base = video_run.root / "inputs"
    base.mkdir()
    return {"mp4": _write_mp4(base / "street.mp4", frames), "folder": _write_folder(base / "cam", frames, first=1)}


@pytest.fixture(scope="module")
def torch_rows(video_run: VideoRun, inputs: dict[str, Path]) -> list[dict[str, str]]:
    """``--backend torch`` on the frame folder into the default folder (predict/ beside model.pt): its CSV rows."""
    result = video_run.call("--mode", "predict", "--input", str(inputs["folder"]))
    assert_ok(result)
    return _check_outputs(video_run.run_dir / "predict", "cam", result)


@pytest.fixture(scope="module")
def exported(video_run: VideoRun):
    result = video_run.call("--mode", "export")
    assert_ok(result)
    return result


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _check_outputs(out_dir: Path, name: str, result) -> list[dict[str, str]]:
    """CSV rows and the GIF agree with each other and with the summary line; returns the rows."""
    rows = _rows(out_dir / f"{name}.csv")
    assert [r["frame"] for r in rows] == [str(i) for i in range(INPUT_FRAMES)]
    assert all(r["score"] == r["prediction"] == "" for r in rows[:CLIP])
    scored = rows[CLIP:]
    assert all(r["prediction"] in ("0", "1") for r in scored)
    assert Image.open(out_dir / f"{name}.gif").n_frames == len(scored)  # fewer frames than the GIF's budget: all shown
    alarms = sum(r["prediction"] == "1" for r in scored)
    peak = max(float(r["score"]) for r in scored)
    pattern = rf"{INPUT_FRAMES} frames, {len(scored)} scored, {alarms} alarm\(s\) .* max score {peak:.4f}"
    assert re.search(pattern, result.stdout), result.stdout
    return rows


def test_predict_on_a_frame_folder_and_on_an_mp4(
    video_run: VideoRun, inputs: dict[str, Path], torch_rows, tmp_path: Path
) -> None:
    result = video_run.call("--mode", "predict", "--input", str(inputs["mp4"]), "--output", str(tmp_path))
    assert_ok(result)
    _check_outputs(tmp_path, "street", result)  # the same frames as the folder, through the lossy mp4v codec
    assert all(r["score"] for r in torch_rows[CLIP:])


def test_output_inside_the_input_is_refused(video_run: VideoRun, inputs: dict[str, Path]) -> None:
    inside = inputs["folder"] / "out"
    result = video_run.call("--mode", "predict", "--input", str(inputs["folder"]), "--output", str(inside))
    assert_user_error(result, "inside the input folder")
    assert not inside.exists()


def test_a_foreign_file_is_not_overwritten(video_run: VideoRun, inputs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "cam.csv").write_text("mine\n")
    result = video_run.call("--mode", "predict", "--input", str(inputs["folder"]), "--output", str(tmp_path))
    assert_user_error(result, "cam.csv", "not written by predict")
    assert (tmp_path / "cam.csv").read_text() == "mine\n" and not (tmp_path / "cam.gif").exists()


def test_export_writes_a_checked_onnx_with_metadata(video_run: VideoRun, exported) -> None:
    report = next(line for line in exported.stdout.splitlines() if line.startswith("ONNX check"))
    relatives = [float(v) for v in re.findall(r"max \|diff\| \S+ \((\S+) of", report)]
    assert len(relatives) == 5 and all(r <= TOLERANCE for r in relatives), report
    model = onnx.load(video_run.run_dir / "model.onnx")
    assert [i.name for i in model.graph.input] == ["clip", "target"]  # one shared template: baked in
    assert [o.name for o in model.graph.output] == [
        "predicted_frame",
        "error_map",
        "score_deformation",
        "score_prediction",
        "score_gradient",
    ]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["format"] == VIDEO_ONNX_FORMAT and meta["clip_length"] == str(CLIP) and meta["channels"] == "1"
    assert json.loads(meta["image_size"]) == [SIZE, SIZE] and json.loads(meta["unexported_scores"]) == []
    stored = torch.load(video_run.run_dir / "model.pt", weights_only=True)["calibration"]
    assert json.loads(meta["calibration"]) == json.loads(json.dumps(stored))


def test_onnx_outputs_match_torch(video_run: VideoRun, exported) -> None:
    import onnxruntime as ort

    engine = _video_engine([a for a in video_run.args if "=" in a])
    loaded = engine.load(video_run.run_dir / "model.pt")
    module = engine.method.serving_module(loaded.model, loaded.cfg)
    generator = torch.Generator().manual_seed(0)
    clip = torch.rand(2, CLIP, 1, SIZE, SIZE, generator=generator) * 2 - 1
    target = torch.rand(2, 1, SIZE, SIZE, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = [t.numpy() for t in module(clip, target)]
    session = ort.InferenceSession(str(video_run.run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(None, {"clip": clip.numpy(), "target": target.numpy()}), expected):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOLERANCE * max(1e-3, float(np.abs(want).max()))


def test_predict_with_onnx_matches_torch(video_run: VideoRun, inputs: dict[str, Path], torch_rows, exported) -> None:
    # Into the default folder again (predict/ beside model.onnx): it replaces the torch run's files, which it wrote.
    result = video_run.call("--mode", "predict", "--input", str(inputs["folder"]), "--backend", "onnx")
    assert_ok(result)
    onnx_rows = _check_outputs(video_run.run_dir / "predict", "cam", result)
    state = torch.load(video_run.run_dir / "model.pt", weights_only=True)
    # Export guarantees each raw score to TOLERANCE of its training spread, the unit the online fusion divides by.
    bound = TOLERANCE * sum(state["config"]["SCORE"]["weights"])
    for a, b in zip(torch_rows[CLIP:], onnx_rows[CLIP:]):
        assert abs(float(a["score"]) - float(b["score"])) <= bound
        assert a["prediction"] == b["prediction"] or abs(float(a["score"]) - state["calibration"]["threshold"]) <= bound


def test_one_line_errors(video_run: VideoRun, inputs: dict[str, Path], tmp_path: Path) -> None:
    predict = ("--mode", "predict", "--output", str(tmp_path / "out"))
    assert_user_error(video_run.call(*predict), "needs --input")
    assert_user_error(video_run.call(*predict, "--input", str(tmp_path / "missing.mp4")), "not found")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    assert_user_error(video_run.call(*predict, "--input", str(broken)), "cannot read video")
    short = _write_folder(tmp_path / "short", _frames(CLIP, 2, 0))
    assert_user_error(video_run.call(*predict, "--input", str(short)), "has 4 frames but a clip needs 5")

    state = torch.load(video_run.run_dir / "model.pt", weights_only=True)
    image_run = tmp_path / "image" / "model.pt"
    image_run.parent.mkdir()
    torch.save({**state, "format": "tnvision-dmad"}, image_run)  # what an image run's model.pt says it is
    assert_user_error(
        video_run.call(*predict, "--input", str(inputs["folder"]), "--checkpoint", str(image_run)), str(image_run)
    )

    del state["calibration"]
    uncalibrated = tmp_path / "uncalibrated" / "model.pt"
    uncalibrated.parent.mkdir()
    torch.save(state, uncalibrated)
    for mode in (predict, ("--mode", "export")):
        assert_user_error(
            video_run.call(*mode, "--input", str(inputs["folder"]), "--checkpoint", str(uncalibrated)),
            "no video calibration",
        )
    assert_user_error(
        video_run.call(
            *predict, "--input", str(inputs["folder"]), "--backend", "onnx", "--checkpoint", str(uncalibrated)
        ),
        "run --mode export",
    )
    assert not (tmp_path / "out").exists() and not (uncalibrated.parent / "model.onnx").exists()
