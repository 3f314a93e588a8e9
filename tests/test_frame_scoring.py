"""Frame-level video scoring: each protocol step on hand-computable arrays, the score file and its validation."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score

from helpers import CONFIGS
from task.anomaly.unsupervised.models.dmad_video.presets import PAPER_PRESETS, SCORE_SCHEMA
from task.anomaly.unsupervised.scoring import filters
from task.anomaly.unsupervised.scoring import protocols as fs
from task.anomaly.unsupervised.scoring import score_file as sfm
from task.anomaly.unsupervised.scoring.settings import ProtocolParams, WindowParams
from task.common.config import load_config
from task.common.errors import UserError


def window(
    size: int,
    keep: int,
    weights=None,
    shift: int = 0,
    left: str = "replicate",
    right: str = "replicate",
    fill: float = 0.0,
    scope: str = "concat",
) -> WindowParams:
    return WindowParams(True, size, keep, None if weights is None else tuple(weights), scope, shift, left, right, fill)


def plain_params(**changes) -> ProtocolParams:
    """One score, no normalisation, no smoothing: the fused score is the raw score."""
    off = {**PAPER_PRESETS["ped2"]["PRE_SMOOTH"]}
    cfg = {
        **PAPER_PRESETS["ped2"],
        "names": ["s"],
        "weights": [1.0],
        "signs": [1],
        "normalize": "none",
        "polarity": "anomaly",
        "SMOOTH": off,
        "ONLINE": {"window": 1, "keep": 1, "threshold_quantile": 0.5},
    }
    return replace(ProtocolParams.from_config(cfg), **changes)


def reference_smooth(x: np.ndarray, w: WindowParams) -> np.ndarray:
    """Straightforward per-window loop written from the definition, to check the vectorised version."""
    weights = np.ones(w.size) if w.weights is None else np.asarray(w.weights, dtype=np.float64)
    values = []
    for i in range(x.size - w.size + 1):
        win = x[i : i + w.size].copy()
        mask = np.zeros_like(win)
        mask[np.argsort(np.abs(win - win.mean()))[: w.keep]] = 1
        ww = weights * mask
        values.append(np.sum(win * ww) / ww.sum())
    first = w.size // 2 + w.shift
    out = np.empty(x.size)
    out[first : first + len(values)] = values
    out[:first] = w.fill if w.edge_left == "fill" else values[0]
    out[first + len(values) :] = w.fill if w.edge_right == "fill" else values[-1]
    return out


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def test_normalize_per_video_vs_global():
    videos = [np.array([0.0, 2.0, 4.0]), np.array([1.0, 3.0])]
    per_video = filters.normalize(videos, "per_video", 0.0, "anomaly")
    glob = filters.normalize(videos, "global", 0.0, "anomaly")
    # Exact: every value is a ratio of small integers computed with one subtraction and one division.
    np.testing.assert_array_equal(per_video[0], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(per_video[1], [0.0, 1.0])
    np.testing.assert_array_equal(glob[1], [0.25, 0.75])
    np.testing.assert_array_equal(filters.normalize(videos, "global", 0.0, "normality")[1], [0.75, 0.25])
    np.testing.assert_array_equal(filters.normalize(videos, "none", 0.0, "normality")[0], [-0.0, -2.0, -4.0])
    # eps enlarges the range: 2 / (4 + 1).
    assert filters.normalize(videos, "per_video", 1.0, "anomaly")[0][1] == 2.0 / 5.0
    # Official dtypes: per-video maths on Python floats (float64), the global Avenue arrays stay float32.
    assert filters.normalize([np.array([1, 2], dtype=np.float32)], "global", 0.0, "anomaly")[0].dtype == np.float32
    assert filters.normalize([np.array([1, 2], dtype=np.float32)], "per_video", 0.0, "anomaly")[0].dtype == np.float64
    with pytest.raises(UserError, match="constant"):
        filters.normalize([np.array([3.0, 3.0])], "per_video", 0.0, "anomaly", "prediction")
    np.testing.assert_array_equal(
        filters.normalize([np.array([3.0, 3.0])], "per_video", 1e-8, "anomaly")[0], [0.0, 0.0]
    )


def test_robust_window_by_hand_with_edges():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    # keep = size: a plain weighted mean; (1*1 + 2*2 + 3*1) / 4 = 2 etc.; the edges copy the nearest result.
    np.testing.assert_array_equal(filters.robust_smooth(x, window(3, 3, [1, 2, 1])), [2, 2, 3, 4, 4])
    np.testing.assert_array_equal(
        filters.robust_smooth(x, window(3, 3, [1, 2, 1], left="fill", fill=9)), [9, 2, 3, 4, 4]
    )
    # shift 1 (official utils.conf_avg): results one past the centre, both edges filled.
    np.testing.assert_array_equal(
        filters.robust_smooth(x, window(3, 3, shift=1, left="fill", right="fill", fill=9)), [9, 9, 2, 3, 4]
    )
    # [0, 1, 5]: mean 2, distances 2, 1, 3 -> keep 0 and 1 with weights 1 and 2: (0 + 2) / 3.
    assert filters.robust_smooth(np.array([0.0, 1.0, 5.0]), window(3, 2, [1, 2, 1]))[1] == pytest.approx(
        2 / 3, rel=1e-15
    )
    # The robust mean drops an isolated spike.
    np.testing.assert_array_equal(filters.robust_smooth(np.array([0, 0, 0, 10, 0, 0, 0.0]), window(3, 2)), np.zeros(7))
    # Shorter than the window: fill wins, else unchanged.
    np.testing.assert_array_equal(filters.robust_smooth(x[:2], window(3, 2, left="fill", fill=1)), [1, 1])
    np.testing.assert_array_equal(filters.robust_smooth(x[:2], window(3, 2)), x[:2])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_vectorised_window_equals_loop_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    x = rng.random(200)
    x[::3] = np.round(x[::3] * 4) / 4  # ties in the distances to the mean
    x = x.astype(dtype)
    for w in (
        window(11, 5, PAPER_PRESETS["ped2"]["SMOOTH"]["weights"], left="fill", fill=1.0),
        window(11, 5, PAPER_PRESETS["avenue"]["SMOOTH"]["weights"]),
        window(55, 49, shift=1, left="fill", right="fill", fill=1.0),
    ):
        # Same operations in the same order (row means and sums reduce like 1-D ones), so equality is exact.
        np.testing.assert_array_equal(filters.robust_smooth(x, w), reference_smooth(x, w))


def test_concat_scope_crosses_videos_and_video_scope_does_not():
    videos = [np.zeros(3), np.full(3, 9.0)]
    concat = filters.smooth_sequences(videos, window(3, 3))
    alone = filters.smooth_sequences(videos, replace(window(3, 3), scope="video"))
    assert [v.shape for v in concat] == [(3,), (3,)]
    assert concat[0][2] == 3.0 and concat[1][0] == 6.0  # windows [0, 0, 9] and [0, 9, 9]
    np.testing.assert_array_equal(np.concatenate(alone), [0, 0, 0, 9, 9, 9])
    assert filters.smooth_sequences(videos, replace(window(3, 3), enabled=False))[1] is videos[1]


def test_fuse_weights_and_order():
    a, b, c = np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.1, 0.3])
    fused = filters.fuse({"d": [a], "p": [b], "g": [c]}, ["d", "p", "g"], [0.2, 0.4, 0.6])[0]
    np.testing.assert_array_equal(fused, (a * 0.2 + b * 0.4) + c * 0.6)  # the official addition order
    np.testing.assert_allclose(fused, [0.26, 0.58], rtol=1e-15)


def test_kalman_by_hand():
    # q = 0, r = 1: gains 1/2 then 1/3; frame 0 shows the raw value, the recursion started from 0.
    np.testing.assert_allclose(
        filters.kalman_filter(np.array([5.0, 1.0, 1.0]), 0.0, 1.0), [5.0, 0.5, 2 / 3], rtol=1e-15
    )
    assert filters.kalman_filter(np.array([]), 1e-5, 0.01).shape == (0,)


def test_causal_smooth_by_hand_and_never_looks_ahead():
    # t=2: mean 10/3, keep 0 and 3; t=3: [3, 7, 100] keeps 3 and 7.
    np.testing.assert_array_equal(filters.causal_smooth(np.array([0.0, 3.0, 7.0, 100.0]), 3, 2), [0.0, 1.5, 1.5, 5.0])
    rng = np.random.default_rng(1)
    x = rng.random(60)
    for k in (1, 10, 30, 59):
        y = x.copy()
        y[k:] = rng.random(60 - k) * 100
        np.testing.assert_array_equal(filters.causal_smooth(y, 7, 4)[:k], filters.causal_smooth(x, 7, 4)[:k])


def test_online_scores_are_causal_end_to_end():
    params = ProtocolParams.from_config(PAPER_PRESETS["shanghaitech"])  # post smoothing and Kalman on
    rng = np.random.default_rng(2)
    scores = {n: [rng.random(80), rng.random(50)] for n in params.names}
    stats = fs.fit_train_stats({n: [rng.random(100)] for n in params.names})
    base = fs.online_frame_scores(scores, stats, params)
    changed = {n: [np.concatenate([v[0][:40], rng.random(40) * 50]), v[1]] for n, v in scores.items()}
    out = fs.online_frame_scores(changed, stats, params)
    np.testing.assert_array_equal(out[0][:40], base[0][:40])
    np.testing.assert_array_equal(out[1], base[1])  # another video is never affected
    assert not np.array_equal(out[0][40:], base[0][40:])


def test_online_normalisation_and_threshold_by_hand():
    stats = {"s": {"low": 0.0, "high": 10.0, "mean": 5.0, "std": 1.0, "count": 3}}
    params = plain_params()
    np.testing.assert_array_equal(fs.online_frame_scores({"s": [np.array([2.0, 5.0])]}, stats, params)[0], [0.2, 0.5])
    flipped = replace(params, signs=(-1,))
    np.testing.assert_array_equal(fs.online_frame_scores({"s": [np.array([2.0, 5.0])]}, stats, flipped)[0], [0.8, 0.5])
    res = fs.online_protocol(
        {"s": [np.array([1.0, 2.0, 3.0, 9.0])]}, [np.array([0, 0, 1, 1])], stats, params, threshold=0.25
    )
    assert res["frame_auroc_online"] == 1.0
    assert (res["online_tpr"], res["online_fpr"]) == (1.0, 0.0)  # alarms: 0.3 and 0.9 >= 0.25
    train = {"s": [np.arange(101.0)]}
    # conformal rank ceil(102 * 0.5) = 51 of 101: the score 50, normalised (50 - 1) / 98
    assert fs.fit_threshold(train, fs.fit_train_stats(train), params).value == pytest.approx(0.5, abs=1e-15)


def test_fit_train_stats():
    stats = fs.fit_train_stats({"s": [np.arange(51.0), np.arange(51.0, 101.0)]})["s"]
    # np.quantile interpolates linearly on 0..100: exactly 1 and 99.
    assert (stats["low"], stats["high"], stats["mean"], stats["count"]) == (1.0, 99.0, 50.0, 101)
    # A constant training score gets a minimal range (not a division by zero) and one warning.
    constant = fs.fit_train_stats({"s": [np.full(10, 2.0)]})["s"]
    assert constant["low"] == 2.0 and constant["high"] == 2.0 + 2e-6
    with pytest.raises(UserError, match="no training frames"):
        fs.fit_train_stats({"s": []})


def test_paper_protocol_matches_sklearn_and_per_video_notes():
    rng = np.random.default_rng(3)
    x = [rng.random(30), rng.random(20)]
    y = [(rng.random(30) > 0.6).astype(int), np.ones(20, dtype=int)]
    res = fs.paper_protocol({"s": x}, y, plain_params(), videos=["a", "b"])
    ys, xs = np.concatenate(y), np.concatenate(x)
    assert res["frame_auroc"] == roc_auc_score(ys, xs)
    assert res["frame_aupr"] == average_precision_score(ys, xs)
    assert res["per_video_auroc"] == {"a": roc_auc_score(y[0], x[0]), "b": None}
    assert res["per_video_note"] == {"b": "all 20 scored frames are abnormal"}
    # polarity normality ranks 1 - x with the official call roc_auc_score(1 - y, .): same AUROC.
    res_n = fs.paper_protocol({"s": x}, y, plain_params(polarity="normality", normalize="global"))
    assert res_n["frame_auroc"] == pytest.approx(
        res["frame_auroc"], abs=1e-12
    )  # min-max rounding may merge no ties here
    # paper_frame_scores gives 1 - (1 - m) for normality: m up to one rounding of values in [0, 1].
    np.testing.assert_allclose(
        np.concatenate(fs.paper_frame_scores({"s": x}, plain_params(polarity="normality", normalize="global"))),
        (xs - xs.min()) / (xs.max() - xs.min() + 1e-8),
        rtol=0,
        atol=1e-15,
    )
    # One class only (as image runs without defective images): null metrics, the reason, and a warning.
    normal = fs.paper_protocol({"s": x}, [np.zeros(30, int), np.zeros(20, int)], plain_params())
    assert normal["frame_auroc"] is None and normal["frame_aupr"] is None
    assert "no abnormal frame among the 50" in normal["note"]
    with pytest.raises(UserError, match="shape"):
        fs.paper_protocol({"s": [x[0][:-1], x[1]]}, y, plain_params())
    with pytest.raises(UserError, match=r"no score 's' \(have: q\)"):
        fs.paper_protocol({"q": x}, y, plain_params(names=("q", "s"), weights=(1.0, 1.0), signs=(1, 1)))


def test_paper_pipeline_ped2_preset_by_hand():
    """Per-video min-max to normality, an 11-frame window whose first 5 results are the fill value 1."""
    params = ProtocolParams.from_config({**PAPER_PRESETS["ped2"], "names": ["s"], "weights": [1.0], "signs": [1]})
    x = np.arange(12.0)
    fused = fs._paper_fused({"s": [x]}, params)[0]
    normality = 1.0 - x / (11.0 + 1e-8)
    expected = reference_smooth(normality, params.smooth)
    np.testing.assert_array_equal(fused, expected)
    np.testing.assert_array_equal(fused[:5], 1.0)
    assert fused[-1] == fused[-6]  # right edge replicates the last window result


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------


def test_presets_round_trip_and_yaml_section(tmp_path):
    for name, preset in PAPER_PRESETS.items():
        params = ProtocolParams.from_config(preset)
        assert ProtocolParams.from_config(params.to_config()) == params, name
    sh = ProtocolParams.from_config(PAPER_PRESETS["shanghaitech"])
    # Official keep counts: round(69 * 0.36), int(55 * 0.9), 55 // 2.
    assert (sh.pre_smooth.keep, sh.smooth.keep, sh.post_smooth.keep) == (round(69 * 0.36), int(55 * 0.9), 55 // 2)
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"SCORE": PAPER_PRESETS["avenue"]})
    )  # configs refuse anchors: presets share no objects
    cfg = load_config({"SCORE": SCORE_SCHEMA}, path, ["SCORE.ONLINE.window=9"])
    params = ProtocolParams.from_config(cfg.SCORE)
    assert params.names == ("deformation", "prediction") and params.online.window == 9
    with pytest.raises(UserError, match="lacks names"):  # a recorded protocol is never completed from defaults
        ProtocolParams.from_config({})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weights": [0.2]}, "SCORE.weights has 1 values"),
        ({"signs": [1, 0, 1]}, "SCORE.signs"),
        ({"names": ["a", "a", "b"]}, "repeats"),
        ({"SMOOTH": {"keep": 12}}, "SCORE.SMOOTH.keep"),
        ({"SMOOTH": {"weights": [1.0, 2.0]}}, "SCORE.SMOOTH.weights"),
        ({"SMOOTH": {"shift": 6}}, "SCORE.SMOOTH.shift"),
        ({"SMOOTH": {"scope": "global"}}, "SCORE.SMOOTH.scope"),
        ({"normalise": "global"}, "unknown config key SCORE.normalise"),
        ({"ONLINE": {"keep": 7}}, "SCORE.ONLINE.keep"),
        # settings that make the metric meaningless
        ({"weights": [0.0, 0.0, 0.0]}, "are all 0"),
        ({"weights": [1e308, 1e308, 1e308]}, "are too large"),
        ({"weights": [1e7, 1.0, 1.0]}, "keep each weight <= 1000000"),
        ({"KALMAN": {"enabled": True, "process_var": 0.0}}, "SCORE.KALMAN.process_var is 0"),
    ],
)
def test_bad_config_is_one_line_user_error(change, message):
    cfg = {**PAPER_PRESETS["ped2"], **{k: v for k, v in change.items() if not isinstance(v, dict)}}
    for key, sub in change.items():
        if isinstance(sub, dict):
            cfg[key] = {**PAPER_PRESETS["ped2"][key], **sub}
    with pytest.raises(UserError, match=message.replace(".", r"\.")) as info:
        ProtocolParams.from_config(cfg)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------
# Score file
# --------------------------------------------------------------------------


def make_file(**changes) -> sfm.ScoreFile:
    """Two videos of 10 and 8 frames, clip_length 4: scores for frames 4..9 and 4..7."""
    rng = np.random.default_rng(4)
    labels = [np.array([-1] * 4 + [0, 0, 1, 1, 0, 0], np.int8), np.array([-1] * 4 + [0, 1, 1, 0], np.int8)]
    frames = [sfm.default_frames(10, 4), sfm.default_frames(8, 4)]
    scores = {
        "deformation": [rng.random(6), rng.random(4)],
        "prediction": [rng.random(6).astype(np.float32), rng.random(4).astype(np.float32)],
    }
    base = dict(dataset="ped2", clip_length=4, videos=["01", "02"], scores=scores, labels=labels, frames=frames)
    return sfm.ScoreFile(**{**base, **changes})


def test_length_convention_and_alignment():
    np.testing.assert_array_equal(sfm.default_frames(10, 4), [4, 5, 6, 7, 8, 9])
    assert sfm.default_frames(3, 4).size == 0
    sf = make_file()
    np.testing.assert_array_equal(sf.aligned_labels()[0], [0, 0, 1, 1, 0, 0])  # labels[4:] of the full-length labels
    with pytest.raises(UserError, match=r"must lie in \[clip_length=4, 10\)"):
        sfm.validate(make_file(frames=[np.arange(3, 9), sfm.default_frames(8, 4)]))


def test_score_file_round_trip(tmp_path):
    stats = {n: {"low": 0.1, "high": 0.9, "mean": 0.5, "std": 0.2, "count": 40} for n in ("deformation", "prediction")}
    sf = make_file(train_stats=stats, threshold=0.7, extra={"source": "unit test"})
    path = sfm.write_scores(tmp_path / "scores.npz", sf)
    with np.load(path, allow_pickle=False) as raw:  # plain numpy, no pickle
        assert json.loads(str(raw["meta"]))["clip_length"] == 4
        assert raw["prediction/02"].dtype == np.float32
    back = sfm.read_scores(path)
    assert (back.dataset, back.clip_length, back.videos, back.threshold, back.extra) == (
        "ped2",
        4,
        ["01", "02"],
        0.7,
        {"source": "unit test"},
    )
    assert back.train_stats == stats
    for name in sf.scores:
        for a, b in zip(sf.scores[name], back.scores[name]):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
    for a, b in zip(sf.labels + sf.frames, back.labels + back.frames):
        np.testing.assert_array_equal(a, b)


def _arrays(**edits):
    arrays = sfm.to_arrays(make_file())
    for key, value in edits.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


@pytest.mark.parametrize(
    "edits, message",
    [
        ({"meta": None}, "key 'meta' is missing"),
        ({"labels/02": None}, "key 'labels/02' is missing"),
        ({"gradient/01": np.zeros(6)}, "unexpected key 'gradient/01'"),
        ({"meta": np.array("{not json")}, "not a JSON string"),
        ({"meta": np.array(json.dumps({"format": "other", "version": 1}))}, "expected 'dmad-frame-scores'"),
        ({"deformation/01": np.zeros(5)}, "has 5 values but frames has 6"),
        ({"deformation/01": np.array([0, 1, np.nan, 0, 0, 0.0])}, "1 non-finite"),
        ({"deformation/01": np.arange(6)}, "must be a 1-D float array"),
        ({"labels/01": np.array([-1] * 4 + [0, 0, 2, 1, 0, 0], np.int8)}, "must be 1 .abnormal., 0"),
        ({"labels/01": np.array([-1] * 5 + [0, 1, 1, 0, 0], np.int8)}, "unknown label .-1. on a scored frame"),
        ({"frames/01": np.array([4, 5, 7, 6, 8, 9])}, "strictly increasing"),
        ({"frames/01": np.arange(5, 11)}, r"must lie in \[clip_length=4, 10\)"),
        ({"videos": np.array(["01", "a/b"])}, "video name 'a/b' is not valid"),
    ],
)
def test_every_validation_error(edits, message):
    with pytest.raises(UserError, match=message) as info:
        sfm.from_arrays(_arrays(**edits))
    assert "\n" not in str(info.value)


def test_validation_of_names_stats_and_files(tmp_path):
    with pytest.raises(UserError, match="'labels' is reserved"):
        sfm.validate(make_file(scores={"labels": make_file().scores["deformation"]}))
    with pytest.raises(UserError, match="train_stats has no entry for score 'prediction'"):
        sfm.validate(make_file(train_stats={"deformation": {"low": 0, "high": 1, "mean": 0, "std": 1, "count": 1}}))
    bad = {n: {"low": 1.0, "high": 1.0, "mean": 0, "std": 1, "count": 1} for n in ("deformation", "prediction")}
    with pytest.raises(UserError, match="high <= low"):
        sfm.validate(make_file(train_stats=bad))
    with pytest.raises(UserError, match="score file not found"):
        sfm.read_scores(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(UserError, match="not a .npz archive"):
        sfm.read_scores(tmp_path / "text.npz")
    with open(tmp_path / "pickled.npz", "wb") as fh:
        np.savez(fh, meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="unreadable without pickle"):
        sfm.read_scores(tmp_path / "pickled.npz")
    assert zipfile.is_zipfile(sfm.write_scores(tmp_path / "ok.npz", make_file()))


def test_evaluate_scores_both_protocols(tmp_path):
    params = ProtocolParams.from_config(
        {
            **PAPER_PRESETS["avenue"],
            "POST_SMOOTH": {**PAPER_PRESETS["avenue"]["POST_SMOOTH"], "enabled": False},
            "SMOOTH": {**PAPER_PRESETS["avenue"]["SMOOTH"], "enabled": False},
        }
    )
    sf = make_file()
    res = fs.evaluate_scores(sfm.write_scores(tmp_path / "s.npz", sf), params)
    assert (res["videos"], res["frames"], res["abnormal_frames"]) == (2, 10, 4)
    assert "frame_auroc_online" not in res and "train_stats" in res["online_note"]
    # Without smoothing the avenue preset is global min-max then 0.2 d + 0.4 p: one pooled AUROC.
    d, p = (np.concatenate(sf.scores[n]) for n in ("deformation", "prediction"))
    fused = 0.2 * (d - d.min()) / (d.max() - d.min()) + 0.4 * (p - p.min()) / (p.max() - p.min())
    assert res["frame_auroc"] == roc_auc_score(np.concatenate(sf.aligned_labels()), fused)
    train = {n: [np.random.default_rng(5).random(50)] for n in ("deformation", "prediction")}
    stats = fs.fit_train_stats(train)
    with_stats = replace(sf, train_stats=stats, threshold=fs.fit_threshold(train, stats, params).value)
    res = fs.evaluate_scores(sfm.to_arrays(with_stats), params)
    assert 0.0 <= res["frame_auroc_online"] <= 1.0 and "online_tpr" in res
    with pytest.raises(UserError, match="no score 'gradient'"):
        fs.evaluate_scores(sf, ProtocolParams.from_config(PAPER_PRESETS["ped2"]))
    normal_only = replace(sf, labels=[np.where(lab > 0, 0, lab).astype(np.int8) for lab in sf.labels])
    res = fs.evaluate_scores(normal_only, params)
    assert res["frame_auroc"] is None and "no abnormal frame among the 10 scored frames" in res["note"]


def test_smoothing_window_longer_than_every_video_is_refused():
    """A window longer than every video cannot smooth within one (AUROC 0.5 or mixed videos): refused, before the
    run where the lengths are known (``check_lengths``); longer than only some videos (per video) is a warning."""
    params = ProtocolParams.from_config(PAPER_PRESETS["ped2"])  # SMOOTH: size 11, concat
    params.check_lengths([40, 11, 12], "the test videos")
    with pytest.raises(UserError) as info:
        params.check_lengths([6, 10], "the test videos")
    expected = "SCORE.SMOOTH.size=11 is longer than every video (the longest of 2 has 10 scored frames in the test"
    assert expected in str(info.value)
    avenue = replace(ProtocolParams.from_config(PAPER_PRESETS["avenue"]), smooth=window(11, 5, scope="video"))
    with pytest.raises(UserError, match="SCORE.SMOOTH.size=11"):
        fs.evaluate_scores(make_file(), avenue)  # 6 scored frames per video in the file


def test_short_videos_only_warned_about(caplog):
    params = ProtocolParams.from_config(PAPER_PRESETS["ped2"])
    per_video = replace(params, smooth=replace(params.smooth, scope="video"))
    with caplog.at_level("WARNING", logger="anomaly"):
        per_video.check_lengths([40, 5, 12], "score file 'ped2'")
    assert "SCORE.SMOOTH.size=11 is longer than 1 of 3 videos in score file 'ped2'" in caplog.text


def test_fused_overflow_is_one_line():
    big = {"a": [np.array([1e303, 2e303])], "b": [np.array([1e303, 1e303])]}
    with pytest.raises(UserError, match="overflows to inf; scale SCORE.weights down"):
        filters.fuse(big, ["a", "b"], [1e6, 1e6])


def test_score_file_inputs_with_misleading_messages_before(tmp_path):
    """A directory as --input, and repeated video names, are named as such (not 'not found' / 'unexpected key')."""
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"score file .*run is a directory; .* e\.g\. .*run/scores\.npz"):
        sfm.read_scores(tmp_path / "run")
    arrays = _arrays(videos=np.array(["01", "02", "01"]))
    with pytest.raises(UserError, match=r"video '01' appears 2 times in 'videos' \(1 name\(s\) repeat\)"):
        sfm.from_arrays(arrays)


def test_score_file_write_is_atomic_and_never_through_a_symlink(tmp_path, monkeypatch):
    outside = tmp_path / "my-data.npz"
    outside.write_bytes(b"user's own file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "scores.npz").symlink_to(outside)
    sfm.write_scores(run / "scores.npz", make_file())
    assert outside.read_bytes() == b"user's own file" and not (run / "scores.npz").is_symlink()
    good = (run / "scores.npz").read_bytes()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(UserError, match="cannot write .*scores.npz .No space left on device"):
        sfm.write_scores(run / "scores.npz", make_file())
    assert (run / "scores.npz").read_bytes() == good and sorted(p.name for p in run.iterdir()) == ["scores.npz"]


def test_command_line_score_override_applies_to_a_file_with_its_own_protocol(caplog):
    """--mode score with a file that carries its own SCORE settings: an explicit SCORE.* override is applied on top
    and logged, never ignored."""
    from types import SimpleNamespace

    from task.anomaly.unsupervised.video.modes import with_command_line_score
    from task.common.config import Config

    own = PAPER_PRESETS["avenue"]
    kalman = {**PAPER_PRESETS["ped2"]["KALMAN"], "enabled": True}
    cfg = Config({"SCORE": {**PAPER_PRESETS["ped2"], "weights": [0.1, 0.9], "KALMAN": kalman}})
    engine = SimpleNamespace(cfg=cfg, overridden=frozenset({"SCORE.weights", "SCORE.KALMAN.enabled", "DATASET.target"}))
    with caplog.at_level("WARNING", logger="anomaly"):
        merged = with_command_line_score(engine, own, "x.npz")
    assert merged["weights"] == [0.1, 0.9] and merged["KALMAN"]["enabled"] is True
    assert merged["names"] == own["names"] and merged["SMOOTH"] == own["SMOOTH"] and own["weights"] == [0.2, 0.4]
    assert "SCORE.KALMAN.enabled, SCORE.weights replace(s) the file's own SCORE settings" in caplog.text
    assert with_command_line_score(SimpleNamespace(cfg=cfg, overridden=frozenset()), own, "x.npz") is own


@pytest.mark.parametrize("dataset", ["ped2", "avenue", "shanghaitech"])
def test_dataset_yaml_score_sections_are_the_presets(dataset: str) -> None:
    """The YAMLs spell the SCORE section out for users to read; the presets are the method's: they must agree."""
    section = yaml.safe_load((CONFIGS / f"{dataset}.yaml").read_text())["SCORE"]
    assert ProtocolParams.from_config({**PAPER_PRESETS["ped2"], **section}) == ProtocolParams.from_config(
        PAPER_PRESETS[dataset]
    )
