"""ONNX files as this toolkit writes and reads them: the session opener, metadata, checksums and the parity record.

Shared by the image and the video export/predict paths; nothing here knows which method or modality wrote a file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from task.common.errors import UserError

ONNX_FILENAME = "model.onnx"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_onnx(source: Path | bytes, name: str) -> tuple[Any, dict[str, str]]:
    """(onnxruntime CPU session, its custom metadata) for an ONNX file or bytes; a bad file is a one-line error."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes (Fail, InvalidProtobuf, ...) for bad files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load ONNX model {name} ({reason}); re-create it with --mode export") from None
    return session, dict(session.get_modelmeta().custom_metadata_map)


TOLERANCE = 1e-3


def with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """ONNX bytes with ``metadata`` added to ``metadata_props``."""
    import onnx

    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


@dataclass
class Difference:
    """Largest |onnx - torch| of one output, and the scale the tolerance is relative to."""

    name: str
    max_abs: float
    scale: float

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale

    def __str__(self) -> str:
        return f"{self.name} max |diff| {self.max_abs:.3g} ({self.relative:.3g} of {self.scale:.3g})"
