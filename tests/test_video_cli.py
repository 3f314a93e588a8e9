"""The video half end to end through main.py: train, outputs, resume, test, score, and bad input as one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_ok, assert_user_error, main_in_process, run_dir, video_args
from task.anomaly.unsupervised.scoring.score_file import read_scores


def test_training_writes_every_video_output(video_run: Path) -> None:
    out = run_dir(video_run)
    for name in (
        "model.pt",
        "last.pt",
        "metrics.json",
        "run.json",
        "frame_scores.csv",
        "scores.npz",
        "video_demo.gif",
        "train.log",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "plots").iterdir()) == [f"{i:02d}.png" for i in range(1, 7)]
    assert sorted(p.name for p in (out / "curves").iterdir()) == ["pr_frame.png", "roc_frame.png"]  # paper, online
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("frame_auroc", "frame_aupr", "frame_auroc_online", "frame_aupr_online", "online_threshold"):
        assert 0.0 <= metrics[key] <= 1.0 or key == "online_threshold", key
    assert set(metrics["per_video_auroc"]) == {f"{i:02d}" for i in range(1, 7)}
    scores = read_scores(out / "scores.npz")
    assert scores.clip_length == 4 and len(scores.videos) == 6 and scores.threshold == metrics["online_threshold"]
    # every frame after the first clip is scored, and the CSV has one row per scored frame
    assert all(np.array_equal(f, np.arange(4, 72)) for f in scores.frames)
    assert len((out / "frame_scores.csv").read_text().splitlines()) == 1 + 6 * 68


def test_score_mode_recomputes_the_metrics_from_scores_npz(video_run: Path) -> None:
    out = run_dir(video_run)
    result = main_in_process(
        *video_args(out.parent.parent.parent, video_run, "--input", str(out / "scores.npz"), mode="score")
    )
    assert_ok(result)
    recomputed = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    metrics = json.loads((out / "metrics.json").read_text())
    # the same raw scores through the same numpy code: identical to the last bit
    assert recomputed["frame_auroc"] == metrics["frame_auroc"]
    assert recomputed["frame_auroc_online"] == metrics["frame_auroc_online"]


def test_resume_continues_from_last_pt(video_data: Path, video_run: Path, tmp_path: Path, caplog) -> None:
    savedir = tmp_path / "runs"
    shutil.copytree(video_run, savedir)
    caplog.set_level("INFO")
    assert_ok(
        main_in_process(
            *video_args(
                video_data, savedir, "TRAIN.num_training_steps=3", "TRAIN.save_interval=1", "TEST.save_images=false"
            )
        )
    )
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    assert torch.load(run_dir(savedir) / "last.pt", weights_only=True)["step"] == 3


def test_test_mode_reproduces_the_training_metrics(video_data: Path, video_run: Path, tmp_path: Path) -> None:
    savedir = tmp_path / "runs"
    shutil.copytree(video_run, savedir)
    metrics = json.loads((run_dir(savedir) / "metrics.json").read_text())
    assert_ok(main_in_process(*video_args(video_data, savedir, "TEST.save_images=false", mode="test")))
    again = json.loads((run_dir(savedir) / "metrics.json").read_text())
    # same weights, same stored calibration, same CPU code path: the scores are recomputed identically
    assert again["frame_auroc"] == pytest.approx(metrics["frame_auroc"], abs=1e-9)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "breakage, needles",
    [
        ("labels-missing", ("no frame labels found", "DATASET.labels")),
        ("labels-length", ("432", "408", "labels")),
        ("video-too-short", ("has 3 frames but a clip needs 5", "training/frames/01")),
        ("frame-unreadable", ("cannot read", "000.png")),
        # refused at scan time / from the config, before any training
        ("duplicate-video-names", ("video name(s) repeat", "01.avi", "01.mp4")),
        ("test-name-trailing-space", ("testing/frames/03 ", "surrounding spaces")),
        ("smooth-window-too-long", ("SCORE.SMOOTH.size=100 is longer than every video", "68 scored frames")),
        ("deformation-window-too-large", ("MODEL.deformation_window=[1000, 1000] is larger than the frames", "64, 64")),
    ],
)
def test_bad_video_input_is_a_one_line_error(
    video_data: Path, tmp_path: Path, breakage: str, needles: tuple[str, ...]
) -> None:
    data = _copy(video_data, tmp_path / "data")
    root = data / "video_demo"
    labels = next(root.glob("frame_labels_*.npy"))
    if breakage == "labels-missing":
        labels.unlink()
    elif breakage == "labels-length":
        np.save(labels, np.zeros(431, dtype=np.int64))
    elif breakage == "video-too-short":
        frames = sorted((root / "training" / "frames" / "01").iterdir(), key=lambda p: int(p.stem))
        for frame in frames[3:]:
            frame.unlink()
    elif breakage == "frame-unreadable":
        (root / "testing" / "frames" / "01" / "000.png").write_bytes(b"not an image")
    elif breakage == "duplicate-video-names":
        shutil.rmtree(root / "testing" / "frames")
        for name, fourcc in (("01.avi", "MJPG"), ("01.mp4", "mp4v")):
            _write_video(root / "testing" / "videos" / name, fourcc)
    elif breakage == "test-name-trailing-space":
        (root / "testing" / "frames" / "03").rename(root / "testing" / "frames" / "03 ")
    extra = {
        "smooth-window-too-long": ["SCORE.SMOOTH.size=100", "SCORE.SMOOTH.weights=null"],
        "deformation-window-too-large": ["MODEL.deformation_window=[1000,1000]"],
    }.get(breakage, [])
    result = main_in_process(*video_args(data, tmp_path / "runs", "TRAIN.num_training_steps=1", *extra))
    assert_user_error(result, *needles)
    assert not (tmp_path / "runs" / "dmad" / "video_demo" / "model.pt").exists()


def _write_video(path: Path, fourcc: str) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (64, 64))
    for value in range(8):
        writer.write(np.full((64, 64, 3), 30 * value, np.uint8))
    writer.release()


def test_failing_test_mode_keeps_the_good_metrics(video_data: Path, video_run: Path, tmp_path: Path) -> None:
    """A test set that cannot be evaluated (a video named '03 ') stops --mode test before it writes anything."""
    savedir = tmp_path / "runs"
    shutil.copytree(video_run, savedir)
    data = _copy(video_data, tmp_path / "data")
    (data / "video_demo" / "testing" / "frames" / "03").rename(data / "video_demo" / "testing" / "frames" / "03 ")
    outputs = [p for p in run_dir(savedir).iterdir() if p.is_file() and p.suffix in (".json", ".npz", ".csv", ".pt")]
    before = {p.name: p.read_bytes() for p in outputs}
    assert_user_error(main_in_process(*video_args(data, savedir, mode="test")), "03 ", "surrounding spaces")
    after = {name: (run_dir(savedir) / name).read_bytes() for name in before}
    assert after == before


def test_all_normal_test_labels_give_null_metrics_and_a_reason(
    video_data: Path, video_run: Path, tmp_path: Path, caplog
) -> None:
    """As image runs without defective images: a warning and null metrics, not a hard error."""
    savedir = tmp_path / "runs"
    shutil.copytree(video_run, savedir)
    np.save(tmp_path / "normal.npy", np.zeros(6 * 72, dtype=np.int64))
    with caplog.at_level("WARNING", logger="anomaly"):
        labels = f"DATASET.labels={tmp_path / 'normal.npy'}"
        args = video_args(video_data, savedir, labels, "TEST.save_images=false", mode="test")
        assert_ok(main_in_process(*args))
    metrics = json.loads((run_dir(savedir) / "metrics.json").read_text())
    assert metrics["frame_auroc"] is None and metrics["frame_auroc_online"] is None and metrics["online_tpr"] is None
    assert "no abnormal frame among the 408 scored frames" in caplog.text


def test_per_video_backgrounds_stay_the_training_videos(video_data: Path, tmp_path: Path) -> None:
    """Test videos are scored with their own median templates; the learned per-video templates of the 5 training
    videos are what training, recalibration and the saved checkpoints keep (6 test videos must not replace them)."""
    data = _copy(video_data, tmp_path / "data")
    shutil.rmtree(data / "video_demo" / "training" / "frames" / "06")
    per_video = ["DATASET.background=per_video", "MODEL.num_backgrounds=null", "TEST.save_images=false"]
    args = video_args(
        data,
        tmp_path / "runs",
        *per_video,
        "TRAIN.num_training_steps=2",
        "TRAIN.save_interval=1",
        "LOG.eval_interval=1",
    )
    assert_ok(main_in_process(*args))
    out = run_dir(tmp_path / "runs")
    for name in ("model.pt", "last.pt"):
        assert torch.load(out / name, weights_only=True)["state_dict"]["background.template"].shape[0] == 5, name
    # a changed SCORE section recalibrates on the training clips (indexed by training video) and tests again
    assert_ok(main_in_process(*video_args(data, tmp_path / "runs", *per_video, "SCORE.ONLINE.window=5", mode="test")))


def test_a_scoring_override_at_predict_follows_the_settings_rule(
    video_data: Path, video_run: Path, tmp_path: Path
) -> None:
    """The checkpoint's calibration belongs to its score settings: a differing override is an error naming both."""
    frames = video_data / "video_demo" / "testing" / "frames" / "01"
    result = main_in_process(
        *video_args(
            video_data,
            video_run,
            "--input",
            str(frames),
            "--output",
            str(tmp_path / "out"),
            "MODEL.prediction_score=mse",
            mode="predict",
        )
    )
    assert_user_error(result, "MODEL.prediction_score='mse'", "'l1'", "--mode test MODEL.prediction_score=mse")
    assert not (tmp_path / "out").exists()


def test_watch_on_a_video_run_is_a_one_line_error(video_data: Path, video_run: Path, tmp_path: Path) -> None:
    frames = video_data / "video_demo" / "testing" / "frames" / "01"
    args = video_args(video_data, video_run, "--input", str(frames), "--output", str(tmp_path / "out"), mode="predict")
    result = main_in_process(*args, "--watch")
    assert_user_error(result, "--watch", "needs an image run", "without --watch")
    assert not (tmp_path / "out").exists()
