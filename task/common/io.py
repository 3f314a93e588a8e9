"""Safe, atomic file I/O for checkpoints, weights and small JSON/CSV outputs."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from task.common.errors import UserError


def atomic_write_bytes(path: str | Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write to {path.parent} ({exc.strerror}); choose a writable RESULT.savedir") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(obj, handle))


def write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only; anything that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported pickle content"
        raise UserError(
            f"refusing to load {what} {path}: it holds objects other than tensors and plain data ({first[:160]}); "
            "only load files you trust, and re-save them as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{what} {path} is not a readable PyTorch file ({type(exc).__name__}); check the path or re-create it") from None


def load_tensor_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict file (optionally wrapped as {'state_dict': ...} or {'model': ...})."""
    obj = load_checkpoint(path, what)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what} {path} is not a state dict of tensors")
    return obj
