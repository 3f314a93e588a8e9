"""Decision thresholds from normal calibration scores and a false-alarm target (split-conformal order statistics).

For ``n`` calibration scores of normal data and a target false-alarm rate ``alpha``, the threshold is the ``k``-th
smallest score with ``k = ceil((n + 1) (1 - alpha))``. When the calibration scores and a new normal score are
exchangeable (drawn i.i.d. from one distribution, the scoring function fixed), an alarm ``score > threshold`` on the
new score has probability at most ``alpha`` (Vovk et al., split conformal prediction): ``(n + 1 - k) / (n + 1)``.
The toolkit's alarm rule is ``score >= threshold``; for continuous scores ties have probability zero and the bound is
the same.

When ``k > n`` the target is too small for ``n`` scores (``alpha < 1 / (n + 1)``): the largest score is used and the
result says so (``capped``); its false-alarm bound is then ``1 / (n + 1)``, not ``alpha``.

A ``ScoreSample`` keeps what re-deriving a threshold for another target needs, small enough for a checkpoint: every
score when there are few, else the highest ``tail`` scores exactly plus evenly spaced order statistics below them,
each with its rank among all ``n``. A threshold read from it is the stored score of the smallest stored rank
``>= k``: exact where that rank is stored, otherwise a higher score (fewer alarms), never a lower one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GUARANTEE", "ScoreSample", "Threshold", "conformal_rank"]

GUARANTEE = (
    "P(false alarm) <= alpha for a normal input exchangeable with the calibration inputs "
    "(split conformal, k = ceil((n + 1)(1 - alpha)))"
)

# Scores kept in a checkpoint per kind: the highest TAIL exactly, and about SPREAD order statistics below them.
TAIL = 2048
SPREAD = 2048


def conformal_rank(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))``, the 1-based ascending rank of the threshold (may exceed ``n``)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    # A tiny tolerance keeps e.g. (99 + 1) * 0.99 = 99.00000000000001 at rank 99.
    return max(1, math.ceil((n + 1) * (1.0 - alpha) - 1e-9))


@dataclass(frozen=True)
class Threshold:
    """A threshold derived from a ``ScoreSample``: the value and how it was obtained."""

    value: float
    alpha: float
    n: int  # calibration scores it was derived from
    rank: int  # 1-based ascending rank wanted, ceil((n + 1)(1 - alpha))
    capped: bool  # rank > n: the largest score is used and the bound is 1 / (n + 1), not alpha

    @property
    def bound(self) -> float:
        """The false-alarm bound this threshold guarantees for exchangeable normal data."""
        return 1.0 / (self.n + 1) if self.capped else self.alpha

    def describe(self) -> str:
        rank = min(self.rank, self.n)
        base = f"{self.value:.6g} (rank {rank} of {self.n} calibration scores, target false-alarm rate {self.alpha:g}"
        if self.capped:
            return base + f"; too few scores for it: the largest is used, bound 1/(n+1) = {self.bound:.3g})"
        return base + ")"

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "alpha": self.alpha,
            "n": self.n,
            "rank": self.rank,
            "capped": self.capped,
            "bound": self.bound,
        }


@dataclass(frozen=True)
class ScoreSample:
    """Ascending calibration scores ``values`` with their 1-based ranks among all ``n`` scores (the last is rank n)."""

    n: int
    ranks: tuple[int, ...]
    values: tuple[float, ...]

    @classmethod
    def of(cls, scores: Any, tail: int = TAIL, spread: int = SPREAD) -> ScoreSample:
        """The sample of the finite ``scores`` (any shape): all of them when at most ``tail + spread``."""
        x = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if x.size == 0:
            raise ValueError("no calibration scores")
        if not np.all(np.isfinite(x)):
            raise ValueError("calibration scores must be finite")
        n = int(x.size)
        if n <= tail + spread:
            ranks = np.arange(1, n + 1)
        else:
            below = np.unique(np.linspace(1, n - tail, spread).round().astype(np.int64))
            ranks = np.concatenate([below, np.arange(n - tail + 1, n + 1)])
        return cls(n, tuple(int(r) for r in ranks), tuple(float(v) for v in x[ranks - 1]))

    def threshold(self, alpha: float) -> Threshold:
        """The conformal threshold for target false-alarm rate ``alpha`` (see the module docstring)."""
        k = conformal_rank(self.n, alpha)
        capped = k > self.n
        index = int(np.searchsorted(np.asarray(self.ranks), min(k, self.n), side="left"))
        return Threshold(self.values[index], float(alpha), self.n, k, capped)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "ranks": list(self.ranks), "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: Any) -> ScoreSample | None:
        """The sample stored by ``to_dict``; None when ``data`` is not a well-formed one."""
        if not isinstance(data, dict):
            return None
        n, ranks, values = data.get("n"), data.get("ranks"), data.get("values")
        if not isinstance(n, int) or not isinstance(ranks, list) or not isinstance(values, list):
            return None
        if not ranks or len(ranks) != len(values) or not all(isinstance(r, int) for r in ranks):
            return None
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return None
        if ranks[-1] != n or any(b <= a for a, b in itertools.pairwise(ranks)):
            return None
        return cls(n, tuple(ranks), tuple(float(v) for v in values))
