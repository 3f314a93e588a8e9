"""A graceful stop for live sources (watch folders, streams): SIGINT/SIGTERM or a limit end the loop between items.

``StopSignal`` installs handlers for SIGINT and SIGTERM (main thread only) that set a flag instead of raising, so the
loop finishes the item in hand, writes its outputs and returns normally; a second signal while stopping restores
the previous handlers, so a third ends the process the usual way. The previous handlers come back on exit.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import TracebackType
from typing import Any, Self

log = logging.getLogger("anomaly")


class StopSignal:
    """``with StopSignal(duration) as stop: while not stop.is_set(): ...``; ``stop.wait(s)`` sleeps until a stop."""

    def __init__(self, duration: float | None = None) -> None:
        self.event = threading.Event()
        self.reason = ""
        self.deadline = None if duration is None else time.monotonic() + max(0.0, duration)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            self._restore()  # asked twice: the next signal acts as usual
            return
        self.set(signal.Signals(signum).name)

    def set(self, reason: str) -> None:
        """Ask the loop to stop (``reason`` is logged)."""
        if not self.event.is_set():
            self.reason = reason
            log.info("stopping (%s): finishing the current item and closing the outputs", reason)
            self.event.set()

    def is_set(self) -> bool:
        if not self.event.is_set() and self.deadline is not None and time.monotonic() >= self.deadline:
            self.set("--duration reached")
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (less when a stop comes or the duration ends); True when stopping."""
        if self.deadline is not None:
            seconds = min(seconds, max(0.0, self.deadline - time.monotonic()))
        self.event.wait(seconds)
        return self.is_set()
