"""Safe, atomic file I/O for checkpoints, weights and small JSON/CSV outputs.

Every write goes through ``atomic_write_bytes``: a temporary file ``.<name>.<host>-<pid>.<random>.tmp`` in the
target's folder, fsync, rename. A failure of the operating system (disk full, quota, read-only folder, I/O error;
torch reports some of these as a RuntimeError around the OSError) becomes a one-line ``UserError`` naming the path
and a fix; the previous file is untouched and the temporary file removed. SIGTERM during a write (in the main
thread, while SIGTERM has its default action) removes the temporary file before the process ends as SIGTERM would.
Temporary files of writers that died by SIGKILL or power loss are removed by ``remove_stale_temps``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import pickletools
import re
import shutil
import signal
import socket
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from task.common.array_files import check_zip_expansion
from task.common.errors import UserError, short_text

if TYPE_CHECKING:
    import torch

# ``.<name>.<host>-<pid>.<8 random chars from mkstemp>.tmp``: the host and pid say whose temp file it is.
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.tmp$")
_OUTPUT_FIX = "choose another RESULT.savedir (or --output for --mode predict)"
# How torch's zip writer reports a failed write when the OSError itself is not chained to its RuntimeError.
_TORCH_WRITE_FAILURE = re.compile(r"file write failed|unexpected pos|No space left on device|Disk quota exceeded")


def _host_tag() -> str:
    """8 hex digits naming this machine in temp names (run folders on network disks are shared between hosts)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _shown(path: str | Path) -> str:
    return short_text(str(path), 160)


def _check_path(path: Path, what: str) -> None:
    """A NUL byte makes every OS call raise ValueError (not OSError): refuse it with a message instead."""
    if "\0" in str(path):
        raise UserError(f"{what} {_shown(path)} contains a NUL byte; pass a plain path")


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, one in its cause/context chain, or one described by torch's writer message.

    A UserError already says what went wrong, and a context hidden with ``raise ... from None`` is not followed.
    """
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen and not isinstance(node, UserError):
        if isinstance(node, OSError):
            return node
        seen.add(id(node))
        node = node.__cause__ or (None if node.__suppress_context__ else node.__context__)
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc)):
        code = errno.ENOSPC if "No space left" in str(exc) else errno.EDQUOT if "quota" in str(exc) else errno.EIO
        return OSError(code, os.strerror(code))
    return None


def _write_error(path: Path, exc: OSError) -> UserError:
    """One line: what could not be written, the operating system's reason, and the fix that reason calls for."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free disk space ({_free_space(path.parent)}) or {_OUTPUT_FIX}"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"check the folder's permissions or {_OUTPUT_FIX}"
    else:
        fix = f"check the disk and the path, or {_OUTPUT_FIX}"
    return UserError(f"cannot write {_shown(path)} ({reason}); {fix}")


class _Terminated(BaseException):
    """Raised by the SIGTERM handler inside a write: unwinds it (removing the temp file) like KeyboardInterrupt."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the body runs, SIGTERM raises ``_Terminated``; once the body has cleaned up, the process ends by SIGTERM.

    Only in the main thread (Python runs signal handlers there alone) and only while SIGTERM has its default
    action: a handler installed by someone else (e.g. a graceful stop) stays in charge, and an ignored SIGTERM
    stays ignored. The previous handler is always restored.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        if _HELD["active"]:  # inside _sigterm_held: act once the held section is done
            _HELD["pending"] = True
            return
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)  # the default action: the process ends, killed by SIGTERM
        raise SystemExit(128 + signal.SIGTERM) from None  # reached only if this thread blocks SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def _temp_file(path: Path, write: Callable[[IO[bytes]], Any]) -> str:
    """Write through ``write`` into a new temp file beside ``path`` (fsynced, plain-open permissions); its name.
    On failure the temp file is removed and the exception propagates."""
    prefix = f".{path.name[:128]}.{_host_tag()}-{os.getpid()}."  # cut long names: temp names stay under 255 bytes
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions a plain open() would
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


# While a set of renames runs, SIGTERM is recorded rather than acted on (see _sigterm_held).
_HELD = {"active": False, "pending": False}


@contextlib.contextmanager
def _sigterm_held() -> Iterator[None]:
    """Inside ``_sigterm_unwinds``: a SIGTERM during the body is acted on only after it, so the body's renames all
    happen. Python runs signal handlers in the main thread between bytecodes, whichever thread the kernel picked,
    so a flag read by the handler is exact where a thread's signal mask would not be."""
    _HELD["active"], _HELD["pending"] = True, False
    try:
        yield
    finally:
        _HELD["active"] = False
    if _HELD["pending"]:
        _HELD["pending"] = False
        raise _Terminated()


def atomic_write_bytes(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: readers never see a partial file.

    ``write(handle)`` writes the content to a binary file handle. OS-level failures raise a one-line UserError.
    The rename replaces ``path`` itself: a symlink there is replaced by the file, never written through.
    """
    write_together({Path(path): write})


def write_together(writers: dict[Path, Callable[[IO[bytes]], Any]]) -> None:
    """Write several files as a set: each into its own temp file first, then all renamed with SIGTERM held back,
    so SIGTERM leaves either every old file or every new one (e.g. a video's ``.csv`` and ``.gif`` from one input,
    never a mix). A failure before the renames replaces nothing and removes the temp files."""
    paths = [Path(p) for p in writers]
    for path in paths:
        _check_path(path, "output path")
    temps: list[tuple[str, Path]] = []
    with _sigterm_unwinds():
        current = paths[0] if paths else Path()
        try:
            for path, write in zip(paths, writers.values()):
                current = path
                path.parent.mkdir(parents=True, exist_ok=True)
                temps.append((_temp_file(path, write), path))
            with _sigterm_held():
                for tmp, path in temps:
                    current = path
                    os.replace(tmp, path)
        except BaseException as exc:
            for tmp, _ in temps:
                with contextlib.suppress(OSError):
                    Path(tmp).unlink(missing_ok=True)  # the previous files are untouched (renamed ones are complete)
            os_error = _os_error_in(exc) if isinstance(exc, Exception) else None
            if os_error is not None:  # disk full, quota, I/O error: the user's environment, not a bug
                raise _write_error(current, os_error) from None
            raise


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files ``atomic_write_bytes`` left in ``folder`` when its writer died; returns those removed.

    Only names of our pattern written on this host by a process that no longer exists are removed, so the temp
    file of a live writer (another run, a rank of this one) is never touched. Call at run start, before writing.
    """
    folder = Path(folder)
    host = _host_tag()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (OSError, ValueError):  # no folder yet (nothing to clean), or unreadable: writes will report it
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if (
            match is None
            or match["host"] != host
            or not entry.is_file(follow_symlinks=False)
            or _pid_alive(int(match["pid"]))
        ):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (signal 0 checks without sending anything)."""
    if pid <= 0:
        return True  # 0 and negatives name process groups, never a writer: treat as alive, i.e. keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OverflowError:  # larger than any pid
        return False
    return True


def csv_cell(text: str) -> str:
    """``text`` safe for a CSV cell opened in a spreadsheet: a leading ``= + - @``, tab or CR would start a formula.

    Such cells get a leading single quote (OWASP's advice). Use it for text cells (paths, names), not numbers.
    """
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def ensure_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) and check that it is writable; a one-line UserError naming it otherwise."""
    path = Path(path)
    _check_path(path, "output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(
            f"cannot create output folder {_shown(path)}: a file of that name exists; {_OUTPUT_FIX}"
        ) from None
    except OSError as exc:
        raise UserError(
            f"cannot create output folder {_shown(path)} ({exc.strerror or type(exc).__name__}); {_OUTPUT_FIX}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(
            f"output folder {_shown(path)} is not writable (permission denied); fix its permissions or {_OUTPUT_FIX}"
        )
    return path


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` through ``atomic_write_bytes``."""
    import torch  # imported where used: text writers, the lock and the SIGTERM guard need no torch (1-2 s to import)

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
        return f"it would import {short_text(name)}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("Unsupported")]
    return f"it holds unsupported pickle content ({lines[0][:80]})" if lines else "it holds unsupported pickle content"


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only; anything that would run code is refused."""
    import torch

    path = Path(path)
    _check_path(path, what)
    shown = _shown(path)
    if path.is_dir():
        raise UserError(f"{what} {shown} is a directory; pass the .pt file inside it")
    if not path.is_file():
        raise UserError(f"{what} not found: {shown}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {what} {shown} ({exc.strerror}); check the path and its permissions") from None
    if not head:
        raise UserError(f"{what} {shown} is empty (0 bytes); re-create it or pass another file")
    # torch.save writes a zip archive (PK..); old torch versions wrote a bare pickle (protocol byte 0x80).
    if not head.startswith(b"PK") and head[0] != 0x80:
        raise UserError(
            f"{what} {shown} is not a PyTorch checkpoint (neither a zip archive nor a pickle); pass a .pt file "
            "written by this toolkit"
        )
    # The zip directory's declared sizes, before torch inflates (and allocates) anything.
    check_zip_expansion(path, what, "re-create it or pass another file")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: noise next to the one-line error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"refusing to load {what} {shown}: {_refusal_reason(exc, path)}, and only tensors and plain data are "
            "accepted; "
            "if you trust the file, re-save it as a plain state dict"
        ) from None
    except Exception as exc:  # damaged zip, truncated pickle, wrong record types: all mean the file is unusable
        raise UserError(
            f"{what} {shown} is damaged or truncated ({type(exc).__name__}); re-create it or pass another file"
        ) from None


def load_tensor_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict file (optionally wrapped as {'state_dict': ...} or {'model': ...})."""
    import torch

    obj = load_checkpoint(path, what)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what} {_shown(path)} is not a state dict of tensors")
    return obj


def build_folder_atomically(target: Path, marker: str, build: Callable[[Path], str]) -> Path:
    """Create the folder ``target`` all at once: ``build(tmp)`` fills a temporary sibling and returns the text of its
    completion marker file ``marker``; the folder is renamed into place only when complete. An interrupted build
    leaves nothing behind; when a concurrent builder finished first, its complete copy is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / marker).write_text(build(tmp), encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / marker).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
