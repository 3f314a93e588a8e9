"""Video anomaly pictures: abnormal ranges, score-plot geometry, cursor, GIF frame selection and the GIF file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from task.anomaly.unsupervised.video.plots import (
    _CURSOR,
    _SHADE,
    _THRESHOLD,
    _layout,
    _value_range,
    _x_at,
    _y_at,
    abnormal_ranges,
    gif_frame_positions,
    plot_x,
    render_score_plot,
    render_video_frame,
    write_video_gif,
)

SIZE = (240, 640)


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
    layout = _layout(*SIZE)
    rows = slice(layout.y0 + 1, layout.y1)
    for frame in range(num_frames):
        assert _column_is(plot, plot_x(frame, num_frames, SIZE[1]), _SHADE, rows) == (labels[frame] == 1), frame
    # Between two runs nothing is shaded, also off the frames' own columns.
    for x in range(plot_x(8, num_frames, SIZE[1]), plot_x(11, num_frames, SIZE[1]) + 1):
        assert not np.any(np.all(plot[rows, x] == _SHADE, axis=-1)), x
    no_labels = render_score_plot(scores, frames, num_frames, None, None, "t", SIZE)
    assert not np.any(np.all(no_labels == _SHADE, axis=-1))


def test_threshold_line_is_at_its_value():
    scores = np.linspace(0.0, 1.0, 50)
    threshold = 0.3
    plot = render_score_plot(scores, np.arange(50), 50, None, threshold, "t", SIZE)
    layout = _layout(*SIZE)
    y = _y_at(threshold, _value_range(scores, threshold), layout)
    assert layout.y0 < y < layout.y1
    dash = slice(layout.x0, layout.x0 + 8)  # the first dash, left of where the rising curve crosses it
    assert np.all(plot[y, dash] == _THRESHOLD)
    assert not np.any(np.all(plot[y - 3, dash] == _THRESHOLD, axis=-1))
    assert not np.any(np.all(plot[y + 4, dash] == _THRESHOLD, axis=-1))


def test_cursor_follows_the_frame():
    num_frames = 41
    plot = render_score_plot(np.linspace(0, 1, num_frames), np.arange(num_frames), num_frames, None, 0.5, "t", SIZE)
    frame = np.full((150, 200, 3), 90, dtype=np.uint8)
    error = np.zeros((150, 200), dtype=np.float32)
    layout = _layout(*SIZE)
    rows = slice(layout.y0 + 1, layout.y1)
    xs = []
    for index in (10, 30):
        picture = render_video_frame(frame, error, (0.0, 1.0), plot, index / (num_frames - 1), 0.7, 0.5, 1, "c")
        assert picture.shape[1] == SIZE[1]
        bottom = picture[-SIZE[0]:]
        x = plot_x(index, num_frames, SIZE[1])
        assert x == _x_at(index / (num_frames - 1), SIZE[1])
        assert _column_is(bottom, x, _CURSOR, rows)
        assert np.count_nonzero(np.all(bottom[rows] == _CURSOR, axis=-1).any(axis=0)) == 2  # 2 px wide, nowhere else
        xs.append(x)
    assert xs[0] < xs[1]


def test_small_frames_are_upscaled_and_sizes_add_up():
    plot = render_score_plot(np.zeros(3), np.arange(3), 3, None, None, "t", SIZE)
    picture = render_video_frame(np.zeros((32, 48, 3), np.uint8), np.zeros((8, 12)), (0, 1), plot, 0.0, 0.0, None, None, "c")
    title = picture.shape[0] - SIZE[0] - 128
    assert title > 0 and picture.shape[1] == SIZE[1]
    assert np.all(picture[title : title + 128, (SIZE[1] - 2 * 192) // 2 + 100] == 0)  # inside the upscaled frame


def test_degenerate_plots_render():
    for scores, frames in [(np.zeros(0), np.zeros(0, np.int64)), (np.full(5, 2.5), np.arange(5)), (np.ones(1), np.array([0]))]:
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
        render_video_frame(np.zeros((8, 8, 3), np.uint8), np.full((8, 8), np.nan), (0, 1), plot, 0.0, 0.0, None, None, "c")


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
    picks = write_video_gif(frames, error_maps, scores, frame_indices, num_frames, labels, 0.8, "video", targets, max_frames=8, max_width=400)
    assert len(picks) == 8 and int(np.argmax(scores)) in picks
    data = targets[0].read_bytes()
    assert data == targets[1].read_bytes()
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 8
        assert gif.size[0] == 400
        gif.seek(7)
        assert np.asarray(gif.convert("RGB")).shape == (gif.size[1], 400, 3)
