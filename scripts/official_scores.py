"""Convert the official DMAD-PDM per-frame score files into ``scores.npz`` and print the paper-protocol metrics.

The official repository (FlappyPeggy/DMAD) commits per-frame scores under ``DMAD-PDM/exp/`` and frame labels under
``DMAD-PDM/data/``. This script reads them from a local copy of that repository (given on the command line; its
files are never copied into this repository), writes one ``scores.npz`` per dataset (``score_file`` format) and
evaluates it with ``frame_scoring.evaluate_scores``. Nothing in the test suite needs it.

Exact command (the official repository as a bare mirror; take its files out with ``git show``):

    mkdir -p /tmp/dmad/DMAD-PDM/exp /tmp/dmad/DMAD-PDM/data
    for f in exp/res_list.npz exp/res_list_ped2.npz exp/res_list_avenue.npz exp/res_list_shanghai.npz \\
             data/frame_labels_ped2.npy data/frame_labels_avenue.npy data/frame_labels_shanghai.npy; do
        git -C /work/.mirror/FlappyPeggy+DMAD/repo show HEAD:DMAD-PDM/$f > /tmp/dmad/DMAD-PDM/$f
    done
    python scripts/official_scores.py /tmp/dmad --out /tmp/dmad/scores

Measured (frame AUROC, %; paper: Ped2 99.7, Avenue 92.8, ShanghaiTech 78.8), each bit-identical to the official
evaluation code run on the same file:

    ped2                  99.6905  (12 videos, 1962 frames)
    avenue                92.8443  (21 videos, 15240 frames)
    shanghaitech          78.7570  (107 videos, 40363 frames)
    shanghaitech_res_list 78.7226  (res_list.npz: another ShanghaiTech run, same protocol)

What each official file holds, and how it is read (``clip_length = 4``: the first 4 frames of every video have no
score; the official label files already omit them, so those frames get label -1 = unknown here):

* ``res_list_ped2.npz``: ``arr_0 .. arr_4`` per-video ``1 - min-max`` values of five scores and ``arr_5 = 1 -
  labels``. The evaluation kept (commented out) at the end of ``Evaluate_ped2.py`` fuses ``arr_0, arr_1, arr_4``
  with 0.2 / 0.4 / 0.6: stored as deformation / prediction / gradient with sign -1 (higher = more normal) and
  evaluated with the ``ped2`` preset minus its normalisation (already applied).
* ``res_list_avenue.npz``: ``offset_res`` and ``patch_res``, the raw scores ``process_avenue.py`` derives from the
  deformation offsets and the prediction error after removing static objects: stored as deformation /
  prediction (sign +1), evaluated with the ``avenue`` preset as is.
* ``res_list_shanghai.npz``: ``arr_0 .. arr_4`` per-video ``1 - min-max`` values already smoothed per video (the
  preset's ``PRE_SMOOTH``) and ``arr_5 = 1 - labels``. The commented evaluation in ``Evaluate_shanghai.py`` sums
  ``arr_0 * 0.2 + arr_2 * 0.6 + arr_3 * 0.4``; ``arr_2`` / ``arr_3`` match the ``list3`` (object score, called
  gradient here) / ``list2`` (prediction) columns of ``res_list.npz``, which ``Evaluate_shanghai.py`` writes as
  ``list1, list2, list3, 1 - labels``. Evaluated with the ``shanghaitech`` preset minus normalisation and
  ``PRE_SMOOTH``, names in the commented code's addition order (deformation, gradient, prediction).
* ``res_list.npz``: that ShanghaiTech layout (``arr_0 .. arr_2`` = deformation, prediction, gradient).

Video lengths (the official code counts the frames in the dataset folders): Ped2 and Avenue use the public test
sets' frame counts below; ShanghaiTech's are read from the files themselves: the per-video window (69 frames,
result one past the centre) leaves exactly 35 leading and 33 trailing values of 1.0 in every video, so each video
boundary lies 33 values into a run of 68 ones (this gives 107 videos and 40791 frames, the public test set).
``--frames-root`` (one sub-folder of ``*.jpg`` per test video) counts them from a dataset copy instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file from anywhere

from task.anomaly.unsupervised.models.dmad_video.presets import PAPER_PRESETS  # noqa: E402
from task.anomaly.unsupervised.scoring.protocols import evaluate_scores  # noqa: E402
from task.anomaly.unsupervised.scoring.score_file import ScoreFile, write_scores  # noqa: E402
from task.anomaly.unsupervised.scoring.settings import ProtocolParams  # noqa: E402
from task.common.errors import UserError  # noqa: E402

CLIP_LENGTH = 4  # official time_step: 4 input frames predict the 5th
PAPER_AUROC = {"ped2": 99.7, "avenue": 92.8, "shanghaitech": 78.8}  # res_list.npz is another run, not in the paper
# Frames per test video of the public datasets, in sorted folder order.
PED2_FRAMES = [180, 180, 150, 180, 150, 180, 180, 180, 120, 150, 180, 180]
AVENUE_FRAMES = [
    1439,
    1211,
    923,
    947,
    1007,
    1283,
    605,
    36,
    1175,
    841,
    472,
    1271,
    549,
    507,
    1001,
    740,
    426,
    294,
    248,
    273,
    76,
]
SHANGHAI_EDGE = (35, 33)  # values left at 1.0 before / after the official per-video 69-frame window


@dataclass
class Source:
    """How one official file maps onto score names."""

    file: str
    labels: str
    preset: str
    columns: dict[str, str]  # score name -> npz key, in the official addition order
    label_key: str | None  # npz key holding 1 - labels, checked against the label file
    sign: int
    overrides: dict


SOURCES = {
    "ped2": Source(
        "exp/res_list_ped2.npz",
        "data/frame_labels_ped2.npy",
        "ped2",
        {"deformation": "arr_0", "prediction": "arr_1", "gradient": "arr_4"},
        "arr_5",
        -1,
        {"normalize": "none"},
    ),
    "avenue": Source(
        "exp/res_list_avenue.npz",
        "data/frame_labels_avenue.npy",
        "avenue",
        {"deformation": "offset_res", "prediction": "patch_res"},
        None,
        1,
        {},
    ),
    "shanghaitech": Source(
        "exp/res_list_shanghai.npz",
        "data/frame_labels_shanghai.npy",
        "shanghaitech",
        {"deformation": "arr_0", "gradient": "arr_2", "prediction": "arr_3"},
        "arr_5",
        -1,
        {"normalize": "none"},
    ),
    "shanghaitech_res_list": Source(
        "exp/res_list.npz",
        "data/frame_labels_shanghai.npy",
        "shanghaitech",
        {"deformation": "arr_0", "prediction": "arr_1", "gradient": "arr_2"},
        "arr_3",
        -1,
        {"normalize": "none"},
    ),
}


def protocol(src: Source) -> ProtocolParams:
    """The dataset preset minus the steps already applied inside the official file."""
    cfg = {**PAPER_PRESETS[src.preset], **src.overrides}
    names = list(src.columns)
    weight_of = dict(zip(cfg["names"], cfg["weights"]))
    cfg.update(names=names, weights=[weight_of[n] for n in names], signs=[src.sign] * len(names))
    if src.preset == "shanghaitech":
        cfg["PRE_SMOOTH"] = {**cfg["PRE_SMOOTH"], "enabled": False}
    return ProtocolParams.from_config(cfg)


def shanghai_lengths(presmoothed: np.ndarray) -> list[int]:
    """Video lengths (in frames, scored + 4) from the 1.0 runs the official per-video window leaves."""
    ones = np.diff(np.concatenate([[0], (presmoothed == 1.0).astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(ones == 1), np.flatnonzero(ones == -1)
    lead, trail = SHANGHAI_EDGE
    cuts = [int(s) + trail for s, e in zip(starts, ends) if e - s == lead + trail]
    bounds = [0, *cuts, presmoothed.size]
    return [b - a + CLIP_LENGTH for a, b in zip(bounds[:-1], bounds[1:])]


def folder_lengths(frames_root: Path) -> tuple[list[str], list[int]]:
    """Sorted sub-folder names and their ``*.jpg`` counts, as the official evaluation reads them."""
    folders = sorted(p for p in frames_root.iterdir() if p.is_dir())
    if not folders:
        raise UserError(f"--frames-root {frames_root} has no video sub-folders; pass <dataset>/testing/frames")
    return [p.name for p in folders], [len(list(p.glob("*.jpg"))) for p in folders]


def convert(repo: Path, name: str, frames_root: Path | None) -> ScoreFile:
    """Read one official score file and its labels into a ``ScoreFile``."""
    src = SOURCES[name]
    paths = [repo / src.file, repo / src.labels]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path} not found; pass the official repository's root (or its DMAD-PDM folder)")
    data = np.load(paths[0], allow_pickle=False)
    labels = np.asarray(np.load(paths[1], allow_pickle=False)).reshape(-1).astype(np.int8)
    columns = {n: np.asarray(data[k]) for n, k in src.columns.items()}
    if src.label_key is not None and not np.array_equal(np.asarray(data[src.label_key]).reshape(-1), 1 - labels):
        raise UserError(
            f"{paths[0]}: {src.label_key} is not 1 - labels of {paths[1]}; the files do not belong together"
        )
    if frames_root is not None:
        videos, lengths = folder_lengths(frames_root)
    elif src.preset == "ped2":
        videos, lengths = [f"{i + 1:02d}" for i in range(len(PED2_FRAMES))], PED2_FRAMES
    elif src.preset == "avenue":
        videos, lengths = [f"{i + 1:02d}" for i in range(len(AVENUE_FRAMES))], AVENUE_FRAMES
    else:
        lengths = shanghai_lengths(columns["deformation"])
        videos = [f"video_{i + 1:03d}" for i in range(len(lengths))]
    scored = [n - CLIP_LENGTH for n in lengths]
    if sum(scored) != labels.size or any(c.size != labels.size for c in columns.values()):
        raise UserError(
            f"{name}: {len(lengths)} videos give {sum(scored)} scored frames but the files hold {labels.size}; check "
            "--frames-root"
        )
    cuts = np.cumsum(scored)[:-1]
    full_labels = [np.concatenate([np.full(CLIP_LENGTH, -1, np.int8), part]) for part in np.split(labels, cuts)]
    return ScoreFile(
        dataset=src.preset,
        clip_length=CLIP_LENGTH,
        videos=videos,
        scores={n: np.split(c, cuts) for n, c in columns.items()},
        labels=full_labels,
        frames=[np.arange(CLIP_LENGTH, n, dtype=np.int64) for n in lengths],
        # The official file holds values some protocol steps were already applied to: the file says so, and
        # --mode score evaluates it with these settings instead of the YAML's SCORE section.
        extra={
            "source": f"official DMAD-PDM/{src.file} (FlappyPeggy/DMAD); sign -1 = stored higher-is-normal values",
            "protocol": protocol(src).to_config(),
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "official", type=Path, help="local copy of the official repository (root or its DMAD-PDM folder)"
    )
    parser.add_argument("--dataset", choices=[*SOURCES, "all"], default="all")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for scores_<dataset>.npz (outside this repository); default: a temporary folder",
    )
    parser.add_argument(
        "--frames-root",
        type=Path,
        default=None,
        help="<dataset>/testing/frames, to count video lengths (one dataset only)",
    )
    args = parser.parse_args(argv)
    try:
        repo = args.official / "DMAD-PDM" if (args.official / "DMAD-PDM").is_dir() else args.official
        names = list(SOURCES) if args.dataset == "all" else [args.dataset]
        if args.frames_root is not None and len(names) > 1:
            raise UserError("--frames-root describes one dataset; pass --dataset too")
        if args.out is not None and args.out.resolve().is_relative_to(ROOT):
            raise UserError(f"--out {args.out} is inside this repository; official data must stay outside it")
        with tempfile.TemporaryDirectory() as tmp:
            out = args.out or Path(tmp)
            print(
                f"{'dataset':<22} {'videos':>6} {'frames':>6} {'AUROC %':>9} {'paper':>6} {'AUPR %':>8}  per-video "
                "AUROC (mean of defined)"
            )
            for name in names:
                path = write_scores(out / f"scores_{name}.npz", convert(repo, name, args.frames_root))
                res = evaluate_scores(path, protocol(SOURCES[name]))
                auroc = 100 * res["frame_auroc"]
                defined = [v for v in res["per_video_auroc"].values() if v is not None]
                paper = PAPER_AUROC.get(name)
                match = (
                    "not in the paper"
                    if paper is None
                    else "matches the paper"
                    if round(auroc, 1) == paper
                    else "DIFFERS from the paper"
                )
                print(
                    f"{name:<22} {res['videos']:>6} {res['frames']:>6} {auroc:>9.4f} {paper or '-':>6} "
                    f"{100 * res['frame_aupr']:>8.4f}  "
                    f"{100 * np.mean(defined):.2f} over {len(defined)} videos  [{match}]"
                )
            if args.out is not None:
                print(f"wrote {', '.join(f'scores_{n}.npz' for n in names)} to {out}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
