"""Video data: layouts, frame order, video files, frame labels (a)-(d), clips, background templates, demo generator."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch

from task.anomaly.unsupervised.data.video import synthetic as synthetic_video
from task.anomaly.unsupervised.data.video.clips import ClipDataset, frames_of, scan_videos, video_from_path
from task.anomaly.unsupervised.data.video.labels import attach_labels, load_frame_labels
from task.anomaly.unsupervised.data.video.synthetic import make_video_demo
from task.anomaly.unsupervised.models.dmad_video.templates import background_for, build_background
from task.common.config import Config
from task.common.errors import UserError

SIZE = 8


def config(root: Path, target: str, clip_length: int = 2, labels: str | None = None, grayscale: bool = False) -> Config:
    return Config(
        {
            "datadir": str(root),
            "target": target,
            "resize": [SIZE, SIZE],
            "cache": True,
            "clip_length": clip_length,
            "labels": labels,
            "grayscale": grayscale,
            "background": "shared",
        }
    )


def frame(value: int, size: int = SIZE) -> np.ndarray:
    """RGB uint8 [size, size, 3]: a flat colour that encodes ``value`` and tells the channels apart."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = (value, 255 - value, value // 2)
    return image


def write_frames(folder: Path, values: list[int], names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for value, name in zip(values, names):
        assert cv2.imwrite(str(folder / name), cv2.cvtColor(frame(value), cv2.COLOR_RGB2BGR))


def write_video(path: Path, values: list[int], fourcc: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (32, 32))
    assert writer.isOpened()
    for value in values:
        writer.write(cv2.cvtColor(frame(value, 32), cv2.COLOR_RGB2BGR))
    writer.release()


def first_values(frames: np.ndarray) -> list[int]:
    """The encoded value (red channel of the top-left pixel) of each decoded RGB frame."""
    return [int(v) for v in frames[:, 0, 0, 0]]


# ---------------------------------------------------------------- layouts and frame order


def test_frames_sorted_by_number_not_string_with_mixed_extensions(tmp_path: Path) -> None:
    values = [10 * k for k in range(1, 13)]
    names = [f"{k}.png" if k % 3 == 0 else f"img_{k}.bmp" if k % 3 == 1 else f"{k:04d}.tif" for k in range(1, 13)]
    write_frames(tmp_path / "ds" / "training" / "frames" / "v1", values, names)
    (tmp_path / "ds" / "training" / "frames" / "v1" / "notes.txt").write_text("not a frame")
    [video] = scan_videos(config(tmp_path, "ds"), "train")
    assert video.num_frames == 12
    assert [p.name for p in video.frames][:4] == ["img_1.bmp", "0002.tif", "3.png", "img_4.bmp"]
    assert sorted(p.name for p in video.frames) != [p.name for p in video.frames]  # string order differs
    assert first_values(frames_of(video, (SIZE, SIZE), False)) == values


def test_videos_naturally_sorted_and_jpg_zero_based(tmp_path: Path) -> None:
    for name in ("Test10", "Test2", "Test1"):
        write_frames(tmp_path / "ds" / "testing" / "frames" / name, [50, 100, 150], ["000.jpg", "001.jpg", "002.jpg"])
    videos = scan_videos(config(tmp_path, "ds"), "test")
    assert [v.name for v in videos] == ["Test1", "Test2", "Test10"]
    decoded = frames_of(videos[0], (SIZE, SIZE), False)
    assert np.allclose(first_values(decoded), [50, 100, 150], atol=3)  # JPEG of a flat colour: within rounding


def test_ucsd_layout_skips_gt_folders(tmp_path: Path) -> None:
    base = tmp_path / "UCSDped2"
    write_frames(base / "Train" / "Train001", [1, 2, 3], ["001.tif", "002.tif", "003.tif"])
    write_frames(base / "Test" / "Test001", [4, 5, 6], ["001.tif", "002.tif", "003.tif"])
    write_frames(base / "Test" / "Test001_gt", [0, 0, 0], ["001.bmp", "002.bmp", "003.bmp"])
    assert [v.name for v in scan_videos(config(tmp_path, "UCSDped2"), "train")] == ["Train001"]
    assert [v.name for v in scan_videos(config(tmp_path, "UCSDped2"), "test")] == ["Test001"]


def test_missing_split_lists_layouts(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    with pytest.raises(UserError) as err:
        scan_videos(config(tmp_path, "ds"), "test")
    message = str(err.value)
    assert "\n" not in message
    for layout in ("testing/frames", "testing/videos", "testing_videos", "Test"):
        assert layout in message


def test_video_shorter_than_clip(tmp_path: Path) -> None:
    write_frames(tmp_path / "ds" / "training" / "frames" / "short", [1, 2, 3], ["1.png", "2.png", "3.png"])
    with pytest.raises(UserError, match=r"short has 3 frames but a clip needs 5 .*clip_length=4"):
        scan_videos(config(tmp_path, "ds", clip_length=4), "train")


def test_unreadable_frame_named(tmp_path: Path) -> None:
    folder = tmp_path / "ds" / "training" / "frames" / "v"
    write_frames(folder, [1, 2], ["1.png", "2.png"])
    (folder / "3.png").write_bytes(b"not a png")
    dataset_videos = scan_videos(config(tmp_path, "ds"), "train")
    with pytest.raises(UserError, match=r"cannot read frame .*3\.png"):
        ClipDataset(dataset_videos, 2, (SIZE, SIZE), False, True)


def test_duplicate_frame_numbers(tmp_path: Path) -> None:
    write_frames(tmp_path / "v", [1, 2, 3], ["1.png", "001.bmp", "2.png"])
    with pytest.raises(UserError, match="same number 1"):
        video_from_path(tmp_path / "v")


# ---------------------------------------------------------------- video files


def test_unreadable_video_named(tmp_path: Path) -> None:
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"cannot read video .*broken\.mp4"):
        video_from_path(tmp_path / "broken.mp4")


@pytest.mark.parametrize("suffix, fourcc", [(".avi", "MJPG"), (".mp4", "mp4v")])
def test_video_file_decoding_and_seeking(tmp_path: Path, suffix: str, fourcc: str) -> None:
    values = [20 * k for k in range(1, 9)]
    path = tmp_path / f"clip{suffix}"
    write_video(path, values, fourcc)
    video = video_from_path(path)
    assert video.is_file and video.num_frames == 8
    full = frames_of(video, (SIZE, SIZE), False)
    assert full.shape == (8, SIZE, SIZE, 3)
    assert np.allclose(first_values(full), values, atol=6)  # lossy codec
    assert np.array_equal(frames_of(video, (SIZE, SIZE), False, [3, 4, 6]), full[[3, 4, 6]])
    cached = ClipDataset([video], 3, (SIZE, SIZE), False, True)
    streamed = ClipDataset([video], 3, (SIZE, SIZE), False, False)
    for item in range(len(cached)):
        assert torch.equal(cached[item]["clip"], streamed[item]["clip"])


def test_shanghaitech_and_avenue_video_layouts(tmp_path: Path) -> None:
    write_video(tmp_path / "shanghaitech" / "training" / "videos" / "01_001.avi", [10, 20, 30, 40], "MJPG")
    (tmp_path / "shanghaitech" / "training" / "frames").mkdir()  # empty: the videos are used
    write_frames(
        tmp_path / "shanghaitech" / "testing" / "frames" / "01_0014", [1, 2, 3], ["000.jpg", "001.jpg", "002.jpg"]
    )
    write_video(tmp_path / "avenue" / "training_videos" / "01.avi", [10, 20, 30], "MJPG")
    write_video(tmp_path / "avenue" / "testing_videos" / "02.avi", [10, 20, 30], "MJPG")
    [train] = scan_videos(config(tmp_path, "shanghaitech"), "train")
    [test] = scan_videos(config(tmp_path, "shanghaitech"), "test")
    assert (train.name, train.is_file, train.num_frames) == ("01_001", True, 4)
    assert (test.name, test.is_file, test.num_frames) == ("01_0014", False, 3)
    assert [v.name for v in scan_videos(config(tmp_path, "avenue"), "test")] == ["02"]


# ---------------------------------------------------------------- clips


def test_clip_items(tmp_path: Path) -> None:
    write_frames(tmp_path / "a", [10, 20, 30, 40], ["1.png", "2.png", "3.png", "4.png"])
    write_frames(tmp_path / "b", [50, 60, 70], ["1.png", "2.png", "3.png"])
    videos = attach_labels(
        [video_from_path(tmp_path / "a"), video_from_path(tmp_path / "b")],
        [np.array([0, 0, 1, 1]), np.array([0, 1, 0])],
    )
    videos[1].labels = None
    dataset = ClipDataset(videos, 2, (SIZE, SIZE), False, True)
    assert len(dataset) == 2 + 1
    item = dataset[1]
    assert item["clip"].shape == (2, 3, SIZE, SIZE) and item["target"].shape == (3, SIZE, SIZE)
    assert item["clip"].is_contiguous() and item["clip"].dtype == torch.float32
    expected = torch.tensor([[20, 235, 10], [30, 225, 15], [40, 215, 20]], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(item["clip"][:, :, 0, 0], expected[:2]) and torch.allclose(
        item["target"][:, 0, 0], expected[2]
    )
    assert (int(item["video"]), int(item["frame"]), int(item["label"])) == (0, 3, 1)
    last = dataset[2]
    assert (int(last["video"]), int(last["frame"]), int(last["label"])) == (1, 2, -1)
    grey = ClipDataset(videos, 2, (SIZE, SIZE), True, False)[0]
    assert grey["clip"].shape == (2, 1, SIZE, SIZE)


def test_pixels_match_official_decoding_up_to_channel_order(tmp_path: Path) -> None:
    """Official: cv2.imread (BGR, or grey with c=1) -> cv2.resize(w, h) bilinear -> x / 127.5 - 1."""
    rng = np.random.default_rng(0)
    for k in range(3):
        assert cv2.imwrite(str(tmp_path / f"{k}.png"), rng.integers(0, 256, size=(13, 19, 3), dtype=np.uint8))
    video = video_from_path(tmp_path)
    colour = ClipDataset([video], 2, (8, 12), False, True)[0]["target"].permute(1, 2, 0).numpy()
    official = cv2.resize(cv2.imread(str(tmp_path / "2.png")), (12, 8)).astype(np.float32) / 127.5 - 1.0
    assert np.allclose(colour[:, :, ::-1], official, atol=1e-6)
    grey = ClipDataset([video], 2, (8, 12), True, True)[0]["target"][0].numpy()
    official_grey = cv2.resize(cv2.imread(str(tmp_path / "2.png"), 0), (12, 8)).astype(np.float32) / 127.5 - 1.0
    assert np.allclose(grey, official_grey, atol=1e-6)


# ---------------------------------------------------------------- labels


def make_test_videos(tmp_path: Path, target: str, counts: list[int], layout: str = "testing/frames") -> list:
    for k, count in enumerate(counts, start=1):
        write_frames(
            tmp_path / target / layout / f"{k:02d}", list(range(count)), [f"{i}.png" for i in range(1, count + 1)]
        )
    return scan_videos(config(tmp_path, target), "test")


def test_labels_concatenated_full_and_trimmed(tmp_path: Path) -> None:
    videos = make_test_videos(tmp_path, "ds", [5, 4])
    full = [np.array([0, 0, 1, 1, 0]), np.array([0, 1, 1, 0])]
    np.save(tmp_path / "ds" / "frame_labels_ds.npy", np.concatenate(full).astype(np.float64)[None])  # MNAD: [1, N]
    got = load_frame_labels(config(tmp_path, "ds"), videos, 2)
    assert [g.tolist() for g in got] == [f.tolist() for f in full]
    trimmed = tmp_path / "official.npy"
    np.save(trimmed, np.array([1, 1, 0, 1, 0], dtype=np.int32))  # first 2 frames of each video dropped
    got = load_frame_labels(config(tmp_path, "ds", labels=str(trimmed)), videos, 2)
    assert [g.tolist() for g in got] == [[1, 1, 1, 1, 0], [1, 1, 1, 0]]  # dropped frames take the first kept label


def test_labels_length_mismatch_message(tmp_path: Path) -> None:
    videos = make_test_videos(tmp_path, "ds", [5, 4])
    np.save(tmp_path / "bad.npy", np.zeros(7))
    with pytest.raises(UserError) as err:
        load_frame_labels(config(tmp_path, "ds", labels=str(tmp_path / "bad.npy")), videos, 2)
    message = str(err.value)
    assert "hold 7 values" in message and "need 9 (every frame) or 5 (without the first clip_length=2" in message
    assert "\n" not in message


def test_labels_missing_says_where_it_looked(tmp_path: Path) -> None:
    videos = make_test_videos(tmp_path, "ds", [3])
    with pytest.raises(UserError) as err:
        load_frame_labels(config(tmp_path, "ds"), videos, 2)
    assert "test_frame_mask" in str(err.value) and "frame_labels_ds.npy" in str(err.value)


def test_labels_non_binary_rejected(tmp_path: Path) -> None:
    videos = make_test_videos(tmp_path, "ds", [3])
    np.save(tmp_path / "ds" / "frame_labels_ds.npy", np.array([0, 2, 1]))
    with pytest.raises(UserError, match="must be 0 .normal. or 1"):
        load_frame_labels(config(tmp_path, "ds"), videos, 2)


def test_labels_shanghaitech_frame_masks(tmp_path: Path) -> None:
    videos = make_test_videos(tmp_path, "shanghaitech", [3, 4])
    masks = tmp_path / "shanghaitech" / "testing" / "test_frame_mask"
    masks.mkdir(parents=True)
    np.save(masks / "01.npy", np.array([0, 1, 1], dtype=np.int8))
    np.save(masks / "02.npy", np.array([1, 0, 0]))
    with pytest.raises(UserError, match=r"02\.npy have 3 values but video .*02 has 4 frames"):
        load_frame_labels(config(tmp_path, "shanghaitech"), videos, 2)
    np.save(masks / "02.npy", np.array([1, 0, 0, 0]))
    assert [g.tolist() for g in load_frame_labels(config(tmp_path, "shanghaitech"), videos, 2)] == [
        [0, 1, 1],
        [1, 0, 0, 0],
    ]


def test_labels_ucsd_m_file(tmp_path: Path) -> None:
    videos = make_test_videos(tmp_path, "UCSDped2", [6, 5], layout="Test")
    (tmp_path / "UCSDped2" / "Test" / "UCSDped2.m").write_text(
        "TestDataset = {};\nTestDataset.gt_frame{1} = [2:4];\nTestDataset.gt_frame{2} = [1:2, 5];\n"
    )
    got = load_frame_labels(config(tmp_path, "UCSDped2"), videos, 2)
    assert [g.tolist() for g in got] == [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1]]
    (tmp_path / "UCSDped2" / "Test" / "UCSDped2.m").write_text(
        "TestDataset.gt_frame{1} = [2:7];\nTestDataset.gt_frame{2} = [1:2];\n"
    )
    with pytest.raises(UserError, match=r"range 2:7 lies outside frames 1\.\.6"):
        load_frame_labels(config(tmp_path, "UCSDped2"), videos, 2)


def test_labels_avenue_mat(tmp_path: Path) -> None:
    write_video(tmp_path / "avenue" / "testing_videos" / "01.avi", [10, 20, 30, 40], "MJPG")
    videos = scan_videos(config(tmp_path, "avenue"), "test")
    cell = np.empty((1, 4), dtype=object)
    for i, hit in enumerate([0, 1, 0, 1]):
        mask = np.zeros((6, 9), dtype=np.uint8)
        mask[2, 3] = hit
        cell[0, i] = mask
    folder = tmp_path / "avenue" / "ground_truth_demo" / "testing_label_mask"
    folder.mkdir(parents=True)
    scipy.io.savemat(str(folder / "1_label.mat"), {"volLabel": cell})
    assert [g.tolist() for g in load_frame_labels(config(tmp_path, "avenue"), videos, 2)] == [[0, 1, 0, 1]]


# Label files of a careless or hostile user: (file name, content, fragments of the one-line error). Two test videos of
# 6 and 5 frames (UCSD layout); the .m cases name the line, the .npy/.mat cases the file.
_M_HEAD = "TestDataset = {};\n"
BAD_LABEL_FILES: dict[str, tuple[str, bytes, tuple[str, ...]]] = {
    "m-repeated-key": (
        "l.m",
        b"gt_frame{1} = [2:4];\ngt_frame{2} = [1:2];\ngt_frame{1} = [5:6];\n",
        ("l.m line 3", "gt_frame{1} again", "first on line 1"),
    ),
    "m-negative-range": (
        "l.m",
        b"gt_frame{1} = [-3:5];\ngt_frame{2} = [1:2];\n",
        ("l.m line 1", "-3:5", "negative frame"),
    ),
    "m-fractional-range": (
        "l.m",
        b"gt_frame{1} = [3.5:5];\ngt_frame{2} = [1:2];\n",
        ("l.m line 1", "3.5:5", "whole frame numbers"),
    ),
    "m-names-not-numbers": (
        "l.m",
        b"gt_frame{1} = [a:b];\ngt_frame{2} = [1:2];\n",
        ("l.m line 1", "a:b", "not a frame range"),
    ),
    "m-stepped-range": (
        "l.m",
        b"gt_frame{1} = [1:2:5];\ngt_frame{2} = [1:2];\n",
        ("l.m line 1", "stepped range 1:2:5", "first:last"),
    ),
    "m-key-not-a-number": (
        "l.m",
        b"gt_frame{k} = [1:2];\ngt_frame{2} = [1:2];\n",
        ("l.m line 1", "gt_frame{k}", "video number"),
    ),
    "m-only-commented-lines": (
        "l.m",
        b"% gt_frame{1} = [1:2];\n%{\ngt_frame{2} = [1:2];\n%}\n",
        ("gives gt_frame{k} for 0 videos",),
    ),
    "m-empty": ("l.m", b"", ("l.m", "is empty (0 bytes)")),
    "npy-zero-bytes": ("l.npy", b"", ("labels", "l.npy", "is empty (0 bytes)")),
    "npy-text": ("l.npy", b"0\n0\n1\n", ("l.npy", "a text file, not a .npy array")),
    "npy-zip": ("l.npy", b"PK\x03\x04" + bytes(40), ("l.npy", "a zip archive (an .npz?)")),
    "npy-claims-1e11-int64": (
        "l.npy",
        b"",
        ("l.npy", "int64 array of shape 100000000000", "nothing was loaded"),
    ),  # content made below
    "mat-zero-bytes": ("mat/1_label.mat", b"", ("1_label.mat", "is empty (0 bytes)")),
    "mat-text": (
        "mat/1_label.mat",
        b"volLabel = 1\n" * 20,
        ("cannot read volLabel", "1_label.mat", "ground_truth_demo"),
    ),
}


@pytest.mark.parametrize("name", list(BAD_LABEL_FILES))
def test_bad_label_file_is_one_line_error(name: str, tmp_path: Path) -> None:
    file_name, content, fragments = BAD_LABEL_FILES[name]
    videos = make_test_videos(tmp_path, "UCSDped2", [6, 5], layout="Test")
    path = tmp_path / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "npy-claims-1e11-int64":  # a 193-byte file whose header claims 800 GB
        import io

        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (10**11,)})
        content = header.getvalue() + bytes(65)
    path.write_bytes(content if not file_name.endswith(".m") or not content else _M_HEAD.encode() + content)
    if file_name.endswith(".m") and content:
        # the file starts with one header line
        fragments = tuple(f.replace("line 1", "line 2").replace("line 3", "line 4") for f in fragments)
    with pytest.raises(UserError) as err:
        labels = str(path.parent if "mat" in file_name else path)
        load_frame_labels(config(tmp_path, "UCSDped2", labels=labels), videos, 2)
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_ucsd_matlab_comments_are_ignored(tmp_path: Path) -> None:
    """A commented-out assignment (``% ...`` or a ``%{ ... %}`` block) never overrides the real line."""
    videos = make_test_videos(tmp_path, "UCSDped2", [6, 5], layout="Test")
    (tmp_path / "l.m").write_text(
        "TestDataset = {};  % ground truth\n"
        "TestDataset.gt_frame{1} = [2:4];   % gt_frame{1} = [1:6];\n"
        "% TestDataset.gt_frame{2} = [1:5];\n"
        "%{\nTestDataset.gt_frame{2} = [3:3];\n%}\n"
        "TestDataset.gt_frame{2} = [1:2, 5];\n"
    )
    got = load_frame_labels(config(tmp_path, "UCSDped2", labels=str(tmp_path / "l.m")), videos, 2)
    assert [g.tolist() for g in got] == [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1]]


def _dangling(folder: Path) -> None:
    (folder / "005.png").symlink_to(folder / "missing.png")


def _fifo(folder: Path) -> None:
    import os

    os.mkfifo(folder / "005.png")


# An entry named like a frame that is not an image file: never dropped silently (a clip would span the hole).
BAD_FRAME_ENTRIES = {
    "dangling-symlink": (_dangling, ("005.png", "dangling symbolic link")),
    "fifo": (_fifo, ("005.png", "not a regular file", "FIFO")),
    "directory": (lambda folder: (folder / "005.png").mkdir(), ("005.png", "is a folder, not an image")),
}


@pytest.mark.parametrize("name", list(BAD_FRAME_ENTRIES))
def test_unreadable_frame_entry_is_one_line_error(name: str, tmp_path: Path) -> None:
    folder = tmp_path / "ds" / "training" / "frames" / "v"
    write_frames(folder, [1, 2, 3, 4], [f"{i:03d}.png" for i in (1, 2, 3, 4)])
    BAD_FRAME_ENTRIES[name][0](folder)
    with pytest.raises(UserError) as err:
        scan_videos(config(tmp_path, "ds"), "train")
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in BAD_FRAME_ENTRIES[name][1]), str(err.value)


def test_frame_numbering_gap_is_a_warning_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "ds" / "training" / "frames" / "v"
    numbers = [1, 2, 3, 10, 11, 13]  # 004-009 and 012 missing
    write_frames(folder, list(range(6)), [f"{i:03d}.png" for i in numbers])
    with caplog.at_level("WARNING", logger="anomaly"):
        videos = scan_videos(config(tmp_path, "ds"), "train")
    assert videos[0].num_frames == 6
    assert "7 frame number(s) missing in 2 gap(s), the first between 003.png and 010.png (numbers 4-9)" in caplog.text


@pytest.mark.parametrize(
    "layout, names, fragments",
    [
        ("testing/videos", ["01.avi", "01.mp4", "02.avi"], ("1 video name(s) repeat", "01.avi", "01.mp4", "'01'")),
        ("testing/frames", ["01", "03 "], ("03 ", "surrounding spaces", "rename it")),
    ],
)
def test_video_names_checked_at_scan_time(
    tmp_path: Path, layout: str, names: list[str], fragments: tuple[str, ...]
) -> None:
    for name in names:
        if layout.endswith("videos"):
            write_video(tmp_path / "ds" / layout / name, [10, 20, 30, 40], "MJPG" if name.endswith(".avi") else "mp4v")
        else:
            write_frames(tmp_path / "ds" / layout / name, [1, 2, 3, 4], ["1.png", "2.png", "3.png", "4.png"])
    with pytest.raises(UserError) as err:
        scan_videos(config(tmp_path, "ds"), "test")
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)


# ---------------------------------------------------------------- background


@pytest.mark.parametrize("count", [7, 8])
def test_background_equals_numpy_median(count: int) -> None:
    frames = np.random.default_rng(count).integers(0, 256, size=(count, 5, 67, 3), dtype=np.uint8)  # > one pixel block
    assert np.array_equal(build_background(frames), np.rint(np.median(frames, axis=0)).astype(np.uint8))


def test_background_for_shared_per_video_and_cache(tmp_path: Path) -> None:
    write_frames(tmp_path / "a", [10, 10, 200], ["1.png", "2.png", "3.png"])
    write_frames(tmp_path / "b", [90, 90, 90, 30], ["1.png", "2.png", "3.png", "4.png"])
    videos = [video_from_path(tmp_path / "a"), video_from_path(tmp_path / "b")]
    per_video = background_for(videos, (SIZE, SIZE), False, True, tmp_path / "cache")
    assert per_video.shape == (2, SIZE, SIZE, 3) and per_video.dtype == np.uint8
    assert (
        per_video[0, 0, 0].tolist() == frame(10)[0, 0].tolist()
        and per_video[1, 0, 0].tolist() == frame(90)[0, 0].tolist()
    )
    shared = background_for(videos, (SIZE, SIZE), True, False, tmp_path / "cache")
    assert shared.shape == (1, SIZE, SIZE, 1)
    grey = np.concatenate([frames_of(v, (SIZE, SIZE), True) for v in videos])  # all 7 frames: under MAX_FRAMES
    assert np.array_equal(shared[0], np.rint(np.median(grey, axis=0)).astype(np.uint8))
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 6 and sum(name.endswith(".png") for name in cached) == 3
    stem = next(name for name in cached if name.startswith("bkg-median_a_") and name.endswith(".npy"))
    np.save(tmp_path / "cache" / stem, np.full((SIZE, SIZE, 3), 7, dtype=np.uint8))  # reused, not rebuilt
    assert background_for(videos, (SIZE, SIZE), False, True, tmp_path / "cache")[0, 0, 0].tolist() == [7, 7, 7]
    # Frames changed in place (same names, same count): a new key, so the template is recomputed.
    write_frames(tmp_path / "a", [50, 50, 200], ["1.png", "2.png", "3.png"])
    videos = [video_from_path(tmp_path / "a"), video_from_path(tmp_path / "b")]
    rebuilt = background_for(videos, (SIZE, SIZE), False, True, tmp_path / "cache")
    assert rebuilt[0, 0, 0].tolist() == frame(50)[0, 0].tolist()


# ---------------------------------------------------------------- synthetic demo


def test_demo_deterministic_and_labels_mark_events(tmp_path: Path) -> None:
    first = make_video_demo(tmp_path / "one")
    second = make_video_demo(tmp_path / "two")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 12 * 72 + 2
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)

    videos = scan_videos(config(tmp_path / "one", "demo", clip_length=4), "test")
    labels = load_frame_labels(config(tmp_path / "one", "demo", clip_length=4), videos, 4)
    events = json.loads((first / ".complete").read_text())["events"]
    background = synthetic_video._background(0, 64, "walkway")
    for index, (video, video_labels) in enumerate(zip(videos, labels)):
        movers, _ = synthetic_video._test_scene(0, index, 64, "walkway")
        without_event = synthetic_video._render(background, movers, 64)
        differs = (frames_of(video, (64, 64), False) != without_event).any(axis=(1, 2, 3))
        assert np.array_equal(differs, video_labels.astype(bool))  # label 1 exactly where the event object shows
        abnormal = np.flatnonzero(video_labels)
        assert np.array_equal(abnormal, np.arange(abnormal[0], abnormal[-1] + 1))  # one event, normal around it
        assert abnormal[0] >= 16 and abnormal[-1] <= 72 - 13
        assert (events[video.name]["first"], events[video.name]["last"]) == (abnormal[0], abnormal[-1])
    assert [e["event"] for e in events.values()] == ["fast", "reverse", "shape"] * 2


def test_demo_interrupted_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic_video, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_video_demo(tmp_path, size=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    target = make_video_demo(tmp_path, size=32)
    assert (target / ".complete").is_file()
    with pytest.raises(UserError, match="delete it or use another"):
        make_video_demo(tmp_path, size=64)
