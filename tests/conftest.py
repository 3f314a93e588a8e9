"""Shared test fixtures: markers and the small trained runs the suite shares (helpers live in ``helpers.py``).

* ``dataset`` / ``trained_run`` (session): one 64x64 synthetic category ``widget`` and ONE 4-step resnet18 training
  run on it through the real CLI, with pictures, GIF, maps, W&B offline and TensorBoard. Tests read it; a test that
  modifies a run copies it first (``trained_run.copy_to``). ``exported_run`` (session) is such a copy with model.onnx.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import (
    BASE,
    CATEGORY,
    N_DEFECT,
    N_GOOD,
    N_TRAIN,
    SECRET,
    SIZE,
    Result,
    assert_ok,
    main_in_process,
    patchcore_args,
    run_cli,
    train_overrides,
    video_args,
)
from task.anomaly.unsupervised.data.video.synthetic import make_video_demo


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU; skipped without one")


@pytest.fixture(autouse=True)
def _no_leaked_log_handlers():
    """In-process runs attach a FileHandler (train.log) to the root logger: detach it after each test."""
    before = list(logging.getLogger().handlers)
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """datadir of a 64x64 synthetic category ``widget``: 6 train, 3 good + 4 defective (scratch, spot) test images."""
    from task.anomaly.unsupervised.data.image.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(root, CATEGORY, n_train=N_TRAIN, n_test_good=N_GOOD, n_test_defect=N_DEFECT, size=SIZE)
    return root


@dataclass
class TrainedRun:
    datadir: Path
    savedir: Path
    assets: Path
    result: subprocess.CompletedProcess
    overrides: list[str] = field(default_factory=list)  # the training overrides (without the reporters)

    @property
    def run_dir(self) -> Path:
        return self.savedir / "dmad" / CATEGORY

    @property
    def category_dir(self) -> Path:
        return self.datadir / CATEGORY

    def args(self, savedir: Path | None = None, *extra: str) -> list[str]:
        """BASE + the training overrides (with another savedir, no assets copy) + ``extra``."""
        if savedir is None:
            return BASE + self.overrides + list(extra)
        return BASE + train_overrides(self.datadir, savedir) + list(extra)

    def copy_to(self, savedir: Path) -> Path:
        """A copy of the run directory (without the reporters' folders) at ``<savedir>/dmad/widget``; returns it."""
        target = savedir / "dmad" / CATEGORY
        shutil.copytree(self.run_dir, target, ignore=shutil.ignore_patterns("wandb", "tensorboard", ".lock"))
        return target


@pytest.fixture(scope="session")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """THE trained run: ``python main.py`` (the end-to-end path) with W&B offline, TensorBoard and an API key in the
    environment. Read-only for tests: copy it (``copy_to``) before changing anything."""
    root = tmp_path_factory.mktemp("shared-run")
    savedir, assets = root / "runs", root / "assets"
    overrides = train_overrides(dataset, savedir, assets)
    reporters = ["LOG.wandb=true", "LOG.wandb_mode=offline", "LOG.tensorboard=true"]
    result = run_cli(*BASE, *overrides, *reporters, env={"WANDB_API_KEY": SECRET})
    assert_ok(result)
    return TrainedRun(dataset, savedir, assets, result, overrides)


@dataclass
class ExportedRun:
    run_dir: Path
    args: list[str]  # BASE + overrides that point at this copy
    export: Result  # the --mode export call


@pytest.fixture(scope="session")
def exported_run(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> ExportedRun:
    """A copy of the shared run with model.onnx from ``--mode export`` (in-process)."""
    savedir = tmp_path_factory.mktemp("exported") / "runs"
    run_dir = trained_run.copy_to(savedir)
    args = trained_run.args(savedir)
    export = main_in_process(*args, "--mode", "export")
    assert_ok(export)
    return ExportedRun(run_dir, args, export)


@pytest.fixture(scope="session")
def video_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic video demo at 64x64 (6 training and 6 test videos)."""
    root = tmp_path_factory.mktemp("video_data")
    make_video_demo(root, "video_demo", size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def video_run(video_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """THE trained video run (2 steps through main.py, in-process); returns its RESULT.savedir. Read-only for tests."""
    savedir = tmp_path_factory.mktemp("video_runs")
    assert_ok(main_in_process(*video_args(video_data, savedir, "TRAIN.num_training_steps=2", "TRAIN.save_interval=1")))
    return savedir


@pytest.fixture(scope="session")
def patchcore_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path, str]:
    """THE PatchCore run on the shared 64x64 dataset: (args, run directory, stdout of the training). Read-only."""
    savedir = tmp_path_factory.mktemp("patchcore") / "runs"
    args = patchcore_args(
        dataset, savedir, "MODEL.coreset_ratio=0.25", "TEST.save_images=false"
    )  # pictures: DMAD's tests
    result = main_in_process(*args)
    assert_ok(result)
    return args, savedir / "patchcore" / CATEGORY, result.stdout
