"""Calibration on held-out normal images and thresholds by a false-alarm target (issue 16).

* the conformal order statistic, its stored sample, and the calibration split (pure functions, fast);
* on data where training and test normals share one distribution, the realised false-alarm rate on normal test
  images stays within sampling error of the target (a binomial check, below);
* relabelling the test set changes no byte of model.pt (and so no threshold predict serves);
* predict with another TEST.target_fpr serves another threshold from the stored calibration scores, without
  retraining, and says so.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom

from helpers import BASE, assert_ok, main_in_process, make_engine
from task.anomaly.unsupervised.data.image.calibration import MIN_CALIBRATION_IMAGES, split_calibration
from task.anomaly.unsupervised.data.image.dataset import Sample
from task.anomaly.unsupervised.scoring.adaptive import VideoLevel
from task.common.conformal import ScoreSample, conformal_rank
from task.common.errors import UserError

SIZE = 64
CATEGORY = "held"


# ----------------------------------------------------------------------------------------------- pure functions
def test_conformal_rank_and_threshold() -> None:
    assert conformal_rank(99, 0.01) == 99 and conformal_rank(100, 0.01) == 100 and conformal_rank(8, 0.01) == 9
    scores = np.arange(1, 101, dtype=float)[::-1]  # 100 .. 1, order must not matter
    t = ScoreSample.of(scores).threshold(0.05)  # k = ceil(101 * 0.95) = 96
    assert (t.value, t.rank, t.n, t.capped, t.bound) == (96.0, 96, 100, False, 0.05)
    capped = ScoreSample.of(scores[:8]).threshold(0.01)  # k = 9 > n = 8: the largest score, bound 1/9
    assert capped.capped and capped.value == 100.0 and capped.bound == pytest.approx(1 / 9)
    assert "too few scores" in capped.describe()


def test_large_sample_keeps_the_tail_exactly_and_is_conservative_below() -> None:
    x = np.random.default_rng(0).normal(size=50_000)
    full = np.sort(x)
    sample = ScoreSample.of(x)
    assert len(sample.values) <= 4096 + 1 and sample.n == 50_000
    assert ScoreSample.from_dict(json.loads(json.dumps(sample.to_dict()))) == sample
    for alpha in (0.001, 0.01, 0.04):  # inside the exact tail (2048 highest of 50,000)
        t = sample.threshold(alpha)
        assert t.value == full[t.rank - 1]
    for alpha in (0.2, 0.5):  # below it: a stored order statistic at or above the wanted one
        t = sample.threshold(alpha)
        assert t.value >= full[t.rank - 1] and np.mean(full >= t.value) <= alpha + 1e-3


def test_conformal_bound_holds_on_exchangeable_scores() -> None:
    """Averaged over many calibration draws, the false-alarm rate at the threshold is at most alpha."""
    rng = np.random.default_rng(1)
    alpha, n = 0.1, 30
    rates = []
    for _ in range(2000):
        t = ScoreSample.of(rng.normal(size=n)).threshold(alpha)
        rates.append(np.mean(rng.normal(size=200) >= t.value))
    # E[rate] = (n + 1 - k) / (n + 1) = 3/31 = 0.0968 exactly; 2000 x 200 draws put the mean within about 0.002
    assert abs(np.mean(rates) - 3 / 31) < 0.006


def _samples(names: list[str]) -> list[Sample]:
    return [Sample(f"/d/train/good/{n}", 0, None, "good") for n in names]


def test_calibration_split_is_seeded_by_name_not_listing_order(caplog) -> None:
    names = [f"{i:03d}.png" for i in range(40)]
    a = split_calibration(_samples(names), 0.1, seed=3)
    b = split_calibration(_samples(names[::-1]), 0.1, seed=3)
    assert a == b and a.held_out and len(a.calibration) == MIN_CALIBRATION_IMAGES  # ceil(4) < 8: the minimum
    assert not {s.path for s in a.calibration} & {s.path for s in a.train} and len(a.train) == 32
    assert split_calibration(_samples(names), 0.1, seed=4).calibration != a.calibration
    assert len(split_calibration(_samples([f"{i}.png" for i in range(200)]), 0.1, seed=0).calibration) == 20
    with caplog.at_level(logging.WARNING):
        few = split_calibration(_samples(names[:12]), 0.1, seed=0)
    assert not few.held_out and few.train == few.calibration and "calibrating on the training images" in caplog.text


# ----------------------------------------------------------------------------------------------- one small dataset
@pytest.fixture(scope="module")
def held_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64x64 synthetic MVTec layout: 32 normal training images (half held out for calibration), 24 normal and 4
    defective test images; train and test normals come from one generator."""
    from task.anomaly.unsupervised.data.image.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("held")
    make_demo_dataset(root, CATEGORY, n_train=32, n_test_good=24, n_test_defect=4, size=SIZE, seed=5)
    return root


def overrides(datadir: Path, savedir: Path) -> list[str]:
    return [
        f"DATASET.datadir={datadir}",
        f"DATASET.target={CATEGORY}",
        "DATASET.demo=false",
        f"DATASET.resize=[{SIZE},{SIZE}]",
        "DATASET.calibration_split=0.5",
        "DATALOADER.batch_size=4",
        "TRAIN.num_training_steps=1",
        "TEST.batch_size=16",
        "TEST.save_images=false",
        f"RESULT.savedir={savedir}",
        "RESULT.assets_dir=null",
    ]


def test_realised_false_alarm_rate_is_within_sampling_error_of_the_target(held_data: Path, tmp_path: Path) -> None:
    """The conformal bound holds for any fixed scoring function, trained or not: an untrained model scores 16 held-out
    calibration images, and its threshold at target 0.1 is measured on the 24 normal test images. The realised count
    of false alarms must be inside the central 99.8 % binomial interval of Binomial(24, bound); the bound itself is
    (n + 1 - k) / (n + 1) = 1/17 for n = 16."""
    from task.anomaly.unsupervised.engine.thresholds import resolve
    from task.anomaly.unsupervised.image.calibration import calibrate
    from task.anomaly.unsupervised.image.inference import predict_loader

    engine = make_engine(*overrides(held_data, tmp_path), "TEST.target_fpr=0.1")
    model = engine.build_model().eval()
    calibration_set, source = engine.calibration_data()
    assert source == "calibration_split" and len(calibration_set) == 16 and len(engine.dataset("train")) == 16
    calibration = calibrate(engine, model, calibration_set, source)
    thresholds, record = resolve(engine.cfg, calibration.samples, "test")
    assert record["image"]["n"] == 16 and record["image"]["rank"] == 16 and not record["image"]["capped"]
    test = predict_loader(model, engine.eval_loader(engine.dataset("test")), engine.device)
    normal = test.scores[test.labels == 0].numpy()
    alarms = int((normal >= thresholds["image"]).sum())
    low, high = binom.interval(0.998, normal.size, 1 / 17)
    assert low <= alarms <= high, (alarms, normal.size)


def test_relabelled_test_set_changes_no_byte_of_model_pt_and_predict_rederives_thresholds(
    held_data: Path,
    tmp_path: Path,
    caplog,
) -> None:
    # the same paths both times (the saved config records them): train, keep the outputs, relabel in place, train again
    datadir, savedir = tmp_path / "data", tmp_path / "runs"
    shutil.copytree(held_data, datadir)
    run_dir = savedir / "dmad" / CATEGORY
    runs = {"original": tmp_path / "original", "relabelled": tmp_path / "relabelled"}
    for name, folder in runs.items():
        if name == "relabelled":
            test = datadir / CATEGORY / "test"
            shutil.move(test / "spot" / "000.png", test / "good" / "900.png")  # a defective image now called good
        assert_ok(main_in_process(*BASE, *overrides(datadir, savedir)))
        shutil.move(run_dir, folder)
    a, b = (json.loads((runs[n] / "metrics.json").read_text()) for n in ("original", "relabelled"))
    assert a["image_auroc"] != b["image_auroc"]  # the metrics see the labels ...
    model_bytes = (runs["original"] / "model.pt").read_bytes()
    assert model_bytes == (runs["relabelled"] / "model.pt").read_bytes()  # ... nothing else
    assert a["image_threshold"] == b["image_threshold"] and a["calibration_source"] == "calibration_split"
    assert a["image_calibration_n"] == 16 and a["image_target_fpr"] == 0.01 and a["image_threshold_capped"] is True
    assert a["pixel_calibration_n"] == 16 * SIZE * SIZE and "exchangeable" in a["guarantee"]
    state = torch.load(runs["original"] / "model.pt", map_location="cpu", weights_only=True)
    assert state["calibration"]["samples"]["image"]["n"] == 16 and state["thresholds"]["image"] == a["image_threshold"]

    # predict at another target: another threshold, from the stored calibration scores, announced in the log
    images = held_data / CATEGORY / "test" / "good"
    checkpoint = str(runs["original"] / "model.pt")
    args = [*BASE, *overrides(held_data, savedir), "--mode", "predict", "--input", str(images)]
    args += ["--checkpoint", checkpoint]
    with caplog.at_level(logging.INFO):
        assert_ok(main_in_process(*args, "TEST.target_fpr=0.3", "--output", str(tmp_path / "p30")))
    served = 0.0
    for line in caplog.text.splitlines():
        if "serving image threshold" in line:
            served = float(line.split("serving image threshold ")[1].split()[0])
    expected = ScoreSample.from_dict(state["calibration"]["samples"]["image"]).threshold(0.3).value
    assert served == pytest.approx(expected, rel=1e-5) and served < a["image_threshold"]
    assert "no retraining" in caplog.text and (runs["original"] / "model.pt").read_bytes() == model_bytes
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert_ok(main_in_process(*args, "TEST.image_threshold=0.123", "--output", str(tmp_path / "given")))
    assert "image threshold 0.123: given by TEST.image_threshold" in caplog.text
    assert math.isfinite(served)


# ----------------------------------------------------------------------------------------------- video
def test_video_calibration_split_holds_out_the_end_of_each_video(caplog) -> None:
    from task.anomaly.unsupervised.data.video.calibration import split_rows

    index = np.array([(v, t) for v in range(3) for t in range(4, 4 + 200)], dtype=np.int64)
    train, calibration, source = split_rows(index, 0.25)
    assert source == "calibration_split" and len(calibration) == 150 and not set(train) & set(calibration)
    for v in range(3):
        held = index[calibration][index[calibration][:, 0] == v, 1]
        kept = index[train][index[train][:, 0] == v, 1]
        assert held.min() > kept.max() and held.size == 50  # the last quarter of every video
    with caplog.at_level(logging.WARNING):
        train, calibration, source = split_rows(index[:40], 0.25)  # 10 frames: too few
    assert source == "train" and np.array_equal(train, calibration)
    assert "calibrating on the training frames" in caplog.text


def _level(adapt: str, **online) -> VideoLevel:
    from task.anomaly.unsupervised.scoring.settings import OnlineParams

    params = OnlineParams(window=1, keep=1, threshold_quantile=0.99, adapt=adapt, **online)
    return VideoLevel(params, {"low": 0.0, "high": 8.0, "mean": 0.0}, 1)


def test_running_adaptation_is_causal_and_warms_up_from_the_calibration() -> None:
    x = np.array([10.0, 10.0, 10.0, 10.0, 50.0])
    # frame 0: itself; 50 never lifts its own baseline; fewer than 8 past frames: scale = spread / 4 = 2
    np.testing.assert_array_equal(_level("running").scale(x), [0.0, 0.0, 0.0, 0.0, 20.0])
    # three copies of the calibration mean 0 in front: median(0, 0, 0) = 0 at frame 0, median(0, 0, 0, 10 x 4) at 4
    assert _level("running", warmup=3).scale(x)[[0, 4]].tolist() == [5.0, 20.0]
    y = np.r_[np.tile([1.0, 3.0], 10), 100.0]
    assert _level("running").scale(y)[-1] == pytest.approx((100.0 - 2.0) / 1.4826)  # MAD 1 of the 20 frames before
    assert _level("running").scale(np.ones(20) * 2)[-1] == 0.0  # a constant video: (x - median) / floor 0.4 = 0


def test_range_adaptation_is_the_causal_per_video_min_max() -> None:
    x = np.array([5.0, 7.0, 6.0, 9.0, 5.5, 30.0, 8.0])
    # settle 2: frames 0 and 1 set the range; frame t: (x - min) / max(max - min, 0.25 * 8) of frames before t
    expected = [0.0, 0.0, 1 / 2, 4 / 2, 0.5 / 4, 25 / 4, 3 / 25]
    np.testing.assert_allclose(_level("range", settle=2, min_range=0.25).scale(x), expected, rtol=1e-12)
    # memory 2: only the two frames before count (the 30 has left the range by the last frame of y)
    y = np.array([5.0, 7.0, 30.0, 6.0, 6.5, 7.0])
    np.testing.assert_allclose(
        _level("range", settle=1, memory=2, min_range=0.25).scale(y), [0.0, 1.0, 25 / 2, -1 / 23, 0.5 / 24, 1 / 2]
    )
    flipped = VideoLevel(_level("range", settle=1, min_range=0.25).online, {"low": 0.0, "high": 8.0}, -1)
    assert flipped.scale(np.array([5.0, 1.0]))[-1] == 2.0  # sign -1: lower is more anomalous, (-1 - -5) / 2


def test_range_threshold_leaves_the_settle_frames_out() -> None:
    from dataclasses import replace

    from task.anomaly.unsupervised.models.dmad_video.presets import PAPER_PRESETS
    from task.anomaly.unsupervised.scoring import protocols as fs
    from task.anomaly.unsupervised.scoring.settings import ProtocolParams

    params = ProtocolParams.from_config(PAPER_PRESETS["ped2"])  # adapt range, settle 8
    rng = np.random.default_rng(0)
    videos = {n: [rng.normal(1.0, 0.1, 20) for _ in range(10)] for n in params.names}
    threshold = fs.fit_threshold(videos, fs.fit_train_stats(videos), params)
    assert threshold.n == 10 * (20 - params.online.settle)
    short = {n: [v[:8] for v in vs] for n, vs in videos.items()}
    with pytest.raises(UserError, match="lower SCORE.ONLINE.settle or raise DATASET.calibration_split"):
        fs.fit_threshold(short, fs.fit_train_stats(short), params)
    none = replace(params, online=replace(params.online, adapt="none"))
    assert fs.fit_threshold(short, fs.fit_train_stats(short), none).n == 80


def _offset_videos(rng: np.random.Generator, names: tuple[str, ...], anomaly: tuple[int, int], length: int = 300):
    """Three videos of normal scores around different levels (1, 3, 5) with one anomaly (+1.5) each."""
    scores = {n: [] for n in names}
    labels = []
    for level in (1.0, 3.0, 5.0):
        lab = np.zeros(length)
        lab[anomaly[0] : anomaly[1]] = 1
        labels.append(lab)
        for n in names:
            scores[n].append(level + rng.normal(scale=0.3, size=length) + 1.5 * lab)
    return scores, labels


@pytest.mark.parametrize("adapt", ["none", "running", "range"])
def test_adaptive_online_protocol_on_videos_at_different_levels(adapt: str) -> None:
    """Calibration frames mix the levels; without adaptation a video's level decides its alarms, with it the anomaly
    does. With the running median a long anomaly fades with a short memory (the documented trade-off)."""
    from dataclasses import replace

    from task.anomaly.unsupervised.models.dmad_video.presets import PAPER_PRESETS
    from task.anomaly.unsupervised.scoring import protocols as fs
    from task.anomaly.unsupervised.scoring.settings import ProtocolParams

    rng = np.random.default_rng(0)
    params = ProtocolParams.from_config(PAPER_PRESETS["ped2"])
    params = replace(params, online=replace(params.online, adapt=adapt))
    calibration, _ = _offset_videos(rng, params.names, (0, 0), 60)
    stats = fs.fit_train_stats(calibration)
    threshold = fs.fit_threshold(calibration, stats, params)
    scores, labels = _offset_videos(rng, params.names, (150, 190))
    result = fs.online_protocol(scores, labels, stats, params, threshold.value)
    if adapt == "none":
        assert result["frame_auroc_online"] < 0.8  # the level of a video, not the anomaly, decides
    elif adapt == "range":
        assert result["frame_auroc_online"] > 0.95 and result["online_fpr"] < 0.05 and result["online_tpr"] > 0.5
    else:
        assert result["frame_auroc_online"] > 0.95 and result["online_fpr"] < 0.05 and result["online_tpr"] > 0.8
        long_scores, long_labels = _offset_videos(rng, params.names, (50, 300))
        whole = [lab.astype(bool) & (np.arange(lab.size) < 95) for lab in long_labels]
        fused = fs.online_frame_scores(long_scores, stats, params)
        kept = np.concatenate([(f >= threshold.value)[m] for f, m in zip(fused, whole)])
        assert kept.mean() > 0.8  # memory 0: alarms while the anomaly is under half of the video so far
        short = replace(params, online=replace(params.online, memory=40))
        late = [lab.astype(bool) & (np.arange(lab.size) >= 150) for lab in long_labels]
        fused = fs.online_frame_scores(long_scores, stats, short)
        alarms = np.concatenate([(f >= threshold.value)[m] for f, m in zip(fused, late)])
        assert alarms.mean() < 0.2  # 100 frames into an anomaly, a 40-frame memory treats it as the new normal


# ----------------------------------------------------------------------------------------------- synthetic validation
def test_cutpaste_and_selection_keep_the_best_weights(held_data: Path, tmp_path: Path) -> None:
    from task.anomaly.unsupervised.data.image.synthetic_defects import cutpaste
    from task.anomaly.unsupervised.image.validation import Selection, SyntheticSet, observe

    image = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(3, 32, 32)
    out, mask = cutpaste(image, torch.Generator().manual_seed(0))
    assert mask.sum() >= 4 and torch.equal(out[:, mask == 0], image[:, mask == 0]) and not torch.equal(out, image)

    engine = make_engine(*overrides(held_data, tmp_path))
    calibration_set, _ = engine.calibration_data()
    data = SyntheticSet(calibration_set, seed=0)
    assert len(data) == 2 * len(calibration_set) and [int(data[i]["label"]) for i in range(4)] == [0, 1, 0, 1]
    assert torch.equal(SyntheticSet(calibration_set, seed=0)[1]["image"], data[1]["image"])  # same defects every time
    selection = Selection()
    models = [engine.build_model().eval() for _ in range(2)]
    for step, model in enumerate(models, start=1):
        observe(engine, model, data, selection, step)
    assert selection.step in (1, 2) and 0.0 <= selection.score <= 1.0
    best = models[selection.step - 1].state_dict()
    assert all(torch.equal(best[k], v) for k, v in selection.weights.items())
