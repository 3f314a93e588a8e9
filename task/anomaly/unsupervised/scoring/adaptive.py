"""Per-video, causal scaling of one raw score for the online protocol (``SCORE.ONLINE.adapt``), one frame at a time.

``VideoLevel.push(raw) -> scaled`` (higher = more anomalous) depends only on the frame itself, the earlier frames of
its video and the calibration statistics, so the batch protocol (``protocols.online_frame_scores``) and a live source
(``running.RunningOnlineScore``) run the same object and give the same values.

* ``none``: ``(x - low) / (high - low)`` with the calibration ``low`` / ``high`` (``1 -`` that for sign -1).
* ``running``: minus the median of the video's earlier frames (the last ``memory``; ``warmup`` copies of the
  calibration mean in front), divided by their MAD (``filters.robust_level``).
* ``range``: the causal counterpart of the paper protocol's per-video min-max: ``(x - min) / (max - min)`` of the
  video's earlier frames (the last ``memory``; 0: all, kept as two numbers), with ``max - min`` at least
  ``min_range`` times the calibration spread ``high - low`` (a video whose first frames barely vary does not turn noise
  into alarms). The first ``settle`` frames of a video only establish its range and score 0: a video is assumed to
  start normal, and an anomaly present from its first frame is only seen once it exceeds the range its first frames
  set. An anomaly is part of the range once seen: a long one at a steady level scores near 1 (it alarms mainly at its
  onset and where it grows) and a second one at the same level scores below 1; a ``memory`` of M frames forgets it M
  frames later (``memory: 0`` never does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import numpy as np

from task.anomaly.unsupervised.scoring.filters import robust_level
from task.anomaly.unsupervised.scoring.settings import OnlineParams


class VideoLevel:
    """The scaling of one score over one video (``push`` each frame in order).

    Args:
        online: the ``SCORE.ONLINE`` parameters (``adapt``, ``memory``, ``warmup``, ``settle``, ``min_range``).
        stats: the calibration statistics of this score (``low``, ``high`` and optionally ``mean``).
        sign: 1 when higher raw values are more anomalous, -1 when they are more normal.
    """

    def __init__(self, online: OnlineParams, stats: Mapping[str, float], sign: int) -> None:
        self.online, self.sign = online, sign
        self.low, self.high = float(stats["low"]), float(stats["high"])
        mean = float(stats.get("mean", (self.low + self.high) / 2))
        self.head = np.full(online.warmup, sign * mean)  # adapt=running: the calibration mean's warm-up weight
        self.past: deque[float] = deque(maxlen=online.memory or None)
        self.count = 0
        self.lowest, self.highest = np.inf, -np.inf  # adapt=range, memory 0: the whole past in two numbers

    def push(self, raw: float) -> float:
        o = self.online
        spread = self.high - self.low
        if o.adapt == "none":
            scaled = (raw - self.low) / spread
            return scaled if self.sign > 0 else 1.0 - scaled
        x = self.sign * raw
        if o.adapt == "running":
            past = np.concatenate([self.head, np.fromiter(self.past, np.float64)])
            location, scale = robust_level(past if past.size else np.array([x]), spread)
            self.past.append(x)
            return (x - location) / scale
        value = 0.0
        if self.count >= max(o.settle, 1):
            lowest, highest = (min(self.past), max(self.past)) if o.memory else (self.lowest, self.highest)
            # float32 eps x spread: a constant past with min_range 0 gives large, finite scores
            value = (x - lowest) / max(highest - lowest, o.min_range * spread, np.finfo(np.float32).eps * spread)
        self.count += 1
        if o.memory:
            self.past.append(x)
        else:
            self.lowest, self.highest = min(self.lowest, x), max(self.highest, x)
        return float(value)

    def scale(self, values: np.ndarray) -> np.ndarray:
        """``push`` over ``values`` [n] in order -> [n] float64."""
        return np.array([self.push(float(v)) for v in np.asarray(values, dtype=np.float64)], dtype=np.float64)
