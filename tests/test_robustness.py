"""Nothing lost, nobody surprised: user errors, interrupted runs, NaN losses, side-channel failures, untrusted files.

Every user mistake must end with exit code 2 and exactly one ``error: ...`` line on stderr that names the problem
and the fix, without a traceback. ``CASES`` is the suite's one table of such mistakes: it runs in-process through
``main.main`` (same code path, no interpreter start-up per case); a few also run as a real ``python main.py``.
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

from helpers import (
    BASE,
    CATEGORY,
    CONFIGS,
    N_TRAIN,
    REPO,
    SECRET,
    STEPS,
    assert_ok,
    assert_user_error,
    cpu_env,
    main_in_process,
    make_engine,
    run_cli,
    train_overrides,
    write_zero_bomb,
)
from task.anomaly.unsupervised.records import Predictions
from task.common.errors import UserError
from task.common.io import load_checkpoint, save_checkpoint


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def broken_copy(dataset: Path, tmp: Path, breaker: Callable[[Path], None]) -> Path:
    """A copy of the dataset whose category folder ``breaker`` damages; returns the new datadir."""
    data = tmp / "data"
    shutil.copytree(dataset / CATEGORY, data / CATEGORY)
    breaker(data / CATEGORY)
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


def onnx_with(source: Path, target: Path, key: str, value: str) -> Path:
    """A copy of an exported model.onnx whose metadata ``key`` is edited to ``value``."""
    import onnx

    model = onnx.load(source)
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(model, target)
    return target


def onnx_without(source: Path, target: Path, key: str) -> Path:
    """A copy of an exported model.onnx whose metadata lacks ``key`` (a partial or hand-edited file)."""
    import onnx

    model = onnx.load(source)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(kept))
    onnx.save(model, target)
    return target


# --------------------------------------------------------------------------- the table of user mistakes


@dataclass
class Ctx:
    """What a case needs: the good dataset, a scratch folder, and (lazily) the shared trained / exported runs."""

    dataset: Path
    tmp: Path
    request: pytest.FixtureRequest

    @property
    def checkpoint(self) -> Path:
        return self.request.getfixturevalue("trained_run").run_dir / "model.pt"

    @property
    def exported(self) -> Path:
        """The run directory of the exported copy (model.pt, last.pt, model.onnx)."""
        return self.request.getfixturevalue("exported_run").run_dir

    def train(self, *extra: str, data: Path | None = None) -> list[str]:
        return train_overrides(data or self.dataset, self.tmp / "runs") + ["TEST.save_images=false"] + list(extra)

    def test_with(self, checkpoint: Path, *extra: str) -> list[str]:
        return ["--mode", "test", "--checkpoint", str(checkpoint), *self.train(*extra)]

    def predict(self, *extra: str, images: Path | None = None) -> list[str]:
        """--mode predict with the exported run's model.pt (its run directory through RESULT.savedir)."""
        savedir = self.exported.parents[1]
        inputs = ["--input", str(images)] if images else []
        return ["--mode", "predict", *inputs, *train_overrides(self.dataset, savedir), *extra]

    def images(self, name: str = "inputs") -> Path:
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(folder / "a.png")
        return folder

    def file(self, name: str, content: bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
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
    after: Callable[[Ctx], None] | None = None  # what must still hold after the error (files kept, nothing written)


def _zip_bomb(path: Path) -> Path:
    write_zero_bomb(path, "archive/data/0", 3 * 2**30 // 8)  # 3 MB on disk
    return path


def _yaml_file(ctx: Ctx, text: str) -> list[str]:
    return ["--yaml_config", str(ctx.file("bad.yaml", text.encode())), *ctx.train()]


def _foreign_file_kept(ctx: Ctx) -> None:
    assert (ctx.tmp / "out" / "a.png.png").read_bytes() == b"my own picture"
    assert sorted(p.name for p in (ctx.tmp / "out").iterdir()) == ["a.png.png"]  # nothing was written


def _nothing_inside_input(ctx: Ctx) -> None:
    assert sorted(p.name for p in (ctx.tmp / "inputs").iterdir()) == ["a.png"]


CASES: dict[str, Case] = {
    # command line and configuration
    "unknown-model": Case(
        lambda c: ["--model_name", "efficientad"], ("efficientad", "registered: anomaly/unsupervised/dmad")
    ),
    "yaml-missing": Case(
        lambda c: ["--yaml_config", str(c.tmp / "nope.yaml"), *c.train()], ("config file not found", "nope.yaml")
    ),
    "yaml-syntax": Case(
        lambda c: _yaml_file(c, "DATASET:\n  resize: [64, 64\nTRAIN: {"), ("YAML syntax error", "bad.yaml", "line")
    ),
    "yaml-unknown-key": Case(
        lambda c: _yaml_file(c, "DATASET:\n  resise: [64, 64]\n"),
        ("unknown config key DATASET.resise", "did you mean resize"),
    ),
    "yaml-unknown-key-in-train": Case(
        lambda c: _yaml_file(c, "TRAIN:\n  num_trainig_steps: 5\n"), ("TRAIN.num_trainig_steps", "num_training_steps")
    ),
    "yaml-wrong-type": Case(
        lambda c: _yaml_file(c, "DATALOADER:\n  batch_size: four\n"), ("DATALOADER.batch_size", "expects int", "'four'")
    ),
    "override-unknown-key": Case(lambda c: c.train("DATASET.foo=1"), ("unknown config key DATASET.foo",)),
    "override-misspelt-key": Case(lambda c: c.train("MODEL.backbon=resnet18"), ("MODEL.backbon", "backbone")),
    "override-not-key-value": Case(lambda c: c.train("DATASET.resize"), ("not KEY=VALUE",)),
    "batch-size-abc": Case(
        lambda c: c.train("DATALOADER.batch_size=abc"), ("DATALOADER.batch_size", "expects int", "'abc'")
    ),
    "resize-three-items": Case(lambda c: c.train("DATASET.resize=[1,2,3]"), ("DATASET.resize", "list of 2 items")),
    "resize-not-multiple-of-32": Case(
        lambda c: c.train("DATASET.resize=[100,100]"), ("DATASET.resize", "multiple of 32", "100")
    ),
    "resize-too-small": Case(lambda c: c.train("DATASET.resize=[32,32]"), ("DATASET.resize", "[64, 1024]", "got 32")),
    "batch-size-zero": Case(lambda c: c.train("DATALOADER.batch_size=0"), ("DATALOADER.batch_size", ">= 1", "got 0")),
    "steps-negative": Case(
        lambda c: c.train("TRAIN.num_training_steps=-1"), ("TRAIN.num_training_steps", ">= 1", "-1")
    ),
    "lr-negative": Case(lambda c: c.train("OPTIMIZER.lr=-1"), ("OPTIMIZER.lr", "(0, 1]", "-1")),
    "lr-nan": Case(lambda c: c.train("OPTIMIZER.lr=.nan"), ("OPTIMIZER.lr", "finite")),
    "beta-one": Case(lambda c: c.train("OPTIMIZER.betas=[0.5,1.0]"), ("OPTIMIZER.betas", "[0, 1)")),
    "backbone-choice": Case(
        lambda c: c.train("MODEL.backbone=vgg16"), ("MODEL.backbone", "resnet18", "wide_resnet50_2")
    ),
    "exp-name-absolute": Case(
        lambda c: c.train(f"RESULT.exp_name={c.tmp / 'elsewhere'}"), ("RESULT.exp_name", "plain folder name")
    ),
    "exp-name-parent": Case(
        lambda c: c.train("RESULT.exp_name=../../escape"), ("RESULT.exp_name", "plain folder name", "'../../escape'")
    ),
    # dataset
    "mvtec-missing": Case(
        lambda c: ["--yaml_config", str(CONFIGS / "bottle.yaml"), f"DATASET.datadir={c.tmp / 'mvtec'}"],
        (str(Path("mvtec")), "MVTec AD"),
    ),
    "datadir-missing": Case(lambda c: c.train(data=c.tmp / "absent"), ("dataset folder", "absent", "DATASET.datadir")),
    "datadir-empty": Case(lambda c: c.train(data=c.folder("empty")), ("category folder", "DATASET.target", "none")),
    "category-missing": Case(
        lambda c: c.train("DATASET.target=cable"), ("category folder", "cable", f"available categories: {CATEGORY}")
    ),
    "category-escapes": Case(
        lambda c: c.train("DATASET.target=../x"), ("DATASET.target", "'../x'", "plain folder name")
    ),
    "train-good-missing": Case(
        lambda c: c.train(data=broken_copy(c.dataset, c.tmp, lambda d: shutil.rmtree(d / "train" / "good"))),
        ("no images in", "train/good"),
    ),
    "train-good-empty": Case(
        lambda c: c.train(data=broken_copy(c.dataset, c.tmp, lambda d: empty_folder(d / "train" / "good"))),
        ("no images in", "train/good"),
    ),
    "truncated-image": Case(
        lambda c: c.train(data=broken_copy(c.dataset, c.tmp, lambda d: truncate(d / "train" / "good" / "003.png"))),
        ("cannot read image", "train/good/003.png", "truncated", "replace or delete"),
        cli=True,
    ),
    "unreadable-image": Case(
        lambda c: c.train(
            data=broken_copy(c.dataset, c.tmp, lambda d: (d / "test" / "good" / "001.png").write_bytes(os.urandom(512)))
        ),
        ("cannot read image", "test/good/001.png"),
    ),
    "defect-without-mask": Case(
        lambda c: c.train(
            data=broken_copy(c.dataset, c.tmp, lambda d: (d / "ground_truth" / "spot" / "000_mask.png").unlink())
        ),
        ("defect image", "spot/000.png", "has no mask", "000_mask.png"),
    ),
    "mask-other-size": Case(
        lambda c: c.train(
            data=broken_copy(
                c.dataset,
                c.tmp,
                lambda d: Image.new("L", (32, 32)).save(d / "ground_truth" / "scratch" / "000_mask.png"),
            )
        ),
        ("mask", "scratch/000_mask.png", "32x32", "64x64"),
    ),
    # outputs
    "savedir-under-a-file": Case(
        lambda c: c.train(f"RESULT.savedir={c.file('plain-file', b'x') / 'sub'}"),
        ("plain-file/sub", "RESULT.savedir"),
    ),
    # checkpoints: unreadable or foreign files
    "checkpoint-missing": Case(lambda c: c.test_with(c.tmp / "absent.pt"), ("checkpoint not found", "absent.pt")),
    "checkpoint-random-bytes": Case(
        lambda c: c.test_with(c.file("random.pt", np.random.RandomState(0).bytes(4096))),
        ("random.pt", "not a PyTorch checkpoint"),
    ),
    "checkpoint-text": Case(
        lambda c: c.test_with(c.file("notes.pt", b"epoch 10: loss 0.3\n")), ("notes.pt", "not a PyTorch checkpoint")
    ),
    "checkpoint-empty": Case(lambda c: c.test_with(c.file("empty.pt", b"")), ("empty.pt", "is empty")),
    "checkpoint-truncated": Case(
        lambda c: c.test_with(c.file("half.pt", c.checkpoint.read_bytes()[:20000])), ("half.pt", "damaged or truncated")
    ),
    "checkpoint-a-list": Case(lambda c: c.test_with(c.saved("list.pt", [1, 2])), ("list.pt", "holds a list")),
    "checkpoint-backbone-weights": Case(
        lambda c: c.test_with(c.saved("r18.pt", {"conv1.weight": torch.zeros(1)})),
        ("r18.pt", "neither a dmad checkpoint"),
    ),
    "checkpoint-without-config": Case(
        lambda c: c.test_with(c.saved("bare.pt", {"format": "tnvision-dmad"})), ("bare.pt", "lacks its config")
    ),
    "checkpoint-other-method": Case(
        lambda c: c.test_with(c.saved("video.pt", {"format": "tnvision-dmad-video", "config": {}, "state_dict": {}})),
        ("video.pt", "not 'tnvision-dmad'"),
    ),
    "checkpoint-missing-tensor": Case(
        lambda c: c.test_with(
            c.saved(
                "short.pt",
                {
                    **torch.load(c.checkpoint, weights_only=True),
                    "state_dict": dict(list(state_dict(c.checkpoint).items())[1:]),
                },
            )
        ),
        ("short.pt", "missing tensor"),
    ),
    # network settings come from the checkpoint: a command-line override that differs names both values
    "checkpoint-other-backbone": Case(
        lambda c: c.test_with(c.checkpoint, "MODEL.backbone=resnet34"),
        ("MODEL.backbone='resnet34'", "MODEL.backbone='resnet18'", "drop the override"),
    ),
    "checkpoint-other-size": Case(
        lambda c: c.test_with(c.checkpoint, "DATASET.resize=[96,96]"),
        ("DATASET.resize=[96, 96]", "DATASET.resize=[64, 64]"),
    ),
    "checkpoint-other-pdm": Case(
        lambda c: c.test_with(c.checkpoint, "MODEL.pdm=false"), ("MODEL.pdm=False", "MODEL.pdm=True")
    ),
    # predict and export
    "predict-without-input": Case(lambda c: c.predict(), ("--mode predict needs --input",)),
    "predict-input-missing": Case(lambda c: c.predict(images=c.tmp / "nowhere"), ("--input", "nowhere", "not found")),
    "predict-empty-folder": Case(lambda c: c.predict(images=c.folder("empty")), ("no images in", "empty")),
    "predict-broken-image": Case(
        lambda c: c.predict(images=c.file("bad/broken.png", b"not a png").parent), ("cannot read image", "broken.png")
    ),
    "predict-output-inside-input": Case(
        lambda c: c.predict("--output", str(c.images() / "out"), images=c.images()),
        ("inside the input folder",),
        after=_nothing_inside_input,
    ),
    "predict-output-is-input": Case(
        lambda c: c.predict("--output", str(c.images()), images=c.images()), ("inside the input folder",)
    ),
    "predict-overwrites-foreign-file": Case(
        lambda c: c.predict("--output", str(c.file("out/a.png.png", b"my own picture").parent), images=c.images()),
        ("a.png.png", "was not written by predict", "another --output"),
        after=_foreign_file_kept,
    ),
    "predict-scoring-override": Case(
        lambda c: c.predict("MODEL.deform_weight=0.3", images=c.images()),
        ("MODEL.deform_weight=0.3", "0.05", "--mode test MODEL.deform_weight=0.3"),
    ),
    "predict-sigma-override": Case(
        lambda c: c.predict("MODEL.sigma=2", images=c.images()),
        ("MODEL.sigma=2.0", "4.0", "--mode test MODEL.sigma=2.0"),
    ),
    "predict-checkpoint-not-found": Case(
        lambda c: c.predict(f"RESULT.savedir={c.tmp / 'nothing'}", images=c.images()), ("checkpoint not found",)
    ),
    "predict-torch-from-onnx": Case(
        lambda c: c.predict("--checkpoint", str(c.exported / "model.onnx"), images=c.images()),
        ("is an ONNX file", "--backend onnx"),
    ),
    "predict-onnx-of-another-checkpoint": Case(  # model.onnx was exported from model.pt, not from last.pt beside it
        lambda c: c.predict("--backend", "onnx", "--checkpoint", str(c.exported / "last.pt"), images=c.images()),
        ("exported from a different",),
    ),
    "predict-onnx-partial-metadata": Case(
        lambda c: c.predict(
            "--backend",
            "onnx",
            "--checkpoint",
            str(onnx_without(c.exported / "model.onnx", c.tmp / "partial.onnx", "thresholds")),
            images=c.images(),
        ),
        ("partial.onnx", "incomplete metadata", "--mode export"),
    ),
    "predict-onnx-not-ours": Case(
        lambda c: c.predict(
            "--backend",
            "onnx",
            "--checkpoint",
            str(onnx_without(c.exported / "model.onnx", c.tmp / "plain.onnx", "format")),
            images=c.images(),
        ),
        ("plain.onnx", "not a model exported by this toolkit"),
    ),
    "predict-onnx-edited-image-size": Case(
        lambda c: c.predict(
            "--backend",
            "onnx",
            "--checkpoint",
            str(onnx_with(c.exported / "model.onnx", c.tmp / "edited.onnx", "image_size", "[128, 64]")),
            images=c.images(),
        ),
        ("edited.onnx", "metadata image_size [128, 64] differs from the graph input", "64x64", "--mode export"),
    ),
    "checkpoint-zip-claims-3-gib": Case(
        lambda c: c.test_with(_zip_bomb(c.tmp / "bomb.pt")),
        ("bomb.pt", "records declare 3 GiB uncompressed", "nothing was decompressed"),
    ),
    "export-scoring-override": Case(
        lambda c: c.predict("--mode", "export", "MODEL.deform_weight=0.3"), ("MODEL.deform_weight=0.3", "--mode test")
    ),
}


def full_argv(argv: list[str]) -> list[str]:
    """BASE with the case's --yaml_config / --model_name in place of the demo's, then the rest."""
    base = list(BASE)
    for option in ("--yaml_config", "--model_name"):
        if option in argv:
            i = argv.index(option)
            base[base.index(option) + 1] = argv[i + 1]
            argv = argv[:i] + argv[i + 2 :]
    return base + argv


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_in_process(name: str, dataset: Path, tmp_path: Path, request) -> None:
    case = CASES[name]
    ctx = Ctx(dataset, tmp_path, request)
    assert_user_error(main_in_process(*full_argv(case.argv(ctx))), *case.fragments)
    if case.after:
        case.after(ctx)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.cli])
def test_user_error_cli(name: str, dataset: Path, tmp_path: Path, request) -> None:
    assert_user_error(run_cli(*full_argv(CASES[name].argv(Ctx(dataset, tmp_path, request)))), *CASES[name].fragments)


@pytest.mark.parametrize("kind", ["zip", "bare-pickle"])
def test_malicious_checkpoint_is_refused_and_never_runs(kind: str, dataset: Path, tmp_path: Path) -> None:
    """A pickle whose loading would run ``touch PWNED``: refused with a clear message, and the file never appears."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    (write_evil_checkpoint if kind == "zip" else write_evil_pickle)(evil, marker)
    argv = ["--mode", "test", "--checkpoint", str(evil), *train_overrides(dataset, tmp_path / "runs")]
    assert_user_error(
        main_in_process(*BASE, *argv), "refusing to load", "evil.pt", "would import", "system", "only tensors"
    )
    assert not marker.exists()


def test_skip_bad_images_warns_with_a_count(dataset: Path, tmp_path: Path) -> None:
    data = broken_copy(dataset, tmp_path, lambda d: truncate(d / "train" / "good" / "002.png"))
    engine = make_engine(*train_overrides(data, tmp_path / "runs"), "DATASET.skip_bad_images=true")
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable image\(s\) of {N_TRAIN}: .*002\.png"):
        train_set = engine.dataset("train")
    assert len(train_set) == N_TRAIN - 1 and train_set.skipped == [str(data / CATEGORY / "train" / "good" / "002.png")]


# --------------------------------------------------------------------------- interrupted runs


@pytest.mark.parametrize(
    "interruption", [OSError(28, "No space left on device"), RuntimeError("writer crashed"), KeyboardInterrupt()]
)
def test_crash_during_checkpoint_write_keeps_previous(interruption: BaseException, tmp_path: Path, monkeypatch) -> None:
    """torch.save dies half-way: the previous last.pt is intact, no temporary file is left, a disk error is a
    UserError."""
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


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(trained_run, tmp_path: Path, caplog) -> None:
    """SIGKILL a real ``python main.py`` once last.pt holds step >= 2, rerun the same command: the same final weights
    and metrics as the uninterrupted shared run (CPU training is bit-reproducible, the data order a function of
    (seed, epoch))."""
    args = trained_run.args(tmp_path / "runs", "TEST.save_images=false")
    last = tmp_path / "runs" / "dmad" / CATEGORY / "last.pt"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cpu_env(),
    )
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

    with caplog.at_level(logging.INFO):
        assert_ok(main_in_process(*args))
    assert f"resumed from {last} at step {saved_step}" in caplog.text
    expected, got = state_dict(trained_run.run_dir / "model.pt"), state_dict(last.parent / "model.pt")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert json.loads((last.parent / "metrics.json").read_text()) == json.loads(
        (trained_run.run_dir / "metrics.json").read_text()
    )


def test_rerunning_a_finished_run_only_reevaluates(trained_run, tmp_path: Path, caplog) -> None:
    run_dir = trained_run.copy_to(tmp_path / "runs")
    weights_before = state_dict(run_dir / "model.pt")
    with caplog.at_level(logging.INFO):
        assert_ok(main_in_process(*trained_run.args(tmp_path / "runs", "TEST.save_images=false")))
    assert f"resumed from {run_dir / 'last.pt'} at step {STEPS}" in caplog.text
    assert load_checkpoint(run_dir / "last.pt")["step"] == STEPS
    weights_after = state_dict(run_dir / "model.pt")
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)  # no further training step
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.parametrize("change", ["OPTIMIZER.lr=0.001", "DATALOADER.batch_size=3", "SEED=1"])
def test_resume_with_changed_settings_is_refused(change: str, trained_run, tmp_path: Path) -> None:
    target = tmp_path / "runs" / "dmad" / CATEGORY / "last.pt"
    target.parent.mkdir(parents=True)
    shutil.copy(trained_run.run_dir / "last.pt", target)
    result = main_in_process(*trained_run.args(tmp_path / "runs", change))
    assert_user_error(result, change.split("=")[0], "RESUME.option=false", "RESULT.exp_name")
    assert target.read_bytes() == (trained_run.run_dir / "last.pt").read_bytes()


def _without(key: str, tensor: bool = False) -> Callable[[dict], dict]:
    def damage(state: dict) -> dict:
        if tensor:
            return {**state, "state_dict": {k: v for k, v in state["state_dict"].items() if k != key}}
        return {k: v for k, v in state.items() if k != key}

    return damage


@pytest.mark.parametrize(
    "damage, fragments",
    [
        ("empty", ("last.pt", "RESUME.option=false")),
        ("truncated", ("last.pt", "RESUME.option=false")),
        ("missing-explicit", ("gone.pt", "RESUME.checkpoint")),
        ("missing-rng", ("last.pt", "lacks rng_torch", "RESUME.option=false")),
        ("missing-tensor", ("last.pt", "does not match this run's model", "RESUME.option=false")),
    ],
)
def test_unusable_resume_checkpoint_is_kept_and_named(
    damage: str, fragments: tuple[str, ...], trained_run, tmp_path: Path
) -> None:
    source = trained_run.run_dir / "last.pt"
    target = tmp_path / "runs" / "dmad" / CATEGORY / "last.pt"
    target.parent.mkdir(parents=True)
    extra: list[str] = []
    if damage == "missing-explicit":
        extra = [f"RESUME.checkpoint={tmp_path / 'gone.pt'}"]
    elif damage in ("empty", "truncated"):
        target.write_bytes(b"" if damage == "empty" else source.read_bytes()[:20000])
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
        assert "decoder.layer1.0.conv1.weight" in state["state_dict"]
        change = (
            _without("rng_torch") if damage == "missing-rng" else _without("decoder.layer1.0.conv1.weight", tensor=True)
        )
        torch.save(change(state), target)
    before = target.read_bytes() if target.exists() else None
    assert_user_error(main_in_process(*trained_run.args(tmp_path / "runs", *extra)), *fragments)
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
    poison: str,
    bad_step: int,
    save_interval: int,
    fragments: tuple[str, ...],
    dataset: Path,
    tmp_path: Path,
    monkeypatch,
) -> None:
    from task.anomaly.unsupervised.models.dmad import method as dmad_method

    class Poisoned(dmad_method.DMADLoss):
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

    monkeypatch.setattr(dmad_method, "DMADLoss", Poisoned)
    savedir = tmp_path / "runs"
    result = main_in_process(*BASE, *train_overrides(dataset, savedir), f"TRAIN.save_interval={save_interval}")
    line = assert_user_error(result, "last.pt", "OPTIMIZER.lr", *fragments)
    assert f"training stopped at step {bad_step}" in line
    run_dir = savedir / "dmad" / CATEGORY
    last = load_checkpoint(run_dir / "last.pt")
    assert last["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (run_dir / "model.pt").exists()


def test_picture_failure_does_not_lose_the_run(dataset: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    from task.anomaly.unsupervised.image import evaluation
    from task.anomaly.unsupervised.image.calibration import ImageCalibration
    from task.common.conformal import ScoreSample

    engine = make_engine(*train_overrides(dataset, tmp_path / "runs"), "TEST.save_images=true")
    test_set = engine.dataset("test")
    n, (h, w) = len(test_set), test_set.size
    preds = Predictions(
        torch.rand(n, h, w),
        torch.rand(n),
        torch.tensor(test_set.labels),
        None,
        [s.path for s in test_set.samples],
        [s.defect for s in test_set.samples],
        {"deformation_map": torch.rand(n, h, w)},
    )

    def broken(*args, **kwargs):
        raise RuntimeError("font cache exploded")

    monkeypatch.setattr(evaluation, "save_result_images", broken)
    metrics = {"image_auroc": 1.0, "image_threshold": 0.5, "pixel_threshold": 0.5}
    calibration = ImageCalibration(ScoreSample.of([0.1, 0.5]), ScoreSample.of([0.2, 0.5]), "train", 2)
    with caplog.at_level(logging.WARNING):
        evaluation.write_outputs(
            engine,
            engine.run_dir,
            engine.method.build(engine.cfg, pretrained=False),
            preds,
            metrics,
            test_set,
            STEPS,
            calibration,
            {"image": 0.5, "pixel": 0.5},
            {},
        )
    for name in ("model.pt", "metrics.json", "predictions.csv"):
        assert (engine.run_dir / name).is_file()
    assert "font cache exploded" in caplog.text and "--mode gif" in caplog.text


def test_wandb_failure_switches_reporting_off(tmp_path: Path, monkeypatch, caplog) -> None:
    wandb = pytest.importorskip("wandb")
    from task.anomaly.unsupervised.reporters import WandbReporter

    def no_service(*args, **kwargs):
        raise RuntimeError("wandb service unreachable")

    monkeypatch.setattr(wandb, "init", no_service)
    engine = make_engine("LOG.wandb=true", f"RESULT.savedir={tmp_path}")
    reporter = WandbReporter.from_config(engine.cfg, tmp_path, "train", "dmad")
    with caplog.at_level(logging.WARNING):
        reporter.log_train(1, {"loss": 1.0})
        reporter.log_eval(1, {"image_auroc": 0.5})
        reporter.log_results({"image_auroc": 0.5}, [], None, None)
        reporter.finish(True)
    assert not reporter.active
    assert caplog.text.count("wandb service unreachable") == 1


class _BrokenReporter:
    """A reporter whose every call raises (a third-party logger gone wrong)."""

    name = "Broken"
    calls = 0

    @classmethod
    def from_config(cls, cfg, run_dir, job_type, method_name):
        return cls()

    def _fail(self, *args, **kwargs):
        type(self).calls += 1
        raise RuntimeError("reporter exploded")

    log_train = log_eval = log_results = finish = _fail


def test_failing_reporters_never_stop_training(dataset: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    """W&B whose init raises, and a reporter that raises on every call: training and outputs go on; each failure is
    reported once and that reporter is switched off."""
    import wandb

    from task.anomaly.unsupervised import reporters

    def broken_init(*args, **kwargs):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setattr(reporters, "REPORTERS", [*reporters.REPORTERS, _BrokenReporter])
    savedir = tmp_path / "runs"
    with caplog.at_level(logging.WARNING):
        result = main_in_process(
            *BASE,
            *train_overrides(dataset, savedir),
            "TRAIN.num_training_steps=1",
            "LOG.wandb=true",
            "TEST.save_images=false",
        )
    assert_ok(result)
    assert (savedir / "dmad" / CATEGORY / "metrics.json").is_file() and (
        savedir / "dmad" / CATEGORY / "model.pt"
    ).is_file()
    wandb_warnings = [r for r in caplog.records if "no W&B today" in r.getMessage()]
    assert len(wandb_warnings) == 1 and "W&B" in wandb_warnings[0].getMessage()
    broken = [r.getMessage() for r in caplog.records if "reporter exploded" in r.getMessage()]
    assert len(broken) == 1 and "Broken reporter disabled" in broken[0], broken
    assert _BrokenReporter.calls == 1  # switched off after its first failure


# --------------------------------------------------------------------------- untrusted files and secrets


def _calls(tree: ast.AST):
    """(call, owner, name) for ``name(...)`` (owner None) and ``owner.name(...)``; method calls on objects are
    skipped."""
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
            elif owner == "yaml" and name in (
                "load",
                "unsafe_load",
                "full_load",
                "load_all",
                "unsafe_load_all",
                "full_load_all",
            ):
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
    run_dir = trained_run.run_dir  # trained with WANDB_API_KEY=SECRET in its environment
    configs = {
        "config.yaml": yaml.safe_load((run_dir / "config.yaml").read_text()),
        "model.pt": load_checkpoint(run_dir / "model.pt")["config"],
        "last.pt": load_checkpoint(run_dir / "last.pt")["config"],
    }
    for name, config in configs.items():
        suspicious = [
            k for k in _keys(config) if any(word in k.lower() for word in ("key", "token", "password", "secret"))
        ]
        assert not suspicious, f"{name}: {suspicious}"
    assert any((run_dir / "wandb").iterdir()), "the W&B offline run should have written its files"
    leaks = [
        str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()
    ]
    assert not leaks, f"WANDB_API_KEY found in {leaks}"


# --------------------------------------------------------------------------- damaged official video checkpoints


def _official_module(depth: int = 1) -> torch.nn.Module:
    root = module = torch.nn.Module()
    for _ in range(depth - 1):
        module.inner = torch.nn.Module()
        module = module.inner
    module.bkg = torch.nn.Parameter(torch.rand(3, 4, 4))
    return root


def _rezip(source: Path, target: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """A copy of a torch zip with each member passed through ``edit(name, data)`` (None drops the member)."""
    import zipfile

    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = edit(info.filename, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
    return target


def _official_with(tmp: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    torch.save(_official_module(), tmp / "good.pth")
    return _rezip(tmp / "good.pth", tmp / "model.pth", edit)


def _nested_lists(depth: int) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."  # EMPTY_LIST x depth, APPEND x depth - 1


DAMAGED_OFFICIAL: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "empty": (lambda t: _write(t / "model.pth", b""), ("model.pth", "not a torch zip checkpoint")),
    "garbage": (
        lambda t: _write(t / "model.pth", np.random.RandomState(0).bytes(4096)),
        ("model.pth", "not a torch zip checkpoint"),
    ),
    "garbage-pickle": (
        lambda t: _official_with(t, lambda n, d: os.urandom(64) if n.endswith("data.pkl") else d),
        ("model.pth", "damaged"),
    ),
    "empty-pickle": (
        lambda t: _official_with(t, lambda n, d: b"" if n.endswith("data.pkl") else d),
        ("model.pth", "damaged", "EOFError"),
    ),
    "truncated-pickle": (
        lambda t: _official_with(t, lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d),
        ("model.pth", "damaged"),
    ),
    "deeply-nested-pickle": (
        lambda t: _official_with(t, lambda n, d: _nested_lists(200_000) if n.endswith("data.pkl") else d),
        ("model.pth", "damaged"),
    ),
    "deeply-nested-modules": (
        lambda t: _save(t / "model.pth", _official_module(100)),
        ("model.pth", "nested deeper than 64"),
    ),
    "storage-record-missing": (
        lambda t: _official_with(t, lambda n, d: None if "/data/" in n else d),
        ("model.pth", "storage record", "missing"),
    ),
    "storage-out-of-bounds": (
        lambda t: _official_with(t, lambda n, d: d[:8] if "/data/" in n else d),
        ("model.pth", "beyond its 8-byte record"),
    ),
    "record-claims-3-gib": (
        lambda t: _zip_bomb(t / "model.pth"),
        ("model.pth", "declare 3 GiB", "nothing was decompressed"),
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name", list(DAMAGED_OFFICIAL))
def test_damaged_official_video_checkpoint_is_one_line(name: str, tmp_path: Path) -> None:
    """Garbage, empty, truncated or absurdly nested pickles, out-of-bounds storages and zip bombs: one line each,
    in bounded memory (sizes are checked against the zip records before anything is read)."""
    import resource

    from task.anomaly.unsupervised.models.dmad_video.official_import import convert_official

    make, fragments = DAMAGED_OFFICIAL[name]
    path = make(tmp_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError) as info:
        convert_official(path)
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 500e6  # never inflated


def test_official_reader_still_reads_nested_modules(tmp_path: Path) -> None:
    from task.anomaly.unsupervised.models.dmad_video.official_import import read_official

    source = _official_module(3)
    torch.save(source, tmp_path / "model.pth")
    assert torch.equal(read_official(tmp_path / "model.pth")["inner.inner.bkg"], source.inner.inner.bkg.detach())


# --------------------------------------------------------------------------- report of hand-edited metrics


@pytest.mark.parametrize(
    "value, shown",
    [(7.5, "7.5"), ("0.9", "'0.9'"), ([0.9], "[0.9]"), (float("nan"), "nan"), (-0.1, "-0.1"), (True, "True")],
)
def test_report_refuses_metrics_outside_0_1(value: object, shown: str, tmp_path: Path, caplog) -> None:
    """A hand-edited metrics.json never reaches the tables (or README): a dash and one warning naming file and key."""
    from task.anomaly.unsupervised.engine.report import MISSING, write_report

    run = tmp_path / "runs" / "dmad" / "bottle"
    run.mkdir(parents=True)
    text = json.dumps({"image_auroc": value, "pixel_auroc": 0.95, "pixel_f1": None}, allow_nan=True)
    (run / "metrics.json").write_text(text)
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- results:start -->\nold\n<!-- results:end -->\n")
    with caplog.at_level("WARNING", logger="anomaly"):
        report = write_report(tmp_path / "runs", readme)
    warnings_seen = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_seen) == 1, warnings_seen
    assert str(run / "metrics.json") in warnings_seen[0]
    assert f"image_auroc = {shown} is not a number in [0, 1]" in warnings_seen[0]
    bottle_row = [line for line in report.splitlines() if line.startswith("| ")][2]  # image table: header, rule, values
    assert bottle_row.split(" | ")[7] == MISSING  # Avg, 5 textures, then Bottle
    assert "750.0" not in readme.read_text() and "95.0" in readme.read_text()


# --------------------------------------------------------------------------- ONNX metadata


class _Input:
    def __init__(self, name: str, shape: list) -> None:
        self.name, self.shape = name, shape


class _Session:
    def __init__(self, *inputs: _Input) -> None:
        self.inputs = list(inputs)

    def get_inputs(self) -> list[_Input]:
        return self.inputs


@pytest.mark.parametrize(
    "value, inputs, fragments",
    [
        ("[64, 64", [], ("model.onnx", "image_size [64, 64 is not [height, width]")),
        ('"64x64"', [], ("not [height, width]",)),
        ("[64]", [], ("not [height, width]",)),
        ("[64, 64, 3]", [], ("not [height, width]",)),
        ("[0, 64]", [], ("whole numbers in [64, 1024]",)),
        ("[64.5, 64]", [], ("whole numbers",)),
        ("[true, 64]", [], ("whole numbers",)),
        ("[100000, 64]", [], ("whole numbers in [64, 1024]",)),
        (
            "[128, 64]",
            [_Input("image", ["batch", 3, 64, 64])],
            ("differs from the graph input 'image' (64x64)", "--mode export"),
        ),
        ("[128, 64]", [_Input("clip", [1, 4, 3, 64, 64])], ("graph input 'clip'",)),
    ],
)
def test_onnx_image_size_metadata_is_checked(value: str, inputs: list, fragments: tuple[str, ...]) -> None:
    from task.anomaly.unsupervised.deploy.onnx import metadata_image_size

    with pytest.raises(UserError) as info:
        metadata_image_size({"image_size": value}, _Session(*inputs), "model.onnx")
    assert "\n" not in str(info.value) and all(f in str(info.value) for f in fragments), str(info.value)
    dynamic = _Session(_Input("image", ["batch", 3, "h", "w"]))
    assert metadata_image_size({"image_size": "[128, 64]"}, dynamic, "m") == (128, 64)
