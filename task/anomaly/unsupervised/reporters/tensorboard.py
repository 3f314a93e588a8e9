"""TensorBoard reporter: event files under ``<run_dir>/tensorboard`` (``tensorboard --logdir runs``).

Scalars: ``train/<term>`` per logged step, ``eval/<metric>`` per evaluation, ``results/<metric>`` at the end; the
sample result pictures as images, the ROC/PR curves as ``curves/<name>`` images. The writer is created on first use,
so a run that logs nothing writes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from task.common.config import Config

log = logging.getLogger("anomaly")


class TensorBoardReporter:
    name = "TensorBoard"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None

    @classmethod
    def from_config(cls, cfg: Config, run_dir: Path, job_type: str, method_name: str) -> TensorBoardReporter | None:
        return cls(Path(run_dir) / "tensorboard") if cfg.LOG.tensorboard else None

    def _get(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
            log.info("TensorBoard event files: %s", self.log_dir)
        return self._writer

    def log_train(self, step: int, values: dict[str, float]) -> None:
        writer = self._get()
        for key, value in values.items():
            writer.add_scalar(f"train/{key}", value, step)

    def log_eval(self, step: int | None, metrics: dict[str, Any]) -> None:
        writer = self._get()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"eval/{key}", value, step)

    def log_results(
        self, metrics: dict[str, Any], images: list[tuple[Path, str]], gif: Path | None, checkpoint: Path | None
    ) -> None:
        writer = self._get()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"results/{key}", value)
        for index, (path, caption) in enumerate(images[:8]):
            picture = np.asarray(Image.open(path).convert("RGB"))
            writer.add_image(f"results/{index}", picture, dataformats="HWC")
            writer.add_text(f"results/{index}", caption)
        writer.flush()

    def log_curves(self, pictures: list[Path]) -> None:
        writer = self._get()
        for path in pictures:
            with Image.open(path) as picture:
                writer.add_image(f"curves/{path.stem}", np.asarray(picture.convert("RGB")), dataformats="HWC")
        writer.flush()

    def finish(self, success: bool = True) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
