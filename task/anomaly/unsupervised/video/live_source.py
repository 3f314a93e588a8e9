"""A live video source (network stream or camera) read by a thread that keeps only the latest frames.

``LiveSource`` opens ``rtsp://``, ``rtmp://``, ``http(s)://``, ``udp://``/``tcp://`` URLs with OpenCV's FFMPEG backend
and cameras (an index such as ``0``, or ``/dev/videoN``) with OpenCV's default one. Its reader thread decodes frames
as they arrive and keeps the last ``keep`` of them (a ``deque``: never an unbounded queue); a frame pushed out before
the scorer took it counts as dropped. When the source ends or fails it is reopened with exponential backoff (0.5 s
doubling to ``max_backoff_s``) until ``reconnect_timeout_s`` passes without a frame (None: forever); the reconnections
and the time spent disconnected are counted. The kept frames after a reconnection never mix with those before it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger("anomaly")

URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
# OpenCV's FFMPEG backend waits this long to open a source or for a frame before it gives up (then: reconnect).
OPEN_TIMEOUT_MS = 5000
READ_TIMEOUT_MS = 5000
CAPTURE_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
FAST_START_OPTIONS = "analyzeduration;500000|probesize;65536"


def is_live_source(text: str | None) -> bool:
    """True for a stream URL, a camera index (``0``) or a V4L2 device (``/dev/video0``)."""
    if not text:
        return False
    return bool(
        re.match(rf"^({'|'.join(URL_SCHEMES)})://", text, re.IGNORECASE)
        or re.fullmatch(r"\d{1,3}", text)
        or re.fullmatch(r"/dev/video\d+", text)
    )


def source_name(text: str) -> str:
    """A file-name-safe name for the outputs of a source: ``camera0``, ``video2``, ``127.0.0.1_8554_live`` ..."""
    if re.fullmatch(r"\d{1,3}", text):
        return f"camera{text}"
    if text.startswith("/dev/"):
        return text.rsplit("/", 1)[-1]
    rest = re.sub(r"^[a-z]+://", "", text, flags=re.IGNORECASE)
    rest = re.sub(r"^[^@/]*@", "", rest)  # never put credentials in a file name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", rest).strip("_.")
    return (name or "stream")[:80]


@dataclass
class Frame:
    """One decoded frame: its number in the stream (counting every frame read), wall time (epoch s), BGR pixels."""

    number: int
    time: float
    pixels: np.ndarray
    segment: int  # which connection it came from (frames of different segments are not consecutive)


class LiveSource:
    """Reads ``source`` on a daemon thread; ``latest(after)`` returns the kept frames once a newer one arrives."""

    def __init__(
        self, source: str, keep: int, reconnect_timeout_s: float | None = 60.0, max_backoff_s: float = 8.0
    ) -> None:
        self.source = source
        self.keep = keep
        self.reconnect_timeout_s = reconnect_timeout_s
        self.max_backoff_s = max_backoff_s
        self.frames: deque[Frame] = deque(maxlen=keep)
        self.condition = threading.Condition()
        self.read = 0  # frames decoded
        self.taken_up_to = -1  # the newest frame number handed out
        self.dropped = 0  # frames pushed out of the buffer before they were handed out as the newest
        self.reconnects = 0
        self.disconnected_s = 0.0
        self.segment = 0
        self.finished = False  # no more frames will come (gave up reconnecting, or stopped)
        self.error = ""
        self._stop = threading.Event()
        self._own_options = False  # whether start() set OpenCV's FFmpeg options (stop() removes them)
        self._thread = threading.Thread(target=self._run, name="live-source", daemon=True)

    def start(self) -> LiveSource:
        # FFmpeg analyses 5 s of a stream before the first frame by default; a live source starts sooner with less
        # (unless the user set OpenCV's FFmpeg options, which then apply as they are). Set here, on the calling
        # thread, and never by the reader: setenv while another thread's C code reads the environment can crash.
        self._own_options = CAPTURE_OPTIONS_ENV not in os.environ
        if self._own_options:
            os.environ[CAPTURE_OPTIONS_ENV] = FAST_START_OPTIONS
        self._thread.start()
        return self

    def stop(self, wait_s: float = 1.0) -> None:
        """Ask the reader to end; waits up to ``wait_s`` (a read blocked in OpenCV ends by its own timeout)."""
        self._stop.set()
        with self.condition:
            self.condition.notify_all()
        self._thread.join(wait_s)
        if self._own_options and not self._thread.is_alive():
            os.environ.pop(CAPTURE_OPTIONS_ENV, None)

    def _open(self) -> cv2.VideoCapture | None:
        if re.fullmatch(r"\d{1,3}", self.source):
            capture = cv2.VideoCapture(int(self.source))
        elif self.source.startswith("/dev/"):
            capture = cv2.VideoCapture(self.source)
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS]
            capture = cv2.VideoCapture(self.source, cv2.CAP_FFMPEG, params)
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def _run(self) -> None:
        lost_at: float | None = None  # when the last connection ended (None: connected, or never connected yet)
        started = time.monotonic()
        backoff = 0.5
        first = True
        while not self._stop.is_set():
            capture = self._open()
            if capture is None:
                since = lost_at if lost_at is not None else started
                if self.reconnect_timeout_s is not None and time.monotonic() - since > self.reconnect_timeout_s:
                    self.error = f"no frames from {self.source} for {self.reconnect_timeout_s:.0f} s"
                    break
                self._stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            if not first:
                self.reconnects += 1
                log.info("reconnected to %s (reconnection %d)", self.source, self.reconnects)
            first = False
            got_frame = False
            try:
                while not self._stop.is_set():
                    ok, pixels = capture.read()
                    if not ok or pixels is None:
                        break
                    if not got_frame:
                        got_frame = True
                        backoff = 0.5
                        if lost_at is not None:
                            self.disconnected_s += time.monotonic() - lost_at
                            lost_at = None
                    with self.condition:
                        if len(self.frames) == self.keep and self.frames[0].number > self.taken_up_to:
                            self.dropped += 1  # its turn as the newest frame never came
                        self.frames.append(Frame(self.read, time.time(), pixels, self.segment))
                        self.read += 1
                        self.condition.notify_all()
            finally:
                capture.release()
            if self._stop.is_set():
                break
            if lost_at is None:
                lost_at = time.monotonic()
                log.warning("lost %s after frame %d; reconnecting with backoff", self.source, self.read - 1)
            with self.condition:
                self.segment += 1
            if got_frame:
                continue  # reopen at once after a working connection; back off only while opening fails
            since = lost_at
            if self.reconnect_timeout_s is not None and time.monotonic() - since > self.reconnect_timeout_s:
                self.error = f"no frames from {self.source} for {self.reconnect_timeout_s:.0f} s"
                break
            self._stop.wait(backoff)
            backoff = min(self.max_backoff_s, backoff * 2)
        if lost_at is not None:
            self.disconnected_s += time.monotonic() - lost_at
        with self.condition:
            self.finished = True
            self.condition.notify_all()

    def latest(self, timeout_s: float) -> list[Frame] | None:
        """The kept frames of the newest segment, oldest first, once a frame newer than the last handed out exists;
        None after ``timeout_s`` without one or when the source has finished."""
        deadline = time.monotonic() + timeout_s
        with self.condition:
            while not (self.frames and self.frames[-1].number > self.taken_up_to):
                remaining = deadline - time.monotonic()
                if self.finished or self._stop.is_set() or remaining <= 0:
                    return None
                self.condition.wait(remaining)
            newest = self.frames[-1]
            # Frames between the last handed out and the newest, other than the newest, are never scored.
            skipped = sum(1 for f in self.frames if self.taken_up_to < f.number < newest.number)
            self.dropped += skipped
            self.taken_up_to = newest.number
            return [f for f in self.frames if f.segment == newest.segment]
