"""Live video: the running online score equals the file protocol, alarm events, and predict on a loopback stream
served by ffmpeg (HTTP, ``-listen 1``), including a stream that dies mid-way and comes back."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import REPO, VIDEO_YAML, assert_ok, assert_user_error, cpu_env, main_in_process, run_dir, video_args
from task.anomaly.unsupervised.scoring.protocols import online_frame_scores
from task.anomaly.unsupervised.scoring.running import RunningOnlineScore
from task.anomaly.unsupervised.scoring.settings import ProtocolParams
from task.anomaly.unsupervised.video.alarms import AlarmTracker
from task.anomaly.unsupervised.video.live_source import is_live_source, source_name

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(
    FFMPEG is None, reason="ffmpeg is not installed (apt-get install -y ffmpeg; .ci/run does it)"
)


def _params(post_smooth: bool, kalman: bool, adapt: str) -> ProtocolParams:
    """The video demo's SCORE settings with POST_SMOOTH, KALMAN and ONLINE.adapt switched as asked."""
    from task.common.config import read_yaml

    config = ProtocolParams.from_config(read_yaml(str(VIDEO_YAML))["SCORE"]).to_config()
    config["POST_SMOOTH"]["enabled"] = post_smooth
    config["KALMAN"]["enabled"] = kalman
    config["ONLINE"]["adapt"] = adapt
    return ProtocolParams.from_config(config)


@pytest.mark.parametrize(
    ("post_smooth", "kalman", "adapt"), [(False, False, "range"), (True, True, "running"), (False, False, "none")]
)
def test_the_running_score_is_the_online_protocol(post_smooth: bool, kalman: bool, adapt: str) -> None:
    params = _params(post_smooth, kalman, adapt)
    rng = np.random.default_rng(0)
    raw = {name: rng.normal(1.0, 0.3, 70) for name in params.names}
    stats = {name: {"low": 0.5, "high": 1.6} for name in params.names}
    expected = online_frame_scores({n: [v] for n, v in raw.items()}, stats, params)[0]
    running = RunningOnlineScore(stats, params)
    got = [running.push({n: raw[n][t] for n in params.names}) for t in range(70)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert all(len(h) <= params.online.window for h in running.history.values())  # bounded memory


def test_alarm_events_have_hysteresis_and_a_minimum_duration() -> None:
    scores = [0.1, 0.9, 0.2, 0.9, 0.9, 0.9, 0.75, 0.9, 0.6, 0.1, 0.95, 0.95]
    tracker = AlarmTracker(threshold=0.8, hysteresis=0.1, min_frames=3)
    confirmed, finished = [], []
    for frame, score in enumerate(scores):
        started, ended = tracker.update(frame, float(frame), score)
        confirmed += [started.start_frame] if started else []
        finished += [(ended.start_frame, ended.end_frame, ended.peak_frame, ended.frames)] if ended else []
    assert confirmed == [3]  # frame 1 alone was noise; frames 10-11 are too short to be confirmed
    assert finished == [(3, 7, 3, 5)]  # 0.75 >= 0.8 - 0.1 keeps it going, 0.6 ends it at frame 7
    assert tracker.close() is None


def test_live_source_names() -> None:
    assert all(map(is_live_source, ["rtsp://cam/live", "HTTP://127.0.0.1:8/x", "0", "/dev/video2", "udp://@:1234"]))
    assert not any(map(is_live_source, ["clip.mp4", "frames/", "", None, "/dev/sda", "1234"]))
    assert source_name("rtsp://user:secret@10.0.0.5:554/stream1") == "10.0.0.5_554_stream1"
    assert source_name("0") == "camera0" and source_name("/dev/video3") == "video3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(clip: Path, port: int) -> subprocess.Popen:
    """ffmpeg sends ``clip`` in a loop, in real time, as MPEG-TS (MPEG-2 video: its headers repeat in the stream, so a
    client can start anywhere) to the first client of http://127.0.0.1:port/live, until it is killed."""
    return subprocess.Popen(
        [
            FFMPEG,
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-stream_loop",
            "-1",
            "-i",
            str(clip),
            "-c:v",
            "mpeg2video",
            "-q:v",
            "4",
            "-f",
            "mpegts",
            "-listen",
            "1",
            f"http://127.0.0.1:{port}/live",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class LiveRun:
    args: list[str]  # main.py arguments of a copy of the suite's trained video run
    root: Path

    def call(self, *extra: str):
        return main_in_process(*self.args, *extra)

    def run(self, *extra: str) -> subprocess.CompletedProcess:
        process = self.spawn(*extra)
        stdout, stderr = process.communicate(timeout=300)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def spawn(self, *extra: str) -> subprocess.Popen:
        """``python main.py`` in a process of its own: OpenCV's FFmpeg threads and the SIGINT stay out of pytest's."""
        command = [sys.executable, str(REPO / "main.py"), *self.args, *extra]
        return subprocess.Popen(
            command, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )


@pytest.fixture(scope="module")
def live_run(video_data: Path, video_run: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveRun:
    """A copy of the suite's trained video run (grey 64x64 demo, clips of 4) that predict writes beside."""
    root = tmp_path_factory.mktemp("video-live")
    shutil.copytree(video_run, root / "runs", ignore=shutil.ignore_patterns(".lock"))
    assert (run_dir(root / "runs") / "model.pt").is_file()
    return LiveRun(video_args(video_data, root / "runs"), root)


@pytest.fixture(scope="module")
def clip(live_run: LiveRun, video_data: Path) -> Path:
    """A 4-second clip (40 frames at 10 fps) of one of the demo's test videos."""
    frames = sorted((video_data / "video_demo" / "testing" / "frames" / "01").iterdir())[:40]
    assert len(frames) == 40, "the video demo layout changed"
    first = cv2.imread(str(frames[0]))
    path = live_run.root / "live.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (first.shape[1], first.shape[0]))
    for frame in frames:
        writer.write(cv2.imread(str(frame)))
    writer.release()
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@needs_ffmpeg
def test_predict_on_a_loopback_stream_reconnects_and_stops_cleanly(
    live_run: LiveRun, clip: Path, tmp_path: Path
) -> None:
    """Predict scores a stream served over loopback (CSV, summary, live plot, alarm events with snapshots); the server
    dies after a few scored frames and comes back 0.5 s later; predict reconnects and scores frames that arrived after
    the restart; --max-frames then stops it cleanly (the reader thread included; signals stop it the same way, as the
    watch tests check). One predict process for all of it: each costs seconds to start."""
    port = _free_port()
    out = tmp_path / "out"
    table = out / f"127.0.0.1_{port}_live.csv"
    servers = [_serve(clip, port)]
    restarted: list[str] = []

    def scored() -> list[dict[str, str]]:
        return _rows(table) if table.is_file() else []

    def control() -> None:
        deadline = time.monotonic() + 80
        while len(scored()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        servers[0].kill()
        servers[0].wait()
        time.sleep(0.5)  # the stream is away: predict retries with backoff (0.5 s, 1 s, ...)
        restarted.append(datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        servers.append(_serve(clip, port))

    # The server plays 10 frames/s and is killed 2-4 scored frames in, so frames 12 comes well after the restart.
    process = live_run.spawn(
        "--mode", "predict", "--input", f"http://127.0.0.1:{port}/live", "--output", str(out), "--duration", "90",
        "--max-frames", "12", "STREAM.plot_interval_s=0.5", "STREAM.min_alarm_frames=1", "STREAM.hysteresis=0",
    )  # fmt: skip
    thread = threading.Thread(target=control)
    thread.start()
    try:
        stdout, stderr = process.communicate(timeout=150)
    finally:
        thread.join()
        process.kill()
        for server in servers:
            server.kill()
            server.wait()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert_ok(result)
    summary = json.loads((out / f"127.0.0.1_{port}_live.stream.json").read_text())
    assert summary["stopped"] == "--max-frames reached" and summary["frames_scored"] == 12, summary
    assert summary["reconnections"] >= 1 and summary["disconnected_s"] > 0, summary
    rows = scored()
    frames = [int(r["frame"]) for r in rows]
    assert frames == sorted(set(frames)) and frames[0] >= 4  # the first frame scored has 4 frames before it
    after = [r for r in rows if r["time"] > restarted[0]]
    assert after and len(after) < len(rows)  # frames scored before the drop and after the reconnection
    assert table.read_text().endswith("\n")
    # Every frame read was scored, was context of a scored one, or was dropped to keep up (never queued).
    assert summary["frames_scored"] == len(rows) and summary["frames_read"] >= len(rows) + 4
    assert summary["latency_ms_mean"] > 0
    assert [int(r["dropped"]) for r in rows] == sorted(int(r["dropped"]) for r in rows)
    name = f"127.0.0.1_{port}_live"
    assert (out / f"{name}.plot.png").is_file()
    events = [json.loads(line) for line in (out / f"{name}.events.jsonl").read_text().splitlines()]
    alarmed = [int(r["frame"]) for r in rows if r["prediction"] == "1"]
    assert bool(events) == bool(alarmed)  # one-frame events: every alarmed frame is in an event
    for event in events:
        assert (out / event["snapshot"]).is_file() and event["start_frame"] <= event["peak_frame"] <= event["end_frame"]


def test_stream_errors(live_run: LiveRun, tmp_path: Path) -> None:
    predict = ("--mode", "predict", "--input", "rtsp://127.0.0.1:9/none", "--output", str(tmp_path / "out"))
    assert_user_error(live_run.call(*predict, "--max-frames", "0"), "--max-frames")
    assert_user_error(live_run.call(*predict, "--duration", "-1"), "--duration")


def test_stream_scores_equal_predict_on_the_file(live_run: LiveRun, clip: Path, tmp_path: Path) -> None:
    """The stream path (frame conversion, one-clip batches, running online score) gives the scores that --mode
    predict gives for a file of the same frames."""
    import torch

    import task.anomaly.unsupervised.models.available  # noqa: F401  (registers the methods)
    from task.anomaly.unsupervised.engine.engine import Engine
    from task.anomaly.unsupervised.engine.modes import ModeOptions
    from task.anomaly.unsupervised.engine.schema import method_schema
    from task.anomaly.unsupervised.models.registry import get_method
    from task.anomaly.unsupervised.video.live_source import Frame
    from task.anomaly.unsupervised.video.predict import serving_from
    from task.anomaly.unsupervised.video.stream import StreamScorer
    from task.common.config import load_config

    result = live_run.call("--mode", "predict", "--input", str(clip), "--output", str(tmp_path / "file"))
    assert_ok(result)
    expected = {int(r["frame"]): float(r["score"]) for r in _rows(tmp_path / "file" / "live.csv") if r["score"]}

    method = get_method("anomaly", "unsupervised", "dmad", "video")
    overrides = [a for a in live_run.args if "=" in a and not a.startswith("-")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        engine = Engine(method, load_config(method_schema(method), str(VIDEO_YAML), overrides))
    scorer = StreamScorer(method, serving_from(engine, ModeOptions()))
    capture = cv2.VideoCapture(str(clip))
    frames = []
    while True:
        ok, pixels = capture.read()
        if not ok:
            break
        frames.append(Frame(len(frames), 0.0, pixels, 0))
    capture.release()
    assert not scorer.needs_video(scorer.converted(frames[0]))  # a shared background: nothing per video
    got = {t: scorer.score(frames[t - 4 : t + 1])[0] for t in range(4, len(frames))}
    assert sorted(got) == sorted(expected)
    # The online protocol scales each score by its video's own range of past frames (ONLINE.adapt; at least half the
    # calibration spread with range, 5 % with running), so float32 differences between batched (file) and one-clip
    # (stream) inference reach the score up to ~20x larger than with the calibration spread alone (2e-6): same
    # protocol, same values to that rounding.
    np.testing.assert_allclose([got[t] for t in sorted(got)], [expected[t] for t in sorted(got)], rtol=0, atol=1e-3)
