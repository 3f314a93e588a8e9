"""OS-level failures of file I/O, SIGTERM during a save, stale temp files, CSV injection, and the run-directory lock.

Each failure must be one ``UserError`` line naming the path and a fix, with the previous file intact and no temp
file left. The lock and SIGTERM tests use real second processes (started and ended by the test itself).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable

import pytest
import torch

import task.common.io as io_module
from helpers import REPO, crc32_of_zeros, npy_header, write_zero_bomb
from task.common.array_files import MAX_ARRAY_BYTES, load_npy, load_npz
from task.common.errors import UserError
from task.common.io import (
    atomic_write_bytes,
    csv_cell,
    ensure_dir,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    write_text,
    write_together,
)
from task.common.runlock import LOCK_NAME, RunLock


def one_line(exc: pytest.ExceptionInfo[UserError], *fragments: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def python(code: str, *args: str) -> subprocess.Popen:
    """A child ``python -c code args`` in the repository root; it reports readiness with one line on stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- OS errors while saving


def _wrapped_enospc(obj: Any, handle: IO[bytes], *args: Any, **kwargs: Any) -> None:
    """torch.save failing the way torch reports a full disk: a RuntimeError around the OSError."""
    handle.write(b"PK\x03\x04 half a checkpoint")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as exc:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from exc


def _message_only(obj: Any, handle: IO[bytes], *args: Any, **kwargs: Any) -> None:
    """torch's zip writer failing with no OSError attached, only its message."""
    raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")


def _quota(obj: Any, handle: IO[bytes], *args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


def _read_only_fs(obj: Any, handle: IO[bytes], *args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def _io_error(obj: Any, handle: IO[bytes], *args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


SAVE_FAILURES: dict[str, tuple[Callable[..., None], tuple[str, ...]]] = {
    "enospc-wrapped-by-torch": (
        _wrapped_enospc,
        ("No space left on device", "free disk space", "MiB free there", "RESULT.savedir", "--output"),
    ),
    "torch-message-only": (_message_only, ("Input/output error", "check the disk and the path", "RESULT.savedir")),
    "quota": (_quota, ("Disk quota exceeded", "free disk space")),
    "read-only-filesystem": (
        _read_only_fs,
        ("Read-only file system", "check the folder's permissions", "RESULT.savedir"),
    ),
    "io-error": (_io_error, ("Input/output error", "check the disk and the path")),
}


@pytest.mark.parametrize("name", list(SAVE_FAILURES))
def test_os_failure_during_save_is_one_line_and_keeps_previous(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 2}, path)
    before = path.read_bytes()
    failing_save, fragments = SAVE_FAILURES[name]
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(UserError) as info:
        save_checkpoint({"step": 4}, path)
    one_line(info, f"cannot write {path}", *fragments)
    assert path.read_bytes() == before
    assert only_files(tmp_path) == ["last.pt"]  # the temp file is gone


def test_runtime_error_that_is_not_an_os_failure_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (not the environment) keeps its traceback; the temp file is still removed."""

    def buggy(obj: Any, handle: IO[bytes], *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("shape mismatch in writer")

    monkeypatch.setattr(torch, "save", buggy)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        save_checkpoint({"step": 4}, tmp_path / "last.pt")
    assert only_files(tmp_path) == []


def test_user_error_from_the_writer_is_kept(tmp_path: Path) -> None:
    """A writer that already explains its failure keeps its message, even when an OSError was being handled."""

    def explained(handle: IO[bytes]) -> None:
        try:
            raise OSError(errno.EIO, "decoder failed")
        except OSError:
            raise UserError("image x.png cannot be encoded; replace it") from None

    with pytest.raises(UserError, match=r"^image x.png cannot be encoded; replace it$"):
        atomic_write_bytes(tmp_path / "x.png", explained)
    assert only_files(tmp_path) == []


def test_read_only_folder_real(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"previous")
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod does not make a folder read-only")
        with pytest.raises(UserError) as info:
            write_text(folder / "model.pt", "new")
        one_line(info, f"cannot write {folder / 'model.pt'}", "Permission denied", "check the folder's permissions")
        with pytest.raises(UserError) as info:
            ensure_dir(folder)
        one_line(info, f"output folder {folder} is not writable", "RESULT.savedir")
        assert (folder / "model.pt").read_bytes() == b"previous" and only_files(folder) == ["model.pt"]
    finally:
        folder.chmod(0o755)


def test_read_only_folder_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusals as the real read-only folder, for runs as root: the OS answers EACCES / no W_OK."""

    def no_temp_file(*args: Any, **kwargs: Any) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(io_module.tempfile, "mkstemp", no_temp_file)
    with pytest.raises(UserError) as info:
        write_text(tmp_path / "metrics.json", "{}")
    one_line(info, "metrics.json", "Permission denied", "check the folder's permissions", "RESULT.savedir")
    monkeypatch.setattr(io_module.os, "access", lambda path, mode: False)
    with pytest.raises(UserError) as info:
        ensure_dir(tmp_path)
    one_line(info, "is not writable", "fix its permissions", "RESULT.savedir")


def _a_file(tmp: Path) -> Path:
    (tmp / "taken").write_text("x")
    return tmp / "taken"


ENSURE_DIR_ERRORS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "path-is-a-file": (
        _a_file,
        ("cannot create output folder", "taken", "a file of that name exists", "RESULT.savedir"),
    ),
    "parent-is-a-file": (
        lambda t: _a_file(t) / "sub",
        ("cannot create output folder", "taken/sub", "Not a directory", "RESULT.savedir"),
    ),
    "nul-byte": (lambda t: t / "a\0b", ("output folder", "a\\x00b", "contains a NUL byte")),
}


@pytest.mark.parametrize("name", list(ENSURE_DIR_ERRORS))
def test_ensure_dir_errors(name: str, tmp_path: Path) -> None:
    make, fragments = ENSURE_DIR_ERRORS[name]
    with pytest.raises(UserError) as info:
        ensure_dir(make(tmp_path))
    one_line(info, *fragments)


def test_nul_byte_paths_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="output path .* contains a NUL byte"):
        write_text(tmp_path / "a\0b.json", "{}")
    with pytest.raises(UserError, match="checkpoint .* contains a NUL byte"):
        load_checkpoint(tmp_path / "a\0b.pt")


def test_checkpoint_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        load_checkpoint(tmp_path)
    one_line(info, "is a directory", "pass the .pt file")


# --------------------------------------------------------------------------- SIGTERM during a save

SLOW_SAVE = """
import sys, time
from task.common.io import atomic_write_bytes
def slow(handle):
    handle.write(b"half")
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)
atomic_write_bytes(sys.argv[1], slow)
"""


def test_sigterm_during_save_removes_temp_and_terminates(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous")
    child = python(SLOW_SAVE, str(path))
    try:
        assert child.stdout.readline() == "writing\n", child.stderr.read()
        assert len(only_files(tmp_path)) == 2  # last.pt and the temp file being written
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=20) == -signal.SIGTERM  # ended the way SIGTERM's default action ends it
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert only_files(tmp_path) == ["last.pt"] and path.read_bytes() == b"previous"


def test_sigterm_handler_only_during_write_in_main_thread(tmp_path: Path) -> None:
    """Installed around the write (main thread, default disposition), restored after; left alone otherwise."""
    seen: list[Any] = []

    def record(handle: IO[bytes]) -> None:
        seen.append(signal.getsignal(signal.SIGTERM))

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        write_text(tmp_path / "a.txt", "x")
        atomic_write_bytes(tmp_path / "b.txt", record)
        assert callable(seen[-1]) and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

        def graceful(signum: int, frame: Any) -> None:
            """Someone else's handler (e.g. a graceful stop): it stays in charge during writes."""

        signal.signal(signal.SIGTERM, graceful)
        atomic_write_bytes(tmp_path / "c.txt", record)
        assert seen[-1] is graceful and signal.getsignal(signal.SIGTERM) is graceful

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        worker = threading.Thread(target=atomic_write_bytes, args=(tmp_path / "d.txt", record))
        worker.start()
        worker.join()
        assert seen[-1] == signal.SIG_DFL  # signal handlers cannot be installed outside the main thread
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- stale temp files


def test_remove_stale_temps_removes_only_dead_writers_of_this_host(tmp_path: Path) -> None:
    host = io_module._host_tag()
    other_host = f"{(int(host, 16) + 1) % 2**32:08x}"
    gone = dead_pid()
    names = {
        f".last.pt.{host}-{gone}.abcd_123.tmp": False,  # dead writer here: removed
        f".model.pt.{host}-{os.getpid()}.zzzzzzzz.tmp": True,  # live writer (this process): kept
        f".last.pt.{other_host}-{gone}.abcd_123.tmp": True,  # another host's writer: its pid means nothing here
        ".last.pt.abcd_123.tmp": True,  # the old pattern without a pid: the writer is unknown
        "last.pt": True,
        f"notes.{host}-{gone}.abcd_123.tmp": True,  # not hidden: not ours
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".dir.{host}-{gone}.abcd_123.tmp").mkdir()  # a folder, not a temp file
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [f".last.pt.{host}-{gone}.abcd_123.tmp"]
    assert only_files(tmp_path) == sorted(
        [n for n, kept in names.items() if kept] + [f".dir.{host}-{gone}.abcd_123.tmp"]
    )
    assert remove_stale_temps(tmp_path / "absent") == []


def test_live_writers_temp_matches_pattern_and_survives(tmp_path: Path) -> None:
    """The name atomic_write_bytes uses carries this host and pid: a clean-up during the write keeps it."""
    during: list[list[str]] = []

    def write(handle: IO[bytes]) -> None:
        handle.write(b"x")
        during.append([p.name for p in remove_stale_temps(tmp_path)] + only_files(tmp_path))

    atomic_write_bytes(tmp_path / ("m" * 300)[:200], write)
    temp_name = during[0][0]
    assert io_module._TEMP_NAME.match(temp_name) and f"{io_module._host_tag()}-{os.getpid()}." in temp_name
    assert len(temp_name) < 255 and only_files(tmp_path) == ["m" * 200]


# --------------------------------------------------------------------------- CSV cells


@pytest.mark.parametrize(
    "text, expected",
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tcmd", "'\tcmd"),
        ("\rcmd", "'\rcmd"),
        ("test/good/000.png", "test/good/000.png"),
        ("", ""),
        ("a=b", "a=b"),
    ],
)
def test_csv_cell_escapes_formulas(text: str, expected: str) -> None:
    assert csv_cell(text) == expected


# --------------------------------------------------------------------------- run-directory lock

HOLD_LOCK = """
import sys
from task.common.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""

HOLD_RAW_FLOCK = """
import fcntl, os, sys
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"not json")
print("locked", flush=True)
sys.stdin.read()
"""


def hold(code: str, run_dir: Path) -> subprocess.Popen:
    child = python(code, str(run_dir))
    assert child.stdout.readline() == "locked\n", child.stderr.read()
    return child


def end(child: subprocess.Popen) -> None:
    child.kill()
    child.wait(timeout=20)


def test_second_live_process_is_refused_then_takes_over_when_it_dies(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "dmad" / "bottle"
    child = hold(HOLD_LOCK, run_dir)
    try:
        with pytest.raises(UserError) as info:
            RunLock(run_dir).acquire()
        one_line(
            info,
            f"run directory {run_dir} is in use by pid {child.pid} on host ",
            "(started 20",
            "wait for that run to finish",
            "RESULT.exp_name",
        )
    finally:
        end(child)  # SIGKILL: no clean-up ran, the OS released the flock
    with RunLock(run_dir) as lock:
        assert lock.held and json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (run_dir / LOCK_NAME).read_text() == ""  # released: emptied, not deleted


def test_holder_without_details_is_still_named(tmp_path: Path) -> None:
    child = hold(HOLD_RAW_FLOCK, tmp_path)
    try:
        with pytest.raises(UserError) as info:
            RunLock(tmp_path).acquire()
        one_line(info, "is in use by another process (its details are not written yet)", "RESULT.exp_name")
    finally:
        end(child)


def test_stale_lock_file_of_dead_pid_is_taken_over(tmp_path: Path) -> None:
    stale = {"pid": dead_pid(), "host": "gone", "started": "2020-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    lock = RunLock(tmp_path).acquire()
    try:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["started"] != stale["started"]
    finally:
        lock.release()
    assert not lock.held


def test_same_process_cannot_lock_twice(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()


@pytest.mark.parametrize("kind", ["symlink", "directory", "under-a-file"])
def test_lock_path_that_is_not_a_lock_file(kind: str, tmp_path: Path) -> None:
    """A .lock that is a symlink (never followed: the target stays intact), a folder, or a run_dir under a file."""
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if kind == "symlink":
        (run_dir / LOCK_NAME).symlink_to(target)
    elif kind == "directory":
        (run_dir / LOCK_NAME).mkdir()
    else:
        run_dir = target / "run"
    with pytest.raises(UserError) as info:
        RunLock(run_dir).acquire()
    one_line(info, "cannot create the run lock", "RESULT.savedir")
    assert target.read_text() == "keep"


def test_release_is_idempotent_and_acquire_is_not_reentrant(tmp_path: Path) -> None:
    lock = RunLock(tmp_path)
    lock.release()
    lock.acquire()
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire()
    lock.release()
    lock.release()
    assert not lock.held


# --------------------------------------------------------------------------- bounded reads of user arrays

FIX = "pass a proper file"


def _npz(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _valid_npy(tmp: Path) -> bytes:
    import numpy as np

    np.save(tmp / "ok.npy", np.arange(3))
    return (tmp / "ok.npy").read_bytes()


def _dup(tmp: Path) -> Path:
    import warnings
    import zipfile

    data = _valid_npy(tmp)
    with warnings.catch_warnings(), zipfile.ZipFile(tmp / "dup.npz", "w") as archive:
        warnings.simplefilter("ignore")
        archive.writestr("a.npy", data)
        archive.writestr("a.npy", data)
    return tmp / "dup.npz"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.npy")
    return tmp / "pipe.npy"


# name -> (make the file in tmp, loader (load_npy / load_npz), fragments of the one-line error)
BAD_ARRAY_FILES: dict[str, tuple[Callable[[Path], Path], Callable[..., Any], tuple[str, ...]]] = {
    "npy-zero-bytes": (lambda t: _write(t / "e.npy", b""), load_npy, ("e.npy", "is empty (0 bytes)", FIX)),
    "npy-header-claims-1e11-int64": (
        lambda t: _write(t / "big.npy", npy_header((10**11,)) + bytes(65)),
        load_npy,
        ("big.npy", "shape 100000000000", "745 GiB", "nothing was loaded"),
    ),
    "npy-text-file": (
        lambda t: _write(t / "labels.npy", b"0 0 1 1\n0 1\n"),
        load_npy,
        ("labels.npy", "a text file, not a .npy array"),
    ),
    "npy-is-a-zip": (lambda t: _npz(t / "z.npy", {"x.npy": b"1"}), load_npy, ("z.npy", "a zip archive (an .npz?)")),
    "npy-truncated": (
        lambda t: _write(t / "cut.npy", npy_header((1000,)) + bytes(80)),
        load_npy,
        ("cut.npy", "truncated", "8000 bytes"),
    ),
    "npy-object-array": (
        lambda t: _write(t / "obj.npy", npy_header((2,), "|O") + b"\x80\x04N."),
        load_npy,
        ("obj.npy", "unreadable without pickle"),
    ),
    "npy-bad-header": (
        lambda t: _write(t / "h.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': ???}   \n"),
        load_npy,
        ("h.npy", "damaged .npy header"),
    ),
    "npy-directory": (lambda t: _mkdir(t / "d.npy"), load_npy, ("d.npy", "is a directory")),
    "npy-fifo": (_fifo, load_npy, ("pipe.npy", "not a regular file")),
    "npy-dangling-link": (lambda t: _link(t / "gone.npy", t / "nowhere"), load_npy, ("gone.npy", "dangling link")),
    "npz-member-header-claims-1e11": (
        lambda t: _npz(t / "s.npz", {"labels/01.npy": npy_header((10**11,)) + bytes(16)}),
        load_npz,
        ("s.npz", "labels/01.npy", "nothing was loaded"),
    ),
    "npz-member-truncated": (
        lambda t: _npz(t / "s.npz", {"a.npy": npy_header((100,), "<f8") + bytes(8)}),
        load_npz,
        ("s.npz", "'a.npy'", "truncated"),
    ),
    "npz-duplicate-member": (_dup, load_npz, ("dup.npz", "'a.npy' twice")),
    "npz-foreign-member": (
        lambda t: _npz(t / "s.npz", {"notes.txt": b"hello"}),
        load_npz,
        ("s.npz", "'notes.txt'", "not a .npy array"),
    ),
    "npz-damaged": (lambda t: _write(t / "s.npz", b"PK\x03\x04" + bytes(60)), load_npz, ("s.npz", "damaged")),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


@pytest.mark.parametrize("name", list(BAD_ARRAY_FILES))
def test_bad_array_file_is_one_line_before_allocating(name: str, tmp_path: Path) -> None:
    make, loader, fragments = BAD_ARRAY_FILES[name]
    path = make(tmp_path)
    with pytest.raises(UserError) as info:
        loader(path, "labels", FIX)
    one_line(info, *fragments)


def test_npz_whose_directory_declares_more_than_the_budget_is_not_inflated(tmp_path: Path) -> None:
    import numpy as np

    with open(tmp_path / "zeros.npz", "wb") as handle:
        np.savez_compressed(handle, zeros=np.zeros(300_000))  # 2.4 MB of zeros in a few kB
    with pytest.raises(UserError) as info:
        load_npz(tmp_path / "zeros.npz", "score file", FIX, budget=1 << 20)
    one_line(info, "zeros.npz", "declares 2.29 MiB of uncompressed data", "1 MiB", "nothing was decompressed")
    assert load_npz(tmp_path / "zeros.npz", "score file", FIX)["zeros"].shape == (300_000,)  # within the default budget


def test_small_crc_of_zeros_matches_zlib() -> None:
    import zlib

    for count in (0, 1, 5, 1000, 70_001):
        assert crc32_of_zeros(0x1234, count) == zlib.crc32(bytes(count), 0x1234)


def test_11_mb_npz_bomb_is_refused_in_bounded_memory_and_time(tmp_path: Path) -> None:
    """1.5e9 float64 zeros (12 GB) in an 11 MB scores.npz: refused from the zip directory, peak RSS under 1 GB.

    Measured in a fresh process: its peak resident set (VmHWM) after the refusal, and its growth over the peak
    after the imports."""
    import zipfile

    bomb = tmp_path / "scores.npz"
    size = write_zero_bomb(bomb, "deformation/01.npy", 1_500_000_000)
    assert 10e6 < size < 13e6
    with zipfile.ZipFile(bomb) as archive:  # an honest archive: the directory says 12 GB, the stream starts right
        info = archive.getinfo("deformation/01.npy")
        assert info.file_size == 12_000_000_128
        with archive.open(info) as handle:
            assert handle.read(6) == b"\x93NUMPY" and handle.read(1 << 20).count(0) > 1 << 19
    # VmHWM (the peak resident set of this process image): unlike ru_maxrss it starts afresh at exec, so the
    # memory of the forking pytest process does not count.
    code = (
        "import sys, time\n"
        "def hwm():\n"
        "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
        "from task.anomaly.unsupervised.scoring.score_file import read_scores\n"
        "from task.common.errors import UserError\n"
        "base = hwm()\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    read_scores(sys.argv[1])\n"
        "    print('accepted')\n"
        "except UserError as exc:\n"
        "    print(exc)\n"
        "print(base, hwm(), time.perf_counter() - start)\n"
    )
    command = [sys.executable, "-c", code, str(bomb)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    message, numbers = done.stdout.strip().splitlines()
    base_kib, peak_kib, seconds = (float(x) for x in numbers.split())
    assert "declares 11.2 GiB of uncompressed data" in message and "nothing was decompressed" in message, message
    assert peak_kib * 1024 < 1e9, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert (peak_kib - base_kib) * 1024 < 100e6, f"grew {(peak_kib - base_kib) / 1024:.0f} MiB while refusing"
    assert seconds < 5, seconds
    growth = (peak_kib - base_kib) / 1024
    print(f"bomb {size / 1e6:.1f} MB refused in {seconds:.3f} s, peak RSS {peak_kib / 1024:.0f} MiB (+{growth:.1f})")
    assert MAX_ARRAY_BYTES == 1 << 30  # the README's stated budget


def test_checkpoint_zip_whose_records_claim_gigabytes_is_refused_unread(tmp_path: Path) -> None:
    """A 3 MB torch-style zip whose data record claims 3 GiB: refused from the directory before torch.load."""
    path = tmp_path / "bomb.pt"
    write_zero_bomb(path, "archive/data/0", 3 * 2**30 // 8)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    one_line(info, "bomb.pt", "zip archive whose records declare 3 GiB", "nothing was decompressed")


def test_write_together_replaces_a_symlink_not_its_target_and_keeps_pairs(tmp_path: Path) -> None:
    outside = tmp_path / "user-file.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "scores.npz").symlink_to(outside)
    write_together({run / "scores.npz": lambda h: h.write(b"new"), run / "b.gif": lambda h: h.write(b"gif")})
    assert outside.read_text() == "precious" and not (run / "scores.npz").is_symlink()
    assert (run / "scores.npz").read_bytes() == b"new" and (run / "b.gif").read_bytes() == b"gif"

    def fails(handle: IO[bytes]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError) as info:  # the second file fails: the first is not replaced either
        write_together({run / "scores.npz": lambda h: h.write(b"newer"), run / "b.gif": fails})
    one_line(info, "b.gif", "No space left")
    assert (run / "scores.npz").read_bytes() == b"new" and only_files(run) == ["b.gif", "scores.npz"]


_PAIR_CHILD = (
    """
import os, signal, sys
from pathlib import Path
import task.common.io as io
folder, when = Path(sys.argv[1]), sys.argv[2]
def gif(handle):
    if when == "while-writing":
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the second temp file is"""
    """ written
    handle.write(b"new gif")
real_replace = os.replace
def replace(a, b):
    real_replace(a, b)
    if when == "between-renames":
        os.kill(os.getpid(), signal.SIGTERM)  # held back until both files are in place
io.os.replace = replace
io.write_together({folder / "v.csv": lambda h: h.write(b"new csv"), folder / "v.gif": gif})
print("survived")
"""
)


@pytest.mark.parametrize(
    "when, expected", [("while-writing", (b"old csv", b"old gif")), ("between-renames", (b"new csv", b"new gif"))]
)
def test_sigterm_never_splits_a_pair(when: str, expected: tuple[bytes, bytes], tmp_path: Path) -> None:
    """SIGTERM while the pair is written keeps both old files; SIGTERM between the renames is held until both are
    new. Either way the process then ends by SIGTERM and leaves no temp file."""
    (tmp_path / "v.csv").write_bytes(b"old csv")
    (tmp_path / "v.gif").write_bytes(b"old gif")
    command = [sys.executable, "-c", _PAIR_CHILD, str(tmp_path), when]
    child = subprocess.run(command, cwd=REPO, capture_output=True, timeout=60, check=False)
    assert child.returncode == -signal.SIGTERM, child.stderr
    assert ((tmp_path / "v.csv").read_bytes(), (tmp_path / "v.gif").read_bytes()) == expected
    assert only_files(tmp_path) == ["v.csv", "v.gif"]
