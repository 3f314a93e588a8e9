"""``--mode export``: an image method's whole inference path as one ONNX graph, checked against PyTorch on real images.

The graph maps a float32 image batch [B, 3, H, W] (dynamic B, H and W fixed to ``DATASET.resize`` of the checkpoint)
to ``anomaly_map`` [B, 1, H, W], ``score`` [B] and the method's extra maps (DMAD: ``deformation_map`` [B, 1, H, W]),
i.e. everything the model's eval forward does; for DMAD: PDM warps (GridSample), frozen encoder, bottleneck with the
VQ nearest-prototype lookup, decoder, feature discrepancy, unwarping, the scipy-exact Gaussian smoothing and the score
fusion with the calibration statistics stored in the checkpoint. The input is raw
RGB in [0, 1] with the ImageNet normalisation inside the graph (``EXPORT.input=raw``, the default) or an already
normalised batch (``EXPORT.input=imagenet``). Metadata (``metadata_props``) records the input format, image size,
thresholds, category, backbone and the sha256 of the source checkpoint; ``predict.OnnxModel`` reads it.

The export uses the TorchScript-based exporter (``dynamo=False``): the torch.export-based default of recent torch
needs ``onnxscript``, which is not a dependency, and the TorchScript exporter handles GridSample from opset 16.
The CoordConv coordinate channels and the smoothing's reflection indices depend only on H and W and are traced as
constants, which is right because H and W are fixed at export.

Check: before anything is written, ONNX Runtime (CPU) runs the graph on ``CHECK_IMAGES`` real images (the test split
of the dataset, or ``--input``), preprocessed exactly like evaluation, as one batch and as a batch of one, and the
outputs are compared with PyTorch (CPU, float32) on the same images. The export fails (exit code 2, no file) if
``max |onnx - torch|`` exceeds ``TOLERANCE`` times the range of the PyTorch map over the batch (anomaly and
deformation maps), or ``TOLERANCE`` times ``max(1, max |score|)`` for the scores. Observed differences are around
1e-6 of the range. One legitimate cause of a larger difference: the VQ ``argmin`` picking another prototype at a near
tie (distances equal to float32 rounding, which ONNX Runtime and PyTorch accumulate in different orders). That swaps
one prototype at one 1/16-resolution cell, changing the maps locally; both answers are equally valid nearest-prototype
lookups, but the check reports it rather than hiding it. With a trained codebook such ties are very rare.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from task.anomaly.unsupervised.data.image.formats import scan_dataset
from task.anomaly.unsupervised.data.image.preprocess import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_image,
    resize_image,
    to_tensor,
    to_unit_tensor,
)
from task.anomaly.unsupervised.deploy.onnx import ONNX_FILENAME, TOLERANCE, Difference, file_sha256, with_metadata
from task.anomaly.unsupervised.engine.engine import LoadedModel
from task.anomaly.unsupervised.image.predict import ONNX_FORMAT, ONNX_INPUT, OnnxModel, list_images
from task.common.config import Config
from task.common.errors import UserError
from task.common.io import atomic_write_bytes
from task.common.spacing import spread

log = logging.getLogger("anomaly")

CHECK_IMAGES = 4


class ExportModule(nn.Module):
    """An image model's eval forward as a plain tuple-returning module for ``torch.onnx.export``.

    images [B, 3, H, W] float32 (RGB in [0, 1] if ``normalize``, else ImageNet-normalised) ->
    (anomaly_map [B, 1, H, W], score [B], *extras [B, 1, H, W] in the order of ``extra_names``).
    """

    def __init__(self, model: nn.Module, normalize: bool, extra_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model.eval()
        self.normalize = normalize
        self.extra_names = extra_names
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        # Same operations as to_tensor (subtract, then divide), so raw and normalised inputs agree to rounding.
        x = (images - self.mean) / self.std if self.normalize else images
        out = self.model(x)
        return (out.anomaly_map, out.score, *(out.extras[name] for name in self.extra_names))


def export_onnx(module: ExportModule, example: Tensor, opset: int) -> bytes:
    """Trace ``module`` on ``example`` [B, 3, H, W] (CPU) into ONNX bytes with a dynamic batch."""
    names = ("anomaly_map", "score", *module.extra_names)
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation; the choice is deliberate (module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        # The VQ training loss (F.mse_loss) is traced, then pruned as unused; only its shape check warns.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.functional")
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=[ONNX_INPUT],
            output_names=list(names),
            dynamic_axes={name: {0: "batch"} for name in (ONNX_INPUT, *names)},
            opset_version=opset,
            do_constant_folding=True,
            **kwargs,
        )
    return buffer.getvalue()


def check_image_paths(cfg: Config, input_path: str | None) -> list[Path]:
    """A few real images for the check: from ``--input``, else spread over the test split (good and defect folders)."""
    if input_path:
        paths = list_images(Path(input_path))
        if not paths:
            raise UserError(
                f"no images in {input_path} for the ONNX check; pass a folder with {', '.join(IMAGE_EXTENSIONS)} files"
            )
        return spread(paths, CHECK_IMAGES)
    try:
        samples = scan_dataset(cfg.DATASET, "test", cfg.SEED)
    except UserError as exc:
        raise UserError(
            "the ONNX check needs a few real images: pass --input IMAGE_OR_FOLDER, or point DATASET.datadir at the "
            f"dataset ({exc})"
        ) from None
    return [Path(s.path) for s in spread(samples, CHECK_IMAGES)]


def preprocess(paths: list[Path], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(ImageNet-normalised, raw RGB in [0, 1]) batches [N, 3, H, W], both from the evaluation preprocessing."""
    arrays = [resize_image(load_image(p), size) for p in paths]
    normalized = torch.stack([to_tensor(a) for a in arrays])
    raw = torch.stack([to_unit_tensor(a) for a in arrays])
    return normalized, raw


def compare(onnx_model: OnnxModel, inputs: np.ndarray, reference: dict[str, Tensor]) -> list[Difference]:
    """Run ``onnx_model`` (anything with ``run(inputs) -> {name: array}``: ONNX Runtime, an OpenVINO IR) on ``inputs``
    as one batch and as a batch of one; differences against ``reference``."""
    full = onnx_model.run(inputs)
    single = onnx_model.run(inputs[:1])
    differences = []
    for name in reference:
        expected = reference[name].numpy()
        worst = max(float(np.abs(full[name] - expected).max()), float(np.abs(single[name] - expected[:1]).max()))
        if name == "score":
            scale = max(1.0, float(np.abs(expected).max()))
        else:
            scale = max(float(expected.max() - expected.min()), float(np.finfo(np.float32).eps))
        differences.append(Difference(name, worst, scale))
    return differences


@dataclass
class PreparedExport:
    """What every export format starts from: the traced ONNX graph with its metadata, the check images in the graph's
    input format [N, 3, H, W] and PyTorch's outputs on them (the reference)."""

    module: ExportModule
    inputs: Tensor
    reference: dict[str, Tensor]
    metadata: dict[str, str]
    data: bytes


def prepare_export(
    loaded: LoadedModel, paths: list[Path], extra_names: tuple[str, ...], input_format: str, opset: int
) -> PreparedExport:
    """Trace ``loaded``'s inference path into ONNX bytes and run PyTorch on the check images ``paths``."""
    checkpoint, cfg, thresholds = loaded.path, loaded.cfg, loaded.thresholds
    model = loaded.model.float().cpu().to(memory_format=torch.contiguous_format).eval()
    size = tuple(cfg.DATASET.resize)
    normalize = input_format == "raw"
    module = ExportModule(model, normalize, extra_names).eval()

    normalized, raw = preprocess(paths, size)
    inputs = raw if normalize else normalized
    with torch.no_grad():  # the PyTorch reference; it also fills the CoordConv caches, so they trace as constants
        outputs = module(inputs)
    reference = dict(zip(("anomaly_map", "score", *extra_names), outputs))

    log.info("exporting %s (%dx%d, %s input, opset %d)", checkpoint, size[0], size[1], input_format, opset)
    example = inputs[:2] if len(inputs) >= 2 else inputs.repeat(2, 1, 1, 1)
    metadata = {
        "format": ONNX_FORMAT,
        "input": input_format,
        "input_description": (
            "float32 [B, 3, H, W] RGB in [0, 1] (ImageNet normalisation is inside the graph)"
            if normalize
            else "float32 [B, 3, H, W] ImageNet-normalised RGB: (x / 255 - mean) / std"
        ),
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "image_size": json.dumps(list(size)),
        "thresholds": json.dumps({k: float(v) for k, v in thresholds.items()}),
        "category": str(cfg.DATASET.target),
        "model": json.dumps(
            {k: v for k, v in cfg.to_dict()["MODEL"].items() if k not in ("pretrained", "backbone_weights")}
        ),
        "outputs": ", ".join(["anomaly_map [B, 1, H, W]", "score [B]", *(f"{n} [B, 1, H, W]" for n in extra_names)]),
        "checkpoint_sha256": file_sha256(checkpoint),
    }
    return PreparedExport(module, inputs, reference, metadata, export_onnx(module, example, opset))


def export_run(
    loaded: LoadedModel,
    paths: list[Path],
    extra_names: tuple[str, ...],
    input_format: str,
    opset: int,
    prepared: PreparedExport | None = None,
) -> Path:
    """Export ``loaded`` to ``model.onnx`` beside its checkpoint, after checking the graph against PyTorch on
    ``paths``."""
    prepared = prepared or prepare_export(loaded, paths, extra_names, input_format, opset)
    data = with_metadata(prepared.data, prepared.metadata)

    differences = compare(OnnxModel(data, "the exported graph"), prepared.inputs.numpy(), prepared.reference)
    summary = "; ".join(str(d) for d in differences)
    print(
        f"ONNX check on {len(paths)} image(s), onnxruntime CPU vs PyTorch CPU: {summary}; tolerance {TOLERANCE:g} "
        "relative"
    )
    failed = [d for d in differences if not d.relative <= TOLERANCE]  # NaN fails too
    if failed:
        raise UserError(
            f"ONNX output differs from PyTorch beyond the tolerance {TOLERANCE:g} ({'; '.join(map(str, failed))}); "
            "nothing was written; a VQ near tie can cause this (see export.py), report it with the checkpoint otherwise"
        )
    target = loaded.path.parent / ONNX_FILENAME
    atomic_write_bytes(target, lambda handle: handle.write(data))
    print(f"exported {target} ({len(data) / 2**20:.1f} MiB)")
    return target
