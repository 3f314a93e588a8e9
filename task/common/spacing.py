"""Evenly spaced picks from a sequence (check images, calibration images, pictures, GIF frames)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def spread(items: Sequence[T], count: int) -> list[T]:
    """``count`` entries of ``items`` evenly spaced over it, first and last included when ``count >= 2``; all of them
    when there are fewer; none when ``count <= 0``."""
    if count <= 0 or not items:
        return []
    return [items[round(j)] for j in np.linspace(0, len(items) - 1, min(count, len(items)))]
