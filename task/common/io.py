"""Safe, atomic file I/O for checkpoints, weights and small JSON/CSV outputs."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import tempfile
import warnings
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
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)  # the previous file at ``path``, if any, is untouched
        if isinstance(exc, OSError):  # disk full, quota, I/O error: the user's environment, not a bug
            raise UserError(f"cannot write {path} ({exc.strerror or exc}); free disk space or choose another output folder") from None
        raise


def ensure_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents); a UserError naming it when that is impossible (e.g. a parent is a file)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path} ({exc.strerror or type(exc).__name__}); choose a writable RESULT.savedir") from None
    return path


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(obj, handle))


def write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _pickle_import(path: Path) -> str | None:
    """The first ``module.name`` a pickle file would import, read with ``pickletools`` (parses, never executes)."""
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for opcode, arg, _ in pickletools.genops(handle):
                if opcode.name == "GLOBAL":
                    return str(arg).replace(" ", ".")
                if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a well-formed pickle: nothing to name
        return None
    return None


def _refusal_reason(exc: pickle.UnpicklingError, path: Path) -> str:
    """Why torch's weights-only loader refused the file, e.g. 'it would import posix.system'."""
    match = re.search(r"GLOBAL (\S+)", str(exc))
    name = match.group(1) if match else _pickle_import(path)
    if name:
        return f"it would import {name}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("Unsupported")]
    return f"it holds unsupported pickle content ({lines[0][:80]})" if lines else "it holds unsupported pickle content"


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only; anything that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror}); check the path and its permissions") from None
    if not head:
        raise UserError(f"{what} {path} is empty (0 bytes); re-create it or pass another file")
    # torch.save writes a zip archive (PK..); old torch versions wrote a bare pickle (protocol byte 0x80).
    if not head.startswith(b"PK") and head[0] != 0x80:
        raise UserError(f"{what} {path} is not a PyTorch checkpoint (neither a zip archive nor a pickle); pass a .pt file written by this toolkit")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: noise next to the one-line error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"refusing to load {what} {path}: {_refusal_reason(exc, path)}, and only tensors and plain data are accepted; "
            "if you trust the file, re-save it as a plain state dict"
        ) from None
    except Exception as exc:  # damaged zip, truncated pickle, wrong record types: all mean the file is unusable
        raise UserError(f"{what} {path} is damaged or truncated ({type(exc).__name__}); re-create it or pass another file") from None


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
