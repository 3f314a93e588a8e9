"""Importing official DMAD-PDM checkpoints, which are whole-module pickles (``torch.save(model)``).

Nothing pickled is executed: ``data.pkl`` of the zip is read by an unpickler whose only callables are torch's tensor
and parameter rebuilders (and ``OrderedDict``); every other class it names becomes an inert placeholder that just
keeps the state it is given. Parameters and buffers are then collected from the placeholders' ``_parameters`` /
``_buffers`` / ``_modules`` and renamed to ``VideoDMADModel``'s keys.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from task.common.array_files import check_zip_expansion, zip_expansion_limit
from task.common.errors import UserError, short_text

_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Inert:
    """Stands in for any pickled class: accepts any construction and keeps the state it is given, nothing else."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    """A storage class named in the pickle, reduced to its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, budget: int) -> None:
        super().__init__(file)
        self.archive, self.prefix, self.budget = archive, prefix, budget  # budget: storage bytes still allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        return type(name, (_Inert,), {})

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        try:
            info = self.archive.getinfo(f"{self.prefix}data/{key}")
        except KeyError:
            raise pickle.UnpicklingError(f"storage record {key!r:.40} is missing") from None
        if info.file_size > self.budget:
            raise pickle.UnpicklingError(
                f"storage record {key!r:.40} declares {info.file_size} bytes, more than the archive can hold"
            )
        if not isinstance(numel, int) or numel < 0 or numel * storage_type.dtype.itemsize > info.file_size:
            raise pickle.UnpicklingError(
                f"storage {key!r:.40} claims {numel!r:.20} elements, beyond its {info.file_size}-byte record"
            )
        self.budget -= info.file_size
        data = bytearray(self.archive.read(info))
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)


_FIX = "pass the official DMAD-PDM model.pth"
_DEPTH = 64  # module nesting of the official networks is under 10


def read_official(path: str | Path) -> dict[str, Tensor]:
    """All parameters and buffers of a pickled official module (or a pickled state dict), official names.

    Bounded: the zip records may declare at most ``zip_expansion_limit`` bytes in all (checked before reading), every
    storage must fit its record, and a damaged, truncated or absurdly nested pickle is a one-line ``UserError``.
    """
    path = Path(path)
    check_zip_expansion(path, "official checkpoint", _FIX)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a torch zip checkpoint ({error}); {_FIX}") from None
    try:
        with archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise UserError(f"{path} has no single data.pkl; {_FIX}")
            prefix = pickles[0][: -len("data.pkl")]
            budget = zip_expansion_limit(path.stat().st_size)
            with archive.open(pickles[0]) as file:
                root = _RestrictedUnpickler(file, archive, prefix, budget).load()
            if isinstance(root, _Inert):
                tensors = _collect(root, "", 0)
            else:
                tensors = {k: v for k, v in dict(root).items() if isinstance(v, Tensor)}
    except UserError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        RecursionError,
        RuntimeError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        IndexError,
        OverflowError,
        MemoryError,
        zipfile.BadZipFile,
        zlib.error,
        OSError,
    ) as error:
        reason = f"{type(error).__name__}: {short_text(str(error), 80)}" if str(error) else type(error).__name__
        raise UserError(f"official checkpoint {path} is damaged or not a DMAD-PDM model ({reason}); {_FIX}") from None
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def _collect(module: _Inert, prefix: str, depth: int) -> dict[str, Tensor]:
    if depth > _DEPTH:
        raise ValueError(f"modules nested deeper than {_DEPTH} levels")
    state = module.state if isinstance(module.state, dict) else {}
    found: dict[str, Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, Tensor):
                found[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, _Inert):
            found.update(_collect(child, f"{prefix}{name}.", depth + 1))
    return found


# CoordConv2d in the official code subclasses Conv2d and convolves with its inner ``.conv``: its own weight and bias
# are never used.
_UNUSED = re.compile(r"^(offset_net\.conv_offset1|decoder\.moduleConv|decoder\.moduleDeconv[23])\.[03]\.(weight|bias)$")
_RULES = [
    (r"^offset_net\.conv_offset1\.", "deformation.stem."),
    (r"^offset_net\.conv_offset2\.0\.convs\.", "deformation.refine.0.body."),
    (r"^offset_net\.conv_offset2\.1\.", "deformation.refine.1."),
    (r"^offset_net\.conv_offset3\.", "deformation.fine_head."),
    (r"^offset_net\.conv_offset4\.", "deformation.coarse_head."),
    (r"^encoder\.moduleConv([1-4])\.", "encoder.stage{0}."),
    (r"^encoder\.mask_\.", "encoder.mask_up."),
    (r"^encoder\.mask\.", "encoder.mask."),
    (r"^decoder\.moduleConv\.", "decoder.block4."),
    (r"^decoder\.moduleUpsample([2-4])\.", "decoder.up{0}."),
    (r"^decoder\.moduleDeconv([23])\.", "decoder.block{0}."),
    (r"^decoder\.moduleDeconv1\.", "decoder.head."),
    (r"^decoder\.mask\.", "decoder.mask."),
    (r"^vq_layer\.embedding\.weight$", "memory.codebook.weight"),
    (r"^bkg$", "background.template"),
]


def convert_state(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official ``convAE`` names -> ``VideoDMADModel`` state-dict entries (unused CoordConv tensors dropped).

    The ped2 encoder names its skips ``skip``/``skip_``, the others ``skip2``/``skip3``; both become skip3/skip4.
    A single background [C, H, W] becomes [1, C, H, W].
    """
    numbered = any(k.startswith("encoder.skip2.") for k in official)
    skips = {"skip2": "skip3", "skip3": "skip4"} if numbered else {"skip": "skip3", "skip_": "skip4"}
    converted: dict[str, Tensor] = {}
    for key, value in official.items():
        if _UNUSED.match(key):
            continue
        skip = re.match(r"^encoder\.(skip\w*)\.", key)
        if skip and skip.group(1) in skips:
            converted[f"encoder.{skips[skip.group(1)]}." + key[skip.end() :]] = value
            continue
        for pattern, replacement in _RULES:
            match = re.match(pattern, key)
            if match:
                name = replacement.format(*match.groups()) + key[match.end() :]
                converted[name] = value.unsqueeze(0) if name == "background.template" and value.dim() == 3 else value
                break
        else:
            raise UserError(
                f"official checkpoint tensor {key!r} has no counterpart in the video model; is it a DMAD-PDM model.pth?"
            )
    return converted


def convert_official(path: str | Path) -> dict[str, Tensor]:
    """A ``VideoDMADModel`` state dict from an official DMAD-PDM ``model.pth``, executing no pickled code."""
    return convert_state(read_official(path))
