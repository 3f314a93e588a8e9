"""DMAD-PDM's official frame-scoring settings per dataset (the paper protocol's presets) and its SCORE section.

Read from the official evaluation code (Evaluate_ped2.py, process_avenue.py, Evaluate_shanghai.py + utils.py); the
table in ``scoring/protocols.py`` explains each step. The dataset YAMLs' SCORE sections must equal these
(tests/test_frame_scoring.py checks it); the method's SCORE defaults are the Ped2 preset.

The presets (``PAPER_PRESETS``):

=================  ===========================  ============================  =================================
step               ped2                         avenue                        shanghaitech
=================  ===========================  ============================  =================================
normalise          per video, eps 1e-8, 1 - x   global, eps 0                 per video, eps 1e-8, 1 - x
PRE_SMOOTH         -                            -                             per video, 69, keep 25, uniform,
                                                                              shift 1, fill 1 both edges
SMOOTH             concat, 11, keep 5, weights  concat, 11, keep 5, weights   concat, 55, keep 49, uniform,
                   1,1,1,1,1.2,1.6,1.2,1,1,1,1  .5,.8,.8,1,1,2.5,1,1,.8,.8,.5  shift 1, fill 1 both edges
                   edges: fill 1 / replicate    edges: replicate / replicate
fusion             .2 def + .4 pred + .6 grad   .2 def + .4 pred              .2 def + .4 pred + .6 grad
POST_SMOOTH        -                            = SMOOTH                      concat, 55, keep 27, uniform,
                                                                              shift 1, fill 1 both edges
KALMAN             -                            -                             per video, q 1e-5, r 0.01**2
=================  ===========================  ============================  =================================

Every dataset drops the first 4 frames of each video (``clip_length = 4`` input frames predict frame 4). The
official Avenue number is computed on two post-processed scores (``process_avenue.py``: static-object removal on
the prediction-error map -> ``prediction``, and on the deformation offsets -> ``deformation``), not on the raw
model scores.
"""

from __future__ import annotations

from typing import Any

from task.anomaly.unsupervised.scoring.settings import NO_WINDOW, score_schema

_NAMES = ["deformation", "prediction", "gradient"]


def _avenue_window() -> dict[str, Any]:
    # A fresh dict and list per use: shared objects would make yaml.safe_dump write &anchors, which configs refuse.
    return {
        "enabled": True,
        "size": 11,
        "keep": 5,
        "weights": [0.5, 0.8, 0.8, 1.0, 1.0, 2.5, 1.0, 1.0, 0.8, 0.8, 0.5],
        "scope": "concat",
        "shift": 0,
        "edge_left": "replicate",
        "edge_right": "replicate",
        "fill": 0.0,
    }


# utils.conf_avg: output at start + (size + 1) // 2 (one past the centre), every other position stays 1.
_SHANGHAI_WINDOW = {
    "enabled": True,
    "scope": "concat",
    "weights": None,
    "shift": 1,
    "edge_left": "fill",
    "edge_right": "fill",
    "fill": 1.0,
}


# The online protocol (not the paper's): each raw score scaled by the min and max of its video's earlier frames (the
# causal per-video min-max); the first 8 frames of a video set its range, and the range is at least half the
# calibration spread (scoring/adaptive.py; README "Calibrated, adaptive online detector" for the measurements).
ONLINE_ADAPTIVE = {"adapt": "range", "memory": 0, "warmup": 0, "settle": 8, "min_range": 0.5}


PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "ped2": {
        "names": list(_NAMES),
        "weights": [0.2, 0.4, 0.6],
        "signs": [1, 1, 1],
        "normalize": "per_video",
        "norm_eps": 1e-8,
        "polarity": "normality",
        "PRE_SMOOTH": dict(NO_WINDOW),
        "SMOOTH": {
            "enabled": True,
            "size": 11,
            "keep": 5,
            "weights": [1.0, 1.0, 1.0, 1.0, 1.2, 1.6, 1.2, 1.0, 1.0, 1.0, 1.0],
            "scope": "concat",
            "shift": 0,
            "edge_left": "fill",
            "edge_right": "replicate",
            "fill": 1.0,
        },
        "POST_SMOOTH": dict(NO_WINDOW),
        "KALMAN": {"enabled": False, "process_var": 1e-5, "measurement_std": 0.01},
        "ONLINE": {"window": 6, "keep": 3, "threshold_quantile": 0.99, **ONLINE_ADAPTIVE},
    },
    "avenue": {
        "names": ["deformation", "prediction"],
        "weights": [0.2, 0.4],
        "signs": [1, 1],
        "normalize": "global",
        "norm_eps": 0.0,
        "polarity": "anomaly",
        "PRE_SMOOTH": dict(NO_WINDOW),
        "SMOOTH": _avenue_window(),
        "POST_SMOOTH": _avenue_window(),
        "KALMAN": {"enabled": False, "process_var": 1e-5, "measurement_std": 0.01},
        "ONLINE": {"window": 6, "keep": 3, "threshold_quantile": 0.99, **ONLINE_ADAPTIVE},
    },
    "shanghaitech": {
        "names": list(_NAMES),
        "weights": [0.2, 0.4, 0.6],
        "signs": [1, 1, 1],
        "normalize": "per_video",
        "norm_eps": 1e-8,
        "polarity": "normality",
        "PRE_SMOOTH": {**_SHANGHAI_WINDOW, "size": 69, "keep": 25, "scope": "video"},  # keep = round(69 * 0.36)
        "SMOOTH": {**_SHANGHAI_WINDOW, "size": 55, "keep": 49},  # keep = int(55 * 0.9)
        "POST_SMOOTH": {**_SHANGHAI_WINDOW, "size": 55, "keep": 27},  # keep = 55 // 2
        "KALMAN": {"enabled": True, "process_var": 1e-5, "measurement_std": 0.01},
        "ONLINE": {"window": 28, "keep": 14, "threshold_quantile": 0.99, **ONLINE_ADAPTIVE},
    },
}


# The YAML section ``SCORE:`` of DMAD-PDM runs; defaults are the Ped2 preset.
SCORE_SCHEMA = score_schema(PAPER_PRESETS["ped2"])
