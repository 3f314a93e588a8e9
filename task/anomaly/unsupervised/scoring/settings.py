"""The SCORE section of video runs: its schema (built from a method's defaults) and the validated parameters.

A video method supplies its defaults (DMAD-PDM: ``models/dmad_video/presets.py``) through ``score_schema``;
``ProtocolParams.from_config`` validates a complete section (a run's ``cfg.SCORE``, a calibration's or a score
file's recorded protocol) into the frozen parameters the protocols take.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from task.common.config import F, Field, Schema
from task.common.errors import UserError, short_repr, short_text

log = logging.getLogger("anomaly")

ADAPT_MODES = ("none", "running", "range")  # SCORE.ONLINE.adapt (scoring/adaptive.py)

# Largest fusion weight: fused scores are sums of weight x score, and only the weights' ratios matter.
MAX_WEIGHT = 1e6


def window_schema(d: Mapping[str, Any]) -> Schema:
    return {
        "enabled": F(bool, d["enabled"], help="apply this smoothing pass"),
        "size": F(int, d["size"], min=1, help="window length in frames"),
        "keep": F(int, d["keep"], min=1, help="how many values closest to the window mean are averaged (<= size)"),
        "weights": F(
            list,
            d["weights"],
            nullable=True,
            item_type=float,
            min=0,
            min_exclusive=True,
            help="position weights inside the window (size values); null: uniform",
        ),
        "scope": F(
            str,
            d["scope"],
            choices=("concat", "video"),
            help="concat: one sequence over all test videos in order (official); video: each video alone",
        ),
        "shift": F(int, d["shift"], min=0, help="each window's result lands at its start + size // 2 + shift"),
        "edge_left": F(str, d["edge_left"], choices=("replicate", "fill"), help="positions before the first result"),
        "edge_right": F(str, d["edge_right"], choices=("replicate", "fill"), help="positions after the last result"),
        "fill": F(
            float, d["fill"], help="value of 'fill' edges, in the processing polarity (1 = most normal for normality)"
        ),
    }


def score_schema(d: Mapping[str, Any]) -> Schema:
    return {
        "names": F(list, d["names"], item_type=str, help="score names fused, in summation order"),
        "weights": F(list, d["weights"], item_type=float, min=0, help="fusion weight per name"),
        "signs": F(
            list,
            d["signs"],
            item_type=int,
            min=-1,
            max=1,
            help="per name: 1 higher = more anomalous, -1 higher = more normal",
        ),
        "normalize": F(
            str, d["normalize"], choices=("per_video", "global", "none"), help="min-max scope of the paper protocol"
        ),
        "norm_eps": F(float, d["norm_eps"], min=0, help="added to max - min (official: 1e-8 per video, 0 global)"),
        "polarity": F(
            str,
            d["polarity"],
            choices=("anomaly", "normality"),
            help="normality: smooth and fuse 1 - normalised scores, as the official Ped2/ShanghaiTech code",
        ),
        "PRE_SMOOTH": window_schema(d["PRE_SMOOTH"]),
        "SMOOTH": window_schema(d["SMOOTH"]),
        "POST_SMOOTH": window_schema(d["POST_SMOOTH"]),
        "KALMAN": {
            "enabled": F(bool, d["KALMAN"]["enabled"], help="scalar Kalman filter of the final score, per video"),
            "process_var": F(float, d["KALMAN"]["process_var"], min=0, help="Q"),
            "measurement_std": F(float, d["KALMAN"]["measurement_std"], min=0, min_exclusive=True, help="sqrt(R)"),
        },
        "ONLINE": {
            "window": F(
                int, d["ONLINE"]["window"], min=1, help="causal window: the frame and window - 1 earlier frames"
            ),
            "keep": F(
                int, d["ONLINE"]["keep"], min=1, help="values closest to the causal window's mean that are averaged"
            ),
            "threshold_quantile": F(
                float,
                d["ONLINE"]["threshold_quantile"],
                min=0,
                max=1,
                min_exclusive=True,
                max_exclusive=True,
                help="1 - the false-alarm target of the alarm threshold "
                "(conformal order statistic of the calibration frames' online scores)",
            ),
            "adapt": F(
                str,
                d["ONLINE"]["adapt"],
                choices=ADAPT_MODES,
                help="range: scale each raw score by the min and max of its video's earlier frames (the causal "
                "per-video min-max); running: by their median and MAD; none: calibration statistics only",
            ),
            "memory": F(
                int,
                d["ONLINE"]["memory"],
                min=0,
                help="adapt=running: past frames in the running statistics (0: the whole video so far); an "
                "anomaly lasting over about half of it becomes the baseline and fades",
            ),
            "warmup": F(
                int,
                d["ONLINE"]["warmup"],
                min=0,
                help="adapt=running: weight, in frames, of the calibration mean in the running median",
            ),
            "settle": F(
                int,
                d["ONLINE"]["settle"],
                min=0,
                help="adapt=range: first frames of a video that only set its range and score 0 (assumed normal)",
            ),
            "min_range": F(
                float,
                d["ONLINE"]["min_range"],
                min=0,
                help="adapt=range: smallest per-video range, as a fraction of the calibration spread (high - low)",
            ),
        },
    }


def checked(schema: Schema, data: Any, prefix: str) -> dict[str, Any]:
    """Defaults of ``schema`` overlaid with ``data``, every key and value checked (``UserError`` on the first
    problem)."""
    if not isinstance(data, Mapping):
        raise UserError(f"config section {prefix} must be a mapping, got {short_repr(data)}")
    unknown = sorted(set(map(str, data)) - set(schema))
    if unknown:
        raise UserError(f"unknown config key {prefix}.{short_text(unknown[0])}; valid keys here: {', '.join(schema)}")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        if isinstance(spec, dict):
            out[key] = checked(spec, data.get(key, {}), f"{prefix}.{key}")
        else:
            assert isinstance(spec, Field)
            out[key] = spec.check(f"{prefix}.{key}", data[key]) if key in data else spec.default
    return out


def _require_every_key(schema: Schema, data: Any, prefix: str) -> None:
    """A recorded protocol must be complete: no method's defaults may fill a gap silently."""
    if not isinstance(data, Mapping):
        raise UserError(f"config section {prefix} must be a mapping, got {short_repr(data)}")
    for key, spec in schema.items():
        if key not in data and f"{prefix}.{key}" in _OPTIONAL:
            continue
        if key not in data:
            raise UserError(
                f"config section {prefix} lacks {key}; give the whole SCORE section (see the dataset YAMLs)"
            )
        if isinstance(spec, dict):
            _require_every_key(spec, data[key], f"{prefix}.{key}")


# ONLINE keys added with the adaptive online protocols: a recorded protocol without them (an older calibration or score
# file) was fitted without adaptation (or, without settle / min_range, with adapt: running, which ignores them), so
# their absence means exactly that.
ONLINE_BEFORE_ADAPTATION = {"adapt": "none", "memory": 0, "warmup": 0, "settle": 0, "min_range": 0.0}
_OPTIONAL = {f"SCORE.ONLINE.{key}" for key in ONLINE_BEFORE_ADAPTATION}

# A smoothing pass that is off (methods' presets use it for the passes a dataset does not run).
NO_WINDOW = {
    "enabled": False,
    "size": 1,
    "keep": 1,
    "weights": None,
    "scope": "video",
    "shift": 0,
    "edge_left": "replicate",
    "edge_right": "replicate",
    "fill": 0.0,
}
# The keys and checks of a SCORE section; its defaults are never used (sections are checked complete).
_SHAPE: Schema = score_schema(
    {
        "names": ["score"],
        "weights": [1.0],
        "signs": [1],
        "normalize": "none",
        "norm_eps": 0.0,
        "polarity": "anomaly",
        "PRE_SMOOTH": NO_WINDOW,
        "SMOOTH": NO_WINDOW,
        "POST_SMOOTH": NO_WINDOW,
        "KALMAN": {"enabled": False, "process_var": 1e-5, "measurement_std": 0.01},
        "ONLINE": {"window": 1, "keep": 1, "threshold_quantile": 0.99, **ONLINE_BEFORE_ADAPTATION},
    }
)


@dataclass(frozen=True)
class WindowParams:
    """One robust smoothing pass (see the module docstring)."""

    enabled: bool
    size: int
    keep: int
    weights: tuple[float, ...] | None
    scope: str
    shift: int
    edge_left: str
    edge_right: str
    fill: float


@dataclass(frozen=True)
class KalmanParams:
    """Scalar Kalman filter: process variance ``q``, measurement variance ``measurement_std ** 2``."""

    enabled: bool
    process_var: float
    measurement_std: float


@dataclass(frozen=True)
class OnlineParams:
    """Causal smoothing window, the threshold quantile and the per-video adaptation of the online protocol."""

    window: int
    keep: int
    threshold_quantile: float
    adapt: str = "none"
    memory: int = 0
    warmup: int = 0
    settle: int = 0
    min_range: float = 0.0


@dataclass(frozen=True)
class ProtocolParams:
    """Everything that differs between datasets: the validated ``SCORE:`` section."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    signs: tuple[int, ...]
    normalize: str
    norm_eps: float
    polarity: str
    pre_smooth: WindowParams
    smooth: WindowParams
    post_smooth: WindowParams
    kalman: KalmanParams
    online: OnlineParams

    @classmethod
    def from_config(cls, section: Any) -> ProtocolParams:
        """From a complete ``cfg.SCORE`` (a ``Config``) or plain mapping (e.g. a recorded protocol or a method's
        preset). Raises ``UserError`` naming the first missing or bad key."""
        data = section.to_dict() if hasattr(section, "to_dict") else section
        _require_every_key(_SHAPE, data, "SCORE")
        d = checked(_SHAPE, data, "SCORE")
        n = len(d["names"])
        if n == 0:
            raise UserError(
                "config key SCORE.names must list at least one score name, e.g. [deformation, prediction, gradient]"
            )
        if len(set(d["names"])) != n:
            raise UserError(f"config key SCORE.names repeats a name: {short_repr(d['names'])}")
        for key in ("weights", "signs"):
            if len(d[key]) != n:
                raise UserError(
                    f"config key SCORE.{key} has {len(d[key])} values for {n} SCORE.names; give one per name"
                )
        if any(s == 0 for s in d["signs"]):
            raise UserError(f"config key SCORE.signs must hold 1 or -1 per name, got {short_repr(d['signs'])}")
        if not any(d["weights"]):
            raise UserError(
                f"config key SCORE.weights {short_repr(d['weights'])} are all 0: every frame would get "
                "the same fused score (AUROC 0.5); give at least one weight > 0"
            )
        if not math.isfinite(sum(d["weights"])) or max(d["weights"]) > MAX_WEIGHT:
            raise UserError(
                f"config key SCORE.weights {short_repr(d['weights'])} are too large (fused scores could "
                f"overflow to inf); keep each weight <= {MAX_WEIGHT:.0f} "
                "(only their ratios matter, e.g. [0.2, 0.4, 0.6])"
            )
        if d["KALMAN"]["enabled"] and d["KALMAN"]["process_var"] == 0:
            raise UserError(
                "config key SCORE.KALMAN.process_var is 0: the filter then trusts its start forever and "
                "flattens every video's score; set it > 0 (the presets use 1e-5) or "
                "SCORE.KALMAN.enabled=false"
            )
        windows = {}
        for key in ("PRE_SMOOTH", "SMOOTH", "POST_SMOOTH"):
            w = d[key]
            if w["enabled"]:
                if w["keep"] > w["size"]:
                    raise UserError(
                        f"config key SCORE.{key}.keep ({w['keep']}) must be <= SCORE.{key}.size ({w['size']})"
                    )
                if w["weights"] is not None and len(w["weights"]) != w["size"]:
                    raise UserError(
                        f"config key SCORE.{key}.weights has {len(w['weights'])} values; give SCORE.{key}.size = "
                        f"{w['size']} or null"
                    )
                limit = w["size"] - 1 - w["size"] // 2  # the last result must stay inside the sequence
                if w["shift"] > limit:
                    raise UserError(
                        f"config key SCORE.{key}.shift ({w['shift']}) moves results past the window; use <= {limit}"
                    )
            windows[key] = WindowParams(**{**w, "weights": None if w["weights"] is None else tuple(w["weights"])})
        if d["ONLINE"]["keep"] > d["ONLINE"]["window"]:
            raise UserError(
                f"config key SCORE.ONLINE.keep ({d['ONLINE']['keep']}) must be <= SCORE.ONLINE.window "
                f"({d['ONLINE']['window']})"
            )
        return cls(
            names=tuple(d["names"]),
            weights=tuple(d["weights"]),
            signs=tuple(d["signs"]),
            normalize=d["normalize"],
            norm_eps=d["norm_eps"],
            polarity=d["polarity"],
            pre_smooth=windows["PRE_SMOOTH"],
            smooth=windows["SMOOTH"],
            post_smooth=windows["POST_SMOOTH"],
            kalman=KalmanParams(**d["KALMAN"]),
            online=OnlineParams(**d["ONLINE"]),
        )

    def check_lengths(self, lengths: Sequence[int], where: str) -> None:
        """Refuse a smoothing window longer than every video (``lengths``: scored frames per video): the pass would
        leave the scores unsmoothed, constant, or mix videos in every window, silently. Some videos shorter than a
        per-video window is legitimate (they stay unsmoothed) and only warned about. ``where`` names the data."""
        if not lengths:
            return
        for key, w in (("PRE_SMOOTH", self.pre_smooth), ("SMOOTH", self.smooth), ("POST_SMOOTH", self.post_smooth)):
            if not w.enabled:
                continue
            if w.size > max(lengths):  # per video: nothing smoothed; concat: every window mixes videos
                raise UserError(
                    f"SCORE.{key}.size={w.size} is longer than every video (the longest of "
                    f"{len(lengths)} has {max(lengths)} scored frames in {where}), so the pass cannot "
                    "smooth within a video; "
                    f"use SCORE.{key}.size <= {max(lengths)} or SCORE.{key}.enabled=false"
                )
            short = sum(n < w.size for n in lengths)
            if w.scope == "video" and short:
                log.warning(
                    "SCORE.%s.size=%d is longer than %d of %d videos in %s; those videos are not smoothed by it",
                    key,
                    w.size,
                    short,
                    len(lengths),
                    where,
                )

    def to_config(self) -> dict[str, Any]:
        """The ``SCORE:`` section as plain YAML-ready data (``from_config(p.to_config()) == p``)."""

        def window(w: WindowParams) -> dict[str, Any]:
            return {**w.__dict__, "weights": None if w.weights is None else list(w.weights)}

        return {
            "names": list(self.names),
            "weights": list(self.weights),
            "signs": list(self.signs),
            "normalize": self.normalize,
            "norm_eps": self.norm_eps,
            "polarity": self.polarity,
            "PRE_SMOOTH": window(self.pre_smooth),
            "SMOOTH": window(self.smooth),
            "POST_SMOOTH": window(self.post_smooth),
            "KALMAN": dict(self.kalman.__dict__),
            "ONLINE": dict(self.online.__dict__),
        }
