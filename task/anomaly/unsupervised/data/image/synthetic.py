"""A small deterministic synthetic dataset in the MVTec AD layout (for the demo and tests).

Each image is a "product": a woven-looking textured background with smooth
low-frequency colour noise and a centred disk-shaped object with a rim and a
darker core, with slight jitter of position/brightness/texture phase. Two defect
types are painted with exact binary masks:

* ``scratch``: a thick bright line across the object (~3-5 % of the image);
* ``spot``: an irregular dark blob on the object (~3-7 % of the image).

Everything is drawn from a seeded ``numpy.random.RandomState`` and PIL drawing
primitives, so the same arguments give byte-identical PNG files on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from task.common.errors import UserError
from task.common.io import build_folder_atomically

__all__ = ["make_demo_dataset", "DEFECTS"]

DEFECTS = ("scratch", "spot")
MARKER = ".complete"

_BG = np.array([196.0, 178.0, 142.0])  # beige fabric
_OBJ = np.array([70.0, 96.0, 132.0])  # steel-blue disk
_CORE = np.array([48.0, 66.0, 96.0])
_SCRATCH = np.array([250.0, 236.0, 80.0])  # bright yellow
_SPOT = np.array([92.0, 26.0, 18.0])  # dark rust


def _smooth_noise(rng: np.random.RandomState, size: int, grid: int, amp: float) -> np.ndarray:
    """Low-frequency colour noise: a coarse random grid bilinearly upsampled, HxWx3 float."""
    coarse = rng.uniform(-amp, amp, size=(grid, grid, 3))
    out = np.empty((size, size, 3), dtype=np.float64)
    for c in range(3):
        ch = Image.fromarray(np.ascontiguousarray(coarse[:, :, c], dtype=np.float32))
        out[:, :, c] = np.asarray(ch.resize((size, size), Image.BILINEAR), dtype=np.float64)
    return out


def _normal_image(rng: np.random.RandomState, size: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One defect-free product image (float HxWx3, 0..255) and its object (cx, cy, r)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = max(4.0, size / 16.0)
    px, py = rng.uniform(0, 2 * np.pi, size=2) * 0.15  # small phase jitter
    weave = np.sin(2 * np.pi * xx / period + px) * np.sin(2 * np.pi * yy / period + py)
    stripes = np.sin(2 * np.pi * (xx + yy) / (period * 2.0))
    tex = 10.0 * weave + 4.0 * stripes
    img = _BG[None, None, :] + tex[:, :, None] + _smooth_noise(rng, size, 5, 10.0)

    cx = size / 2 + rng.uniform(-1.5, 1.5) * size / 128
    cy = size / 2 + rng.uniform(-1.5, 1.5) * size / 128
    r = size * (0.30 + rng.uniform(-0.005, 0.005))
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    inside = d <= r
    core = d <= r * 0.45
    rim = inside & (d >= r * 0.88)
    shade = 1.0 - 0.25 * (d / r)  # radial shading of the object
    obj = _OBJ[None, None, :] * shade[:, :, None] + 3.0 * weave[:, :, None]
    img[inside] = obj[inside]
    img[rim] = img[rim] * 0.8 + 30.0
    img[core] = (_CORE[None, None, :] * shade[:, :, None])[core]

    img = img * rng.uniform(0.96, 1.04) + rng.uniform(-4.0, 4.0)  # global brightness/offset
    img = img + rng.normal(0.0, 1.5, size=img.shape)  # sensor noise
    return img, (cx, cy, r)


def _scratch_mask(rng: np.random.RandomState, size: int, obj: tuple[float, float, float]) -> np.ndarray:
    cx, cy, r = obj
    ang = rng.uniform(0, np.pi)
    half = r * rng.uniform(0.95, 1.15)
    ox, oy = rng.uniform(-0.25, 0.25, size=2) * r
    x0, y0 = cx + ox - half * np.cos(ang), cy + oy - half * np.sin(ang)
    x1, y1 = cx + ox + half * np.cos(ang), cy + oy + half * np.sin(ang)
    width = max(3, int(round(size * rng.uniform(0.05, 0.065))))
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).line([(x0, y0), (x1, y1)], fill=255, width=width)
    return np.asarray(m) > 0


def _spot_mask(rng: np.random.RandomState, size: int, obj: tuple[float, float, float]) -> np.ndarray:
    cx, cy, r = obj
    ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.5) * r
    bx, by = cx + dist * np.cos(ang), cy + dist * np.sin(ang)
    base = size * rng.uniform(0.09, 0.12)
    m = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(m)
    for _ in range(4):  # union of overlapping ellipses = irregular blob
        ex, ey = bx + rng.uniform(-0.5, 0.5) * base, by + rng.uniform(-0.5, 0.5) * base
        rx, ry = base * rng.uniform(0.6, 1.0), base * rng.uniform(0.6, 1.0)
        draw.ellipse([ex - rx, ey - ry, ex + rx, ey + ry], fill=255)
    return np.asarray(m) > 0


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    out = img.copy()
    tint = colour[None, :] * rng.uniform(0.92, 1.05) + rng.normal(0.0, 4.0, size=(int(mask.sum()), 3))
    out[mask] = tint
    return out


def _save(arr: np.ndarray, path: Path, grayscale: bool) -> None:
    im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if grayscale:
        im = im.convert("L")
    im.save(path, format="PNG")


def _params(**kw) -> dict:
    return {k: kw[k] for k in sorted(kw)}


def make_demo_dataset(
    root: str | Path,
    category: str = "demo",
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect: int = 20,
    size: int = 128,
    seed: int = 0,
    grayscale: bool = False,
) -> Path:
    """Write (once) a small synthetic MVTec-style dataset and return ``<root>/<category>``.

    ``n_test_defect`` is the total number of defective test images, split evenly
    over the defect types (``scratch`` gets the remainder). If ``<root>/<category>/.complete``
    exists the dataset is returned as is, without rewriting. The data is written to a
    temporary sibling folder and moved into place with the marker already inside it,
    so an interrupted run never leaves a half-written dataset behind.
    """
    root = Path(root).expanduser()
    if not category or any(c in category for c in ("/", "\\")) or ".." in category:
        raise UserError(f"invalid demo category {category!r}; use a plain folder name such as 'demo'")
    for name, v, lo in (("n_train", n_train, 1), ("n_test_good", n_test_good, 1), ("n_test_defect", n_test_defect, 1)):
        if int(v) < lo:
            raise UserError(f"{name} must be >= {lo}, got {v}; pass a positive number of images")
    if int(size) < 32:
        raise UserError(f"demo image size must be >= 32, got {size}; pass e.g. size=128")
    size = int(size)
    target = root / category
    if (target / MARKER).is_file():
        return target
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # an empty placeholder folder: fill it
    if target.exists():
        raise UserError(
            f"{target} exists but is not a complete demo dataset (no {MARKER} marker); delete it or use another folder"
        )
    def build(tmp: Path) -> str:
        _write(tmp, int(n_train), int(n_test_good), int(n_test_defect), size, int(seed), bool(grayscale))
        meta = _params(
            category=category, n_train=int(n_train), n_test_good=int(n_test_good),
            n_test_defect=int(n_test_defect), size=size, seed=int(seed), grayscale=bool(grayscale),
        )
        return json.dumps(meta, sort_keys=True) + "\n"

    return build_folder_atomically(target, MARKER, build)


def _write(out: Path, n_train: int, n_test_good: int, n_test_defect: int, size: int, seed: int, gray: bool) -> None:
    # Independent streams per part so that e.g. changing n_train does not change the test set.
    rng_train = np.random.RandomState([seed, 1])
    rng_good = np.random.RandomState([seed, 2])
    rng_def = np.random.RandomState([seed, 3])

    d = out / "train" / "good"
    d.mkdir(parents=True)
    for i in range(n_train):
        img, _ = _normal_image(rng_train, size)
        _save(img, d / f"{i:03d}.png", gray)

    d = out / "test" / "good"
    d.mkdir(parents=True)
    for i in range(n_test_good):
        img, _ = _normal_image(rng_good, size)
        _save(img, d / f"{i:03d}.png", gray)

    counts = [n_test_defect // len(DEFECTS)] * len(DEFECTS)
    counts[0] += n_test_defect - sum(counts)
    for defect, n in zip(DEFECTS, counts):
        d = out / "test" / defect
        g = out / "ground_truth" / defect
        d.mkdir(parents=True)
        g.mkdir(parents=True)
        for i in range(n):
            img, obj = _normal_image(rng_def, size)
            if defect == "scratch":
                mask = _scratch_mask(rng_def, size, obj)
                img = _paint(img, mask, _SCRATCH, rng_def)
            else:
                mask = _spot_mask(rng_def, size, obj)
                img = _paint(img, mask, _SPOT, rng_def)
            _save(img, d / f"{i:03d}.png", gray)
            Image.fromarray(mask.astype(np.uint8) * 255).save(g / f"{i:03d}_mask.png", format="PNG")
