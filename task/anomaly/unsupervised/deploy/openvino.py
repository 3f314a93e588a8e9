"""OpenVINO IR files as this toolkit writes and runs them: conversion from the exported ONNX graph, FP16 weights, INT8
post-training quantisation (NNCF), metadata in the IR's ``rt_info``, the IR beside a checkpoint and ``--backend auto``.

Precisions (``EXPORT.precision``):

* ``fp32``: float32 weights, float32 inference (the reference; parity with PyTorch within ``TOLERANCE``).
* ``fp16``: float16 convolution weights (half the file); the convolutions run in the CPU's low precision where it has
  the units
  (bf16 on CPUs with AVX-512-BF16 or AMX: OpenVINO's ``BF16`` capability), float32 elsewhere.
* ``int8``: NNCF post-training quantisation of the convolutions, calibrated on normal training images only; whatever
  is not quantised runs as for ``fp16``.

The runner that keeps the precision-sensitive parts of the graph in float32 (and why it must) is ``ir_runner.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from task.anomaly.unsupervised.deploy.ir_runner import (
    HEAVY,
    METADATA_SECTION,
    has_bf16_units,
    openvino_core,
    read_metadata,
    sensitive_nodes,
)
from task.anomaly.unsupervised.deploy.onnx import TOLERANCE, check_exported_from
from task.anomaly.unsupervised.engine.modes import ModeOptions
from task.common.errors import UserError

log = logging.getLogger("anomaly")


# Largest |IR - PyTorch fp32| the export check accepts, relative to the map range (scores: to max(1, |score|)).
# fp32 is the ONNX tolerance; the others leave room above what was measured (README, "OpenVINO"): bf16 convolutions with
# float32 maps 0.2-1.4 % of the range, int8 7-13 %.
TOLERANCES = {"fp32": TOLERANCE, "fp16": 0.05, "int8": 0.25}

OPENVINO_EXPORT = "--mode export EXPORT.format=openvino"  # the command that writes an IR


def ir_filename(precision: str) -> str:
    return f"model-{precision}.xml"


def ir_source(checkpoint: str | None, run_dir: Path, precision: str) -> tuple[Path, Path | None]:
    """(IR .xml, checkpoint it must come from) for ``--backend openvino``: ``--checkpoint`` itself when it ends in .xml,
    else ``model-<EXPORT.precision>.xml`` beside the checkpoint (``--checkpoint`` or the run's model.pt)."""
    if checkpoint and Path(checkpoint).suffix.lower() == ".xml":
        if not Path(checkpoint).is_file():
            raise UserError(
                f"OpenVINO IR not found: {checkpoint}; check the path or run --mode export EXPORT.format=openvino"
            )
        return Path(checkpoint), None
    source = Path(checkpoint) if checkpoint else run_dir / "model.pt"
    path = source.parent / ir_filename(precision)
    if not path.is_file():
        raise UserError(
            f"OpenVINO IR not found: {path}; run --mode export EXPORT.format=openvino EXPORT.precision={precision} "
            "first, or pass --checkpoint FILE.xml"
        )
    return path, source


def with_auto_backend(options: ModeOptions, run_dir: Path, device_type: str) -> ModeOptions:
    """``options`` with ``--backend auto`` replaced by the backend (and checkpoint) predict runs with.

    An OpenVINO IR beside the checkpoint when this is a CPU run, the IR's export check passed (it was written, so it
    did) and it comes from this very checkpoint (its sha256): fp16 (bf16 convolutions, within ``TOLERANCES["fp16"]``)
    only where the CPU has bf16 units, else fp32; int8 never (its bound is loose). Otherwise PyTorch. An explicit
    .xml / .onnx ``--checkpoint`` keeps its backend. Logs one line saying what it chose and how to force PyTorch.
    """
    if options.backend != "auto":
        return options
    checkpoint = options.checkpoint
    suffix = Path(checkpoint).suffix.lower() if checkpoint else ""
    if suffix in (".xml", ".onnx"):
        return replace(options, backend="openvino" if suffix == ".xml" else "onnx")
    source = Path(checkpoint) if checkpoint else run_dir / "model.pt"
    if device_type == "cpu" and source.is_file():
        bf16 = has_bf16_units(openvino_core())
        for precision in ("fp16", "fp32") if bf16 else ("fp32",):
            path = source.parent / ir_filename(precision)
            if path.is_file() and path.with_suffix(".bin").is_file():
                with contextlib.suppress(UserError):
                    check_exported_from(
                        path, read_metadata(openvino_core().read_model(str(path))), source, OPENVINO_EXPORT
                    )
                    log.info(
                        "--backend auto: OpenVINO %s IR %s (export-checked against this checkpoint%s); "
                        "--backend torch forces PyTorch",
                        precision,
                        path,
                        ", bf16 convolutions on this CPU's bf16 units" if precision == "fp16" else "",
                    )
                    return replace(options, backend="openvino", checkpoint=str(path))
    log.info("--backend auto: PyTorch (no current OpenVINO IR beside %s for this device)", source)
    return replace(options, backend="torch")


def onnx_to_openvino(onnx_bytes: bytes) -> Any:
    """The OpenVINO model of an ONNX graph (read through a temporary file: the ONNX frontend reads paths)."""
    core = openvino_core()
    with tempfile.TemporaryDirectory(prefix="tnv-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(onnx_bytes)
        return core.read_model(str(path))


def quantize_int8(model: Any, samples: Sequence[dict[str, np.ndarray]]) -> Any:
    """NNCF post-training quantisation of ``model``'s convolutions on ``samples`` (normal training inputs only); the
    float32-sensitive nodes are left out of the quantisation (ignored scope)."""
    try:
        import nncf
    except ImportError:
        raise UserError("EXPORT.precision=int8 needs NNCF; pip install nncf (see requirements.txt)") from None
    ignored = sorted(sensitive_nodes(model))
    with _quiet_nncf():
        return nncf.quantize(
            model,
            nncf.Dataset(list(samples)),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(samples),
            fast_bias_correction=True,
            target_device=nncf.TargetDevice.CPU,  # the IR runs on the CPU plugin (and CPU patterns resolve faster)
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        )


@contextlib.contextmanager
def _quiet_nncf() -> Iterable[None]:
    """NNCF logs progress bars and INFO lines of its own; keep the toolkit's log readable."""
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf_log.setLevel(level)


def with_metadata(model: Any, metadata: dict[str, str]) -> Any:
    for key, value in metadata.items():
        model.set_rt_info(str(value), [METADATA_SECTION, key])
    return model


def compress_weights_to_fp16(model: Any) -> int:
    """Store the convolution weights of ``model`` (in place) as float16 constants with a Convert to float32 after
    them; returns how many. Only convolution weights: OpenVINO's own ``compress_to_fp16`` also rounds the small
    constants of the score (the calibration's min and max, whose difference then rounds to zero)."""
    import openvino.opset13 as ops

    count = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() not in HEAVY:
            continue
        weights = node.input_value(1).get_node()
        if weights.get_type_name() != "Constant" or weights.get_output_element_type(0).get_type_name() != "f32":
            continue
        values = weights.get_data()
        if np.abs(values).max(initial=0.0) >= np.finfo(np.float16).max:
            continue
        node.input(1).replace_source_output(ops.convert(ops.constant(values.astype(np.float16)), "f32").output(0))
        count += 1
    return count


def save_ir(model: Any, target: Path, compress_to_fp16: bool = False) -> int:
    """Write ``target`` (.xml) and its .bin atomically: both into a temporary sibling folder, then renamed into
    place, the .bin first (a reader that finds the new .xml finds its weights). Returns the size of both in bytes."""
    import openvino as ov

    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        ov.save_model(model, str(folder / target.name), compress_to_fp16=compress_to_fp16)
        written = folder / target.name, (folder / target.name).with_suffix(".bin")
        size = sum(p.stat().st_size for p in written)
        os.replace(written[1], target.with_suffix(".bin"))
        os.replace(written[0], target)
        return size
    except OSError as exc:
        raise UserError(
            f"cannot write {target} ({exc.strerror or exc}); check the folder's permissions and free space"
        ) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
