"""What every modality's mode table shares: the command-line options, the mode signature, the test output folder
and the report mode (modality-specific modes live in ``image/modes.py`` and ``video/modes.py``)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from task.anomaly.unsupervised.engine.engine import Engine
from task.anomaly.unsupervised.engine.report import write_report

log = logging.getLogger("anomaly")


@dataclass(frozen=True)
class ModeOptions:
    """The command-line options a mode may use (the config carries everything else)."""

    checkpoint: str | None = None  # --checkpoint: test/gif/export/predict (default: the run's model.pt)
    input: str | None = None  # --input: predict's images/video; export's check images; score's scores.npz
    backend: str = "torch"  # --backend: predict with "torch", "onnx", "openvino" or "auto" (deploy/openvino.py)
    output: str | None = None  # --output: predict's output folder
    update_readme: bool = False  # --update-readme: report rewrites README.md's tables
    # live sources (predict): --watch a folder; stop after --max-images / --max-frames or --duration seconds
    watch: bool = False
    max_images: int | None = None
    max_frames: int | None = None
    duration: float | None = None


ModeFunction = Callable[[Engine, ModeOptions], "dict[str, Any] | None"]


def test_output_dir(engine: Engine, checkpoint: Path) -> Path:
    """The run directory for its own model.pt; a folder of its own under ``tests/`` for any other checkpoint, so a
    foreign model never replaces the run's files."""
    if engine.is_own_checkpoint(checkpoint):
        return engine.run_dir
    # the hash of the resolved path keeps two checkpoints with the same folder and file names apart
    digest = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{checkpoint.parent.name}-{checkpoint.stem}-{digest}")
    return engine.run_dir / "tests" / name


def mode_report(engine: Engine, options: ModeOptions) -> None:
    """Tables of this method's runs under RESULT.savedir -> stdout and <savedir>/results.md (+ README.md with
    --update-readme, between the method's own markers when the README has them)."""
    readme = Path("README.md") if options.update_readme else None
    savedir = Path(engine.cfg.RESULT.savedir).expanduser()
    print(write_report(savedir, readme, engine.method.name), end="")
    log.info("report written to %s%s", savedir / "results.md", f" and {readme}" if readme else "")
