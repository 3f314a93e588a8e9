"""The reporter interface and the list the engine talks to.

A reporter receives five calls: ``log_train`` (loss terms of a logged step), ``log_eval`` (metrics of an evaluation),
``log_results`` (final metrics, sample pictures, the GIF, the checkpoint), ``log_curves`` (the ROC/PR curve pictures
of the final evaluation) and ``finish``. ``Reporters`` fans each call
out and guarantees that a failing reporter never stops a run: its first exception is logged once and that reporter is
switched off.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("anomaly")


class Reporter(Protocol):
    name: str

    def log_train(self, step: int, values: dict[str, float]) -> None: ...

    def log_eval(self, step: int | None, metrics: dict[str, Any]) -> None: ...

    def log_results(
        self, metrics: dict[str, Any], images: list[tuple[Path, str]], gif: Path | None, checkpoint: Path | None
    ) -> None: ...

    def log_curves(self, pictures: list[Path]) -> None: ...

    def finish(self, success: bool = True) -> None: ...


class Reporters:
    """Every configured reporter behind one reporter's interface."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self._active = list(reporters)

    def __len__(self) -> int:
        return len(self._active)

    def _each(self, what: str, call) -> None:
        for reporter in list(self._active):
            try:
                call(reporter)
            except Exception as exc:  # noqa: BLE001  (a reporter must never stop training)
                self._active.remove(reporter)
                log.warning(
                    "%s reporter disabled for the rest of this run: %s failed (%s: %s)",
                    reporter.name,
                    what,
                    type(exc).__name__,
                    exc,
                )

    def log_train(self, step: int, values: dict[str, float]) -> None:
        self._each("logging training losses", lambda r: r.log_train(step, values))

    def log_eval(self, step: int | None, metrics: dict[str, Any]) -> None:
        self._each("logging eval metrics", lambda r: r.log_eval(step, metrics))

    def log_results(
        self, metrics: dict[str, Any], images: list[tuple[Path, str]], gif: Path | None, checkpoint: Path | None
    ) -> None:
        self._each("logging results", lambda r: r.log_results(metrics, images, gif, checkpoint))

    def log_curves(self, pictures: list[Path]) -> None:
        if pictures:
            self._each("logging curves", lambda r: r.log_curves(pictures))

    def finish(self, success: bool = True) -> None:
        self._each("finishing", lambda r: r.finish(success))
