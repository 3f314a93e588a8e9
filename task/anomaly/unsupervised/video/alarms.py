"""Alarm events from a stream of frame scores: hysteresis and a minimum duration.

A frame is *hot* when its score is at or above the alarm threshold. An event starts at the first hot frame of a run
and is confirmed once ``min_frames`` frames in a row are hot (shorter runs are noise: no event); it lasts while the
score stays at or above ``threshold - hysteresis`` and ends at the last such frame. Pure bookkeeping, no I/O: the
caller gets the confirmed and finished events back from ``update`` and ``close``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AlarmEvent:
    """One alarm: frames ``start .. end`` (inclusive, stream frame numbers), wall times in seconds since the epoch."""

    start_frame: int
    start_time: float
    end_frame: int
    end_time: float
    peak_score: float
    peak_frame: int
    frames: int = 1  # scored frames in the event
    confirmed: bool = False


class AlarmTracker:
    """``update(frame, time, score)`` per scored frame -> (event confirmed now or None, event finished now or None)."""

    def __init__(self, threshold: float, hysteresis: float = 0.0, min_frames: int = 1) -> None:
        if hysteresis < 0 or min_frames < 1:
            raise ValueError(f"hysteresis must be >= 0 and min_frames >= 1, got {hysteresis}, {min_frames}")
        self.threshold = threshold
        self.release = threshold - hysteresis
        self.min_frames = min_frames
        self.current: AlarmEvent | None = None
        self.hot_run = 0  # hot frames in a row at the end of the current candidate

    def update(self, frame: int, time: float, score: float) -> tuple[AlarmEvent | None, AlarmEvent | None]:
        event = self.current
        if event is None:
            if score < self.threshold:
                return None, None
            self.current = event = AlarmEvent(frame, time, frame, time, score, frame)
            self.hot_run = 1
        elif event.confirmed and score >= self.release or not event.confirmed and score >= self.threshold:
            event.end_frame, event.end_time, event.frames = frame, time, event.frames + 1
            self.hot_run = self.hot_run + 1 if score >= self.threshold else 0
            if score > event.peak_score:
                event.peak_score, event.peak_frame = score, frame
        else:  # the score fell: a confirmed event ends at its previous frame, a candidate was noise
            self.current = None
            return None, event if event.confirmed else None
        if not event.confirmed and self.hot_run >= self.min_frames:
            event.confirmed = True
            return event, None
        return None, None

    def close(self) -> AlarmEvent | None:
        """At the end of the stream: the confirmed event still running (it ends at its last frame), if any."""
        event, self.current = self.current, None
        return event if event is not None and event.confirmed else None
