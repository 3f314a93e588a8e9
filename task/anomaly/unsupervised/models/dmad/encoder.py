"""Frozen ImageNet ResNet encoder: image [B, 3, H, W] -> layer1..layer3 features at strides 4, 8, 16."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn as nn
from torch import Tensor
from torchvision import models

from task.common.errors import UserError
from task.common.io import load_tensor_dict


@dataclass(frozen=True)
class BackboneSpec:
    """What the bottleneck and decoder need to mirror a backbone."""

    builder: Callable[..., models.ResNet]
    weights: models.WeightsEnum
    block: type[nn.Module]  # torchvision BasicBlock or Bottleneck
    layers: tuple[int, int, int, int]
    width_per_group: int

    @property
    def expansion(self) -> int:
        return self.block.expansion

    @property
    def channels(self) -> tuple[int, int, int]:
        """Channels of layer1, layer2, layer3."""
        e = self.expansion
        return 64 * e, 128 * e, 256 * e


# IMAGENET1K_V1 are the weights the official DMAD code downloads (e.g. wide_resnet50_2-95faca4d.pth).
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, models.resnet.BasicBlock, (2, 2, 2, 2), 64
    ),
    "resnet34": BackboneSpec(
        models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1, models.resnet.BasicBlock, (3, 4, 6, 3), 64
    ),
    "resnet50": BackboneSpec(
        models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, models.resnet.Bottleneck, (3, 4, 6, 3), 64
    ),
    "wide_resnet50_2": BackboneSpec(
        models.wide_resnet50_2,
        models.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
        models.resnet.Bottleneck,
        (3, 4, 6, 3),
        128,
    ),
    "wide_resnet101_2": BackboneSpec(
        models.wide_resnet101_2,
        models.Wide_ResNet101_2_Weights.IMAGENET1K_V1,
        models.resnet.Bottleneck,
        (3, 4, 23, 3),
        128,
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UserError(f"unknown MODEL.backbone '{name}'; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _pretrained_state_dict(name: str, spec: BackboneSpec) -> dict[str, Tensor]:
    try:
        return spec.weights.get_state_dict(progress=True)
    except Exception as exc:  # network, proxy, hash or disk errors all end the same way for the user
        raise UserError(
            f"could not fetch ImageNet weights for {name} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); "
            "set MODEL.backbone_weights to a local torchvision state dict (.pth), or MODEL.pretrained=false for a "
            "random-init encoder"
        ) from None


class ResNetEncoder(nn.Module):
    """A torchvision ResNet truncated after layer3, frozen and always in eval mode.

    Parameters take no gradients, but gradients still flow through the encoder to its input, which is how the
    deformation module learns.
    """

    def __init__(self, name: str, pretrained: bool = True, weights_path: str | None = None) -> None:
        super().__init__()
        spec = backbone_spec(name)
        net = spec.builder(weights=None)
        if weights_path:
            state = load_tensor_dict(weights_path, what="MODEL.backbone_weights")
            load_backbone_state(net, state, name, source=weights_path)
        elif pretrained:
            load_backbone_state(net, _pretrained_state_dict(name, spec), name, source="torchvision")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ResNetEncoder":
        # Frozen BatchNorm statistics: the encoder is never put in training mode.
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> [layer1 [B, 64e, H/4, W/4], layer2 [B, 128e, H/8, W/8], layer3 [B, 256e, H/16, W/16]]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


def init_resnet_weights(root: nn.Module) -> None:
    """torchvision's ResNet initialisation (Kaiming-normal convs, unit BatchNorm), as the official DMAD layers use.

    Transposed convolutions are not ``nn.Conv2d`` and keep PyTorch's default initialisation, as upstream.
    """
    for module in root.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def load_backbone_state(net: nn.Module, state: dict[str, Tensor], name: str, source: str) -> None:
    """Load a torchvision-format state dict; layer4/fc may be absent (they are unused)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    needed = [k for k in own if not k.startswith(("layer4.", "fc."))]
    missing = [k for k in needed if k not in state]
    wrong = [k for k in needed if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch at {wrong[:3]}"
        raise UserError(
            f"{source} is not a torchvision {name} state dict ({detail}); check MODEL.backbone and "
            "MODEL.backbone_weights"
        )
    net.load_state_dict({k: state[k] for k in needed}, strict=False)


def resolve_weights_path(path: str | None) -> str | None:
    if path and not Path(path).is_file():
        raise UserError(
            f"MODEL.backbone_weights file not found: {path}; give the path of a torchvision .pth state dict"
        )
    return path
