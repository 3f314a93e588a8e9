"""Frozen timm CNN: image [B, 3, H, W] -> the feature maps of the configured stages (e.g. layer2, layer3).

Any timm model with ``features_only`` support serves (``MODEL.backbone`` is a timm name, optionally with a pretrained
tag such as ``wide_resnet50_2.tv_in1k``); ``MODEL.layers`` are its stage module names. Stages after the deepest one
requested are not built.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from task.common.errors import UserError
from task.common.io import load_tensor_dict


def import_timm() -> ModuleType:
    """timm, imported on first use: other methods' runs do not pay its import time (about 1.5 s)."""
    try:
        import timm
    except ImportError:
        raise UserError("PatchCore needs the timm package; install it with: pip install -r requirements.txt") from None
    return timm


def check_backbone(name: str, layers: list[str]) -> None:
    """One-line UserError for an unknown timm model or a stage it lacks (checked before any weights are fetched)."""
    stage_names(name, layers)


def stage_names(name: str, layers: list[str]) -> tuple[list[int], list[str]]:
    """(timm ``out_indices`` of ``layers``, every stage name of ``name``), read from a weightless meta-device model."""
    timm = import_timm()
    if not timm.is_model(name):
        raise UserError(
            f"MODEL.backbone {name!r} is not a timm model; use a name from timm.list_models(), e.g. wide_resnet50_2"
        )
    try:
        with torch.device("meta"):  # no memory, no initialisation cost: only the stage names are read
            probe = timm.create_model(name, pretrained=False, features_only=True)
    except Exception as exc:  # noqa: BLE001  (timm raises several types for models without a feature-map interface)
        raise UserError(
            f"MODEL.backbone {name!r} has no timm features_only interface ({type(exc).__name__}); "
            "choose a CNN such as wide_resnet50_2"
        ) from None
    names = list(probe.feature_info.module_name())
    unknown = [layer for layer in layers if layer not in names]
    if unknown or not layers:
        raise UserError(
            f"MODEL.layers {layers} are not stages of {name} (its stages: {', '.join(names)}); "
            "e.g. MODEL.layers=[layer2,layer3]"
        )
    indices = [names.index(layer) for layer in layers]
    if indices != sorted(set(indices)):
        raise UserError(
            f"MODEL.layers {layers} must be distinct and ordered from shallow to deep "
            f"(stages of {name}: {', '.join(names)})"
        )
    return indices, names


def read_weights_file(path: str) -> dict[str, Tensor]:
    """A local state dict: ``.safetensors`` (timm's hub format) or a torch file read with ``weights_only=True``."""
    if path.endswith(".safetensors"):
        if not Path(path).is_file():
            raise UserError(
                f"MODEL.backbone_weights not found: {path}; give the path of the backbone's state dict file"
            )
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001  (a damaged or foreign file: one message for all of them)
            raise UserError(
                f"MODEL.backbone_weights {path} is not a readable safetensors file ({type(exc).__name__}); "
                "pass another file"
            ) from None
    return load_tensor_dict(path, what="MODEL.backbone_weights")


def load_backbone_weights(net: nn.Module, state: dict[str, Tensor], name: str, source: str) -> None:
    """Fill ``net`` (a features_only model) from a full-model state dict; stages past the last used one may be absent
    or present (they are ignored), every tensor ``net`` has must be there with its shape."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch at {wrong[:3]}"
        raise UserError(
            f"{source} is not a state dict of timm {name} ({detail}); check MODEL.backbone and MODEL.backbone_weights"
        )
    net.load_state_dict({k: state[k] for k in own})


class FeatureExtractor(nn.Module):
    """A frozen timm CNN truncated after the deepest requested stage, always in eval mode (frozen BatchNorm).

    forward: images [B, 3, H, W] (ImageNet-normalised) -> one feature map [B, C_i, H / r_i, W / r_i] per layer, in
    the order of ``layers`` (``channels`` and ``reductions`` give C_i and r_i).
    """

    def __init__(self, name: str, layers: list[str], pretrained: bool = True, weights_path: str | None = None) -> None:
        super().__init__()
        indices, _ = stage_names(name, layers)
        fetch = pretrained and not weights_path
        try:
            self.net = import_timm().create_model(name, pretrained=fetch, features_only=True, out_indices=indices)
        except Exception as exc:  # hub, network, proxy or cache errors all end the same way for the user
            if not fetch:
                raise
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise UserError(
                f"could not fetch timm ImageNet weights for {name} ({type(exc).__name__}: {first}); "
                "set MODEL.backbone_weights to a local state dict file (.pth or .safetensors), "
                "or MODEL.pretrained=false for a random-init backbone"
            ) from None
        if weights_path:
            load_backbone_weights(self.net, read_weights_file(weights_path), name, source=weights_path)
        self.layers = list(layers)
        self.channels: list[int] = list(self.net.feature_info.channels())
        self.reductions: list[int] = list(self.net.feature_info.reduction())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen BatchNorm statistics: the backbone is never put in training mode.
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.net(images))
