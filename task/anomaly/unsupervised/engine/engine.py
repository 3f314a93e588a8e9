"""The model-agnostic anomaly engine: device and precision, run directory, data, models and checkpoints, reporters.

One ``Engine`` serves one run (one category or one video dataset) of one method. The training loop lives in
training.py, image evaluation and its outputs in evaluation.py, the modes in modes.py; all of them work through the
``Method`` interface (method.py) and never import a method's package.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from task.anomaly.unsupervised.data.image.dataset import AnomalyDataset
from task.anomaly.unsupervised.data.image.formats import scan_dataset, scan_training
from task.anomaly.unsupervised.data.image.synthetic import make_demo_dataset
from task.anomaly.unsupervised.engine.checkpoints import load_weights, read_checkpoint
from task.anomaly.unsupervised.engine.settings import network_config, scoring_config
from task.anomaly.unsupervised.method import Method
from task.anomaly.unsupervised.reporters import Reporters, build_reporters
from task.common.config import Config
from task.common.errors import UserError
from task.common.io import remove_stale_temps
from task.common.runlock import RunLock
from task.common.runtime import DistributedContext, compile_model, keep_freed_memory_for_reuse, select_device, set_seed

log = logging.getLogger("anomaly")


@dataclass
class LoadedModel:
    """A model ready for inference, and what came with it."""

    model: nn.Module
    cfg: Config  # the run's config with the checkpoint's network settings
    thresholds: dict[str, float]
    calibrated: bool  # score statistics and thresholds came with the checkpoint
    path: Path
    calibration: Any = None  # a method's stored calibration beyond the thresholds (video: training score statistics)


def run_dir_for(cfg: Config, model_name: str) -> Path:
    """``<savedir>/<model_name>/<target>[/<exp_name>]``; ``~`` in savedir is expanded, exp_name must be a plain name."""
    exp = cfg.RESULT.exp_name
    if exp is not None and (not exp or exp in (".", "..") or "/" in exp or "\\" in exp or "\0" in exp):
        raise UserError(
            f"RESULT.exp_name must be a plain folder name (no '/', '\\' or '..'), got {exp[:80]!r}; e.g. "
            "RESULT.exp_name=trial1"
        )
    target = cfg.DATASET.target
    if not target or target in (".", "..") or "/" in target or "\\" in target or "\0" in target:
        raise UserError(f"DATASET.target must be a plain folder name, got {target[:80]!r}; e.g. DATASET.target=bottle")
    path = Path(cfg.RESULT.savedir).expanduser() / model_name / target
    return path / exp if exp else path


class Engine:
    """Everything a mode needs to run one method on one run directory."""

    def __init__(self, method: Method, cfg: Config, overridden: frozenset[str] = frozenset()) -> None:
        self.method = method
        self.cfg = cfg
        self.overridden = overridden  # dotted keys given as KEY=VALUE on the command line
        method.validate(cfg)
        self.dist = DistributedContext.from_env()
        self.device = select_device(self.dist)
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()  # no page faults on every step's activations
        self.run_dir = run_dir_for(cfg, method.name)
        self.amp = cfg.TRAIN.amp
        if self.amp == "fp16" and self.device.type != "cuda":
            raise UserError("TRAIN.amp=fp16 needs a CUDA device; use TRAIN.amp=bf16 on CPU")
        # oneDNN's bf16 convolutions work in NHWC: with NCHW tensors each one reorders its input and output, which
        # costs about half of a bf16 forward pass on CPU.
        self.channels_last = cfg.TRAIN.channels_last or (self.amp == "bf16" and self.device.type == "cpu")
        if not self.dist.is_main:  # one log for the whole job: rank 0's
            logging.getLogger().setLevel(logging.WARNING)
        self.reporters = Reporters([])
        set_seed(cfg.SEED)

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        """Generate the built-in demo dataset when DATASET.demo is set (rank 0 writes, the others wait)."""
        ds = self.cfg.DATASET
        if ds.demo:
            if self.dist.is_main:
                make_demo_dataset(ds.datadir, ds.target, size=max(128, ds.resize[0]))
            self.dist.barrier()

    def dataset(self, split: str) -> AnomalyDataset:
        ds = self.cfg.DATASET
        samples = scan_dataset(ds, split, self.cfg.SEED)
        return AnomalyDataset(samples, tuple(ds.resize), cache=ds.cache, skip_bad_images=ds.skip_bad_images)

    def calibration_data(self) -> tuple[AnomalyDataset, str]:
        """The normal images scores and thresholds are calibrated on, and their source: ``calibration_split`` (held
        out from training) or ``train`` (too few images to hold any out: the training images, with a warning)."""
        ds = self.cfg.DATASET
        parts = scan_training(ds, self.cfg.SEED)
        return AnomalyDataset(
            parts.calibration, tuple(ds.resize), cache=ds.cache, skip_bad_images=ds.skip_bad_images
        ), parts.source

    def eval_loader(self, dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.TEST.batch_size,
            shuffle=False,
            num_workers=self.cfg.DATALOADER.num_workers,
            pin_memory=self.cfg.DATALOADER.pin_memory,
        )

    # ------------------------------------------------------------------ models
    def build_model(self) -> nn.Module:
        """A fresh model for training, on the device (compiled with TRAIN.compile)."""
        return self.maybe_compile(self.method.to_device(self.method.build(self.cfg), self.device, self.channels_last))

    def maybe_compile(self, model: nn.Module) -> nn.Module:
        if self.cfg.TRAIN.compile:
            compile_model(model, self.device)
        return model

    def checkpoint_path(self, checkpoint: str | None) -> Path:
        """``--checkpoint`` or the run's ``model.pt`` (the one place every mode finds it); must exist."""
        path = Path(checkpoint) if checkpoint else self.run_dir / "model.pt"
        if not path.is_file():
            hint = "check the path" if checkpoint else "train first (--mode train) or pass --checkpoint PATH"
            raise UserError(f"checkpoint not found: {path}; {hint}")
        return path

    def load(self, path: Path) -> LoadedModel:
        """A model from one of our checkpoints (or an official release's), in eval mode on the device.

        Network settings come from the checkpoint (method.py states the rule); the scoring settings are the
        checkpoint's until a mode applies others.
        """
        method = self.method
        try:
            state = read_checkpoint(path, method)
        except UserError:
            state = method.read_foreign_file(path)
            if state is None:
                raise
        if "format" not in state:  # read_checkpoint let it through: an official release the method imports
            cfg = self.cfg  # official checkpoints carry no config: the YAML describes them
            method.check_foreign_checkpoint(state, path, cfg)  # before building (and fetching weights for) a model
            model = method.build_for_foreign(cfg, state)
            method.load_foreign_checkpoint(model, state, path, cfg)
            thresholds, calibrated = {}, False
        else:
            cfg = network_config(method, self.cfg, state, path, self.overridden)
            model = method.build_for_weights(cfg, state["state_dict"])
            load_weights(model, state, path)
            # Scoring settings that live outside the weights (e.g. the smoothing sigma) are the checkpoint's too,
            # until a mode applies others (--mode test).
            method.apply_scoring(model, scoring_config(method, cfg, state))
            thresholds = {
                k: float(v) for k, v in (state.get("thresholds") or {}).items() if isinstance(v, (int, float))
            }
            calibrated = bool(thresholds)
        model = method.to_device(model, self.device, self.channels_last).eval()
        return LoadedModel(model, cfg, thresholds, calibrated, path, state.get("calibration"))

    def adopt(self, cfg: Config) -> None:
        """Run the rest of a mode with ``cfg`` (a loaded checkpoint's effective config: its network settings, this
        command's scoring and run settings), so data sizes, outputs and the config saved with them agree with it."""
        self.cfg = cfg

    def is_own_checkpoint(self, path: Path) -> bool:
        """True when ``path`` is this run directory's own model.pt (its outputs may be replaced)."""
        return path.resolve() == (self.run_dir / "model.pt").resolve()

    @contextlib.contextmanager
    def owning_run_dir(self):
        """Hold the run directory for a mode that writes into it: rank 0 takes its lock (a second live run on the same
        directory stops with a one-line error) and removes temp files left by killed saves."""
        if not self.dist.is_main:
            yield
            return
        with RunLock(self.run_dir):
            for path in remove_stale_temps(self.run_dir):
                log.info("removed %s, left by an interrupted save", path)
            yield

    # ------------------------------------------------------------------ reporters
    @contextlib.contextmanager
    def reporting(self, job_type: str):
        """The configured reporters (rank 0) for the duration of one mode, always finished."""
        self.reporters = (
            build_reporters(self.cfg, self.run_dir, job_type, self.method.name) if self.dist.is_main else Reporters([])
        )
        success = False
        try:
            yield self.reporters
            success = True
        finally:
            self.reporters.finish(success)
            self.reporters = Reporters([])

    def setup_log_file(self) -> None:
        """Also log to <run_dir>/train.log (rank 0)."""
        if not self.dist.is_main:
            return
        path = self.run_dir / "train.log"
        root = logging.getLogger()
        if not any(
            isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers
        ):
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            handler.setLevel(logging.DEBUG)
            root.addHandler(handler)
