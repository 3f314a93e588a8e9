"""An append-only output file (CSV or JSON lines) that survives a crash: every line is flushed and fsynced as it is
written, and a line cut short by a crash is removed when the file is opened again (the item it belonged to is not
recorded as done, so it is redone)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from task.common.errors import UserError


class AppendLog:
    """Lines appended to ``path``; a new file starts with ``header`` (a line without its newline, or None)."""

    def __init__(self, path: Path, header: str | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = path.read_bytes() if path.is_file() else b""
        if existing and not existing.endswith(b"\n"):
            keep = existing.rfind(b"\n") + 1
            with open(path, "r+b") as handle:  # drop the partial last line of a crashed writer
                handle.truncate(keep)
            existing = existing[:keep]
        if header is not None and existing and not existing.startswith((header + "\n").encode()):
            raise UserError(f"{path} has other columns than {header!r}; choose another --output or move that file")
        self.handle: IO[str] = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115  (closed by close())
        if header is not None and not existing:
            self.write(header + "\n")

    def lines(self) -> list[str]:
        """The complete lines written so far (header included)."""
        return self.path.read_text(encoding="utf-8").splitlines()

    def write(self, text: str) -> None:
        """Append ``text`` (whole lines) and make it durable before returning."""
        self.handle.write(text)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()
