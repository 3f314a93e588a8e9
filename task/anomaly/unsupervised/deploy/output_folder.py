"""A predict output folder: predict replaces only files it wrote itself, listed in its manifest."""

from __future__ import annotations

import json
from pathlib import Path

from task.common.errors import UserError
from task.common.io import write_text

MANIFEST = ".predict-manifest.json"


class OutputFolder:
    """An output folder where predict replaces only files it wrote itself (recorded in ``MANIFEST``)."""

    def __init__(self, folder: Path, input_path: Path) -> None:
        folder_abs, input_abs = folder.resolve(), input_path.resolve()
        if input_path.is_dir() and (folder_abs == input_abs or input_abs in folder_abs.parents):
            raise UserError(
                f"--output {folder} is inside the input folder {input_path}; choose an output folder outside it"
            )
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--output {folder} is a file; pass a folder")
        self.folder = folder
        self.manifest = folder / MANIFEST
        self.owned: set[str] = set()
        if self.manifest.is_file():
            try:
                recorded = json.loads(self.manifest.read_text(encoding="utf-8"))
                self.owned = {str(v) for v in recorded} if isinstance(recorded, list) else set()
            except (OSError, ValueError):
                self.owned = set()

    def claim(self, names: list[Path]) -> None:
        """Check every target before anything is written; record them as ours."""
        for name in names:
            target = self.folder / name
            if target.exists() and name.as_posix() not in self.owned:
                raise UserError(
                    f"{target} exists and was not written by predict; nothing was written: choose another --output or "
                    "move that file"
                )
        self.owned.update(n.as_posix() for n in names)
        write_text(self.manifest, json.dumps(sorted(self.owned)))
