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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from task.common.errors import UserError

_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
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
    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

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
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)


def read_official(path: str | Path) -> dict[str, Tensor]:
    """All parameters and buffers of a pickled official module (or a pickled state dict), official names."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a torch zip checkpoint ({error}); pass the official DMAD-PDM model.pth") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UserError(f"{path} has no single data.pkl; pass the official DMAD-PDM model.pth")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as file:
            root = _RestrictedUnpickler(file, archive, prefix).load()
    tensors = _collect(root, "") if isinstance(root, _Inert) else {k: v for k, v in dict(root).items() if isinstance(v, Tensor)}
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def _collect(module: _Inert, prefix: str) -> dict[str, Tensor]:
    state = module.state if isinstance(module.state, dict) else {}
    found: dict[str, Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, Tensor):
                found[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, _Inert):
            found.update(_collect(child, f"{prefix}{name}."))
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
            converted[f"encoder.{skips[skip.group(1)]}." + key[skip.end():]] = value
            continue
        for pattern, replacement in _RULES:
            match = re.match(pattern, key)
            if match:
                name = replacement.format(*match.groups()) + key[match.end():]
                converted[name] = value.unsqueeze(0) if name == "background.template" and value.dim() == 3 else value
                break
        else:
            raise UserError(f"official checkpoint tensor {key!r} has no counterpart in the video model; is it a DMAD-PDM model.pth?")
    return converted


def convert_official(path: str | Path) -> dict[str, Tensor]:
    """A ``VideoDMADModel`` state dict from an official DMAD-PDM ``model.pth``, executing no pickled code."""
    return convert_state(read_official(path))
