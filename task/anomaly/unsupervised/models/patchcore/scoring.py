"""From nearest-neighbour distances to the outputs: the anomaly map and the paper's re-weighted image score."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from task.common.smoothing import gaussian_blur2d

from .neighbours import k_nearest


def anomaly_map(patch_scores: Tensor, size: tuple[int, int], sigma: float) -> Tensor:
    """[B, 1, h, w] patch distances -> [B, 1, H, W]: bilinear upsampling to the input size, then a Gaussian blur
    (``scipy.ndimage.gaussian_filter`` semantics), as the paper's code does."""
    upsampled = F.interpolate(patch_scores, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur2d(upsampled, sigma)


def reweighted_score(distances: Tensor, indices: Tensor, patches: Tensor, bank: Tensor, num_neighbors: int) -> Tensor:
    """The paper's image score (Eq. 7): s = (1 - exp|m_test - m*| / sum_{m in N_b(m*)} exp|m_test - m|) * s*.

    distances [B, P]: each patch's distance to its nearest bank feature; indices [B, P]: that feature's row;
    patches [B, P, D]: the patch features; bank [M, D]. m_test is the patch with the largest distance s*, m* its
    nearest bank feature, N_b(m*) the b = ``num_neighbors`` (at most M) bank features nearest to m* (m* itself first).
    ``num_neighbors`` 1 gives s* unweighted (a softmax over m* alone would zero every score). Returns [B].
    """
    worst = distances.argmax(dim=1, keepdim=True)  # [B, 1]: m_test
    s_star = distances.gather(1, worst).squeeze(1)  # [B]
    b = num_neighbors
    if b == 1:
        return s_star
    m_test = patches.gather(1, worst.unsqueeze(2).expand(-1, -1, patches.shape[2])).squeeze(1)  # [B, D]
    m_star = bank.index_select(0, indices.gather(1, worst).squeeze(1))  # [B, D]
    support = bank[k_nearest(m_star, bank, b)]  # [B, b, D]; support[:, 0] is m* itself
    to_support = (support - m_test.unsqueeze(1)).pow(2).sum(2).sqrt()  # [B, b]
    weight = 1 - torch.softmax(to_support, dim=1)[:, 0]
    return weight * s_star
