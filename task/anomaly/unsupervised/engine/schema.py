"""The run-level configuration schema (every section but MODEL), shared by all methods, one per modality.

A method contributes its MODEL section (``Method.model_schema``), any section of its own (``Method.extra_sections``),
DATASET keys of its own (``Method.dataset_keys``) and its run defaults (``Method.run_defaults``); ``method_schema``
assembles the whole. The modality contributes its DATASET keys: image formats (mvtec, visa, folder) or video clips,
so an image run refuses a video key such as ``DATASET.clip_length`` and vice versa.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from task.anomaly.unsupervised.data.image.formats import DATASET_SCHEMA_KEYS
from task.anomaly.unsupervised.data.video.clips import VIDEO_DATASET_KEYS
from task.common.config import F, Field, Schema

RUN_SECTIONS: Schema = {
    "DATASET": {
        "datadir": F(str, "data/mvtec", help="dataset root (see DATASET.format for the layout)"),
        "target": F(str, "bottle", help="category (image formats) or dataset name (video) under datadir"),
        "resize": F(
            list,
            [256, 256],
            length=2,
            item_type=int,
            min=64,
            max=1024,
            multiple_of=32,
            help="[H, W], multiples of 32",
            reason="training memory grows 4x per doubling: 1024 already needs ~8 GB per image with wide_resnet50_2",
        ),
        "cache": F(bool, True, help="decode and resize each image once and keep it in memory"),
        "skip_bad_images": F(bool, False, help="skip unreadable images with a warning instead of stopping"),
        "demo": F(bool, False, help="generate the built-in synthetic dataset under datadir if absent"),
    },
    "DATALOADER": {
        "batch_size": F(int, 8, min=1),
        "num_workers": F(int, 0, min=0, max=64, reason="each worker is a process holding a copy of the dataset"),
        "pin_memory": F(bool, False),
    },
    "TRAIN": {
        "epochs": F(int, 400, min=1),
        "num_training_steps": F(
            int, None, nullable=True, min=1, help="cap on optimiser steps (null: epochs x steps per epoch)"
        ),
        "save_interval": F(int, 200, min=1, help="steps between resumable checkpoints"),
        "amp": F(
            str,
            "none",
            choices=("none", "bf16", "fp16"),
            help="autocast dtype for training and evaluation (fp16: CUDA only); maps and scores stay float32",
        ),
        "channels_last": F(
            bool, False, help="NHWC memory layout for the model and inputs (implied by amp=bf16 on CPU)"
        ),
        "validation": F(
            str,
            "off",
            choices=("off", "synthetic"),
            help=(
                "images: synthetic = keep the evaluated checkpoint (LOG.eval_interval) that best detects CutPaste "
                "defects on the calibration images; off = the last"
            ),
        ),
        "compile": F(
            bool, False, help="torch.compile the model's forward (first steps compile; falls back to eager on failure)"
        ),
    },
    "TEST": {
        "batch_size": F(int, 8, min=1),
        "save_maps": F(bool, False, help="write maps/<defect>/<name>.npz per test image"),
        "save_images": F(
            bool,
            True,
            help="write images/<defect>/<name>.png per test image (video: a score plot per video) and the result GIF",
        ),
        "save_scores": F(
            bool, True, help="video: write scores.npz with the raw per-frame scores and labels (--mode score reads it)"
        ),
        "target_fpr": F(
            float,
            0.01,
            min=0,
            max=1,
            min_exclusive=True,
            max_exclusive=True,
            help="false-alarm target of the image threshold: conformal order statistic of the calibration scores; "
            "changeable at predict/export without retraining",
        ),
        "pixel_target_fpr": F(
            float,
            0.01,
            min=0,
            max=1,
            min_exclusive=True,
            max_exclusive=True,
            help="false-alarm target of the pixel threshold (fraction of normal calibration pixels)",
        ),
        "image_threshold": F(
            float,
            None,
            nullable=True,
            help="explicit image threshold, served instead of the one TEST.target_fpr derives",
        ),
        "pixel_threshold": F(
            float,
            None,
            nullable=True,
            help="explicit pixel threshold, served instead of the one TEST.pixel_target_fpr derives",
        ),
        "region_min_area": F(
            int, 16, min=1, help="defect regions (regions.json, predict, pictures): smallest kept, pixels at model size"
        ),
    },
    "OPTIMIZER": {
        "name": F(str, "adamw", choices=("adamw", "adam")),
        "lr": F(float, 0.005, min=0, min_exclusive=True, max=1, reason="larger steps diverge at once"),
        "betas": F(list, [0.5, 0.999], length=2, item_type=float, min=0, max=1, max_exclusive=True),
        "weight_decay": F(
            float, 0.01, min=0, max=1, reason="AdamW scales the weights by 1 - lr x weight_decay each step"
        ),
    },
    "SCHEDULER": {
        "name": F(str, "cosine", choices=("cosine", "none")),
    },
    "LOG": {
        "eval_interval": F(int, None, nullable=True, min=1, help="steps between evaluations (null: only at the end)"),
        "log_interval": F(int, 10, min=1),
        "wandb": F(bool, False),
        "wandb_mode": F(str, "offline", choices=("offline", "online", "disabled")),
        "wandb_project": F(str, "dmad"),
        "wandb_entity": F(str, None, nullable=True),
        "tensorboard": F(bool, False, help="write TensorBoard event files under <run_dir>/tensorboard"),
    },
    "EXPORT": {
        "input": F(
            str,
            "raw",
            choices=("raw", "imagenet"),
            help="ONNX input: raw RGB in [0, 1] (normalised inside the graph) or ImageNet-normalised",
        ),
        "opset": F(int, 17, min=16, help="ONNX opset, at least 16 (GridSample)"),
        "format": F(
            str,
            "onnx",
            choices=("onnx", "openvino", "both"),
            help="--mode export writes model.onnx, the OpenVINO IR model-<precision>.xml/.bin, or both",
        ),
        "precision": F(
            str,
            "fp32",
            choices=("fp32", "fp16", "int8"),
            help="OpenVINO IR precision to write (export) and to read (predict --backend openvino)",
        ),
        "calibration_images": F(
            int,
            32,
            min=1,
            max=10000,
            help="int8: normal training images (video runs: clips of the training videos) NNCF calibrates on",
            reason="each one is a full forward pass at export",
        ),
        "check_videos": F(
            int,
            None,
            nullable=True,
            min=0,
            help=(
                "video OpenVINO export: labelled test videos (the first N; null: all) both PyTorch and the IR score "
                "for the frame AUROC change"
            ),
            reason="each one is scored twice at export",
        ),
    },
    "RESULT": {
        "savedir": F(str, "runs", help="root of the run directories (~ is expanded)"),
        "exp_name": F(str, None, nullable=True, help="sub-folder of the run directory (a plain name: no '/', no '..')"),
        "assets_dir": F(
            str,
            "assets",
            nullable=True,
            help=(
                "folder (relative to the working directory) that receives <target>.gif; null: only the run directory's "
                "copy"
            ),
        ),
    },
    "RESUME": {
        "option": F(bool, True, help="resume from the run directory's last.pt when it exists"),
        "checkpoint": F(str, None, nullable=True, help="explicit last.pt to resume from"),
    },
    "BENCHMARK": {
        "train_steps": F(int, 5, min=1, help="--mode benchmark: timed training steps"),
        "warmup": F(int, 1, min=0, help="--mode benchmark: untimed training steps before them"),
        "eval_images": F(
            int,
            16,
            nullable=True,
            min=1,
            help="--mode benchmark: test images (clips) to evaluate (null: the whole test set)",
        ),
        "backends": F(
            bool,
            False,
            help=(
                "--mode benchmark: one table of every inference backend (PyTorch fp32/bf16, onnxruntime, OpenVINO "
                "fp32/fp16/int8) instead of the training timing"
            ),
        ),
        "openvino": F(
            list,
            ["fp32", "fp16", "int8"],
            item_type=str,
            help="BENCHMARK.backends: the OpenVINO precisions in the table (int8 calibration takes the longest)",
        ),
    },
    # live: --mode predict on a stream or camera (video/stream.py)
    "STREAM": {
        "plot_interval_s": F(float, 5.0, min=0.5, help="seconds between live plot (and latency log) updates"),
        "plot_frames": F(int, 600, min=10, max=100000, help="scored frames the live plot shows (the latest ones)"),
        "hysteresis": F(float, 0.05, min=0, help="an alarm lasts while score >= threshold - hysteresis (score units)"),
        "min_alarm_frames": F(int, 3, min=1, help="hot frames in a row (score >= threshold) that raise an alarm event"),
        "reconnect_timeout_s": F(
            float, 60.0, nullable=True, min=0, help="give up when no frame came for this long (null: retry forever)"
        ),
        "max_backoff_s": F(float, 8.0, min=0.5, help="longest wait between reconnections (doubling from 0.5 s)"),
        "background_frames": F(
            int, 50, min=1, max=1000, help="first frames that stand for the video where a model needs per-video state"
        ),
        "region_quantile": F(
            float,
            0.99,
            min=0.5,
            max=1,
            max_exclusive=True,
            help="alarm snapshots: regions where the error exceeds this quantile of recent normal frames (the highest)",
        ),
    },
    "SEED": F(
        int,
        0,
        min=0,
        max=2**32 - 1,
        reason=(
            "a 32-bit seed, numpy's range; the per-epoch shuffle seeds SEED x 100003 + epoch must stay within 64 bits"
        ),
    ),
}


# The DATASET keys of each modality (a modality is picked by DATASET.format before validation: main.py).
MODALITY_DATASET_KEYS: dict[str, Schema] = {
    "image": DATASET_SCHEMA_KEYS,
    "video": {
        "format": F(str, "video", choices=("video",), help="video: frame folders or video files"),
        **VIDEO_DATASET_KEYS,
        "calibration_split": F(
            float,
            0.1,
            min=0,
            max=0.5,
            help="the last fraction of each training video's frames, held out from training to calibrate the online "
            "statistics and the alarm threshold (at least 99 frames in all, else the training frames are used)",
        ),
    },
}


def run_schema(
    model_schema: Schema,
    extra_sections: Schema | None = None,
    modality: str = "image",
    dataset_keys: Schema | None = None,
    run_defaults: dict[str, Any] | None = None,
) -> Schema:
    """The whole schema of a run: the shared sections with the modality's DATASET keys, the method's MODEL section,
    its own extra sections and DATASET keys, and its defaults (dotted key -> value) over the shared ones."""
    schema: Schema = {
        key: dict(value) if isinstance(value, dict) else value for key, value in RUN_SECTIONS.items() if key != "SEED"
    }
    schema["DATASET"] = {**schema["DATASET"], **MODALITY_DATASET_KEYS[modality], **(dataset_keys or {})}
    schema["MODEL"] = model_schema
    schema.update(extra_sections or {})
    schema["SEED"] = RUN_SECTIONS["SEED"]
    for key, value in (run_defaults or {}).items():
        section, _, name = key.partition(".")
        field = schema[section][name]
        assert isinstance(field, Field), key
        schema[section][name] = dataclasses.replace(field, default=field.check(key, value))
    return schema


def method_schema(method: Any) -> Schema:
    """The run schema of ``method`` (a ``method.Method``)."""
    return run_schema(
        method.model_schema, method.extra_sections, method.modality, method.dataset_keys, method.run_defaults
    )
