"""``--mode predict``: anomaly maps, scores and OK/NG verdicts for unlabelled images, with PyTorch or ONNX Runtime.

Everything the model needs comes from the run, never from the dataset: the image size, the model settings, the
score statistics and the thresholds are read from the checkpoint (or from the metadata of the exported ONNX file),
so ``DATASET.datadir`` need not exist and any YAML whose run directory holds the model (or ``--checkpoint``) works.
Images of any size and mode (grayscale, palette and RGBA become RGB) go through the training preprocessing
(``load_image`` -> ``resize_image`` -> ``to_tensor``) and the one inference path, ``predict_loader``; the ONNX file is
wrapped as a module with the same interface for it. ``--backend torch`` runs on the run's device, ``--backend
onnx`` on ONNX Runtime's CPU provider; on CPU both agree to about 1e-6, while on a GPU PyTorch's TF32 convolutions
make scores differ by up to about 1e-3.

Outputs, in ``--output`` (default: ``predict/`` next to the checkpoint):

* ``<relative path>.png`` per image, the input's whole file name kept (``a.jpg`` -> ``a.jpg.png``, so ``a.jpg`` and
  ``a.png`` never share a picture): input | heatmap | predicted region, at the image's original size (longest side
  capped at ``MAX_PICTURE_SIDE``), drawn by ``visualize.render_result``;
* ``predictions.csv``: ``path,score,prediction,verdict,picture,regions`` (prediction 1 = anomalous = verdict NG;
  regions: the defect regions as a JSON list of ``{"box": [x, y, w, h], "area", "peak", "peak_xy"}`` in the input
  image's pixels, found at model resolution with ``TEST.region_min_area`` and boxed and numbered in the picture).

A folder is searched recursively (hidden files and folders are skipped). The output folder may not be, or be inside,
the input folder, and predict only ever replaces files it wrote itself (listed in ``.predict-manifest.json`` there):
any other existing file of the same name stops the run with a one-line error before anything is written. The maps of
all inputs are kept in memory at model resolution until the pictures are drawn, because the heatmap colour range is
shared by the whole set (as for the test-set pictures).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from task.anomaly.unsupervised.data.image.preprocess import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    display_rgb,
    load_image,
    resize_image,
    to_tensor,
)
from task.anomaly.unsupervised.deploy.onnx import (
    ONNX_FILENAME,
    check_exported_from,
    metadata_image_size,
    open_onnx,
)
from task.anomaly.unsupervised.deploy.output_folder import OutputFolder
from task.anomaly.unsupervised.drawing import display_bounds
from task.anomaly.unsupervised.image.inference import predict_loader
from task.anomaly.unsupervised.image.visualize import render_result
from task.anomaly.unsupervised.records import InferenceOutput
from task.anomaly.unsupervised.regions import Region, find_regions, regions_record, scale_regions
from task.common.errors import UserError
from task.common.io import atomic_write_bytes, csv_cell, write_text

log = logging.getLogger("anomaly")

# The contract between ``export.py`` (writer) and ``OnnxModel`` (reader).
ONNX_FORMAT = "tnvision-dmad-onnx"
ONNX_INPUT = "image"

MAX_PICTURE_SIDE = 1024
CSV_HEADER = ["path", "score", "prediction", "verdict", "picture", "regions"]


# --------------------------------------------------------------------------- ONNX


class ExportedImageModel(nn.Module):
    """An exported image graph (this toolkit's metadata) behind the eval interface of the image methods, so
    ``predict_loader`` can run it; a backend supplies ``run``.

    ``forward``: ImageNet-normalised [B, 3, H, W] (what the datasets yield) -> ``InferenceOutput`` with anomaly_map
    [B, 1, H, W], score [B] and the file's extra maps; when the graph was exported for raw input (normalisation inside
    the graph) the batch is converted back to RGB in [0, 1] first.

    Args:
        meta: the graph's metadata; outputs: its output names in order; image_size: reads [H, W] from the metadata
        (and checks it against the graph where the backend can); recreate: the command that writes such a file.
    """

    def __init__(
        self,
        meta: dict[str, str],
        name: str,
        outputs: Callable[[], Sequence[str]],
        image_size: Callable[[], Sequence[int]],
        recreate: str,
    ) -> None:
        super().__init__()
        if meta.get("format") != ONNX_FORMAT:
            raise UserError(
                f"{name} is not a model exported by this toolkit (no format={ONNX_FORMAT} metadata); re-create it "
                f"with {recreate}"
            )
        self.metadata: dict[str, str] = meta
        try:
            self.input_format: str = meta["input"]
            self.image_size: tuple[int, ...] = tuple(image_size())
            self.thresholds: dict[str, float] = {k: float(v) for k, v in json.loads(meta["thresholds"]).items()}
            self.outputs: tuple[str, ...] = tuple(outputs())
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise UserError(
                f"{name} has incomplete metadata ({type(exc).__name__}: {str(exc)[:80]}); re-create it with --mode "
                "export"
            ) from None
        if (
            self.input_format not in ("raw", "imagenet")
            or len(self.image_size) != 2
            or self.outputs[:2] != ("anomaly_map", "score")
        ):
            raise UserError(
                f"{name} has metadata this toolkit does not know (input {self.input_format!r:.40}, outputs "
                f"{self.outputs[:3]}); re-create it with {recreate}"
            )
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``images`` float32 [B, 3, H, W] in the graph's input format -> the named outputs as arrays."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> InferenceOutput:
        x = images.detach().float().cpu()
        if self.input_format == "raw":
            x = x * self._std + self._mean
        out = {k: torch.from_numpy(v) for k, v in self.run(x.numpy()).items()}
        return InferenceOutput(out.pop("anomaly_map"), out.pop("score"), out)


class OnnxModel(ExportedImageModel):
    """An exported ONNX file on ONNX Runtime's CPU provider (``ExportedImageModel``)."""

    def __init__(self, source: Path | bytes, name: str) -> None:
        session, meta = open_onnx(source, name)
        super().__init__(
            meta,
            name,
            lambda: [out.name for out in session.get_outputs()],
            lambda: metadata_image_size(meta, session, name),  # ints, limits, graph
            "--mode export",
        )
        self.session = session

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(list(self.outputs), {ONNX_INPUT: np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(self.outputs, outputs))


def onnx_source(checkpoint: str | None, run_dir: Path) -> tuple[Path, Path | None]:
    """(ONNX file, checkpoint it must come from) for ``--backend onnx``: ``--checkpoint`` itself when it ends in .onnx
    (no checkpoint to match), else model.onnx beside the checkpoint (``--checkpoint`` or the run's model.pt)."""
    if checkpoint and Path(checkpoint).suffix.lower() == ".onnx":
        if not Path(checkpoint).is_file():
            raise UserError(f"ONNX model not found: {checkpoint}; check the path or run --mode export")
        return Path(checkpoint), None
    source = Path(checkpoint) if checkpoint else run_dir / "model.pt"
    path = source.parent / ONNX_FILENAME
    if not path.is_file():
        raise UserError(
            f"ONNX model not found: {path}; run --mode export first (same config and --checkpoint), or pass "
            "--checkpoint FILE.onnx"
        )
    return path, source


def load_onnx_model(path: Path, checkpoint: Path | None) -> OnnxModel:
    """The ONNX model at ``path``; refused when ``checkpoint`` exists and is not the file it was exported from
    (sha256 recorded at export), so retraining without re-exporting cannot silently serve the old model."""
    model = OnnxModel(path, str(path))
    check_exported_from(path, model.metadata, checkpoint, "--mode export")
    return model


# --------------------------------------------------------------------------- inputs


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def list_images(path: Path) -> list[Path]:
    """``path`` if it is an image file, else the images under the folder ``path``, recursively, sorted by relative path.

    Extensions: ``IMAGE_EXTENSIONS`` (any case). Hidden files and folders are skipped. May return an empty list.
    """
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(
                f"--input {path} is not a supported image; use one of {', '.join(IMAGE_EXTENSIONS)} or a folder"
            )
        return [path]
    if not path.is_dir():
        raise UserError(f"--input {path} not found; pass an image file or a folder of images")
    found = [
        candidate
        for candidate in path.rglob("*")
        if candidate.suffix.lower() in IMAGE_EXTENSIONS
        and not _hidden(candidate.relative_to(path))
        and candidate.is_file()
    ]
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


class ImageFiles(Dataset):
    """Unlabelled image files preprocessed like the training and test images: ``image`` [3, H, W] normalised."""

    def __init__(self, paths: list[Path], size: tuple[int, int]) -> None:
        self.paths = paths
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        return {"image": to_tensor(resize_image(load_image(path), self.size)), "path": str(path)}


def picture_names(paths: list[Path], root: Path) -> list[Path]:
    """One output name per input, relative to the output folder: ``<relative path>.png`` with the whole file name
    kept (``a.jpg`` -> ``a.jpg.png``), so two inputs can never share a picture."""
    return [
        (path.relative_to(root) if root.is_dir() else Path(path.name)).with_name(path.name + ".png") for path in paths
    ]


# --------------------------------------------------------------------------- outputs


def render_picture(
    path: Path,
    anomaly_map: np.ndarray,
    bounds: tuple[float, float],
    score: float,
    thresholds: dict[str, float],
    min_area: int = 1,
) -> tuple[bytes, list[Region]]:
    """PNG bytes of input | heatmap | region for one input, at its original size (longest side <= MAX_PICTURE_SIDE),
    and its defect regions in the input's pixels (boxed and numbered in the picture).

    ``anomaly_map`` [h, w] at model resolution is bilinearly resized to the picture; the regions are found at model
    resolution (at least ``min_area`` pixels there) and scaled.
    """
    image = display_rgb(load_image(path))
    height, width = image.shape[:2]
    found = find_regions(anomaly_map, thresholds.get("pixel", math.nan), min_area)
    regions = scale_regions(found, width / anomaly_map.shape[1], height / anomaly_map.shape[0])
    scale = min(1.0, MAX_PICTURE_SIDE / max(height, width))
    if scale < 1.0:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    resized = cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    shown = scale_regions(found, width / anomaly_map.shape[1], height / anomaly_map.shape[0])
    picture = render_result(
        np.ascontiguousarray(image),
        resized,
        bounds,
        score,
        thresholds.get("image", math.nan),
        thresholds.get("pixel", math.nan),
        regions=shown,
    )
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue(), regions


def regions_cell(regions: list[Region]) -> str:
    """The ``regions`` cell of predictions.csv: compact JSON (``[]`` when none)."""
    return json.dumps(regions_record(regions), separators=(",", ":"))


def verdict(score: float, image_threshold: float) -> tuple[str, str]:
    """(prediction, verdict): ("1", "NG") at or above the threshold, ("0", "OK") below, ("", "n/a") without one."""
    if not math.isfinite(image_threshold):
        return "", "n/a"
    return ("1", "NG") if score >= image_threshold else ("0", "OK")


@dataclass
class Runner:
    """A calibrated model with what it needs to run: input size, thresholds, batch size, device and precision."""

    model: nn.Module
    size: tuple[int, int]
    thresholds: dict[str, float]
    batch_size: int
    device: torch.device = torch.device("cpu")
    amp: str = "none"
    channels_last: bool = False
    region_min_area: int = 1  # TEST.region_min_area of the config


def predict_folder(runner: Runner, input_path: Path, out_dir: Path, source: str) -> None:
    """Score every image of ``input_path`` and write pictures and predictions.csv into ``out_dir``."""
    paths = list_images(input_path)
    if not paths:
        raise UserError(
            f"no images in {input_path} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}); pass a folder that "
            "holds images"
        )
    output = OutputFolder(out_dir, input_path)
    names = picture_names(paths, input_path)
    output.claim(names + [Path("predictions.csv")])
    log.info("predicting %d image(s) from %s with %s", len(paths), input_path, source)

    loader = DataLoader(ImageFiles(paths, runner.size), batch_size=runner.batch_size, shuffle=False)
    preds = predict_loader(
        runner.model, loader, runner.device, runner.amp, desc="predict", channels_last=runner.channels_last
    )
    thresholds = runner.thresholds
    bounds = display_bounds(preds.anomaly_maps, thresholds.get("pixel", math.nan))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for path, name, score, anomaly_map in zip(paths, names, preds.scores.tolist(), preds.anomaly_maps):
        data, regions = render_picture(path, anomaly_map.numpy(), bounds, score, thresholds, runner.region_min_area)
        atomic_write_bytes(out_dir / name, lambda handle, data=data: handle.write(data))
        prediction, label = verdict(score, thresholds.get("image", math.nan))
        writer.writerow(
            [csv_cell(str(path)), f"{score:.6f}", prediction, label, csv_cell(name.as_posix()), regions_cell(regions)]
        )
        print(f"{path}: score={score:.6f} {label} regions={len(regions)}")
    write_text(out_dir / "predictions.csv", buffer.getvalue())
    log.info("pictures and predictions.csv written to %s", out_dir)
