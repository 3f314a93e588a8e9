"""DMAD configuration schema (TNVision section and key names where they exist). Defaults = the paper's settings."""

from __future__ import annotations

from task.common.config import F, Schema

GEOMETRIC_CATEGORIES = ("screw", "carpet", "metal_nut")

SCHEMA: Schema = {
    "DATASET": {
        "datadir": F(str, "data/mvtec", help="root of the MVTec-layout dataset"),
        "target": F(str, "bottle", help="category folder under datadir"),
        "resize": F(list, [256, 256], length=2, item_type=int, min=64, multiple_of=32, help="[H, W], multiples of 32"),
        "cache": F(bool, True, help="decode and resize each image once and keep it in memory"),
        "skip_bad_images": F(bool, False, help="skip unreadable images with a warning instead of stopping"),
        "demo": F(bool, False, help="generate the built-in synthetic dataset under datadir if absent"),
    },
    "DATALOADER": {
        "batch_size": F(int, 8, min=1),
        "num_workers": F(int, 0, min=0),
        "pin_memory": F(bool, False),
    },
    "MODEL": {
        "backbone": F(str, "wide_resnet50_2", choices=("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "wide_resnet101_2")),
        "pretrained": F(bool, True, help="ImageNet weights from torchvision (cached by torch hub)"),
        "backbone_weights": F(str, None, nullable=True, help="local torchvision-format state dict for the encoder"),
        "vq": F(bool, True, help="vector-quantised prototype codebook in the bottleneck"),
        "vq_num_embeddings": F(int, 200, min=1),
        "vq_beta": F(float, 0.25, min=0, help="commitment weight"),
        "gamma": F(float, 1.0, min=0, help="weight of the warp-and-unwarp MSE in the PDM loss"),
        "coarse_shift": F(float, 8 / 256, min=0, help="largest coarse displacement, fraction of the image"),
        "fine_shift": F(float, 3 / 256, min=0, help="largest fine displacement, fraction of the image"),
        "deform_weight": F(float, None, nullable=True, min=0, help="weight of the deformation score; null: 0.2 for screw/carpet/metal_nut, else 0.05"),
        "sigma": F(float, 4.0, min=0, min_exclusive=True, help="Gaussian smoothing of the maps"),
    },
    "TRAIN": {
        "epochs": F(int, 400, min=1),
        "num_training_steps": F(int, None, nullable=True, min=1, help="cap on optimiser steps (null: epochs x steps per epoch)"),
        "save_interval": F(int, 200, min=1, help="steps between resumable checkpoints"),
        "amp": F(str, "none", choices=("none", "bf16", "fp16"), help="autocast dtype for training and evaluation (fp16: CUDA only); maps and scores stay float32"),
        "channels_last": F(bool, False, help="NHWC memory layout for the model and inputs (implied by amp=bf16 on CPU)"),
        "compile": F(bool, False, help="torch.compile the model's forward (first steps compile; falls back to eager on failure)"),
    },
    "TEST": {
        "batch_size": F(int, 8, min=1),
        "save_maps": F(bool, False, help="write maps/<defect>/<name>.npz per test image"),
        "save_images": F(bool, True, help="write images/<defect>/<name>.png per test image and the result GIF"),
    },
    "OPTIMIZER": {
        "name": F(str, "adamw", choices=("adamw", "adam")),
        "lr": F(float, 0.005, min=0, min_exclusive=True),
        "betas": F(list, [0.5, 0.999], length=2, item_type=float, min=0, max=1, max_exclusive=True),
        "weight_decay": F(float, 0.01, min=0),
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
    },
    "EXPORT": {
        "input": F(str, "raw", choices=("raw", "imagenet"), help="ONNX input: raw RGB in [0, 1] (normalised inside the graph) or ImageNet-normalised"),
        "opset": F(int, 17, min=16, help="ONNX opset, at least 16 (GridSample)"),
    },
    "RESULT": {
        "savedir": F(str, "runs"),
        "exp_name": F(str, None, nullable=True, help="sub-folder of the run directory"),
        "assets_dir": F(str, "assets", nullable=True, help="folder (relative to the working directory) that receives <category>.gif; null: only the run directory's copy"),
    },
    "RESUME": {
        "option": F(bool, True, help="resume from the run directory's last.pt when it exists"),
        "checkpoint": F(str, None, nullable=True, help="explicit last.pt to resume from"),
    },
    "BENCHMARK": {
        "train_steps": F(int, 5, min=1, help="--mode benchmark: timed training steps"),
        "warmup": F(int, 1, min=0, help="--mode benchmark: untimed training steps before them"),
        "eval_images": F(int, 16, nullable=True, min=1, help="--mode benchmark: test images to evaluate (null: the whole test set)"),
    },
    "SEED": F(int, 0, min=0),
}


def deform_weight(cfg) -> float:
    """The configured deformation-score weight, or the official per-category default."""
    if cfg.MODEL.deform_weight is not None:
        return cfg.MODEL.deform_weight
    return 0.2 if cfg.DATASET.target in GEOMETRIC_CATEGORIES else 0.05
