"""Nothing lost, nobody surprised: user errors, interrupted runs, NaN losses, side-channel failures, untrusted files.

Every user mistake must end with exit code 2 and exactly one ``error: ...`` line on stderr that names the problem
and the fix, without a traceback. The full table of mistakes runs in-process through ``main.main`` (same code path,
no interpreter start-up per case); a representative subset also runs as a real ``python main.py`` subprocess.
Interrupted training is tested with a genuinely SIGKILLed subprocess that must resume to bit-identical weights.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # main.py lives at the repository root
    sys.path.insert(0, str(REPO))

import main as cli  # noqa: E402
from task.anomaly.unsupervised.data.synthetic import make_demo_dataset  # noqa: E402
from task.anomaly.unsupervised.inference import Predictions  # noqa: E402
from task.anomaly.unsupervised.models.dmad import trainer as trainer_module  # noqa: E402
from task.anomaly.unsupervised.models.dmad.config import SCHEMA  # noqa: E402
from task.anomaly.unsupervised.models.dmad.trainer import DMADTrainer, build_model  # noqa: E402
from task.common.config import load_config  # noqa: E402
from task.common.errors import UserError  # noqa: E402
from task.common.io import load_checkpoint, save_checkpoint  # noqa: E402

DEMO_YAML = REPO / "configs" / "anomaly" / "unsupervised" / "dmad" / "demo.yaml"
BASE = ["--task_type", "anomaly", "--model_name", "dmad", "--yaml_config", str(DEMO_YAML)]
SECRET = "tnv-test-secret-9f3c1a7e5b"
STEPS = 4  # 6 images, batch 2: 3 steps per epoch, so the step-2 checkpoint is mid-epoch and resuming crosses an epoch end


def data_overrides(data: Path) -> list[str]:
    return [f"DATASET.datadir={data}", "DATASET.target=demo", "DATASET.demo=false", "DATASET.resize=[64,64]"]


def train_overrides(data: Path, savedir: Path) -> list[str]:
    """A tiny CPU run: resnet18 (demo.yaml), 64x64, batch 2, 4 steps, last.pt every 2 steps, no pictures."""
    return data_overrides(data) + [
        "DATALOADER.batch_size=2", f"TRAIN.num_training_steps={STEPS}", "TRAIN.save_interval=2", "TEST.batch_size=8",
        "TEST.save_images=false", "LOG.log_interval=1", "RESULT.assets_dir=null", f"RESULT.savedir={savedir}",
    ]


def main_command(args: list[str]) -> list[str]:
    return [sys.executable, "main.py", *BASE, *args]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment for CLI runs: CPU only, so that runs are bit-for-bit reproducible (cuDNN autotuning is not)."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", **extra)


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(args), cwd=REPO, capture_output=True, text=True, timeout=900, env=cpu_env(**env))


def assert_one_error_line(rc: int, stderr: str, fragments: tuple[str, ...]) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """datadir of a 64x64 synthetic category 'demo': 6 train, 2 good + 2 defective test images."""
    root = tmp_path_factory.mktemp("robust-data")
    make_demo_dataset(root, "demo", n_train=6, n_test_good=2, n_test_defect=2, size=64)
    return root


@pytest.fixture(scope="module")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One uninterrupted run (W&B offline on, an API key in the environment); returns (run_dir, its CLI args)."""
    savedir = tmp_path_factory.mktemp("robust-runs") / "base"
    args = train_overrides(dataset, savedir) + ["LOG.wandb=true", "LOG.wandb_mode=offline"]
    result = run_cli(args, WANDB_API_KEY=SECRET)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = savedir / "dmad" / "demo"
    assert (run_dir / "model.pt").is_file() and (run_dir / "last.pt").is_file()
    return run_dir, args


@pytest.fixture(autouse=True)
def _no_leaked_log_handlers():
    """In-process runs attach a FileHandler (train.log) to the root logger: detach it after each test."""
    before = list(logging.getLogger().handlers)
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()


def broken_copy(dataset: Path, tmp: Path, breaker: Callable[[Path], None]) -> Path:
    """A copy of the dataset whose category folder ``breaker`` damages; returns the new datadir."""
    data = tmp / "data"
    shutil.copytree(dataset / "demo", data / "demo")
    breaker(data / "demo")
    return data


def truncate(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def empty_folder(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()


class _Evil:
    """Unpickling this object runs ``touch <marker>`` (if the loader lets it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil_checkpoint(path: Path, marker: Path) -> None:
    """A torch.save zip that looks like a DMAD checkpoint but carries the payload."""
    torch.save({"format": "tnvision-dmad", "config": {}, "state_dict": {}, "payload": _Evil(marker)}, path)


def write_evil_pickle(path: Path, marker: Path) -> None:
    """A bare pickle (the pre-zip torch format) of the payload."""
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))


# --------------------------------------------------------------------------- the table of user mistakes


@dataclass
class Ctx:
    """What a case needs: the good dataset, a scratch folder, and (lazily) the trained checkpoint."""

    dataset: Path
    tmp: Path
    request: pytest.FixtureRequest

    @property
    def checkpoint(self) -> Path:
        run_dir, _ = self.request.getfixturevalue("trained_run")
        return run_dir / "model.pt"

    def train(self, *extra: str, data: Path | None = None) -> list[str]:
        return train_overrides(data or self.dataset, self.tmp / "runs") + list(extra)

    def test_with(self, checkpoint: Path, *extra: str) -> list[str]:
        return ["--mode", "test", "--checkpoint", str(checkpoint), *self.train(*extra)]

    def file(self, name: str, content: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content)
        return path

    def saved(self, name: str, obj: object) -> Path:
        path = self.tmp / name
        torch.save(obj, path)
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir()
        return path


@dataclass(frozen=True)
class Case:
    argv: Callable[[Ctx], list[str]]
    fragments: tuple[str, ...]
    cli: bool = False  # also run as a real subprocess


def _yaml_file(ctx: Ctx, text: str) -> list[str]:
    return ["--yaml_config", str(ctx.file("bad.yaml", text.encode())), *ctx.train()]


CASES: dict[str, Case] = {
    # configuration
    "yaml-missing": Case(lambda c: ["--yaml_config", str(c.tmp / "nope.yaml"), *c.train()], ("config file not found", "nope.yaml")),
    "yaml-syntax": Case(lambda c: _yaml_file(c, "DATASET:\n  resize: [64, 64\nTRAIN: {"), ("YAML syntax error", "bad.yaml", "line"), cli=True),
    "yaml-unknown-key": Case(lambda c: _yaml_file(c, "DATASET:\n  resise: [64, 64]\n"), ("unknown config key DATASET.resise", "did you mean resize")),
    "yaml-wrong-type": Case(lambda c: _yaml_file(c, "DATALOADER:\n  batch_size: four\n"), ("DATALOADER.batch_size", "expects int", "'four'")),
    "override-unknown-key": Case(lambda c: c.train("DATASET.foo=1"), ("unknown config key DATASET.foo",)),
    "override-not-key-value": Case(lambda c: c.train("DATASET.resize"), ("not KEY=VALUE",)),
    "batch-size-abc": Case(lambda c: c.train("DATALOADER.batch_size=abc"), ("DATALOADER.batch_size", "expects int", "'abc'")),
    "resize-three-items": Case(lambda c: c.train("DATASET.resize=[1,2,3]"), ("DATASET.resize", "list of 2 items")),
    "resize-not-multiple-of-32": Case(lambda c: c.train("DATASET.resize=[100,100]"), ("DATASET.resize", "multiple of 32", "100")),
    "resize-too-small": Case(lambda c: c.train("DATASET.resize=[32,32]"), ("DATASET.resize", ">= 64")),
    "batch-size-zero": Case(lambda c: c.train("DATALOADER.batch_size=0"), ("DATALOADER.batch_size", ">= 1", "got 0")),
    "steps-negative": Case(lambda c: c.train("TRAIN.num_training_steps=-1"), ("TRAIN.num_training_steps", ">= 1", "-1")),
    "lr-negative": Case(lambda c: c.train("OPTIMIZER.lr=-1"), ("OPTIMIZER.lr", "> 0", "-1"), cli=True),
    "lr-nan": Case(lambda c: c.train("OPTIMIZER.lr=.nan"), ("OPTIMIZER.lr", "finite")),
    "beta-one": Case(lambda c: c.train("OPTIMIZER.betas=[0.5,1.0]"), ("OPTIMIZER.betas", "[0, 1)")),
    "backbone-choice": Case(lambda c: c.train("MODEL.backbone=vgg16"), ("MODEL.backbone", "resnet18")),
    # dataset
    "datadir-missing": Case(lambda c: c.train(data=c.tmp / "absent"), ("dataset folder", "absent", "DATASET.datadir")),
    "datadir-empty": Case(
        lambda c: c.train(data=c.folder("empty")), ("category folder", "DATASET.target", "none")
    ),
    "category-missing": Case(lambda c: c.train("DATASET.target=cable"), ("category folder", "cable", "available categories: demo")),
    "category-escapes": Case(lambda c: c.train("DATASET.target=../x"), ("invalid DATASET.target", "'../x'", "plain folder name")),
    "train-good-missing": Case(
        lambda c: c.train(data=broken_copy(c.dataset, c.tmp, lambda d: shutil.rmtree(d / "train" / "good"))), ("no images in", "train/good")
    ),
    "train-good-empty": Case(
        lambda c: c.train(data=broken_copy(c.dataset, c.tmp, lambda d: empty_folder(d / "train" / "good"))), ("no images in", "train/good")
    ),
    "truncated-image": Case(
        lambda c: c.train(data=broken_copy(c.dataset, c.tmp, lambda d: truncate(d / "train" / "good" / "003.png"))),
        ("cannot read image", "train/good/003.png", "truncated", "replace or delete"),
        cli=True,
    ),
    "unreadable-image": Case(
        lambda c: c.train(data=broken_copy(c.dataset, c.tmp, lambda d: (d / "test" / "good" / "001.png").write_bytes(os.urandom(512)))),
        ("cannot read image", "test/good/001.png"),
    ),
    "defect-without-mask": Case(
        lambda c: c.train(data=broken_copy(c.dataset, c.tmp, lambda d: (d / "ground_truth" / "spot" / "000_mask.png").unlink())),
        ("defect image", "spot/000.png", "has no mask", "000_mask.png"),
    ),
    "mask-other-size": Case(
        lambda c: c.train(
            data=broken_copy(c.dataset, c.tmp, lambda d: Image.new("L", (32, 32)).save(d / "ground_truth" / "scratch" / "000_mask.png"))
        ),
        ("mask", "scratch/000_mask.png", "32x32", "64x64"),
    ),
    # outputs
    "savedir-under-a-file": Case(
        lambda c: c.train(f"RESULT.savedir={c.file('plain-file', b'x') / 'sub'}"), ("cannot create output folder", "plain-file/sub", "RESULT.savedir"),
        cli=True,
    ),
    # checkpoints
    "checkpoint-missing": Case(lambda c: c.test_with(c.tmp / "absent.pt"), ("checkpoint not found", "absent.pt")),
    "checkpoint-other-backbone": Case(
        lambda c: c.test_with(c.checkpoint, "MODEL.backbone=resnet34"), ("MODEL.backbone='resnet18'", "'resnet34'", "overrides"), cli=True
    ),
    "checkpoint-other-size": Case(lambda c: c.test_with(c.checkpoint, "DATASET.resize=[96,96]"), ("DATASET.resize=[64, 64]", "[96, 96]")),
    "checkpoint-random-bytes": Case(
        lambda c: c.test_with(c.file("random.pt", np.random.RandomState(0).bytes(4096))), ("random.pt", "not a PyTorch checkpoint")
    ),
    "checkpoint-text": Case(lambda c: c.test_with(c.file("notes.pt", b"epoch 10: loss 0.3\n")), ("notes.pt", "not a PyTorch checkpoint")),
    "checkpoint-empty": Case(lambda c: c.test_with(c.file("empty.pt", b"")), ("empty.pt", "is empty")),
    "checkpoint-truncated": Case(
        lambda c: c.test_with(c.file("half.pt", c.checkpoint.read_bytes()[:20000])), ("half.pt", "damaged or truncated")
    ),
    "checkpoint-a-list": Case(lambda c: c.test_with(c.saved("list.pt", [1, 2])), ("list.pt", "holds a list")),
    "checkpoint-backbone-weights": Case(
        lambda c: c.test_with(c.saved("r18.pt", {"conv1.weight": torch.zeros(1)})),
        ("r18.pt", "neither a DMAD checkpoint"),
    ),
    "checkpoint-without-config": Case(
        lambda c: c.test_with(c.saved("bare.pt", {"format": "tnvision-dmad"})), ("bare.pt", "lacks its config")
    ),
}


def full_argv(argv: list[str]) -> list[str]:
    """Cases that bring their own --yaml_config replace the demo one."""
    if "--yaml_config" not in argv:
        return BASE + argv
    i = argv.index("--yaml_config")
    return ["--task_type", "anomaly", "--model_name", "dmad", *argv[i : i + 2], *argv[:i], *argv[i + 2 :]]


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_in_process(name: str, dataset: Path, tmp_path: Path, request, capsys, monkeypatch) -> None:
    case = CASES[name]
    argv = case.argv(Ctx(dataset, tmp_path, request))
    monkeypatch.setattr(cli, "setup_logging", lambda: None)  # keep pytest's own logging set-up untouched
    capsys.readouterr()
    rc = cli.main(full_argv(argv))
    assert_one_error_line(rc, capsys.readouterr().err, case.fragments)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.cli])
def test_user_error_cli(name: str, dataset: Path, tmp_path: Path, request) -> None:
    argv = full_argv(CASES[name].argv(Ctx(dataset, tmp_path, request)))
    result = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=900, env=cpu_env())
    assert_one_error_line(result.returncode, result.stderr, CASES[name].fragments)


@pytest.mark.parametrize("kind", ["zip", "bare-pickle"])
def test_malicious_checkpoint_is_refused_and_never_runs(kind: str, dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A pickle whose loading would run ``touch PWNED``: refused with a clear message, and the file never appears.

    The zip (torch.save) file goes through a real ``python main.py``; the bare pickle through ``main.main``.
    """
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    (write_evil_checkpoint if kind == "zip" else write_evil_pickle)(evil, marker)
    argv = ["--mode", "test", "--checkpoint", str(evil), *train_overrides(dataset, tmp_path / "runs")]
    fragments = ("refusing to load", "evil.pt", "would import", "system", "only tensors")
    if kind == "zip":
        result = run_cli(argv)
        assert_one_error_line(result.returncode, result.stderr, fragments)
    else:
        monkeypatch.setattr(cli, "setup_logging", lambda: None)
        capsys.readouterr()
        assert_one_error_line(cli.main(BASE + argv), capsys.readouterr().err, fragments)
    assert not marker.exists()


def test_predict_without_images(trained_run, tmp_path: Path, capsys, monkeypatch) -> None:
    if not hasattr(DMADTrainer, "mode_predict"):
        pytest.skip("--mode predict is not implemented yet")
    run_dir, args = trained_run
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    monkeypatch.setattr(cli, "setup_logging", lambda: None)
    capsys.readouterr()
    rc = cli.main(BASE + ["--mode", "predict", "--checkpoint", str(run_dir / "model.pt"), "--input", str(tmp_path / "empty"), *args])
    assert_one_error_line(rc, capsys.readouterr().err, ("no images in", "empty"))


def test_skip_bad_images_warns_with_a_count(dataset: Path, tmp_path: Path) -> None:
    data = broken_copy(dataset, tmp_path, lambda d: truncate(d / "train" / "good" / "002.png"))
    cfg = load_config(SCHEMA, DEMO_YAML, train_overrides(data, tmp_path / "runs") + ["DATASET.skip_bad_images=true"])
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 6: .*002\.png"):
        train_set = DMADTrainer(cfg).dataset("train")
    assert len(train_set) == 5 and train_set.skipped == [str(data / "demo" / "train" / "good" / "002.png")]


# --------------------------------------------------------------------------- interrupted runs


@pytest.mark.parametrize("interruption", [OSError(28, "No space left on device"), RuntimeError("writer crashed"), KeyboardInterrupt()])
def test_crash_during_checkpoint_write_keeps_previous(interruption: BaseException, tmp_path: Path, monkeypatch) -> None:
    """torch.save dies half-way: the previous last.pt is intact, no temporary file is left, a disk error is a UserError."""
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 2, "weights": torch.arange(4.0)}, path)
    before = path.read_bytes()

    def crash_midway(obj, handle, *args, **kwargs) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise interruption

    monkeypatch.setattr(torch, "save", crash_midway)
    expected = UserError if isinstance(interruption, OSError) else type(interruption)
    with pytest.raises(expected) as info:
        save_checkpoint({"step": 4, "weights": torch.zeros(4)}, path)
    if expected is UserError:
        assert "last.pt" in str(info.value) and "No space left on device" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind
    assert load_checkpoint(path)["step"] == 2


def test_killed_run_resumes_to_identical_weights(trained_run, dataset: Path, tmp_path: Path) -> None:
    """SIGKILL once last.pt holds step >= 2, rerun the same command: same final weights as the uninterrupted run."""
    base_dir, _ = trained_run
    args = train_overrides(dataset, tmp_path / "runs")
    last = tmp_path / "runs" / "dmad" / "demo" / "last.pt"
    proc = subprocess.Popen(main_command(args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cpu_env())
    try:
        deadline = time.monotonic() + 600
        saved_step = 0
        while saved_step < 2 and proc.poll() is None and time.monotonic() < deadline:
            if last.exists():
                saved_step = int(torch.load(last, map_location="cpu", weights_only=True)["step"])
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 2 <= saved_step < STEPS and not (last.parent / "model.pt").exists()

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last} at step {saved_step}" in resumed.stdout
    expected, got = state_dict(base_dir / "model.pt"), state_dict(last.parent / "model.pt")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert json.loads((last.parent / "metrics.json").read_text()) == json.loads((base_dir / "metrics.json").read_text())


def test_rerunning_a_finished_run_only_reevaluates(trained_run) -> None:
    run_dir, args = trained_run
    weights_before = state_dict(run_dir / "model.pt")
    result = run_cli(args, WANDB_API_KEY=SECRET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {STEPS}" in result.stdout and "resumed from" in result.stdout
    assert load_checkpoint(run_dir / "last.pt")["step"] == STEPS
    weights_after = state_dict(run_dir / "model.pt")
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)  # no further training step
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.parametrize("change", ["OPTIMIZER.lr=0.001", "DATALOADER.batch_size=3", "SEED=1"])
def test_resume_with_changed_settings_is_refused(change: str, trained_run, dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    run_dir, _ = trained_run
    target = tmp_path / "runs" / "dmad" / "demo" / "last.pt"
    target.parent.mkdir(parents=True)
    shutil.copy(run_dir / "last.pt", target)
    monkeypatch.setattr(cli, "setup_logging", lambda: None)
    capsys.readouterr()
    rc = cli.main(BASE + train_overrides(dataset, tmp_path / "runs") + [change])
    assert_one_error_line(rc, capsys.readouterr().err, (change.split("=")[0], "RESUME.option=false", "RESULT.exp_name"))
    assert target.read_bytes() == (run_dir / "last.pt").read_bytes()


@pytest.mark.parametrize("damage", ["empty", "truncated", "missing-explicit"])
def test_unusable_resume_checkpoint_is_kept_and_named(damage: str, trained_run, dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    run_dir, _ = trained_run
    target = tmp_path / "runs" / "dmad" / "demo" / "last.pt"
    target.parent.mkdir(parents=True)
    extra: list[str] = []
    if damage == "missing-explicit":
        extra = [f"RESUME.checkpoint={tmp_path / 'gone.pt'}"]
    else:
        target.write_bytes(b"" if damage == "empty" else (run_dir / "last.pt").read_bytes()[:20000])
    before = target.read_bytes() if target.exists() else None
    monkeypatch.setattr(cli, "setup_logging", lambda: None)
    capsys.readouterr()
    rc = cli.main(BASE + train_overrides(dataset, tmp_path / "runs") + extra)
    line = assert_one_error_line(rc, capsys.readouterr().err, ())
    assert ("gone.pt" in line) if damage == "missing-explicit" else ("last.pt" in line and "RESUME.option=false" in line)
    assert (target.read_bytes() if target.exists() else None) == before


# --------------------------------------------------------------------------- NaN losses, reporters, pictures


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose update poisons every weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


@pytest.mark.parametrize(
    "poison, bad_step, save_interval, fragments",
    [
        ("loss", 3, 2, ("step 3", "the deformation loss is not finite")),  # NaN in one loss term
        ("gradient", 2, 1, ("step 2", "weight", "is not finite")),  # finite loss, NaN update right before a save
    ],
)
def test_non_finite_training_stops_and_keeps_last_good_checkpoint(
    poison: str, bad_step: int, save_interval: int, fragments: tuple[str, ...], dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    class Poisoned(trainer_module.DMADLoss):
        calls = 0

        def forward(self, *args):
            loss, terms = super().forward(*args)
            type(self).calls += 1
            if type(self).calls == bad_step and poison == "loss":
                terms = dict(terms, deformation=terms["deformation"] * float("nan"))
                loss = terms["distillation"] + terms["deformation"] + terms["vq"]
            elif type(self).calls == bad_step:
                loss = _NanGradient.apply(loss)
            return loss, terms

    monkeypatch.setattr(trainer_module, "DMADLoss", Poisoned)
    cfg = load_config(SCHEMA, DEMO_YAML, train_overrides(dataset, tmp_path / "runs") + [f"TRAIN.save_interval={save_interval}"])
    trainer = DMADTrainer(cfg)
    with pytest.raises(UserError) as info:
        trainer.train()
    cli.close_progress_bars()  # main.py does this before printing the error
    message = str(info.value)
    assert "\n" not in message and "last.pt" in message and "OPTIMIZER.lr" in message
    for fragment in fragments:
        assert fragment in message, message
    last = load_checkpoint(trainer.run_dir / "last.pt")
    assert last["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (trainer.run_dir / "model.pt").exists()


def test_picture_failure_does_not_lose_the_run(dataset: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    cfg = load_config(SCHEMA, DEMO_YAML, train_overrides(dataset, tmp_path / "runs") + ["TEST.save_images=true"])
    trainer = DMADTrainer(cfg)
    test_set = trainer.dataset("test")
    n, (h, w) = len(test_set), test_set.size
    preds = Predictions(
        torch.rand(n, h, w), torch.rand(n, h, w), torch.rand(n), torch.tensor(test_set.labels), None,
        [s.path for s in test_set.samples], [s.defect for s in test_set.samples],
    )

    def broken(*args, **kwargs):
        raise RuntimeError("font cache exploded")

    monkeypatch.setattr(trainer_module, "save_result_images", broken)
    metrics = {"image_auroc": 1.0, "image_threshold": 0.5, "pixel_threshold": 0.5}
    with caplog.at_level(logging.WARNING):
        trainer.write_outputs(build_model(cfg, pretrained=False), preds, metrics, {"image": 0.5, "pixel": 0.5}, test_set=test_set, step=STEPS)
    for name in ("model.pt", "metrics.json", "predictions.csv"):
        assert (trainer.run_dir / name).is_file()
    assert "font cache exploded" in caplog.text


def test_wandb_failure_switches_reporting_off(tmp_path: Path, monkeypatch, caplog) -> None:
    wandb = pytest.importorskip("wandb")
    from task.anomaly.unsupervised.reporters import WandbReporter

    def no_service(*args, **kwargs):
        raise RuntimeError("wandb service unreachable")

    monkeypatch.setattr(wandb, "init", no_service)
    cfg = load_config(SCHEMA, DEMO_YAML, ["LOG.wandb=true", f"RESULT.savedir={tmp_path}"])
    reporter = WandbReporter.from_config(cfg, tmp_path, "train")
    with caplog.at_level(logging.WARNING):
        reporter.log_train(1, {"loss": 1.0})
        reporter.log_eval(1, {"image_auroc": 0.5})
        reporter.log_results({"image_auroc": 0.5}, [], None, None)
        reporter.finish(True)
    assert not reporter.active
    assert caplog.text.count("wandb service unreachable") == 1


# --------------------------------------------------------------------------- untrusted files and secrets


def _calls(tree: ast.AST):
    """(call, owner, name) for ``name(...)`` (owner None) and ``owner.name(...)``; method calls on objects are skipped."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):  # a builtin or imported function called by name
                yield node, None, func.id
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):  # module.function(...)
                yield node, func.value.id, func.attr


def test_source_loads_only_safe_formats() -> None:
    """Every torch.load has weights_only=True; YAML only via safe_load; no eval/exec/pickle/dynamic imports."""
    problems = []
    files = [REPO / "main.py", *sorted((REPO / "task").rglob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in ("importlib", "dill", "marshal", "shelve") for m in modules):
                    problems.append(f"{where}:{node.lineno} imports {modules}")
        for node, owner, name in _calls(tree):
            keywords = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and name == "load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            elif owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"):
                problems.append(f"{where}:{node.lineno} yaml.{name}")
            elif owner in ("pickle", "cPickle") and name in ("load", "loads", "Unpickler"):
                problems.append(f"{where}:{node.lineno} pickle.{name}")
            elif owner in ("np", "numpy") and name == "load":
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{where}:{node.lineno} np.load with allow_pickle")
            elif owner is None and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{where}:{node.lineno} {name}()")
    assert not problems, "\n".join(problems)


def _keys(tree) -> list[str]:
    if isinstance(tree, dict):
        return [str(k) for k in tree] + [k for v in tree.values() for k in _keys(v)]
    if isinstance(tree, list):
        return [k for v in tree for k in _keys(v)]
    return []


def test_run_directory_holds_no_credentials(trained_run) -> None:
    run_dir, _ = trained_run
    configs = {
        "config.yaml": yaml.safe_load((run_dir / "config.yaml").read_text()),
        "model.pt": load_checkpoint(run_dir / "model.pt")["config"],
        "last.pt": load_checkpoint(run_dir / "last.pt")["config"],
    }
    for name, config in configs.items():
        suspicious = [k for k in _keys(config) if any(word in k.lower() for word in ("key", "token", "password", "secret"))]
        assert not suspicious, f"{name}: {suspicious}"
    assert any((run_dir / "wandb").iterdir()), "the W&B offline run should have written its files"
    leaks = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"WANDB_API_KEY found in {leaks}"
