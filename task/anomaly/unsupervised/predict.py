"""``--mode predict``: anomaly maps, scores and OK/NG verdicts for unlabelled images, with PyTorch or ONNX Runtime.

Everything the model needs comes from the run, never from the dataset: the image size, the model settings, the
score statistics and the thresholds are read from the checkpoint (or from the metadata of the exported ONNX file),
so ``DATASET.datadir`` need not exist and any YAML whose run directory holds the model (or ``--checkpoint``) works.
Images of any size and mode (grayscale, palette and RGBA become RGB) go through the training preprocessing
(``load_image`` -> ``resize_image`` -> ``to_tensor``) and the one inference path, ``predict_loader``; the ONNX file is
wrapped as a module with the same interface for it. ``--backend torch`` runs on the trainer's device, ``--backend
onnx`` on ONNX Runtime's CPU provider; on CPU both agree to about 1e-6, while on a GPU PyTorch's TF32 convolutions
make scores differ by up to about 1e-3.

Outputs, in ``--output`` (default: ``predict/`` next to the checkpoint):

* ``<relative path>.png`` per image: input | heatmap | predicted region, at the image's original size (longest
  side capped at ``MAX_PICTURE_SIDE``), drawn by ``visualize.render_result``;
* ``predictions.csv``: ``path,score,prediction,verdict,picture`` (prediction 1 = anomalous = verdict NG).

A folder is searched recursively (hidden files and folders, and the output folder itself, are skipped). The maps of
all inputs are kept in memory at model resolution until the pictures are drawn, because the heatmap colour range is
shared by the whole set (as for the test-set pictures).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from task.anomaly.unsupervised.data.mvtec import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, load_image, resize_image, to_tensor
from task.anomaly.unsupervised.inference import predict_loader
from task.anomaly.unsupervised.models.dmad.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from task.anomaly.unsupervised.models.dmad.torch_model import DMADModel, InferenceOutput
from task.anomaly.unsupervised.visualize import display_bounds, render_result
from task.common.config import Config
from task.common.errors import UserError
from task.common.io import atomic_write_bytes, write_text

if TYPE_CHECKING:  # the trainer imports this module lazily; a runtime import would be circular
    from task.anomaly.unsupervised.models.dmad.trainer import DMADTrainer

log = logging.getLogger("dmad")

# The contract between ``export.py`` (writer) and ``OnnxModel`` (reader).
ONNX_FORMAT = "tnvision-dmad-onnx"
ONNX_INPUT = "image"
ONNX_OUTPUTS = ("anomaly_map", "score", "deformation_map")
ONNX_FILENAME = "model.onnx"

MAX_PICTURE_SIDE = 1024


# --------------------------------------------------------------------------- checkpoints


def checkpoint_config(cfg: Config, state: dict) -> Config:
    """``cfg`` with the model settings one of our checkpoints was trained with (MODEL, DATASET.resize/target).

    The encoder weights are inside the checkpoint, so ``MODEL.backbone_weights`` (a file that may not exist on this
    machine) and ``MODEL.pretrained`` are cleared. Official checkpoints carry no config: ``cfg`` describes them.
    """
    if state.get("format") != CHECKPOINT_FORMAT:
        return cfg
    saved = state["config"]
    data = cfg.to_dict()
    changed = sorted(k for k, v in saved["MODEL"].items() if k in data["MODEL"] and data["MODEL"][k] != v)
    data["MODEL"].update({k: v for k, v in saved["MODEL"].items() if k in data["MODEL"]})
    data["MODEL"].update(pretrained=False, backbone_weights=None)
    for key in ("resize", "target"):
        data["DATASET"][key] = saved["DATASET"][key]
    if changed:
        log.info("model settings come from the checkpoint (the YAML differs in MODEL.%s)", ", MODEL.".join(changed))
    return Config(data)


def load_inference_model(trainer: DMADTrainer, path: Path) -> tuple[DMADModel, dict[str, float], Config]:
    """A calibrated model from ``path`` through ``trainer.load_model``: (model in eval mode, thresholds, its config)."""
    cfg = checkpoint_config(trainer.cfg, read_checkpoint(path))
    model, thresholds, calibrated = trainer.load_model(path, cfg)
    if not calibrated:
        raise UserError(
            f"checkpoint {path} has no score calibration or thresholds; run --mode test --checkpoint {path} first "
            "and use the model.pt it writes to the run directory"
        )
    return model, thresholds, cfg


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- ONNX


class OnnxModel(nn.Module):
    """An exported DMAD ONNX file behind ``DMADModel``'s eval interface, so ``predict_loader`` can run it.

    ``forward``: ImageNet-normalised [B, 3, H, W] (what the datasets yield) -> ``InferenceOutput`` with
    anomaly_map [B, 1, H, W], deformation_map [B, 1, H, W] and score [B]; when the file was exported for raw
    input (normalisation inside the graph) the batch is converted back to RGB in [0, 1] first. Runs on ONNX
    Runtime's CPU provider.
    """

    def __init__(self, source: Path | bytes, name: str) -> None:
        super().__init__()
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own classes (Fail, InvalidProtobuf, ...) for bad files
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load ONNX model {name} ({reason}); re-create it with --mode export") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != ONNX_FORMAT:
            raise UserError(f"{name} is not a DMAD model exported by this toolkit (no format={ONNX_FORMAT} metadata); re-create it with --mode export")
        self.metadata: dict[str, str] = dict(meta)
        self.input_format: str = meta["input"]
        self.image_size: tuple[int, int] = tuple(json.loads(meta["image_size"]))
        self.thresholds: dict[str, float] = json.loads(meta["thresholds"])
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``images`` float32 [B, 3, H, W] in the file's input format -> the named outputs as arrays."""
        outputs = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(ONNX_OUTPUTS, outputs))

    def forward(self, images: Tensor) -> InferenceOutput:
        x = images.detach().float().cpu()
        if self.input_format == "raw":
            x = x * self._std + self._mean
        out = {k: torch.from_numpy(v) for k, v in self.run(x.numpy()).items()}
        return InferenceOutput(anomaly_map=out["anomaly_map"], deformation_map=out["deformation_map"], score=out["score"])


def onnx_source(trainer: DMADTrainer) -> tuple[Path, Path | None]:
    """(ONNX file, checkpoint it must come from) for ``--backend onnx``: ``--checkpoint`` itself when it ends in .onnx
    (no checkpoint to match), else model.onnx beside the checkpoint (``--checkpoint`` or the run's model.pt)."""
    arg = trainer.checkpoint_arg
    if arg and Path(arg).suffix.lower() == ".onnx":
        if not Path(arg).is_file():
            raise UserError(f"ONNX model not found: {arg}; check the path or run --mode export")
        return Path(arg), None
    checkpoint = Path(arg) if arg else trainer.run_dir / "model.pt"
    path = checkpoint.parent / ONNX_FILENAME
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}; run --mode export first (same config and --checkpoint), or pass --checkpoint FILE.onnx")
    return path, checkpoint


def load_onnx_model(path: Path, checkpoint: Path | None) -> OnnxModel:
    """The ONNX model at ``path``; refused when ``checkpoint`` exists and is not the file it was exported from
    (sha256 recorded at export), so retraining without re-exporting cannot silently serve the old model."""
    model = OnnxModel(path, str(path))
    recorded = model.metadata.get("checkpoint_sha256")
    if recorded and checkpoint is not None and checkpoint.is_file() and file_sha256(checkpoint) != recorded:
        raise UserError(f"{path} was exported from a different {checkpoint.name} than {checkpoint}; rerun --mode export to refresh it")
    return model


# --------------------------------------------------------------------------- inputs


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def list_images(path: Path, exclude: Path | None = None) -> list[Path]:
    """``path`` if it is an image file, else the images under the folder ``path``, recursively, sorted by relative path.

    Extensions: ``IMAGE_EXTENSIONS`` (any case). Hidden files and folders are skipped, and so is everything under
    ``exclude`` (the output folder, so a rerun never scores its own pictures). May return an empty list.
    """
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(f"--input {path} is not a supported image; use one of {', '.join(IMAGE_EXTENSIONS)} or a folder")
        return [path]
    if not path.is_dir():
        raise UserError(f"--input {path} not found; pass an image file or a folder of images")
    excluded = exclude.resolve() if exclude is not None else None
    found = []
    for candidate in path.rglob("*"):
        relative = candidate.relative_to(path)
        if candidate.suffix.lower() not in IMAGE_EXTENSIONS or _hidden(relative) or not candidate.is_file():
            continue
        if excluded is not None and excluded in candidate.resolve().parents:
            continue
        found.append(candidate)
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
    """One output name per input, relative to the output folder: ``<relative path>.png``.

    Inputs that would share a name (``a.jpg`` and ``a.png``) keep their extension in it (``a_png.png``).
    """
    names: list[Path] = []
    taken: set[str] = set()
    for path in paths:
        relative = path.relative_to(root) if root.is_dir() else Path(path.name)
        name = relative.with_suffix(".png")
        if name.as_posix().lower() in taken:
            name = relative.with_name(f"{relative.stem}_{relative.suffix[1:]}.png")
        taken.add(name.as_posix().lower())
        names.append(name)
    return names


# --------------------------------------------------------------------------- outputs


def render_picture(path: Path, anomaly_map: np.ndarray, bounds: tuple[float, float], score: float, thresholds: dict[str, float]) -> bytes:
    """PNG bytes of input | heatmap | region for one input, at its original size (longest side <= MAX_PICTURE_SIDE).

    ``anomaly_map`` [h, w] at model resolution is bilinearly resized to the picture.
    """
    image = np.asarray(load_image(path))
    height, width = image.shape[:2]
    scale = min(1.0, MAX_PICTURE_SIDE / max(height, width))
    if scale < 1.0:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    resized = cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    picture = render_result(
        np.ascontiguousarray(image), resized, bounds, score, thresholds.get("image", math.nan), thresholds.get("pixel", math.nan)
    )
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def verdict(score: float, image_threshold: float) -> tuple[str, str]:
    """(prediction, verdict): ("1", "NG") at or above the threshold, ("0", "OK") below, ("", "n/a") without one."""
    if not math.isfinite(image_threshold):
        return "", "n/a"
    return ("1", "NG") if score >= image_threshold else ("0", "OK")


def predict_run(trainer: DMADTrainer, input_path: str | None, backend: str, output: str | None) -> None:
    """Score every image of ``input_path`` with the run's model and write pictures and predictions.csv."""
    if not input_path:
        raise UserError("--mode predict needs --input IMAGE_OR_FOLDER")
    if backend == "onnx":
        source, paired_checkpoint = onnx_source(trainer)
    else:
        source = trainer.checkpoint_path()
        if source.suffix.lower() == ".onnx":
            raise UserError(f"--checkpoint {source} is an ONNX file; add --backend onnx")
    out_dir = Path(output) if output else source.parent / "predict"
    root = Path(input_path)
    paths = list_images(root, exclude=out_dir)
    if not paths:
        raise UserError(f"no images in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}); pass a folder that holds images")

    model: nn.Module
    if backend == "onnx":
        onnx_model = load_onnx_model(source, paired_checkpoint)
        model, size, thresholds = onnx_model, onnx_model.image_size, onnx_model.thresholds
        device, amp, channels_last = torch.device("cpu"), "none", False
    else:
        model, thresholds, cfg = load_inference_model(trainer, source)
        size, device, amp, channels_last = tuple(cfg.DATASET.resize), trainer.device, trainer.amp, cfg.TRAIN.channels_last
    log.info("predicting %d image(s) from %s with %s (%s)", len(paths), root, source, backend)

    loader = DataLoader(ImageFiles(paths, size), batch_size=trainer.cfg.TEST.batch_size, shuffle=False)
    preds = predict_loader(model, loader, device, amp, desc="predict", channels_last=channels_last)

    bounds = display_bounds(preds.anomaly_maps, thresholds.get("pixel", math.nan))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score", "prediction", "verdict", "picture"])
    for path, name, score, anomaly_map in zip(paths, picture_names(paths, root), preds.scores.tolist(), preds.anomaly_maps):
        data = render_picture(path, anomaly_map.numpy(), bounds, score, thresholds)
        atomic_write_bytes(out_dir / name, lambda handle, data=data: handle.write(data))
        prediction, label = verdict(score, thresholds.get("image", math.nan))
        writer.writerow([str(path), f"{score:.6f}", prediction, label, name.as_posix()])
        print(f"{path}: score={score:.6f} {label}")
    write_text(out_dir / "predictions.csv", buffer.getvalue())
    log.info("pictures and predictions.csv written to %s", out_dir)
