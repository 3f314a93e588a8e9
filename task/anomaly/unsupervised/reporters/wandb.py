"""Weights & Biases reporter: logging that can never stop a training run.

``WandbReporter`` starts its W&B run lazily on the first thing it logs. Every call into ``wandb`` is guarded:
the first exception is logged once as a warning and the reporter switches itself off for the rest of the run.
Offline mode (the default) writes under ``<run_dir>/wandb`` and needs no network or account; credentials come
from W&B's own login/environment, never from the config. Online mode gives up on an unreachable server after
``INIT_TIMEOUT_S`` seconds (then the reporter switches itself off and training goes on).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from task.common.config import Config

log = logging.getLogger("anomaly")

INIT_TIMEOUT_S = 20


class WandbReporter:
    """Logs config, training losses, eval metrics, result pictures, the GIF and the checkpoint to W&B.

    Keys: ``train/<term>`` (the method's loss terms, loss, lr) at each logged step, ``eval/<metric>`` at
    each evaluation, and the final metrics under their plain names in the run summary (e.g. ``image_auroc``).
    """

    name = "W&B"

    def __init__(self, cfg: Config, run_dir: str | Path, job_type: str, method_name: str) -> None:
        self.cfg = cfg
        self.method_name = method_name
        self.run_dir = Path(run_dir)
        self.job_type = job_type
        self._run: Any = None
        self._disabled = False

    @classmethod
    def from_config(cls, cfg: Config, run_dir: str | Path, job_type: str, method_name: str) -> WandbReporter | None:
        """A reporter when ``LOG.wandb`` is on and ``LOG.wandb_mode`` is not ``disabled``; else None."""
        if not cfg.LOG.wandb or cfg.LOG.wandb_mode == "disabled":
            return None
        return cls(cfg, run_dir, job_type, method_name)

    @property
    def active(self) -> bool:
        return not self._disabled

    # ------------------------------------------------------------------ guarded calls
    def _start(self) -> Any:
        """The W&B run, created on first use."""
        if self._run is None:
            # Keep wandb's own banners and console capture out of the training output.
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            cfg = self.cfg
            self.run_dir.mkdir(parents=True, exist_ok=True)
            name = cfg.DATASET.target + (f"-{cfg.RESULT.exp_name}" if cfg.RESULT.exp_name else "")
            self._run = wandb.init(
                project=cfg.LOG.wandb_project,
                entity=cfg.LOG.wandb_entity,
                mode=cfg.LOG.wandb_mode,
                dir=str(self.run_dir),
                name=name,
                group=cfg.DATASET.target,
                job_type=self.job_type,
                tags=[self.method_name, cfg.DATASET.format],
                config=cfg.to_dict(),
                settings=wandb.Settings(console="off", silent=True, save_code=False, init_timeout=INIT_TIMEOUT_S),
            )
            where = self._run.url if cfg.LOG.wandb_mode == "online" else Path(self._run.dir).parent
            log.info("W&B %s run: %s", cfg.LOG.wandb_mode, where)
        return self._run

    def _guard(self, what: str, action: Callable[[Any], None]) -> None:
        """Run ``action(run)``; on any exception warn once and switch the reporter off."""
        if self._disabled:
            return
        try:
            action(self._start())
        except Exception as exc:  # noqa: BLE001  (a W&B problem must never stop training)
            self._disabled = True
            log.warning("W&B disabled for the rest of this run: %s failed (%s: %s)", what, type(exc).__name__, exc)
            self._close(exit_code=1)

    def _close(self, exit_code: int) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception:  # noqa: BLE001  (already failing or finishing; nothing more to report)
            pass

    # ------------------------------------------------------------------ hooks
    def log_train(self, step: int, values: dict[str, float]) -> None:
        """``values``: loss terms and lr of one logged training step."""
        self._guard(
            "logging training losses", lambda run: run.log({f"train/{k}": v for k, v in values.items()}, step=step)
        )

    def log_eval(self, step: int | None, metrics: dict[str, float]) -> None:
        """``metrics``: one evaluation's metrics; ``step`` None for a checkpoint evaluated outside training."""
        data = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._guard("logging eval metrics", lambda run: run.log(data, step=step) if step is not None else run.log(data))

    def log_results(
        self,
        metrics: dict[str, float],
        images: list[tuple[Path, str]],
        gif: Path | None,
        checkpoint: Path | None,
    ) -> None:
        """Final outputs: metrics into the summary, captioned result pictures (<= 8), the GIF, the checkpoint.

        Args:
            metrics: the final metrics (summary keys are the plain metric names).
            images: (PNG path, caption) pairs; only the first 8 are logged.
            gif: the result GIF, or None when no pictures were made.
            checkpoint: model.pt, logged as a ``model`` artifact (referenced in place, not copied).
        """

        def action(run: Any) -> None:
            import wandb

            run.summary.update({k: v for k, v in metrics.items() if v is not None})
            media: dict[str, Any] = {}
            if images:
                media["results/images"] = [wandb.Image(str(p), caption=c) for p, c in images[:8]]
            if gif is not None:
                media["results/gif"] = wandb.Video(str(gif), format="gif")
            if media:
                run.log(media)
            if checkpoint is not None:
                finite = {
                    k: v for k, v in metrics.items() if v is not None and v == v
                }  # NaN/null are not valid artifact metadata
                artifact = wandb.Artifact(
                    _artifact_name(f"{self.method_name}-{self.cfg.DATASET.target}"), type="model", metadata=finite
                )
                # "immutable": reference model.pt where it is instead of staging a copy outside the run directory.
                artifact.add_file(str(checkpoint), name="model.pt", policy="immutable")
                run.log_artifact(artifact)

        self._guard("logging results", action)

    def log_curves(self, pictures: list[Path]) -> None:
        """The ROC/PR curve pictures of the final evaluation, as ``curves/<name>`` images."""

        def action(run: Any) -> None:
            import wandb

            run.log({f"curves/{path.stem}": wandb.Image(str(path)) for path in pictures})

        self._guard("logging curves", action)

    def finish(self, success: bool = True) -> None:
        """End the W&B run (offline runs can be uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``)."""
        if not self._disabled:
            self._close(exit_code=0 if success else 1)


def _artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)
