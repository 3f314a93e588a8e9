"""DMAD's MODEL section (TNVision key names where they exist; defaults = the paper's settings) and its one
per-category rule: the weight of the deformation score."""

from __future__ import annotations

from task.common.config import Config, F, Schema

# The official code weights the deformation score 0.2 for the categories whose defects are geometric, else 0.05.
DEFORM_WEIGHT_BY_CATEGORY = {"screw": 0.2, "carpet": 0.2, "metal_nut": 0.2}
DEFAULT_DEFORM_WEIGHT = 0.05

MODEL_SCHEMA: Schema = {
    "backbone": F(
        str, "wide_resnet50_2", choices=("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "wide_resnet101_2")
    ),
    "pretrained": F(bool, True, help="ImageNet weights from torchvision (cached by torch hub)"),
    "backbone_weights": F(str, None, nullable=True, help="local torchvision-format state dict for the encoder"),
    "pdm": F(
        bool, True, help="pyramid deformation module (false: reverse distillation without warps, for the ablation)"
    ),
    "vq": F(bool, True, help="vector-quantised prototype codebook in the bottleneck"),
    "vq_num_embeddings": F(
        int, 200, min=1, max=16384, reason="each step compares every feature with all N prototypes in one dense matrix"
    ),
    "vq_beta": F(float, 0.25, min=0, help="commitment weight"),
    "gamma": F(float, 1.0, min=0, help="weight of the warp-and-unwarp MSE in the PDM loss"),
    "coarse_shift": F(float, 8 / 256, min=0, max=1, help="largest coarse displacement, fraction of the image"),
    "fine_shift": F(float, 3 / 256, min=0, max=1, help="largest fine displacement, fraction of the image"),
    "deform_weight": F(
        float,
        None,
        nullable=True,
        min=0,
        help="weight of the deformation score; null: 0.2 for screw/carpet/metal_nut, else 0.05",
    ),
    "sigma": F(
        float,
        4.0,
        min=0.1,
        max=64,
        reason="a smaller kernel is a no-op below one pixel; a larger one blurs the whole map",
    ),
}


def deform_weight(cfg: Config) -> float:
    """The configured deformation-score weight, or the official per-category default."""
    if cfg.MODEL.deform_weight is not None:
        return cfg.MODEL.deform_weight
    return DEFORM_WEIGHT_BY_CATEGORY.get(cfg.DATASET.target, DEFAULT_DEFORM_WEIGHT)
