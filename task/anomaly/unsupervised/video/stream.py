"""``--mode predict --input rtsp://... | http(s)://... | 0 | /dev/videoN``: the online protocol on a live source.

Frames are read by ``live_source.LiveSource`` (a thread keeping the latest ``clip_length + 1`` frames, so every scored
clip is made of consecutive frames and a slow model drops frames instead of queueing them). Each time a new frame is
there, the newest one is scored with the ``clip_length`` frames before it by the scorer ``video.predict.serving_from``
loads (``--backend torch`` or ``onnx``: the ``ClipScorer`` a video file goes through, given a batch of one clip) and
fused by ``RunningOnlineScore`` (the training statistics of the calibration, causal smoothing: the values
``--mode predict`` gives for a file of the same frames). Alarm events come from ``alarms.AlarmTracker`` (the
calibration's threshold, ``STREAM.hysteresis`` and ``STREAM.min_alarm_frames``).

What a method needs per video (``VideoMethod.scoring_context`` / ``video_inputs``; DMAD-PDM with per-video
background templates: the video's median frame) is computed from the stream's first ``STREAM.background_frames``
frames, saved as a frame folder in a temporary directory that stands for "the video"; a first frame tells whether the
method needs anything at all, so other models start scoring at once.

Outputs, in ``--output`` (default: ``predict/`` beside the model), named after the source (``camera0``,
``127.0.0.1_8554_live``, ...); the CSV and the events are appended to by a later run on the same source:

* ``<name>.csv``: ``frame,time,score,prediction,event,latency_ms,dropped`` per scored frame, flushed as it is written
  (``time``: the frame's arrival, ISO 8601 UTC; ``prediction`` 1: score >= threshold; ``event``: the alarm event the
  frame belongs to, once confirmed; ``latency_ms``: arrival to score; ``dropped``: frames skipped so far to keep up);
* ``<name>.events.jsonl``: one line per alarm event when it ends (``event``, ``start_frame``, ``end_frame``,
  ``start_time``, ``end_time``, ``frames``, ``peak_score``, ``peak_frame``, ``snapshot``, ``regions``, ``ended``);
* ``events/<name>_<event>.png``: the event's peak frame | error heatmap | regions, at the frame's size (longest side
  capped at 1024), regions of the error map above the highest ``STREAM.region_quantile`` quantile of the error maps
  of the last 256 normal frames (no regions before a normal frame has been seen: there is no pixel threshold);
* ``<name>.plot.png``: the latest ``STREAM.plot_frames`` scores with the threshold and alarms, every
  ``STREAM.plot_interval_s`` seconds and at the end;
* ``<name>.stream.json``: the run's summary (frames read/scored/dropped, reconnections and time disconnected, latency,
  events), written at the end.

Memory is bounded whatever the stream's length: the source keeps ``clip_length + 1`` frames, the scorer a window of
scores for the plot, the latencies of the last frames and one snapshot per open event. ``--max-frames`` (scored
frames), ``--duration`` (seconds), SIGINT/SIGTERM, or a source that stays away for ``STREAM.reconnect_timeout_s``
end the run after the frame in hand, with every output complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import tempfile
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from task.anomaly.unsupervised.data.video.clips import Video, video_from_path
from task.anomaly.unsupervised.deploy.append_log import AppendLog
from task.anomaly.unsupervised.deploy.output_folder import OutputFolder
from task.anomaly.unsupervised.deploy.stop import StopSignal
from task.anomaly.unsupervised.drawing import display_bounds, png_bytes
from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.engine.modes import ModeOptions
from task.anomaly.unsupervised.image.visualize import render_result
from task.anomaly.unsupervised.method import VideoMethod
from task.anomaly.unsupervised.regions import find_regions, regions_record, scale_regions
from task.anomaly.unsupervised.scoring.running import RunningOnlineScore
from task.anomaly.unsupervised.video.alarms import AlarmEvent, AlarmTracker
from task.anomaly.unsupervised.video.live_source import Frame, LiveSource, source_name
from task.anomaly.unsupervised.video.plots import render_score_plot
from task.common.errors import UserError
from task.common.io import atomic_write_bytes, write_json
from task.common.runtime import autocast

if TYPE_CHECKING:  # predict.py calls this module: the type only, no import at run time
    from task.anomaly.unsupervised.video.predict import VideoServing

log = logging.getLogger("anomaly")

CSV_COLUMNS = "frame,time,score,prediction,event,latency_ms,dropped"
MAX_SNAPSHOT_SIDE = 1024
_LATENCIES = 512  # latencies kept for the logged mean / 95th percentile
_NORMAL_LEVELS = 256  # recent normal frames whose error-map quantiles set the snapshot regions' threshold


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def convert_frame(pixels: np.ndarray, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """A decoded OpenCV frame (BGR or grey) -> uint8 [H, W, C] at model size, as the clips of a video file are made
    (grey or RGB, bilinear ``cv2.resize``)."""
    if pixels.ndim == 3 and grayscale:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    elif pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    elif not grayscale:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    pixels = cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, C] -> float [..., C, H, W] in [-1, 1] (``x / 127.5 - 1``, the clips' scale)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float().div(127.5).sub(1.0)


def _frame_folder(folder: Path, frames: list[np.ndarray]) -> Video:
    """``frames`` (uint8 [H, W, C] at model size) as a numbered PNG folder -> the Video that a method's per-video
    hooks take."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(frames):
        cv2.imwrite(
            str(folder / f"{i:05d}.png"), pixels if pixels.shape[2] == 1 else cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
        )
    return video_from_path(folder)


class StreamScorer:
    """Scores the newest frame of a window of consecutive frames: raw scores, the online score, the error map."""

    def __init__(self, method: VideoMethod, serving: VideoServing) -> None:
        self.method, self.serving = method, serving
        ds = serving.cfg.DATASET
        self.size, self.grayscale = (int(ds.resize[0]), int(ds.resize[1])), bool(ds.grayscale)
        self.online = RunningOnlineScore(serving.calibration.train_stats, serving.params)
        self.video_input: torch.Tensor | None = None  # [1, C, H, W]: the exported graph's per-video input
        self.ready = False  # the per-video state is set (or none is needed)
        self._converted: dict[int, np.ndarray] = {}
        self._context = contextlib.ExitStack()

    def converted(self, frame: Frame) -> np.ndarray:
        if frame.number not in self._converted:
            self._converted[frame.number] = convert_frame(frame.pixels, self.size, self.grayscale)
        return self._converted[frame.number]

    def forget_before(self, number: int) -> None:
        for key in [k for k in self._converted if k < number]:
            del self._converted[key]

    def needs_video(self, first: np.ndarray) -> bool:
        """Whether the method computes anything per video (tried on a one-frame video of ``first``)."""
        if self.serving.model is None:
            needed = bool(getattr(self.serving.scorer, "takes_video_input", False))
        else:
            with tempfile.TemporaryDirectory() as folder:
                needed = self.method.video_inputs(self.serving.cfg, [_frame_folder(Path(folder), [first])]) is not None
        self.ready = not needed
        return needed

    def set_video(self, frames: list[np.ndarray]) -> None:
        """The per-video state from the stream's first ``frames``, held until ``close``."""
        with tempfile.TemporaryDirectory() as folder:
            video = _frame_folder(Path(folder), frames)
            if self.serving.model is None:
                self.video_input = self.method.video_inputs(self.serving.cfg, [video])
            else:
                self._context.enter_context(
                    self.method.scoring_context(self.serving.model, self.serving.cfg, [video], None)
                )
        self.ready = True

    def close(self) -> None:
        self._context.close()

    @torch.no_grad()
    def score(self, window: list[Frame]) -> tuple[float, dict[str, float], np.ndarray]:
        """``window``: ``clip_length + 1`` consecutive frames -> (online score, raw scores, error map [h, w])."""
        serving = self.serving
        device = serving.device
        pixels = _to_tensor(np.stack([self.converted(f) for f in window]))
        batch = {
            "clip": pixels[None, :-1].to(device),
            "target": pixels[None, -1].to(device),
            "video": torch.zeros(1, dtype=torch.int64, device=device),
            "frame": torch.tensor([window[-1].number], device=device),
            "label": torch.full((1,), -1, dtype=torch.int64, device=device),
        }
        if self.video_input is not None:
            batch["video_input"] = self.video_input[:1].to(device)
        with autocast(device, serving.amp):
            scores, maps = serving.scorer(batch)
        raw = {name: float(values.float().reshape(-1)[0]) for name, values in scores.items()}
        return self.online.push(raw), raw, maps[0, 0].float().cpu().numpy()


def _snapshot(
    frame: Frame, error_map: np.ndarray, score: float, threshold: float, pixel_threshold: float, min_area: int
) -> tuple[bytes, list]:
    """PNG of frame | error heatmap | regions at the frame's size (capped), and the regions in the frame's pixels."""
    image = frame.pixels if frame.pixels.ndim == 3 else cv2.cvtColor(frame.pixels, cv2.COLOR_GRAY2BGR)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    height, width = image.shape[:2]
    found = find_regions(error_map, pixel_threshold, min_area)
    regions = scale_regions(found, width / error_map.shape[1], height / error_map.shape[0])
    scale = min(1.0, MAX_SNAPSHOT_SIDE / max(height, width))
    if scale < 1.0:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    resized = cv2.resize(error_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    shown = scale_regions(found, width / error_map.shape[1], height / error_map.shape[0])
    bounds = display_bounds(torch.from_numpy(resized), pixel_threshold)
    picture = render_result(
        np.ascontiguousarray(image), resized, bounds, score, threshold, pixel_threshold, regions=shown
    )
    return png_bytes(picture), regions


class StreamOutputs:
    """The files of one stream run (see the module docstring)."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.out_dir, self.name = out_dir, name
        self.csv_name, self.events_name = Path(f"{name}.csv"), Path(f"{name}.events.jsonl")
        self.plot_name, self.summary_name = Path(f"{name}.plot.png"), Path(f"{name}.stream.json")
        self.folder = OutputFolder(out_dir, Path(f"<{name}>"))  # a live source is no folder to write inside
        self.folder.claim([self.csv_name, self.events_name, self.plot_name, self.summary_name])
        self.table = AppendLog(out_dir / self.csv_name, CSV_COLUMNS)
        self.events = AppendLog(out_dir / self.events_name)
        self.event_count = sum(1 for line in self.events.lines() if line.strip())

    def row(self, cells: list[Any]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(cells)
        self.table.write(buffer.getvalue())

    def event(self, event: AlarmEvent, number: int, snapshot: tuple[bytes, list] | None, ended: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "event": number,
            "start_frame": event.start_frame,
            "end_frame": event.end_frame,
            "start_time": _iso(event.start_time),
            "end_time": _iso(event.end_time),
            "frames": event.frames,
            "peak_score": round(event.peak_score, 6),
            "peak_frame": event.peak_frame,
            "snapshot": None,
            "regions": [],
            "ended": ended,
        }
        if snapshot is not None:
            picture = Path("events") / f"{self.name}_{number:04d}.png"
            self.folder.claim([picture])
            atomic_write_bytes(self.out_dir / picture, lambda handle: handle.write(snapshot[0]))
            record["snapshot"], record["regions"] = picture.as_posix(), regions_record(snapshot[1])
        self.events.write(json.dumps(record) + "\n")
        return record

    def close(self) -> None:
        self.table.close()
        self.events.close()


def predict_stream(engine: Engine, options: ModeOptions, serving: VideoServing) -> dict[str, Any]:
    """Score the live source ``options.input`` with ``serving`` (``video.predict.serving_from``) until a stop; returns
    the summary (also ``<name>.stream.json``)."""
    if options.max_frames is not None and options.max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {options.max_frames}")
    if options.duration is not None and not options.duration > 0:
        raise UserError(f"--duration must be a positive number of seconds, got {options.duration}")
    settings = engine.cfg.STREAM
    serving.check()
    name = source_name(options.input)
    out_dir = Path(options.output).expanduser() if options.output else serving.source.parent / "predict"
    outputs = StreamOutputs(out_dir, name)
    threshold = serving.calibration.threshold
    scorer = StreamScorer(engine.method, serving)
    alarms = AlarmTracker(threshold, settings.hysteresis, settings.min_alarm_frames)
    window_size = int(serving.cfg.DATASET.clip_length) + 1
    source = LiveSource(options.input, window_size, settings.reconnect_timeout_s, settings.max_backoff_s)
    log.info(
        "predicting the live source %s with %s (%s); outputs in %s",
        options.input,
        serving.source,
        serving.backend,
        out_dir,
    )

    plot_scores: deque[tuple[int, float]] = deque(maxlen=settings.plot_frames)
    latencies: deque[float] = deque(maxlen=_LATENCIES)
    normal_levels: deque[float] = deque(maxlen=_NORMAL_LEVELS)
    background: list[np.ndarray] = []
    peak: tuple[Frame, np.ndarray, float] | None = None  # the open event's peak frame, its error map and score
    scored = warmup = 0
    started = time.monotonic()
    next_plot = started + settings.plot_interval_s
    events = 0  # written by this run (a count, not a list: a long stream may raise many)
    min_area = engine.cfg.TEST.region_min_area

    def pixel_threshold() -> float:
        return max(normal_levels) if normal_levels else math.nan

    def finish_event(event: AlarmEvent, ended: str) -> None:
        nonlocal peak, events
        outputs.event_count += 1
        snapshot = None
        if peak is not None and peak[0].number == event.peak_frame:
            snapshot = _snapshot(peak[0], peak[1], peak[2], threshold, pixel_threshold(), min_area)
        outputs.event(event, outputs.event_count, snapshot, ended)
        events += 1
        peak = None
        log.info(
            "alarm event %d: frames %d-%d, peak score %.4f at frame %d",
            outputs.event_count,
            event.start_frame,
            event.end_frame,
            event.peak_score,
            event.peak_frame,
        )

    def write_plot() -> None:
        if not plot_scores:
            return
        frames = np.array([f for f, _ in plot_scores])
        values = np.array([s for _, s in plot_scores])
        picture = render_score_plot(
            values,
            frames,
            int(frames[-1] - frames[0]) + 1,
            None,
            threshold,
            f"{name}: online frame score (live)",
            (300, 900),
            first_frame=int(frames[0]),
        )
        data = png_bytes(picture)
        atomic_write_bytes(out_dir / outputs.plot_name, lambda handle: handle.write(data))

    def log_progress() -> None:
        elapsed = max(1e-9, time.monotonic() - started)
        p95 = float(np.percentile(latencies, 95)) if latencies else math.nan
        mean = float(np.mean(latencies)) if latencies else math.nan
        log.info(
            "%s: %d frames read, %d scored (%.1f/s), %d dropped to keep up, latency mean %.0f ms / p95 %.0f ms, "
            "%d reconnection(s), %.1f s disconnected",
            name,
            source.read,
            scored,
            scored / elapsed,
            source.dropped,
            mean,
            p95,
            source.reconnects,
            source.disconnected_s,
        )

    source.start()
    try:
        with StopSignal(options.duration) as stop:
            while not stop.is_set():
                window = source.latest(timeout_s=0.25)
                if window is None:
                    if source.finished:
                        stop.set(source.error or "the source ended")
                        break
                else:
                    newest = window[-1]
                    scorer.forget_before(window[0].number)
                    if not scorer.ready and (background or scorer.needs_video(scorer.converted(newest))):
                        background.append(scorer.converted(newest))
                        if len(background) >= settings.background_frames:
                            scorer.set_video(background)
                            background = []
                            log.info(
                                "%s: per-video state of the model from the first %d frames",
                                name,
                                settings.background_frames,
                            )
                        warmup += 1
                    elif len(window) < window_size or window[-1].number - window[0].number != window_size - 1:
                        warmup += 1  # not yet clip_length consecutive frames before the newest (start, reconnection)
                    else:
                        score, _, error_map = scorer.score(window)
                        latency_ms = (time.time() - newest.time) * 1000.0
                        latencies.append(latency_ms)
                        confirmed, finished = alarms.update(newest.number, newest.time, score)
                        if finished is not None:
                            finish_event(finished, "score fell")
                        if confirmed is not None:
                            log.warning(
                                "ALARM: %s from frame %d (score %.4f >= threshold %.4f)",
                                name,
                                confirmed.start_frame,
                                score,
                                threshold,
                            )
                        current = alarms.current
                        if current is not None and current.peak_frame == newest.number:
                            peak = (newest, error_map, score)
                        if score < threshold:
                            normal_levels.append(float(np.quantile(error_map, settings.region_quantile)))
                        in_event = outputs.event_count + 1 if current is not None and current.confirmed else ""
                        outputs.row(
                            [
                                newest.number,
                                _iso(newest.time),
                                f"{score:.6f}",
                                int(score >= threshold),
                                in_event,
                                f"{latency_ms:.1f}",
                                source.dropped,
                            ]
                        )
                        plot_scores.append((newest.number, score))
                        scored += 1
                        if options.max_frames is not None and scored >= options.max_frames:
                            stop.set("--max-frames reached")
                if time.monotonic() >= next_plot:
                    write_plot()
                    log_progress()
                    next_plot = time.monotonic() + settings.plot_interval_s
    finally:
        source.stop()
        scorer.close()
        last = alarms.close()
        if last is not None:
            finish_event(last, "stream stopped")
        write_plot()
        outputs.close()
    elapsed = time.monotonic() - started
    summary = {
        "source": options.input if "@" not in options.input else "<credentials hidden>",
        "model": str(serving.source),
        "backend": serving.backend,
        "stopped": stop.reason,
        "seconds": round(elapsed, 3),
        "frames_read": source.read,
        "frames_scored": scored,
        "frames_warmup": warmup,
        "frames_dropped": source.dropped,
        "reconnections": source.reconnects,
        "disconnected_s": round(source.disconnected_s, 3),
        "threshold": threshold,
        "latency_ms_mean": round(float(np.mean(latencies)), 1) if latencies else None,
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
        "events": events,
        "csv": outputs.csv_name.as_posix(),
        "events_file": outputs.events_name.as_posix(),
        "plot": outputs.plot_name.as_posix(),
    }
    write_json(out_dir / outputs.summary_name, summary)
    log_progress()
    print(
        f"{name}: {scored} frames scored of {source.read} read ({source.dropped} dropped), "
        f"{events} alarm event(s), {source.reconnects} reconnection(s) ({source.disconnected_s:.1f} s "
        f"disconnected); stopped: {stop.reason}; outputs in {out_dir}",
        flush=True,
    )
    return summary
