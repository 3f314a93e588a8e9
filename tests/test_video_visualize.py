"""Video anomaly pictures: abnormal ranges, score-plot geometry (matplotlib), cursor, GIF frame selection and the GIF
file; ROC and PR curve pictures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from task.anomaly.unsupervised.curves import render_curve, write_curves
from task.anomaly.unsupervised.video.plots import (
    CURSOR,
    abnormal_ranges,
    gif_frame_positions,
    plot_area,
    plot_x,
    render_score_plot,
    render_video_frame,
    write_video_gif,
)

SIZE = (240, 640)
SHADE = (255, 205, 205)
THRESHOLD = (245, 140, 0)
ALARM = (235, 60, 50)


def _near(image: np.ndarray, colour, tolerance: int = 12) -> np.ndarray:
    """[..] bool: pixels within ``tolerance`` of ``colour`` in every channel (matplotlib antialiases edges)."""
    return np.all(np.abs(image.astype(np.int16) - np.asarray(colour, np.int16)) <= tolerance, axis=-1)


def _column_is(image: np.ndarray, x: int, colour, rows: slice) -> bool:
    """Most pixels of column ``x`` within ``rows`` have ``colour`` (grid lines and the curve cross it)."""
    return bool(np.mean(np.all(image[rows, x] == colour, axis=-1)) > 0.8)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([1, 1, 0, 0, 1, 0, 1], [(0, 1), (4, 4), (6, 6)]),
        ([0, 1, 1, 1, 0], [(1, 3)]),
        ([1, 1, 1], [(0, 2)]),
        ([-1, -1, 0, 1, -1, 1], [(3, 3), (5, 5)]),
        ([0, 0, -1], []),
        ([], []),
    ],
)
def test_abnormal_ranges(labels, expected):
    assert abnormal_ranges(np.asarray(labels, dtype=np.int8)) == expected


def test_shading_covers_exactly_the_abnormal_frames():
    num_frames = 40
    labels = np.zeros(num_frames, dtype=np.int64)
    labels[:4] = -1
    labels[[5, 6, 7, 12, 20, 21, 22, 23, 24, 25, 39]] = 1
    frames = np.arange(4, num_frames)
    scores = np.full(frames.size, 0.1)
    plot = render_score_plot(scores, frames, num_frames, labels, None, "t", SIZE)
    x0, y0, x1, y1 = plot_area(*SIZE)
    rows = slice(y0 + 2, y1 - 1)
    for frame in range(num_frames):
        x = min(max(plot_x(frame, num_frames, SIZE[1]), x0 + 2), x1 - 2)  # the axes' frame is drawn on the edge columns
        assert _column_is(plot, x, SHADE, rows) == (labels[frame] == 1), frame
    # Between two runs nothing is shaded, also off the frames' own columns.
    for x in range(plot_x(8, num_frames, SIZE[1]) + 1, plot_x(11, num_frames, SIZE[1])):
        assert not np.any(np.all(plot[rows, x] == SHADE, axis=-1)), x
    no_labels = render_score_plot(scores, frames, num_frames, None, None, "t", SIZE)
    assert not np.any(np.all(no_labels[rows] == SHADE, axis=-1))


def test_threshold_line_and_alarms_are_where_the_values_are():
    scores = np.linspace(0.0, 1.0, 50)
    threshold = 0.3
    plot = render_score_plot(scores, np.arange(50), 50, None, threshold, "t", SIZE)
    x0, y0, x1, y1 = plot_area(*SIZE)
    inside = plot[y0 + 1 : y1, x0 + 1 : x1]
    rows = np.flatnonzero(_near(inside, THRESHOLD).sum(axis=1) > 0.3 * inside.shape[1])  # a dashed line across
    assert rows.size >= 1 and rows.max() - rows.min() <= 2
    # The y axis runs from about min - 6% to max + 6% of (0 .. 1): 0.3 lies 0.36 / 1.12 of the way up.
    expected = (y1 - 1 - y0) * (1 - 0.36 / 1.12)
    assert abs(rows.mean() - expected) <= 3
    # Red alarm dots only right of where the rising line crosses the threshold (frame 15 of 0 .. 49).
    alarm_columns = np.flatnonzero(_near(inside, ALARM, 20).any(axis=0)) + x0 + 1
    assert alarm_columns.size and alarm_columns.min() >= plot_x(14.5, 50, SIZE[1]) - 4


def test_cursor_follows_the_frame():
    num_frames = 41
    plot = render_score_plot(np.linspace(0, 1, num_frames), np.arange(num_frames), num_frames, None, 0.5, "t", SIZE)
    frame = np.full((150, 200, 3), 90, dtype=np.uint8)
    error = np.zeros((150, 200), dtype=np.float32)
    _, y0, _, y1 = plot_area(*SIZE)
    rows = slice(y0, y1 + 1)
    xs = []
    for index in (10, 30):
        picture = render_video_frame(frame, error, (0.0, 1.0), plot, index / (num_frames - 1), 0.7, 0.5, 1, "c")
        assert picture.shape[1] == SIZE[1]
        bottom = picture[-SIZE[0] :]
        x = plot_x(index, num_frames, SIZE[1])
        assert _column_is(bottom, x, CURSOR, rows)
        assert np.count_nonzero(np.all(bottom[rows] == CURSOR, axis=-1).any(axis=0)) == 2  # 2 px wide, nowhere else
        xs.append(x)
    assert xs[0] < xs[1]


def test_small_frames_are_upscaled_and_sizes_add_up():
    plot = render_score_plot(np.zeros(3), np.arange(3), 3, None, None, "t", SIZE)
    picture = render_video_frame(
        np.zeros((32, 48, 3), np.uint8), np.zeros((8, 12)), (0, 1), plot, 0.0, 0.0, None, None, "c"
    )
    title = picture.shape[0] - SIZE[0] - 128
    assert title > 0 and picture.shape[1] == SIZE[1]
    assert np.all(picture[title : title + 128, (SIZE[1] - 2 * 192) // 2 + 100] == 0)  # inside the upscaled frame


def test_degenerate_plots_render():
    for scores, frames in [
        (np.zeros(0), np.zeros(0, np.int64)),
        (np.full(5, 2.5), np.arange(5)),
        (np.ones(1), np.array([0])),
    ]:
        plot = render_score_plot(scores, frames, 5, np.array([0, 1, 1, 0, 1]), 2.5, "t", SIZE)
        assert plot.shape == (*SIZE, 3) and plot.dtype == np.uint8
    assert render_score_plot(np.zeros(1), np.array([0]), 1, None, None, "t", SIZE).shape == (*SIZE, 3)


def test_nan_and_bad_input_raise():
    with pytest.raises(ValueError):
        render_score_plot(np.array([0.1, np.nan]), np.arange(2), 2, None, None, "t", SIZE)
    with pytest.raises(ValueError):
        render_score_plot(np.array([0.1, 0.2]), np.arange(2), 2, None, float("nan"), "t", SIZE)
    with pytest.raises(ValueError):
        render_score_plot(np.array([0.1, 0.2]), np.array([0, 2]), 2, None, None, "t", SIZE)
    with pytest.raises(ValueError):
        gif_frame_positions(3, np.array([0.0, np.inf, 1.0]), None, 2)
    plot = render_score_plot(np.zeros(2), np.arange(2), 2, None, None, "t", SIZE)
    with pytest.raises(ValueError):
        render_video_frame(
            np.zeros((8, 8, 3), np.uint8), np.full((8, 8), np.nan), (0, 1), plot, 0.0, 0.0, None, None, "c"
        )


def test_selection_keeps_the_maximum_and_the_events():
    rng = np.random.RandomState(0)
    n = 300
    scores = rng.uniform(0, 1, n)
    scores[137] = 5.0
    labels = np.zeros(n, dtype=np.int64)
    labels[200:240] = 1
    labels[290] = 1
    picks = gif_frame_positions(n, scores, labels, 20)
    assert picks == gif_frame_positions(n, scores.copy(), labels.copy(), 20)
    assert len(picks) == 20 and picks == sorted(set(picks))
    assert 137 in picks and 290 in picks
    assert 8 <= sum(200 <= p < 240 for p in picks) <= 12  # about half the budget, not all of it
    assert picks[0] == 0 and picks[-1] == n - 1  # the rest is spread over the whole video
    assert gif_frame_positions(n, scores, None, 1) == [137]
    assert gif_frame_positions(4, scores[:4], None, 10) == [0, 1, 2, 3]


def test_gif_decodes_to_the_chosen_frames(tmp_path):
    rng = np.random.RandomState(1)
    num_frames = 30
    frame_indices = np.arange(2, num_frames)
    n = frame_indices.size
    frames = [rng.randint(0, 255, (24, 32, 3)).astype(np.uint8) for _ in range(n)]
    error_maps = [rng.uniform(0, 1, (12, 16)).astype(np.float32) for _ in range(n)]
    scores = rng.uniform(0, 1, n)
    labels = np.zeros(num_frames, dtype=np.int64)
    labels[:2] = -1
    labels[15:20] = 1
    targets = [tmp_path / "a" / "v.gif", tmp_path / "b.gif"]
    picks = write_video_gif(
        frames,
        error_maps,
        scores,
        frame_indices,
        num_frames,
        labels,
        0.8,
        "video",
        targets,
        max_frames=8,
        max_width=400,
    )
    assert len(picks) == 8 and int(np.argmax(scores)) in picks
    data = targets[0].read_bytes()
    assert data == targets[1].read_bytes()
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 8
        assert gif.size[0] == 400
        gif.seek(7)
        assert np.asarray(gif.convert("RGB")).shape == (gif.size[1], 400, 3)


def test_plot_x_matches_where_matplotlib_draws_the_frames():
    """A one-frame abnormal run at frame k is shaded around column plot_x(k): the axes sit where plot_area says."""
    num_frames = 21
    for k in (0, 7, 20):
        labels = np.zeros(num_frames, dtype=np.int64)
        labels[k] = 1
        plot = render_score_plot(np.zeros(0), np.zeros(0, np.int64), num_frames, labels, None, "t", SIZE)
        _, y0, _, y1 = plot_area(*SIZE)
        shaded = np.flatnonzero(np.all(plot[(y0 + y1) // 2] == SHADE, axis=-1))
        centre = (shaded.min() + shaded.max()) / 2 if shaded.size else -100
        assert abs(centre - plot_x(k, num_frames, SIZE[1])) <= 2 + (k in (0, 20)) * 8  # edge runs are cut in half


def test_a_live_window_plots_absolute_frame_numbers():
    frames = np.arange(1000, 1040)
    plot = render_score_plot(np.linspace(0, 1, 40), frames, 40, None, 0.5, "live", SIZE, first_frame=1000)
    assert plot.shape == (*SIZE, 3)
    with pytest.raises(ValueError):
        render_score_plot(np.zeros(2), np.array([0, 1]), 40, None, None, "t", SIZE, first_frame=1000)


def test_curves_are_written_per_level_and_their_areas_are_sklearns(tmp_path):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    scores = labels + rng.normal(0, 0.8, 100)
    levels = {"image": [("score", labels, scores)], "pixel": [("map", np.zeros(10), np.arange(10.0))]}
    written = write_curves(tmp_path, levels)
    assert [p.name for p in written] == ["roc_image.png", "pr_image.png"]  # no curve without both classes
    with Image.open(written[0]) as picture:
        assert picture.size == (400, 400)
    # The legend's AUROC is scikit-learn's: drawing the curve from a shuffled copy gives the same picture.
    order = rng.permutation(100)
    shuffled = render_curve("roc", [("score", labels[order], scores[order])], "t")
    assert np.array_equal(render_curve("roc", [("score", labels, scores)], "t"), shuffled)
    assert 0.7 < roc_auc_score(labels, scores) < 1.0
    with pytest.raises(ValueError):
        render_curve("det", [], "t")
