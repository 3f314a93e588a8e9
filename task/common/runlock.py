"""One live run per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``.

Two runs writing the same ``last.pt``, ``model.pt`` and metrics would overwrite each other's results. The lock is
an ``fcntl.flock`` on an open file, so the operating system releases it when the holder exits or is killed: a
lock file left behind by a dead process is taken over without any clean-up. The file holds the holder's pid,
host and start time (JSON), which the refusal quotes. The file itself is never deleted (deleting a lock file
lets a third process lock a new inode while a second still holds the old one); release empties it.

The engine takes the lock on rank 0 only, right after creating the run directory and before reading or writing
``last.pt``: the ranks of one DDP job share the run directory and must not lock each other out. Locks on network
filesystems work where the filesystem supports ``flock`` (NFSv4 and Linux's NFS client emulate it with POSIX locks).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from types import TracebackType

from task.common.errors import UserError, short_text

LOCK_NAME = ".lock"
_MAX_INFO_BYTES = 4096  # the holder's JSON is ~100 bytes; a bigger file is not ours and is read no further


class RunLock:
    """Exclusive lock on a run directory: ``with RunLock(run_dir): ...`` or ``acquire()`` / ``release()``.

    ``acquire`` creates the directory if needed and raises a one-line UserError naming the live holder (pid,
    host, start time) and the fix when another process holds the lock. Not re-entrant: a second ``RunLock`` on
    the same directory is refused even inside the same process.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock (without waiting) and record this process in the lock file; returns ``self``."""
        if self._fd is not None:
            raise RuntimeError(f"RunLock on {self.run_dir} is already held by this object")
        shown = short_text(str(self.path), 160)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlink planted as .lock must not make us truncate the file it points to.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UserError(
                f"cannot create the run lock {shown} ({reason}); choose a writable RESULT.savedir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise UserError(
                f"run directory {short_text(str(self.run_dir), 160)} is in use by {holder}; wait for that run to "
                "finish, "
                "or set RESULT.exp_name=<name> to use another directory"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise UserError(
                f"cannot lock {shown} ({exc.strerror}); the filesystem may not support locks: choose another "
                "RESULT.savedir"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as exc:
            os.close(fd)  # closing releases the flock
            raise UserError(
                f"cannot write the run lock {shown} ({exc.strerror}); free disk space or choose another RESULT.savedir"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and release the lock; a no-op when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        # Emptied while still locked, so nobody reads a half-cleared file; if that fails the stale text is harmless:
        # the flock, not the text, decides who holds the lock.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    """'pid 123 on host gpu1 (started 2024-05-01T10:00:00+02:00)' from the holder's lock file, as far as it is
    readable."""
    try:
        info = json.loads(os.pread(fd, _MAX_INFO_BYTES, 0).decode("utf-8"))
        pid, host, started = info["pid"], info["host"], info["started"]
    except (OSError, ValueError, KeyError, TypeError):  # the holder is between open() and writing its details
        return "another process (its details are not written yet)"
    return (
        f"pid {short_text(str(pid), 20)} on host {short_text(str(host), 64)} (started {short_text(str(started), 40)})"
    )
