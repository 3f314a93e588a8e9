"""ONNX files as this toolkit writes and reads them: the session opener, metadata, checksums and the parity record.

Shared by the image and the video export/predict paths; nothing here knows which method or modality wrote a file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from task.common.errors import UserError, short_text

ONNX_FILENAME = "model.onnx"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_exported_from(path: Path, metadata: dict[str, str], checkpoint: Path | None, export: str) -> None:
    """Refuse the exported file at ``path`` when ``checkpoint`` exists and is not the file it was exported from (its
    sha256, recorded at export), so retraining without re-exporting cannot silently serve the old model; ``export``:
    the command that refreshes it."""
    recorded = metadata.get("checkpoint_sha256")
    if recorded and checkpoint is not None and checkpoint.is_file() and file_sha256(checkpoint) != recorded:
        raise UserError(
            f"{path} was exported from a different {checkpoint.name} than {checkpoint}; rerun {export} to refresh it"
        )


def open_onnx(source: Path | bytes, name: str) -> tuple[Any, dict[str, str]]:
    """(onnxruntime CPU session, its custom metadata) for an ONNX file or bytes; a bad file is a one-line error."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(
            source if isinstance(source, bytes) else str(source), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own classes (Fail, InvalidProtobuf, ...) for bad files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load ONNX model {name} ({reason}); re-create it with --mode export") from None
    return session, dict(session.get_modelmeta().custom_metadata_map)


# DATASET.resize's schema limits: an exported graph's frame size lies within them.
IMAGE_SIZE_RANGE = (64, 1024)


def metadata_image_size(meta: dict[str, str], session: Any, name: str) -> tuple[int, int]:
    """The ``image_size`` metadata [H, W]: two ints within ``IMAGE_SIZE_RANGE`` that equal the static height and
    width of every 4-D or 5-D graph input (an edited value would otherwise fail deep inside onnxruntime).

    A missing key raises ``KeyError`` (the caller reports incomplete metadata); a bad value is a one-line error.
    """
    import json

    fix = "the metadata was edited or damaged; re-create the file with --mode export"
    try:
        value = json.loads(meta["image_size"])
    except (ValueError, TypeError):
        value = None
    low, high = IMAGE_SIZE_RANGE
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in value)
    ):
        raise UserError(
            f"{name}: metadata image_size {short_text(str(meta['image_size']), 40)} is not [height, width] "
            f"with whole numbers in [{low}, {high}]; {fix}"
        )
    for graph_input in session.get_inputs():
        shape = list(graph_input.shape or [])
        if len(shape) >= 4 and all(isinstance(v, int) for v in shape[-2:]) and shape[-2:] != value:
            raise UserError(
                f"{name}: metadata image_size {value} differs from the graph input {graph_input.name!r} "
                f"({shape[-2]}x{shape[-1]}); {fix}"
            )
    return value[0], value[1]


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
