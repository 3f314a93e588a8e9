"""--watch: new images of a folder are scored once each, when completely written, also across a restart and a crash."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, assert_ok, assert_user_error, cpu_env, main_in_process
from task.anomaly.unsupervised.image.predict import CSV_HEADER, Runner
from task.anomaly.unsupervised.image.watch import STATE_FILE, WatchLimits, watch_folder
from task.anomaly.unsupervised.records import InferenceOutput
from task.common.errors import UserError

POLL = 0.05


class Brightness(torch.nn.Module):
    """A stand-in model: the anomaly map is the image's mean channel, the score its maximum."""

    def forward(self, images: torch.Tensor) -> InferenceOutput:
        maps = images.mean(1, keepdim=True)
        return InferenceOutput(maps, maps.flatten(1).amax(1))


def _runner() -> Runner:
    return Runner(Brightness(), (32, 32), {"image": 1.0, "pixel": 1.0}, batch_size=2, region_min_area=4)


def _png(seed: int, spot: bool) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 90, (40, 40, 3)).astype(np.uint8)
    if spot:
        pixels[10:20, 22:30] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_slowly(folder: Path, names: list[str], pause: float) -> threading.Thread:
    """Each image: half its bytes, a pause (several polls: the half file is stable, and does not decode), the rest;
    every third goes to a hidden temporary name first and is renamed into place."""

    def run() -> None:
        for i, name in enumerate(names):
            data = _png(i + hash(name) % 1000, spot=i % 2 == 0)
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name("." + target.name + ".tmp") if i % 3 == 2 else target
            with open(partial, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                time.sleep(pause)
                handle.write(data[len(data) // 2 :])
            if partial != target:
                os.replace(partial, target)
            time.sleep(pause / 2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_each_image_is_scored_once_when_complete_also_across_a_restart(tmp_path: Path, caplog) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    first = ["a.png", "b.png", "sub/c.png", "d.png"]
    writer = _write_slowly(inbox, first, pause=6 * POLL)
    with caplog.at_level("WARNING"):
        assert watch_folder(_runner(), inbox, out, "test", WatchLimits(max_images=4, duration=60, poll_s=POLL)) == 4
    writer.join()
    assert "does not decode (yet)" in caplog.text  # a half-written file stood still long enough to be tried
    rows = _rows(out)
    assert sorted(Path(r["path"]).relative_to(inbox).as_posix() for r in rows) == sorted(first)
    assert list(rows[0]) == CSV_HEADER
    for row in rows:
        spot = json.loads(row["regions"])
        assert row["verdict"] in ("OK", "NG") and (out / row["picture"]).is_file()
        if row["verdict"] == "NG":  # the bright spot: one region, its box in the 40 x 40 input's pixels
            assert len(spot) == 1 and spot[0]["box"][0] in range(20, 24) and spot[0]["box"][1] in range(8, 12)
    assert json.loads((out / STATE_FILE).read_text())["done"] == sorted(first)

    # Restart: the scored images are not scored again; new ones are, including one that was there before the start.
    (inbox / "e.png").write_bytes(_png(50, spot=True))
    writer = _write_slowly(inbox, ["f.png"], pause=4 * POLL)
    assert watch_folder(_runner(), inbox, out, "test", WatchLimits(max_images=2, duration=60, poll_s=POLL)) == 2
    writer.join()
    names = [Path(r["path"]).name for r in _rows(out)]
    assert sorted(names) == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]

    # A crash after the row was written but before the state file was: predictions.csv still says it is done.
    # A crash in the middle of a row: the partial row is dropped and that image scored again, once.
    state = json.loads((out / STATE_FILE).read_text())
    state["done"].remove("e.png")
    (out / STATE_FILE).write_text(json.dumps(state))
    (inbox / "g.png").write_bytes(_png(60, spot=False))
    with open(out / "predictions.csv", "a") as handle:
        handle.write(str(inbox / "g.png") + ",0.12")
    assert watch_folder(_runner(), inbox, out, "test", WatchLimits(duration=8 * POLL, poll_s=POLL)) == 1
    names = [Path(r["path"]).name for r in _rows(out)]
    assert sorted(names) == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png"]


def test_a_signal_stops_the_watch_cleanly(trained_run, tmp_path: Path) -> None:
    """SIGTERM to a watching predict (a process of its own, as an inspection line runs it): exit 0, every output
    complete."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    source = next((trained_run.category_dir / "test").rglob("*.png"))
    (inbox / "one.png").write_bytes(source.read_bytes())
    args = trained_run.args(None, "--mode", "predict", "--input", str(inbox), "--output", str(out), "--watch")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), *args, "--duration", "120"],
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 100
        while not (out / "predictions.csv").is_file() or not _rows(out):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-2000:]
    assert len(_rows(out)) == 1 and (out / "predictions.csv").read_text().endswith("\n")


def test_refusals(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with pytest.raises(UserError, match="inside the input folder"):
        watch_folder(_runner(), inbox, inbox / "out", "test", WatchLimits(duration=0.1))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions.csv").write_text("mine\n")
    with pytest.raises(UserError, match="not written by predict"):
        watch_folder(_runner(), inbox, tmp_path / "out", "test", WatchLimits(duration=0.1))


def test_watch_from_the_command_line(trained_run, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = next((trained_run.category_dir / "test").rglob("*.png"))
    (inbox / "one.png").write_bytes(source.read_bytes())
    args = trained_run.args(
        None, "--mode", "predict", "--input", str(inbox), "--output", str(tmp_path / "out"), "--watch"
    )
    result = main_in_process(*args, "--max-images", "1", "--duration", "60")
    assert_ok(result)
    assert [Path(r["path"]).name for r in _rows(tmp_path / "out")] == ["one.png"]
    assert_user_error(main_in_process(*args, "--max-images", "0"), "--max-images")
