"""Bounded reads of user-given ``.npy`` / ``.npz`` files: sizes are checked against what the file declares, before
anything is allocated or decompressed.

A ``.npy`` header states the array's dtype and shape, so its size is known from the first few hundred bytes; a
``.npz`` is a zip archive whose central directory states each member's uncompressed size. Both are checked
before any data is read:

* the file (or zip member) must be large enough to hold the declared array (else: truncated);
* the declared arrays of one file together must fit ``MAX_ARRAY_BYTES`` (else: refused, nothing allocated);
* object arrays (pickles) are refused; a zip archive or a text file given as ``.npy`` is named as such.

Decompression of an ``.npz`` member stops at its declared size (``zipfile`` never inflates past it), so a member
whose header lies cannot blow up memory either. Every problem is a one-line ``UserError`` naming the file.
"""

from __future__ import annotations

import math
import os
import stat
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from task.common.errors import UserError, short_text

__all__ = [
    "MAX_ARRAY_BYTES",
    "MAX_NPZ_MEMBERS",
    "check_file_size",
    "check_zip_expansion",
    "load_npy",
    "load_npz",
    "zip_expansion_limit",
]

# Bytes all arrays read from one user file may occupy (1 GiB): far above any label or score file (ShanghaiTech's
# 40,791 test frames x 3 float64 scores are 1 MB), far below the memory of the machines this runs on.
MAX_ARRAY_BYTES = 1 << 30
# Members of one .npz: a score file has 2 + V x (2 + scores) (ShanghaiTech: 537).
MAX_NPZ_MEMBERS = 100_000
_NPY_MAGIC = b"\x93NUMPY"
_HEADER_LIMIT = 10_000  # numpy's own default for max_header_size


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**27 else f"{n / 2**20:.3g} MiB" if n >= 2**17 else f"{n} bytes"


def check_file_size(path: Path, what: str, fix: str, limit: int) -> int:
    """The size of the regular file ``path``; ``UserError`` if it is missing, not a regular file, empty or over
    ``limit`` bytes (checked with ``os.stat`` before a byte is read)."""
    shown = short_text(str(path), 160)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} {shown} not found (a dangling link or a missing file); {fix}") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {shown} ({exc.strerror}); {fix}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{what} {shown} is a directory, not a file; {fix}")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{what} {shown} is not a regular file (a FIFO, socket or device); {fix}")
    if info.st_size == 0:
        raise UserError(f"{what} {shown} is empty (0 bytes); {fix}")
    if info.st_size > limit:
        raise UserError(
            f"{what} {shown} holds {_gib(info.st_size)}, more than the {_gib(limit)} such a file may hold; {fix}"
        )
    return info.st_size


def zip_expansion_limit(file_size: int) -> int:
    """Most bytes a checkpoint zip of ``file_size`` bytes may declare uncompressed: ``torch.save`` stores members
    uncompressed, so twice the file plus 64 MiB leaves ample room while a zip bomb is refused unopened."""
    return 2 * file_size + (64 << 20)


def check_zip_expansion(path: Path, what: str, fix: str) -> None:
    """Refuse a zip archive whose central directory declares more uncompressed bytes than ``zip_expansion_limit``
    (read from the directory only: nothing is decompressed). Files that are not zip archives pass unchanged."""
    shown = short_text(str(path), 160)
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            declared = sum(m.file_size for m in archive.infolist())
        size = os.path.getsize(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # the loader names a damaged archive
    if declared > zip_expansion_limit(size):
        raise UserError(
            f"{what} {shown} is a {_gib(size)} zip archive whose records declare {_gib(declared)} uncompressed (a zip "
            f"bomb or a damaged file); nothing was decompressed; {fix}"
        )


def _not_npy(head: bytes) -> str:
    """What a file that lacks the .npy magic looks like, for the message."""
    if head.startswith(b"PK"):
        return "a zip archive (an .npz?), not a .npy array"
    if head.startswith((b"\x80", b"\x89HDF", b"MATLAB")):
        return "not a .npy array (a pickle, HDF5 or MATLAB file?)"
    try:
        head.decode("utf-8")
        return "a text file, not a .npy array (save it with numpy.save)"
    except UnicodeDecodeError:
        return "not a .npy array (no NUMPY header)"


def _read_header(handle: IO[bytes], where: str, fix: str, available: int, budget: int) -> int:
    """Check the .npy header at the handle's position against ``available`` bytes and ``budget``; returns the
    array's byte count. The handle is left after the header."""
    head = handle.read(len(_NPY_MAGIC))
    if not head:
        raise UserError(f"{where} is empty (0 bytes); {fix}")
    if head != _NPY_MAGIC:
        raise UserError(f"{where} is {_not_npy(head + handle.read(64))}; {fix}")
    try:
        major, minor = handle.read(2)
    except ValueError:
        raise UserError(f"{where} is truncated inside its .npy header; {fix}") from None
    try:
        if (major, minor) == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle, max_header_size=_HEADER_LIMIT)
        elif (major, minor) in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle, max_header_size=_HEADER_LIMIT)
        else:
            raise UserError(f"{where} has .npy format version {major}.{minor}, which numpy does not write; {fix}")
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise UserError(f"{where} has a damaged .npy header ({short_text(str(exc), 60)}); {fix}") from None
    if dtype.hasobject:
        raise UserError(f"{where} holds Python objects, unreadable without pickle (which is never used); {fix}")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a forged shape cannot overflow
    shown_shape = "x".join(map(str, shape)) or "scalar"
    if nbytes > budget:
        raise UserError(
            f"{where} declares a {dtype} array of shape {short_text(shown_shape, 40)} ({_gib(nbytes)}), more than the "
            f"{_gib(budget)} a file may hold here; nothing was loaded; {fix}"
        )
    header_end = handle.tell()
    if header_end + nbytes > available:
        raise UserError(
            f"{where} is truncated: its header declares {_gib(nbytes)} of data but only "
            f"{_gib(max(available - header_end, 0))} follow; {fix}"
        )
    return nbytes


def load_npy(path: str | Path, what: str, fix: str, budget: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """A ``.npy`` array, its header checked against the file size and ``budget`` before the data is allocated."""
    path = Path(path)
    where = f"{what} {short_text(str(path), 160)}"
    size = check_file_size(path, what, fix, budget + 2 * _HEADER_LIMIT)
    try:
        with open(path, "rb") as handle:
            _read_header(handle, where, fix, size, budget)
            handle.seek(0)
            return np.lib.format.read_array(handle, allow_pickle=False, max_header_size=_HEADER_LIMIT)
    except OSError as exc:
        raise UserError(f"cannot read {where} ({exc.strerror or type(exc).__name__}); {fix}") from None
    except ValueError as exc:
        raise UserError(f"{where} is damaged ({short_text(str(exc), 60)}); {fix}") from None


def load_npz(path: str | Path, what: str, fix: str, budget: int = MAX_ARRAY_BYTES) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` (key = member name without ``.npy``), bounded by ``budget`` bytes in all.

    Before any member is inflated: the member count, duplicate names, and the sum of the uncompressed sizes the
    zip directory declares are checked; then each member's .npy header against its declared size.
    """
    path = Path(path)
    where = f"{what} {short_text(str(path), 160)}"
    check_file_size(path, what, fix, budget)  # a compressed file larger than the budget cannot unpack below it
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_NPZ_MEMBERS:
                raise UserError(f"{where} holds {len(members)} arrays, more than {MAX_NPZ_MEMBERS}; {fix}")
            names = [m.filename for m in members]
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise UserError(f"{where} holds the member {short_text(name)!r} twice; {fix}")
                seen.add(name)
                if not name.endswith(".npy"):
                    raise UserError(f"{where} holds {short_text(name)!r}, which is not a .npy array; {fix}")
            declared = sum(m.file_size for m in members)
            if declared > budget + 2 * _HEADER_LIMIT * len(members):
                raise UserError(
                    f"{where} declares {_gib(declared)} of uncompressed data, more than the {_gib(budget)} a file "
                    f"may hold here; nothing was decompressed; {fix}"
                )
            arrays: dict[str, np.ndarray] = {}
            for member in members:
                member_where = f"{where} member {short_text(member.filename)!r}"
                with archive.open(member) as handle:
                    _read_header(handle, member_where, fix, member.file_size, budget)
                with archive.open(member) as handle:
                    arrays[member.filename[: -len(".npy")]] = np.lib.format.read_array(
                        handle, allow_pickle=False, max_header_size=_HEADER_LIMIT
                    )
            return arrays
    except UserError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, OSError, RuntimeError) as exc:
        raise UserError(f"{where} is damaged ({type(exc).__name__}: {short_text(str(exc), 60)}); {fix}") from None
