"""Training and evaluation glue for DMAD: config -> data -> model -> loop -> evaluator -> outputs."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from task.anomaly.unsupervised.data.mvtec import AnomalyDataset, scan_split
from task.anomaly.unsupervised.benchmark import run_benchmark
from task.anomaly.unsupervised.data.synthetic import make_demo_dataset
from task.anomaly.unsupervised.inference import Predictions, autocast, predict_loader
from task.anomaly.unsupervised.report import write_report
from task.anomaly.unsupervised.reporters import WandbReporter
from task.anomaly.unsupervised.visualize import save_result_images, select_frames, write_result_gif
from task.common.config import Config
from task.common.errors import UserError
from task.common.io import ensure_dir, load_checkpoint, save_checkpoint, write_json, write_text
from task.common.metrics import compute_metrics
from task.common.runtime import DistributedContext, compile_model, keep_freed_memory_for_reuse, select_device, set_seed
from task.registry import register_trainer

from .checkpoint import CHECKPOINT_FORMAT, COMPATIBILITY_KEYS, check_compatible, is_official, load_any_checkpoint, read_checkpoint
from .config import SCHEMA, deform_weight
from .loss import DMADLoss
from .torch_model import DMADModel

log = logging.getLogger("dmad")

CHECKPOINT_VERSION = 1


def build_model(cfg: Config, pretrained: bool | None = None) -> DMADModel:
    m = cfg.MODEL
    height, width = cfg.DATASET.resize
    if height % 32 or width % 32 or height < 64 or width < 64:
        raise UserError(f"DATASET.resize must be two multiples of 32, at least 64 (got {[height, width]}); e.g. [256, 256]")
    return DMADModel(
        backbone=m.backbone,
        pretrained=m.pretrained if pretrained is None else pretrained,
        backbone_weights=m.backbone_weights,
        vq=m.vq,
        num_embeddings=m.vq_num_embeddings,
        vq_beta=m.vq_beta,
        coarse_shift=m.coarse_shift,
        fine_shift=m.fine_shift,
        sigma=m.sigma,
        deform_weight=deform_weight(cfg),
    )


def run_dir_for(cfg: Config) -> Path:
    path = Path(cfg.RESULT.savedir) / "dmad" / cfg.DATASET.target
    return path / cfg.RESULT.exp_name if cfg.RESULT.exp_name else path


# Settings a resumed run must share with its last.pt: the model's, and those that shape the optimisation (a loaded
# optimizer state would silently override a changed lr; batch size and seed fix the data order).
RESUME_KEYS = COMPATIBILITY_KEYS + (
    "MODEL.gamma", "MODEL.vq_beta", "MODEL.coarse_shift", "MODEL.fine_shift",
    "OPTIMIZER.name", "OPTIMIZER.lr", "OPTIMIZER.betas", "OPTIMIZER.weight_decay", "SCHEDULER.name",
    "DATALOADER.batch_size", "SEED",
)


def _dotted(data: dict[str, Any], key: str) -> Any:
    """``data['A']['b']`` for ``key='A.b'``; None when absent (e.g. a checkpoint from an older schema)."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch) so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@register_trainer("anomaly", "unsupervised", "dmad")
class DMADTrainer:
    """Runs one category: ``train`` (then evaluate), ``test`` and the other modes dispatched from main.py."""

    schema = SCHEMA

    def __init__(self, cfg: Config, checkpoint: str | None = None) -> None:
        self.cfg = cfg
        self.dist = DistributedContext.from_env()
        self.device = select_device(self.dist)
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()  # no page faults on every step's activations
        self.run_dir = run_dir_for(cfg)
        self.checkpoint_arg = checkpoint
        self.amp = cfg.TRAIN.amp
        if self.amp == "fp16" and self.device.type != "cuda":
            raise UserError("TRAIN.amp=fp16 needs a CUDA device; use TRAIN.amp=bf16 on CPU")
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        # oneDNN's bf16 convolutions work in NHWC: with NCHW tensors each one reorders its input and output, which
        # costs about half of a bf16 forward pass on CPU.
        self.channels_last = cfg.TRAIN.channels_last or (self.amp == "bf16" and self.device.type == "cpu")
        if not self.dist.is_main:  # one log for the whole job: rank 0's
            logging.getLogger().setLevel(logging.WARNING)
        self.reporter: WandbReporter | None = None  # set while a mode runs with LOG.wandb on
        set_seed(cfg.SEED)

    # ------------------------------------------------------------------ data
    def _prepare_data(self) -> None:
        ds = self.cfg.DATASET
        if ds.demo:
            height = ds.resize[0]
            if self.dist.is_main:  # one writer; the other processes wait for the finished dataset
                make_demo_dataset(ds.datadir, ds.target, size=max(128, height))
            self.dist.barrier()

    def dataset(self, split: str) -> AnomalyDataset:
        ds = self.cfg.DATASET
        samples = scan_split(ds.datadir, ds.target, split)
        return AnomalyDataset(samples, tuple(ds.resize), cache=ds.cache, skip_bad_images=ds.skip_bad_images)

    def eval_loader(self, dataset: AnomalyDataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.cfg.TEST.batch_size, shuffle=False,
            num_workers=self.cfg.DATALOADER.num_workers, pin_memory=self.cfg.DATALOADER.pin_memory,
        )

    # ------------------------------------------------------------------ model state
    def _model_to_device(self, model: DMADModel) -> DMADModel:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def checkpoint_payload(self, model: DMADModel, thresholds: dict[str, float] | None) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "thresholds": thresholds or {},
        }

    def checkpoint_path(self) -> Path:
        """``--checkpoint`` or the run's ``model.pt`` (the one place test, gif, export and predict find it); must exist."""
        path = Path(self.checkpoint_arg) if self.checkpoint_arg else self.run_dir / "model.pt"
        if not path.is_file():
            hint = "check the path" if self.checkpoint_arg else "train first (--mode train) or pass --checkpoint PATH"
            raise UserError(f"checkpoint not found: {path}; {hint}")
        return path

    def load_model(self, path: str | Path, cfg: Config | None = None) -> tuple[DMADModel, dict[str, float], bool]:
        """A model from one of our checkpoints (or an official DMAD-PPDM one), ready for inference.

        Returns (model, thresholds, calibrated). Our checkpoints carry the encoder; official ones take it from
        MODEL.pretrained / MODEL.backbone_weights. ``cfg`` (default: the trainer's) describes the model to build;
        export and predict pass the checkpoint's own settings.
        """
        cfg = self.cfg if cfg is None else cfg
        state = read_checkpoint(path)
        check_compatible(state, path, cfg)  # before building (and fetching ImageNet weights for) a model it cannot fill
        model = build_model(cfg, pretrained=None if is_official(state) else False)
        thresholds, calibrated = load_any_checkpoint(model, state, path, cfg)
        return self._model_to_device(model).eval(), thresholds, calibrated

    def _maybe_compile(self, model: DMADModel) -> DMADModel:
        if self.cfg.TRAIN.compile:
            compile_model(model, self.device)
        return model

    def make_criterion(self) -> DMADLoss:
        return DMADLoss(self.cfg.MODEL.gamma)

    def make_optimizer(self, model: DMADModel) -> torch.optim.Optimizer:
        """Adam(W) over the trainable parameters only: the frozen encoder gets neither gradients nor optimiser state.

        ``fused`` updates each parameter in one kernel instead of a chain of element-wise ops (the same formula;
        about 2.5x faster per step on CPU for wide_resnet50_2).
        """
        o = self.cfg.OPTIMIZER
        params = model.trainable_parameters()
        opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
        return opt_cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused or None)

    def train_step(
        self, train_model: torch.nn.Module, criterion: DMADLoss, optimizer: torch.optim.Optimizer, images: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser step on ``images`` [B, 3, H, W]; returns the loss and its named terms.

        ``step`` (1-based) names the step in the error raised for a non-finite loss. ``--mode benchmark`` times
        this same method.
        """
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            out = train_model(images)
            loss, terms = criterion(images, out.encoder_features, out.decoder_features, out.deformation, out.vq_loss)
        self._check_finite(step, loss, terms)
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.step(optimizer)
        self.grad_scaler.update()
        # Free the gradients now rather than before the next backward: they would sit in memory through the
        # next forward pass, on top of its peak of saved activations.
        optimizer.zero_grad(set_to_none=True)
        return loss, terms

    # ------------------------------------------------------------------ training
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        self._prepare_data()
        train_set = self.dataset("train")
        test_set = self.dataset("test")
        ensure_dir(self.run_dir)
        self._setup_log_file()
        if self.dist.is_main:
            write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

        model = self._maybe_compile(self._model_to_device(build_model(cfg)))
        train_model = self.dist.wrap(model)
        criterion = self.make_criterion()
        optimizer = self.make_optimizer(model)

        batch_size = cfg.DATALOADER.batch_size
        steps_per_epoch = math.ceil(len(train_set) / batch_size)
        total_steps = cfg.TRAIN.epochs * steps_per_epoch
        if cfg.TRAIN.num_training_steps is not None:
            total_steps = min(total_steps, cfg.TRAIN.num_training_steps)
        epochs = math.ceil(total_steps / steps_per_epoch)
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
            if cfg.SCHEDULER.name == "cosine" else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        )
        step = self._maybe_resume(model, optimizer, scheduler)
        log.info("run directory: %s", self.run_dir)
        log.info("%d training images, %d test images, %d steps (%d per epoch) on %s", len(train_set), len(test_set), total_steps, steps_per_epoch, self.device)

        eval_interval = cfg.LOG.eval_interval
        metrics: dict[str, float] = {}
        progress = tqdm(total=total_steps, initial=step, desc=f"train {cfg.DATASET.target}", dynamic_ncols=True, disable=not self.dist.is_main)
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            batches = _epoch_batches(len(train_set), batch_size, cfg.SEED, epoch)[offset:]
            loader = DataLoader(
                train_set, batch_sampler=[self.dist.shard(b) for b in batches],
                num_workers=cfg.DATALOADER.num_workers, pin_memory=cfg.DATALOADER.pin_memory,
            )
            model.train()
            for batch in loader:
                loss, terms = self.train_step(train_model, criterion, optimizer, batch["image"], step + 1)
                step += 1
                progress.update(1)
                if step % steps_per_epoch == 0 or step == total_steps:
                    scheduler.step()
                if step % cfg.LOG.log_interval == 0 or step == total_steps:
                    values = {k: float(v.detach()) for k, v in terms.items()} | {"loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"]}
                    progress.set_postfix({k: f"{v:.4f}" for k, v in values.items() if k != "lr"})
                    self.on_train_log(step, values)
                if step % cfg.TRAIN.save_interval == 0 and step < total_steps:
                    self._save_training_state(model, optimizer, scheduler, step)
                if eval_interval and step % eval_interval == 0 and step < total_steps:
                    metrics = self.evaluate(model, train_set, test_set, step=step)
                if step >= total_steps:
                    break
        progress.close()
        self._save_training_state(model, optimizer, scheduler, step)
        metrics = self.evaluate(model, train_set, test_set, step=step, final=True)
        self.dist.barrier()
        return metrics

    def on_train_log(self, step: int, values: dict[str, float]) -> None:
        log.debug("step %d %s", step, " ".join(f"{k}={v:.5f}" for k, v in values.items()))
        if self.reporter is not None:
            self.reporter.log_train(step, values)

    def _check_finite(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if torch.isfinite(loss):
            return
        bad = [k for k, v in terms.items() if not torch.isfinite(v)] or ["total"]
        last = self.run_dir / "last.pt"
        kept = f"; the last good checkpoint is {last}" if last.exists() else ""
        raise UserError(f"training stopped at step {step}: the {', '.join(bad)} loss is not finite ({float(loss.detach())}){kept}; lower OPTIMIZER.lr or check the data")

    def _save_training_state(self, model: DMADModel, optimizer, scheduler, step: int) -> None:
        # A finite loss can still come with non-finite gradients; never let such weights replace the last good
        # checkpoint. Every rank checks (DDP keeps the weights identical), so all of them stop together.
        broken = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if broken is not None:
            last = self.run_dir / "last.pt"
            kept = f"; the last good checkpoint is {last}" if last.exists() else ""
            raise UserError(f"training stopped at step {step}: weight {broken} is not finite{kept}; lower OPTIMIZER.lr or check the data")
        if not self.dist.is_main:
            return
        payload = self.checkpoint_payload(model, None)
        payload.update(
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            step=step,
            rng_torch=torch.get_rng_state(),
        )
        save_checkpoint(payload, self.run_dir / "last.pt")

    def _maybe_resume(self, model: DMADModel, optimizer, scheduler) -> int:
        cfg = self.cfg
        path = Path(cfg.RESUME.checkpoint) if cfg.RESUME.checkpoint else self.run_dir / "last.pt"
        if cfg.RESUME.option and cfg.RESUME.checkpoint and not path.is_file():
            raise UserError(f"RESUME.checkpoint {path} not found; give the last.pt of an earlier run, or RESUME.checkpoint=null")
        if not cfg.RESUME.option or not path.exists():
            return 0
        try:
            state = load_checkpoint(path, "resume checkpoint")
        except UserError as exc:
            raise UserError(f"{exc}; to start over instead, delete it or set RESUME.option=false") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "optimizer" not in state:
            raise UserError(f"{path} is not a resumable DMAD training state; delete it or set RESUME.option=false")
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        changed = [f"{k}={_dotted(saved, k)!r} (config: {cfg.get(k)!r})" for k in RESUME_KEYS if _dotted(saved, k) != cfg.get(k)]
        if changed:
            raise UserError(
                f"{path} was trained with {', '.join(changed)}; rerun with those settings to resume, "
                "or set RESUME.option=false or RESULT.exp_name to start a new run"
            )
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        t_max = getattr(scheduler, "T_max", None)
        scheduler.load_state_dict(state["scheduler"])
        if t_max is not None:  # a run extended with more steps anneals to its new end, not the old one
            scheduler.T_max = t_max
        torch.set_rng_state(state["rng_torch"])
        log.info("resumed from %s at step %d", path, state["step"])
        return int(state["step"])

    # ------------------------------------------------------------------ evaluation
    def calibrate(self, model: DMADModel, train_set: AnomalyDataset) -> None:
        """Score normalisation from the normal training images (never from the test set)."""
        preds = predict_loader(model, self.eval_loader(train_set), self.device, self.amp, desc="calibrate", channels_last=self.channels_last)
        model.set_score_stats(preds.anomaly_max, preds.deformation_max)

    def evaluate(self, model: DMADModel, train_set: AnomalyDataset | None, test_set: AnomalyDataset, step: int | None = None, final: bool = False) -> dict[str, float]:
        """Calibrate (if a training set is given), predict the test set, compute metrics, write outputs (rank 0)."""
        if not self.dist.is_main:
            return {}
        eval_model = model
        if train_set is not None:
            self.calibrate(eval_model, train_set)
        start = time.perf_counter()
        preds = predict_loader(eval_model, self.eval_loader(test_set), self.device, self.amp, desc="test", channels_last=self.channels_last)
        metrics = compute_metrics(preds.scores, preds.labels, preds.anomaly_maps, preds.masks)
        log.info(
            "%s%s: %s (%.1fs)", self.cfg.DATASET.target, f" step {step}" if step is not None else "",
            " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), time.perf_counter() - start,
        )
        thresholds = {"image": metrics["image_threshold"], "pixel": metrics["pixel_threshold"]}
        self.on_eval(step, metrics)
        if final:
            self.write_outputs(model, preds, metrics, thresholds, test_set=test_set, step=step)
        return metrics

    def on_eval(self, step: int | None, metrics: dict[str, float]) -> None:
        if self.reporter is not None:
            self.reporter.log_eval(step, metrics)

    def write_outputs(
        self, model: DMADModel, preds: Predictions, metrics: dict[str, float], thresholds: dict[str, float],
        test_set: AnomalyDataset | None = None, step: int | None = None,
    ) -> None:
        """model.pt, metrics.json, run.json, predictions.csv, optional maps, pictures + GIF (needs ``test_set``), W&B."""
        ensure_dir(self.run_dir)
        save_checkpoint(self.checkpoint_payload(model, thresholds), self.run_dir / "model.pt")
        write_json(self.run_dir / "metrics.json", {k: _json_number(v) for k, v in metrics.items()})
        write_json(self.run_dir / "run.json", self.run_info(step))
        write_text(self.run_dir / "predictions.csv", predictions_csv(preds, thresholds["image"]))
        if self.cfg.TEST.save_maps:
            save_maps(preds, self.run_dir / "maps")
        sample: list[tuple[Path, str]] = []
        gif = None
        if self.cfg.TEST.save_images and test_set is not None:
            try:
                images = save_result_images(preds, test_set, thresholds, self.run_dir / "images")
                sample = [(images[i], f"{preds.defects[i]}/{images[i].stem} score {float(preds.scores[i]):.3f}") for i in select_frames(preds.labels, 8)]
                gif = self.write_gif(preds, test_set, thresholds)
            except Exception as exc:  # noqa: BLE001  (pictures are a by-product: never lose a finished run over them)
                log.warning("result pictures not written (%s: %s); model.pt and metrics are saved, rerun with --mode gif", type(exc).__name__, exc)
        if self.reporter is not None:
            self.reporter.log_results(metrics, sample, gif, self.run_dir / "model.pt")
        log.info("outputs written to %s", self.run_dir)

    def run_info(self, step: int | None) -> dict[str, Any]:
        """What run.json records for --mode report; an evaluation outside training keeps the recorded step count."""
        cfg = self.cfg
        steps = step
        previous = self.run_dir / "run.json"
        if steps is None and previous.is_file():
            with contextlib.suppress(OSError, ValueError):
                recorded = json.loads(previous.read_text(encoding="utf-8"))
                steps = recorded.get("steps") if isinstance(recorded, dict) else None
        return {
            "category": cfg.DATASET.target, "exp_name": cfg.RESULT.exp_name, "backbone": cfg.MODEL.backbone,
            "image_size": list(cfg.DATASET.resize), "steps": steps, "device": str(self.device),
        }

    def write_gif(self, preds: Predictions, test_set: AnomalyDataset, thresholds: dict[str, float]) -> Path:
        """<run_dir>/<category>.gif and, with RESULT.assets_dir set, <assets_dir>/<category>.gif; returns the first."""
        name = f"{self.cfg.DATASET.target}.gif"
        targets = [self.run_dir / name]
        if self.cfg.RESULT.assets_dir:
            targets.append(Path(self.cfg.RESULT.assets_dir) / name)
        result = write_result_gif(preds, test_set, thresholds, targets)
        log.info("GIF with %d frames written to %s", len(result.frames), ", ".join(map(str, targets)))
        return targets[0]

    # ------------------------------------------------------------------ modes (main.py calls mode_<name>(args))
    def mode_train(self, args=None) -> dict[str, float]:
        with self._reporting("train"):
            return self.train()

    def mode_test(self, args=None) -> dict[str, float]:
        with self._reporting("test"):
            return self.test()

    def mode_gif(self, args=None) -> None:
        """Rebuild the result GIF from a saved checkpoint (--checkpoint or the run's model.pt), no training."""
        path = self.checkpoint_path()
        self._prepare_data()
        test_set = self.dataset("test")
        model, thresholds, calibrated = self.load_model(path)
        if not calibrated:
            self.calibrate(model, self.dataset("train"))
        preds = predict_loader(model, self.eval_loader(test_set), self.device, self.amp, desc="gif", channels_last=self.channels_last)
        if not {"image", "pixel"} <= thresholds.keys():  # e.g. an official checkpoint: thresholds from this test set
            metrics = compute_metrics(preds.scores, preds.labels, preds.anomaly_maps, preds.masks)
            thresholds = {"image": metrics["image_threshold"], "pixel": metrics["pixel_threshold"]}
        self.write_gif(preds, test_set, thresholds)

    def mode_report(self, args=None) -> None:
        """Tables of every run under RESULT.savedir -> stdout and <savedir>/results.md (+ README.md with --update-readme)."""
        readme = Path("README.md") if getattr(args, "update_readme", False) else None
        print(write_report(self.cfg.RESULT.savedir, readme), end="")
        log.info("report written to %s%s", Path(self.cfg.RESULT.savedir) / "results.md", f" and {readme}" if readme else "")

    @contextlib.contextmanager
    def _reporting(self, job_type: str):
        """The W&B reporter (rank 0, LOG.wandb on) for the duration of one mode, always finished."""
        self.reporter = WandbReporter.from_config(self.cfg, self.run_dir, job_type) if self.dist.is_main else None
        success = False
        try:
            yield
            success = True
        finally:
            if self.reporter is not None:
                self.reporter.finish(success)
            self.reporter = None

    def mode_export(self, args) -> None:
        from task.anomaly.unsupervised.export import export_run

        export_run(self, args.input)

    def mode_predict(self, args) -> None:
        from task.anomaly.unsupervised.predict import predict_run

        predict_run(self, args.input, args.backend, args.output)

    def mode_benchmark(self, args=None) -> None:
        """Time BENCHMARK.train_steps training steps and one evaluation pass; print the result as one JSON line.

        Uses the dataset when DATASET.datadir holds DATASET.target (generated first with DATASET.demo), random
        tensors of the configured size otherwise. Writes nothing to disk.
        """
        if self.cfg.DATASET.demo:
            self._prepare_data()
        model = self._maybe_compile(self._model_to_device(build_model(self.cfg)))
        result = run_benchmark(self, model)
        if self.dist.is_main:
            print(json.dumps(result), flush=True)
        self.dist.barrier()

    def test(self) -> dict[str, float]:
        path = self.checkpoint_path()
        self._prepare_data()
        test_set = self.dataset("test")
        ensure_dir(self.run_dir)
        self._setup_log_file()
        model, _, calibrated = self.load_model(path)
        self._maybe_compile(model)
        train_set = None if calibrated else self.dataset("train")
        return self.evaluate(model, train_set, test_set, final=True)

    def _setup_log_file(self) -> None:
        if not self.dist.is_main:
            return
        path = self.run_dir / "train.log"
        root = logging.getLogger()
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            handler.setLevel(logging.DEBUG)
            root.addHandler(handler)


def _json_number(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def predictions_csv(preds: Predictions, image_threshold: float) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "score", "prediction"])
    for path, label, score in zip(preds.paths, preds.labels.tolist(), preds.scores.tolist()):
        writer.writerow([path, label, f"{score:.6f}", int(score >= image_threshold)])
    return buffer.getvalue()


def save_maps(preds: Predictions, folder: Path) -> None:
    """maps/<defect>/<name>.npz with float32 ``anomaly_map`` and ``deformation_map`` at the input resolution."""
    import numpy as np

    for i, (path, defect) in enumerate(zip(preds.paths, preds.defects)):
        target = folder / defect / (Path(path).stem + ".npz")
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, anomaly_map=preds.anomaly_maps[i].numpy().astype("float32"), deformation_map=preds.deformation_maps[i].numpy().astype("float32"))

