"""Reverse-distillation decoder: the encoder's layer1..layer3 run backwards with transposed-conv upsampling.

Input: bottleneck embedding [B, 512e, H/32, W/32]. Output, in the encoder's order:
[[B, 64e, H/4, W/4], [B, 128e, H/8, W/8], [B, 256e, H/16, W/16]].
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .encoder import BackboneSpec, init_resnet_weights


def _upsample_or_conv(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 2:
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


class DecoderBasicBlock(nn.Module):
    """ResNet basic block whose strided conv is a 2x2 transposed conv (doubles H and W)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module | None = None, base_width: int = 64
    ) -> None:
        super().__init__()
        self.conv1 = _upsample_or_conv(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DecoderBottleneck(nn.Module):
    """ResNet bottleneck block whose 3x3 strided conv is a 2x2 transposed conv (doubles H and W)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module | None = None, base_width: int = 64
    ) -> None:
        super().__init__()
        width = int(planes * base_width / 64)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _upsample_or_conv(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ReverseDecoder(nn.Module):
    """Mirrors the encoder: layer1 (512e -> 256e), layer2 (-> 128e), layer3 (-> 64e), each upsampling by 2."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        block = DecoderBasicBlock if spec.expansion == 1 else DecoderBottleneck
        self.inplanes = 512 * block.expansion
        self.layer1 = self._make_layer(block, 256, spec.layers[0], spec.width_per_group)
        self.layer2 = self._make_layer(block, 128, spec.layers[1], spec.width_per_group)
        self.layer3 = self._make_layer(block, 64, spec.layers[2], spec.width_per_group)
        init_resnet_weights(self)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, base_width: int) -> nn.Sequential:
        out = planes * block.expansion
        upsample = nn.Sequential(nn.ConvTranspose2d(self.inplanes, out, 2, stride=2, bias=False), nn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, 2, upsample, base_width)]
        layers += [block(out, planes, base_width=base_width) for _ in range(1, blocks)]
        self.inplanes = out
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: [B, 512e, H/32, W/32] -> [H/4, H/8, H/16 features], matching the encoder's order."""
        f3 = self.layer1(x)
        f2 = self.layer2(f3)
        f1 = self.layer3(f2)
        return [f1, f2, f3]
