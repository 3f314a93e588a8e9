"""OpenVINO IR: --mode export EXPORT.format=openvino for each precision, --mode predict --backend openvino, and the
runner's precision split, on copies of the shared trained run (resnet18, 64x64). Everything runs on the CPU.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CATEGORY, SIZE, assert_ok, assert_user_error, main_in_process
from task.anomaly.unsupervised.deploy.ir_runner import IRRunner, read_metadata, sensitive_nodes
from task.anomaly.unsupervised.deploy.onnx import TOLERANCE
from task.anomaly.unsupervised.deploy.openvino import TOLERANCES

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def ir_run(trained_run, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the shared run with model-fp32/fp16/int8.xml from --mode export, and the export outputs by
    precision."""
    savedir = tmp_path_factory.mktemp("openvino") / "runs"
    run_dir = trained_run.copy_to(savedir)
    args = trained_run.args(savedir)
    exports = {}
    for precision in ("fp32", "fp16", "int8"):
        result = main_in_process(
            *args,
            "--mode",
            "export",
            "EXPORT.format=openvino",
            f"EXPORT.precision={precision}",
            "EXPORT.calibration_images=4",
        )
        assert_ok(result)
        exports[precision] = result.stdout
    return run_dir, args, exports


def _inputs(folder: Path) -> list[str]:
    rng = np.random.RandomState(1)
    names = ["a.png", "sub/b.png", "gray.png"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.randint(0, 256, (48, 56, 3), dtype=np.uint8))
        (image.convert("L") if name.startswith("gray") else image).save(folder / name)
    return names


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_export_writes_a_checked_ir_with_metadata(ir_run, precision: str) -> None:
    run_dir, _, exports = ir_run
    report = next(line for line in exports[precision].splitlines() if line.startswith(f"OpenVINO {precision} check"))
    relatives = [float(v) for v in re.findall(r"max \|diff\| \S+ \((\S+) of", report)]
    assert len(relatives) == 3 and all(r <= TOLERANCES[precision] for r in relatives), report
    assert re.search(
        r"on the \d+ test images: image AUROC \S+ -> \S+ \([+-]\S+\); \d+ of \d+ OK/NG verdicts changed",
        exports[precision],
    )
    xml = run_dir / f"model-{precision}.xml"
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert not list(run_dir.glob(".model-*"))  # no temporary folder left behind
    model = ov.Core().read_model(str(xml))  # an ordinary IR: plain OpenVINO reads it
    meta = read_metadata(model)
    assert meta["precision"] == precision and meta["input"] == "raw" and meta["category"] == CATEGORY
    assert json.loads(meta["image_size"]) == [SIZE, SIZE] and set(json.loads(meta["thresholds"])) == {"image", "pixel"}
    assert [o.get_any_name() for o in model.outputs] == ["anomaly_map", "score", "deformation_map"]
    if precision == "fp32":
        assert all(r <= TOLERANCE for r in relatives)
    if precision == "fp16":  # convolution weights stored in float16: about half the float32 file
        assert xml.with_suffix(".bin").stat().st_size < 0.6 * (run_dir / "model-fp32.bin").stat().st_size
    if precision == "int8":
        assert any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())


def test_predict_with_each_ir_matches_torch(ir_run, tmp_path: Path) -> None:
    run_dir, args, _ = ir_run
    inputs = tmp_path / "inputs"
    names = _inputs(inputs)
    rows = {}
    for backend, extra in (
        ("torch", []),
        ("openvino", ["EXPORT.precision=fp32"]),
        ("openvino", ["EXPORT.precision=fp16"]),
        ("openvino", ["EXPORT.precision=int8"]),
    ):
        label = backend + "".join(extra)
        out = tmp_path / label
        assert_ok(
            main_in_process(
                *args, *extra, "--mode", "predict", "--input", str(inputs), "--backend", backend, "--output", str(out)
            )
        )
        rows[label] = _rows(out / "predictions.csv")
        assert sorted(Path(r["path"]).relative_to(inputs).as_posix() for r in rows[label]) == sorted(names)
        assert all((out / r["picture"]).is_file() for r in rows[label])
    threshold = json.loads(read_metadata(ov.Core().read_model(str(run_dir / "model-fp32.xml")))["thresholds"])["image"]
    for precision in ("fp32", "fp16", "int8"):
        for a, b in zip(rows["torch"], rows[f"openvinoEXPORT.precision={precision}"]):
            scale = max(1.0, abs(float(a["score"])))
            assert abs(float(a["score"]) - float(b["score"])) <= TOLERANCES[precision] * scale
            if precision == "fp32":  # the same verdicts (unless a score sits on the threshold)
                assert a["verdict"] == b["verdict"] or abs(float(a["score"]) - threshold) < 1e-4


def test_an_ir_can_be_given_as_the_checkpoint(ir_run, tmp_path: Path) -> None:
    run_dir, args, _ = ir_run
    image = tmp_path / "one.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 100, np.uint8)).save(image)
    out = tmp_path / "out"
    xml = run_dir / "model-fp16.xml"
    assert_ok(
        main_in_process(
            *args,
            "DATASET.datadir=/nonexistent",
            "--mode",
            "predict",
            "--input",
            str(image),
            "--backend",
            "openvino",
            "--checkpoint",
            str(xml),
            "--output",
            str(out),
        )
    )
    assert [r["picture"] for r in _rows(out / "predictions.csv")] == ["one.png.png"]


def test_openvino_mistakes_are_one_line_errors(ir_run, trained_run, tmp_path: Path) -> None:
    _, args, _ = ir_run
    image = tmp_path / "one.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 100, np.uint8)).save(image)
    fresh = trained_run.copy_to(tmp_path / "runs")  # no IR exported there
    fresh_args = trained_run.args(tmp_path / "runs")
    assert fresh.is_dir()
    result = main_in_process(*fresh_args, "--mode", "predict", "--input", str(image), "--backend", "openvino")
    assert_user_error(result, "model-fp32.xml", "EXPORT.format=openvino")
    broken = tmp_path / "broken.xml"
    broken.write_text("<net>not an IR")
    result = main_in_process(
        *args,
        "--mode",
        "predict",
        "--input",
        str(image),
        "--backend",
        "openvino",
        "--checkpoint",
        str(broken),
        "--output",
        str(tmp_path / "o"),
    )
    assert_user_error(result, "cannot load OpenVINO IR", "broken.xml")
    result = main_in_process(
        *args,
        "--mode",
        "export",
        "EXPORT.format=openvino",
        "EXPORT.precision=int8",
        "DATASET.datadir=/nonexistent",
        "--input",
        str(image),
    )
    assert_user_error(result, "int8 calibrates on the normal training images")


def _tiny_graph():
    """image -> conv -> tanh -> (grid for a GridSample of the image) -> conv -> 1 - x -> output: the shape of DMAD's
    graph in four nodes (a learned grid, a warp, features, a map after the last convolution)."""
    import openvino.opset13 as ops

    rng = np.random.RandomState(0)
    image = ops.parameter([-1, 3, 16, 16], np.float32, name="image")
    field = ops.tanh(
        ops.convolution(
            image, ops.constant(rng.randn(2, 3, 3, 3).astype(np.float32) * 0.3), [1, 1], [1, 1], [1, 1], [1, 1]
        )
    )
    grid = ops.transpose(field, ops.constant(np.array([0, 2, 3, 1], np.int64)))
    warped = ops.grid_sample(image, grid, {"align_corners": True, "mode": "bilinear", "padding_mode": "zeros"})
    features = ops.convolution(
        warped, ops.constant(rng.randn(4, 3, 3, 3).astype(np.float32)), [1, 1], [1, 1], [1, 1], [1, 1]
    )
    anomaly = ops.subtract(ops.constant(np.float32(1)), features)
    anomaly.output(0).set_names({"anomaly_map"})
    return ov.Model([anomaly], [image], "tiny")


def test_sensitive_nodes_and_the_split_keep_float32_results() -> None:
    model = _tiny_graph()
    names = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    sensitive = {names[n] for n in sensitive_nodes(model)}
    assert sensitive == {
        "Tanh",
        "Transpose",
        "GridSample",
        "Subtract",
    }  # the grid, the warp and the tail; not the convolutions
    x = np.random.RandomState(1).rand(2, 3, 16, 16).astype(np.float32)
    reference = IRRunner(model, "tiny", 1).run({"image": x})["anomaly_map"]
    model.set_rt_info("fp16", ["tnvision", "precision"])
    runner = IRRunner(model, "tiny", 1)
    got = runner.run({"image": x})["anomaly_map"]
    if runner.low == "bf16":  # low-precision convolutions between float32 segments
        assert len(runner.segments) >= 3 and [s.precision for s in runner.segments][-1] == "f32"
    np.testing.assert_allclose(got, reference, rtol=0, atol=0.05 * float(np.ptp(reference)))
    again = runner.run({"image": x[:1]})["anomaly_map"]  # a smaller batch after a larger one
    np.testing.assert_allclose(again, got[:1], rtol=0, atol=1e-6)
    assert torch.from_numpy(got).isfinite().all()


@pytest.mark.slow
def test_benchmark_prints_one_table_of_every_backend(ir_run) -> None:
    run_dir, args, _ = ir_run
    result = main_in_process(
        *args,
        "--mode",
        "benchmark",
        "BENCHMARK.backends=true",
        "BENCHMARK.eval_images=4",
        "BENCHMARK.openvino=[fp32,fp16]",  # int8 (NNCF calibration, half the time) is covered by the export tests
        "--checkpoint",
        str(run_dir / "model.pt"),
    )
    assert_ok(result)
    rows = [
        line.split("|")[1:-1]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| backend")
    ]
    names = [r[0].strip() for r in rows]
    assert names[0] == "PyTorch fp32" and {"ONNX Runtime fp32", "OpenVINO fp32"} <= set(names)
    assert not any("int8" in n for n in names)  # BENCHMARK.openvino leaves it out
    assert any(n.startswith("OpenVINO fp16") for n in names)
    for row in rows:
        assert float(row[1].split()[0]) > 0  # images/s
        if row[0].strip() in ("ONNX Runtime fp32", "OpenVINO fp32"):
            assert float(row[5]) <= TOLERANCE and float(row[6]) <= TOLERANCE  # map and score differences
    assert "conditions: cpu:" in result.stdout


# --------------------------------------------------------------------------------------------- the video half
@pytest.fixture(scope="module")
def video_ir_run(video_data: Path, video_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the shared video run with model-fp32/fp16/int8.xml (the export's stdout by precision), the first 10
    frames of a test video and the torch predict rows on them."""
    from helpers import run_dir, video_args

    savedir = tmp_path_factory.mktemp("video-openvino") / "runs"
    shutil.copytree(video_run, savedir, ignore=shutil.ignore_patterns(".lock"))
    exports = {}
    for precision in ("fp32", "fp16", "int8"):
        result = main_in_process(
            *video_args(video_data, savedir, mode="export"),
            "EXPORT.format=openvino",
            f"EXPORT.precision={precision}",
            "EXPORT.calibration_images=4",
            "EXPORT.check_videos=1",
        )
        assert_ok(result)
        exports[precision] = result.stdout
    frames = tmp_path_factory.mktemp("video-openvino-input") / "clip"
    frames.mkdir()
    for source in sorted((video_data / "video_demo" / "testing" / "frames" / "01").iterdir())[:10]:
        shutil.copy(source, frames / source.name)
    out = frames.parent / "torch"
    assert_ok(
        main_in_process(*video_args(video_data, savedir, mode="predict"), "--input", str(frames), "--output", str(out))
    )
    return video_args(video_data, savedir, mode="predict"), run_dir(savedir), exports, frames, _rows(out / "clip.csv")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_video_ir_export_and_predict_round_trip(video_ir_run, tmp_path: Path, precision: str) -> None:
    from task.anomaly.unsupervised.video.openvino import SCORE_TOLERANCES

    args, run_dir, exports, frames, torch_rows = video_ir_run
    report = next(line for line in exports[precision].splitlines() if line.startswith(f"OpenVINO {precision} check"))
    found = dict(re.findall(r"(\w+) max \|diff\| \S+ \((\S+) of", report))
    assert set(found) == {"predicted_frame", "error_map", "score_deformation", "score_prediction", "score_gradient"}
    for name, relative in found.items():
        bound = TOLERANCES[precision] if name in ("predicted_frame", "error_map") else SCORE_TOLERANCES[precision]
        assert float(relative) <= bound, report
    assert re.search(
        r"on 1 labelled test video\(s\), \d+ frames: frame AUROC \(online\) \S+ -> \S+ \([+-]\S+\); \d+ frame alarm",
        exports[precision],
    )
    model = ov.Core().read_model(str(run_dir / f"model-{precision}.xml"))
    meta = read_metadata(model)
    assert meta["precision"] == precision and json.loads(meta["calibration"])["threshold"] is not None
    assert [i.get_any_name() for i in model.inputs] == ["clip", "target"]

    out = tmp_path / "out"
    result = main_in_process(
        *args, f"EXPORT.precision={precision}", "--input", str(frames), "--backend", "openvino", "--output", str(out)
    )
    assert_ok(result)
    rows = _rows(out / "clip.csv")
    assert [r["frame"] for r in rows] == [r["frame"] for r in torch_rows] and (out / "clip.gif").is_file()
    scored = [(float(a["score"]), float(b["score"]), a, b) for a, b in zip(torch_rows, rows) if a["score"]]
    assert scored and all(np.isfinite(b) for _, b, _, _ in scored)
    if precision == "fp32":  # float32 on both sides: the same online scores and alarms
        span = max(max(a for a, *_ in scored) - min(a for a, *_ in scored), 1e-6)
        assert all(abs(a - b) <= 1e-4 * span and ra["prediction"] == rb["prediction"] for a, b, ra, rb in scored)


def test_video_predict_without_an_ir_is_a_one_line_error(video_data: Path, video_run: Path, tmp_path: Path) -> None:
    from helpers import video_args

    result = main_in_process(
        *video_args(video_data, video_run, mode="predict"), "--input", str(tmp_path), "--backend", "openvino"
    )
    assert_user_error(result, "model-fp32.xml", "EXPORT.format=openvino")


def test_backend_auto_picks_a_current_ir_on_the_cpu(video_ir_run, tmp_path: Path) -> None:
    from task.anomaly.unsupervised.deploy.ir_runner import has_bf16_units
    from task.anomaly.unsupervised.deploy.openvino import with_auto_backend
    from task.anomaly.unsupervised.engine.modes import ModeOptions

    _, run_dir, _, _, _ = video_ir_run
    auto = ModeOptions(backend="auto")
    chosen = with_auto_backend(auto, run_dir, "cpu")
    expected = "model-fp16.xml" if has_bf16_units(ov.Core()) else "model-fp32.xml"  # never int8
    assert chosen.backend == "openvino" and chosen.checkpoint == str(run_dir / expected)
    assert with_auto_backend(auto, run_dir, "cuda").backend == "torch"
    retrained = tmp_path / "model.pt"  # a checkpoint the IRs beside it do not come from
    retrained.write_bytes((run_dir / "model.pt").read_bytes() + b"\0")
    for name in ("model-fp16.xml", "model-fp16.bin", "model-fp32.xml", "model-fp32.bin"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    assert with_auto_backend(ModeOptions(backend="auto", checkpoint=str(retrained)), run_dir, "cpu").backend == "torch"


def test_video_benchmark_prints_one_table_of_clips(video_ir_run) -> None:
    args, run_dir, _, _, _ = video_ir_run
    bench = [a if a != "predict" else "benchmark" for a in args]
    result = main_in_process(
        *bench, "BENCHMARK.backends=true", "BENCHMARK.eval_images=4", "BENCHMARK.openvino=[fp16]",
        "--checkpoint", str(run_dir / "model.pt"),
    )  # fmt: skip
    assert_ok(result)
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    names = [r[0].strip() for r in rows]
    assert names[0] == "PyTorch fp32" and "ONNX Runtime fp32" in names and names[-1].startswith("OpenVINO fp16")
    assert all(float(r[1].split()[0]) > 0 for r in rows)  # clips/s
    onnx = rows[names.index("ONNX Runtime fp32")]
    assert float(onnx[5]) <= TOLERANCE and float(onnx[6]) <= TOLERANCE  # error map and raw scores as the export
    wrong = main_in_process(*bench, "BENCHMARK.backends=true", "BENCHMARK.openvino=[fp8]")
    assert_user_error(wrong, "BENCHMARK.openvino lists 'fp8'", "fp32, fp16, int8")
