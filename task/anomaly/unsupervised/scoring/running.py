"""The online protocol one frame at a time, for a live source: same values as ``online_frame_scores`` on the frames
seen so far, in bounded memory (the last ``ONLINE.window`` values per smoothed series and the Kalman state).

``online_frame_scores`` is causal (frame t depends on frames <= t only), so frame t's value needs just the trailing
window of each smoothed series: ``causal_smooth`` over those values gives its last entry exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import numpy as np

from task.anomaly.unsupervised.scoring.adaptive import VideoLevel
from task.anomaly.unsupervised.scoring.filters import causal_smooth
from task.anomaly.unsupervised.scoring.settings import ProtocolParams
from task.common.errors import UserError, short_text


class RunningOnlineScore:
    """``push(raw scores of one frame) -> its online anomaly score`` (higher = more anomalous)."""

    def __init__(self, train_stats: Mapping[str, Mapping[str, float]], params: ProtocolParams) -> None:
        for name in params.names:
            if name not in train_stats:
                raise UserError(
                    f"train_stats has no entry for score '{short_text(name)}'; "
                    "refit them with fit_train_stats on training scores"
                )
        self.params = params
        # ONLINE.adapt's per-video state of each score (adapt=running with memory 0 keeps the whole stream: set
        # ONLINE.memory for sources that run for hours; adapt=range with memory 0 keeps two numbers)
        self.levels = {
            name: VideoLevel(params.online, train_stats[name], sign) for name, sign in zip(params.names, params.signs)
        }
        window = params.online.window
        self.history = {name: deque(maxlen=window) for name in params.names}
        self.fused = deque(maxlen=window)
        self.count = 0
        self.estimate, self.variance = 0.0, 1.0  # the Kalman filter's state (``filters.kalman_filter``)

    def push(self, raw: Mapping[str, float]) -> float:
        """The online score of the next frame from its raw scores (name -> value; every ``SCORE.names`` entry)."""
        p, o = self.params, self.params.online
        total = 0.0
        for name, weight in zip(p.names, p.weights):
            value = float(raw[name])
            if not np.isfinite(value):
                raise UserError(
                    f"score '{short_text(name)}' is not finite at frame {self.count}; the model produced NaN or inf"
                )
            self.history[name].append(self.levels[name].push(value))
            total += weight * causal_smooth(np.fromiter(self.history[name], np.float64), o.window, o.keep)[-1]
        value = total
        if p.post_smooth.enabled:
            self.fused.append(total)
            value = causal_smooth(np.fromiter(self.fused, np.float64), o.window, o.keep)[-1]
        if p.kalman.enabled:
            value = self._kalman(value)
        self.count += 1
        return float(value)

    def _kalman(self, z: float) -> float:
        if self.count == 0:  # as ``kalman_filter``: frame 0 passes through, the recursion starts from 0
            return z
        k = self.params.kalman
        predicted = self.variance + k.process_var
        gain = predicted / (predicted + k.measurement_std**2)
        self.estimate = self.estimate + gain * (z - self.estimate)
        self.variance = (1 - gain) * predicted
        return self.estimate
