"""PatchCore's MODEL section (defaults = the paper's settings) and its defaults for the shared run sections."""

from __future__ import annotations

from typing import Any

from task.common.config import F, Schema

MODEL_SCHEMA: Schema = {
    "backbone": F(
        str, "wide_resnet50_2", help="any timm CNN with features_only support, e.g. wide_resnet50_2, resnet18"
    ),
    "layers": F(list, ["layer2", "layer3"], item_type=str, help="feature stages, shallow to deep (timm module names)"),
    "pretrained": F(bool, True, help="ImageNet weights from timm (fetched once, cached by the Hugging Face hub)"),
    "backbone_weights": F(
        str, None, nullable=True, help="local state dict file for the backbone (timm/torchvision keys)"
    ),
    "embedding_dim": F(
        int,
        None,
        nullable=True,
        min=1,
        max=8192,
        help="adaptive average pooling of each patch feature to this many channels (the paper's code: 1024); "
        "null keeps all",
        reason="memory and search cost grow with the dimension",
    ),
    "coreset_ratio": F(
        float,
        0.1,
        min=0,
        min_exclusive=True,
        max=1,
        help="fraction of the training patch features kept by greedy k-center selection (1: keep all, no selection)",
    ),
    "num_neighbors": F(
        int,
        9,
        min=1,
        max=1024,
        help="b: nearest memory-bank neighbours of m* in the re-weighted image score (1: no re-weighting)",
    ),
    "sigma": F(
        float,
        4.0,
        min=0.1,
        max=64,
        reason="a smaller kernel is a no-op below one pixel; a larger one blurs the whole map",
    ),
}

# The shared sections' defaults that differ for PatchCore (OPTIMIZER, SCHEDULER and TRAIN.epochs do not apply: it
# learns by one gradient-free pass).
RUN_DEFAULTS: dict[str, Any] = {
    "LOG.wandb_project": "patchcore",
    "RESULT.assets_dir": "assets/patchcore",  # its <target>.gif must not replace DMAD's in assets/
}
