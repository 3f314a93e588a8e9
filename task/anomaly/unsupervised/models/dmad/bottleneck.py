"""One-class bottleneck with a vector-quantised prototype codebook on the deepest scale.

Input: encoder features [f1 (64e, H/4), f2 (128e, H/8), f3 (256e, H/16)] where e is the block expansion
(1 for resnet18/34, 4 for the Bottleneck ResNets). Output: one [B, 512e, H/32, W/32] embedding for the decoder.

With ``vq`` (the paper's DMAD): every scale is reduced to 16e channels and brought to H/16, and the codebook's
nearest prototypes for f3 (256e channels) are concatenated: 48e + 256e channels -> residual blocks, stride 2.
Without ``vq``: the reverse-distillation OCBE (f1, f2 brought to 256e channels each, concatenated with f3).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from task.common.vector_quantize import nearest_codes

from .encoder import BackboneSpec, init_resnet_weights


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class VectorQuantizer(nn.Module):
    """Nearest-prototype quantisation with the straight-through estimator.

    x: [B, D, H, W] -> (quantised [B, D, H, W], loss) with loss = ||sg[x] - q||^2 + beta * ||x - sg[q]||^2 (means).
    The forward value is the prototype; the gradient w.r.t. x is the identity.
    """

    def __init__(self, num_embeddings: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.codebook.weight, -1 / num_embeddings, 1 / num_embeddings)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        latents = x.permute(0, 2, 3, 1)
        quantized, _ = nearest_codes(latents, self.codebook.weight)
        codebook_loss = F.mse_loss(quantized, latents.detach())
        commitment_loss = F.mse_loss(quantized.detach(), latents)
        quantized = latents + (quantized - latents).detach()
        return quantized.permute(0, 3, 1, 2).contiguous(), codebook_loss + self.beta * commitment_loss


class Bottleneck(nn.Module):
    """Fuses the three encoder scales into the decoder's input; see the module docstring for shapes."""

    def __init__(self, spec: BackboneSpec, vq: bool = True, num_embeddings: int = 200, beta: float = 0.25) -> None:
        super().__init__()
        e = spec.expansion
        c1, c2, c3 = spec.channels
        self.vq = vq
        if vq:
            reduced = 16 * e
            self.reduce = nn.ModuleList([conv_bn_relu(c, reduced) for c in (c1, c2, c3)])
            self.down1 = nn.Sequential(conv_bn_relu(reduced, reduced, 2), conv_bn_relu(reduced, reduced, 2))
            self.down2 = conv_bn_relu(reduced, reduced, 2)
            self.quantizer = VectorQuantizer(num_embeddings, c3, beta)
            fused = 3 * reduced + c3
        else:
            self.down1 = nn.Sequential(conv_bn_relu(c1, c2, 2), conv_bn_relu(c2, c3, 2))
            self.down2 = conv_bn_relu(c2, c3, 2)
            fused = 3 * c3
        block, planes, out = spec.block, 512, 512 * e
        downsample = nn.Sequential(nn.Conv2d(fused, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
        blocks = [block(fused, planes, 2, downsample, base_width=spec.width_per_group)]
        blocks += [block(out, planes, base_width=spec.width_per_group) for _ in range(spec.layers[3] - 1)]
        self.fuse = nn.Sequential(*blocks)
        init_resnet_weights(self)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """features: [f1, f2, f3] -> (embedding [B, 512e, H/32, W/32], VQ loss (0 without vq))."""
        f1, f2, f3 = features
        if self.vq:
            quantized, vq_loss = self.quantizer(f3)
            f1, f2, f3 = (reduce(f) for reduce, f in zip(self.reduce, (f1, f2, f3)))
            fused = torch.cat([self.down1(f1), self.down2(f2), f3, quantized], dim=1)
        else:
            vq_loss = f3.new_zeros(())
            fused = torch.cat([self.down1(f1), self.down2(f2), f3], dim=1)
        return self.fuse(fused), vq_loss
