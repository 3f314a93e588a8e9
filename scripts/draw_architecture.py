"""Draw the architecture of both halves of DMAD as PNGs for the README (Pillow only: boxes, arrows, text).

    python scripts/draw_architecture.py [--out assets]

writes ``dmad_ppdm.png`` (images: ``DMADModel``) and ``dmad_pdm.png`` (video: ``VideoDMADModel`` and the frame
scoring protocol). Every block named after code goes through ``Figure.code``, which checks with ``ast`` (no torch
import) that the class, function or field still exists, so renaming a module breaks this script instead of
silently dating the figure. Layout is checked too: blocks and labels may not overlap or leave the canvas.
"""

from __future__ import annotations

import argparse
import ast
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
UNSUPERVISED = REPO / "task" / "anomaly" / "unsupervised"
IMAGE_MODEL = UNSUPERVISED / "models" / "dmad"
VIDEO_MODEL = UNSUPERVISED / "models" / "dmad_video"
FRAME_SCORING = UNSUPERVISED / "scoring"
INFERENCE = UNSUPERVISED / "records.py"
SMOOTHING = REPO / "task" / "common" / "smoothing.py"
WARPING = REPO / "task" / "common" / "warping.py"

PPDM_SIZE = (1400, 850)
PDM_SIZE = (1400, 975)
SCALE = 2  # drawn at twice the size and downsampled: Pillow draws lines and shapes without anti-aliasing

TITLE, SUBTITLE, BLOCK_TITLE, BODY, LABEL = 24, 14, 16, 13, 12
MIN_FONT = 9
INK, ARROW, MUTED = (30, 30, 30), (60, 60, 60), (95, 95, 95)


@dataclass(frozen=True)
class Style:
    fill: tuple[int, int, int]
    edge: tuple[int, int, int]
    legend: str


# One colour per kind of block, shared by both figures.
KINDS = {
    "data": Style((221, 235, 250), (47, 109, 181), "data (tensor)"),
    "frozen": Style((228, 228, 228), (110, 110, 110), "frozen"),
    "trainable": Style((220, 242, 218), (46, 139, 58), "trainable"),
    "loss": Style((251, 224, 220), (192, 57, 43), "loss / score"),
    "op": Style((255, 255, 255), (70, 70, 70), "parameter-free op"),
}


@functools.lru_cache(maxsize=None)
def font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans if the system has it, else Pillow's bundled font (sized from Pillow 10.1, fixed before)."""
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


@functools.lru_cache(maxsize=None)
def _names_in_file(path: Path) -> frozenset[str]:
    """Top-level classes and functions, plus ``Class.method`` and ``Class.field`` (annotated attributes)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.add(f"{node.name}.{item.name}")
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(f"{node.name}.{item.target.id}")
    return frozenset(names)


def defined_names(source: Path) -> frozenset[str]:
    """Names defined in a module, or in any module of a package directory."""
    files = sorted(source.glob("*.py")) if source.is_dir() else [source]
    return frozenset().union(*(_names_in_file(f) for f in files))


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    def overlaps(self, other: Rect) -> bool:
        return self.x < other.right and other.x < self.right and self.y < other.bottom and other.y < self.bottom


Line = tuple[str, int, bool]  # text, font size, bold


class Figure:
    """A white canvas in logical pixels; ``save`` writes it at that size."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.width, self.height = size
        self.image = Image.new("RGB", (self.width * SCALE, self.height * SCALE), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.occupied: list[tuple[Rect, str]] = []  # blocks, texts and labels: none may overlap another
        self.texts: list[tuple[Rect, str, int | None]] = []  # texts and labels, with the arrow that owns a label
        self.lines: list[tuple[Rect, int]] = []  # arrow segments (zero-width rects), with their arrow's number
        self.arrows = 0
        self.code_names: list[str] = []

    # -- names and layout checks -------------------------------------------------------------------------------

    def code(self, source: Path, name: str) -> str:
        """``name`` after checking that ``source`` (a module or package directory) defines it."""
        if name not in defined_names(source):
            raise LookupError(
                f"{name} is not defined in {source.relative_to(REPO)}; update scripts/draw_architecture.py"
            )
        self.code_names.append(name)
        return name

    def _claim(self, rect: Rect, what: str, text: bool = False, owner: int | None = None) -> None:
        if rect.x < 0 or rect.y < 0 or rect.right > self.width or rect.bottom > self.height:
            raise ValueError(f"{what} lies outside the {self.width}x{self.height} canvas")
        for other, name in self.occupied:
            if rect.overlaps(other):
                raise ValueError(f"{what} overlaps {name}")
        self.occupied.append((rect, what))
        if text:
            self.texts.append((rect, what, owner))

    def check_lines(self) -> None:
        """Arrows may not run through blocks, nor through any text but their own label."""
        for line, arrow in self.lines:
            for rect, what in self.occupied:
                if line.overlaps(rect) and not any(r is rect and owner == arrow for r, _, owner in self.texts):
                    raise ValueError(f"an arrow runs through {what}")

    # -- text ----------------------------------------------------------------------------------------------------

    def _fitted(self, text: str, size: int, bold: bool, max_width: float) -> ImageFont.ImageFont:
        """The largest font up to ``size`` in which ``text`` fits ``max_width`` (shrinking beats overflowing)."""
        while size > MIN_FONT and self.draw.textlength(text, font=font(size * SCALE, bold)) > max_width * SCALE:
            size -= 1
        return font(size * SCALE, bold)

    def _line_height(self, f: ImageFont.ImageFont) -> float:
        return self.draw.textbbox((0, 0), "Ag", font=f)[3] / SCALE

    def _text_block(
        self, lines: Sequence[Line], max_width: float
    ) -> list[tuple[str, ImageFont.ImageFont, float, float]]:
        """(text, font, width, height) per line, each fitted to ``max_width``."""
        out = []
        for text, size, bold in lines:
            f = self._fitted(text, size, bold, max_width)
            out.append((text, f, self.draw.textlength(text, font=f) / SCALE, self._line_height(f)))
        return out

    def _draw_block(
        self, block: list[tuple[str, ImageFont.ImageFont, float, float]], cx: float, top: float, color=INK
    ) -> None:
        y = top
        for text, f, w, h in block:
            self.draw.text(((cx - w / 2) * SCALE, y * SCALE), text, font=f, fill=color)
            y += h + 4

    @staticmethod
    def _block_height(block: list[tuple[str, ImageFont.ImageFont, float, float]]) -> float:
        return sum(h for *_, h in block) + 4 * (len(block) - 1)

    def text(self, x: float, y: float, text: str, size: int = BODY, bold: bool = False, color=INK) -> None:
        """Left-aligned text with its top at ``y`` (titles and notes; claims its area)."""
        f = font(size * SCALE, bold)
        w, h = self.draw.textlength(text, font=f) / SCALE, self._line_height(f)
        self._claim(Rect(x, y, w, h), f"text {text[:30]!r}", text=True)
        self.draw.text((x * SCALE, y * SCALE), text, font=f, fill=color)

    # -- blocks --------------------------------------------------------------------------------------------------

    def block(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        kind: str,
        title: str,
        lines: Sequence[str] = (),
        *,
        top: bool = False,
        nested: bool = False,
        title_size: int = BLOCK_TITLE,
    ) -> Rect:
        """A rounded box of ``kind`` with a bold title and body lines, centred (or from the ``top``).

        ``nested`` boxes sit inside another block and are exempt from the overlap check.
        """
        rect = Rect(x, y, w, h)
        if not nested:
            self._claim(rect, f"block {title!r}")
        style = KINDS[kind]
        self.draw.rounded_rectangle(
            self._px(rect), radius=8 * SCALE, fill=style.fill, outline=style.edge, width=2 * SCALE
        )
        content = self._text_block([(title, title_size, True)] + [(line, BODY, False) for line in lines], w - 14)
        height = self._block_height(content)
        if height > h - 8:
            raise ValueError(f"block {title!r} is {h} px tall but its text needs {height:.0f}")
        self._draw_block(content, rect.cx, y + 8 if top else rect.cy - height / 2)
        return rect

    def group(self, x: float, y: float, w: float, h: float, label: str, label_x: float | None = None) -> Rect:
        """A dashed frame around related blocks, its label inside the top edge (at ``label_x``, default the left)."""
        rect = Rect(x, y, w, h)
        corners = [(x, y), (x + w, y), (x + w, y + h), (x, y + h), (x, y)]
        for a, b in zip(corners, corners[1:]):
            self._segment(a, b, dashed=True, color=MUTED, width=1.5)
        self.text(x + 8 if label_x is None else label_x, y + 5, label, size=LABEL, bold=True, color=MUTED)
        return rect

    # -- arrows --------------------------------------------------------------------------------------------------

    def _px(self, rect: Rect) -> tuple[float, float, float, float]:
        return (rect.x * SCALE, rect.y * SCALE, rect.right * SCALE, rect.bottom * SCALE)

    def _segment(
        self, a: tuple[float, float], b: tuple[float, float], dashed: bool, color=ARROW, width: float = 2
    ) -> None:
        (x0, y0), (x1, y1) = a, b
        if not dashed:
            self.draw.line([(x0 * SCALE, y0 * SCALE), (x1 * SCALE, y1 * SCALE)], fill=color, width=round(width * SCALE))
            return
        length = math.hypot(x1 - x0, y1 - y0)
        dash, gap = 7.0, 5.0
        start = 0.0
        while start < length:
            end = min(start + dash, length)
            p, q = start / length, end / length
            self.draw.line(
                [
                    ((x0 + (x1 - x0) * p) * SCALE, (y0 + (y1 - y0) * p) * SCALE),
                    ((x0 + (x1 - x0) * q) * SCALE, (y0 + (y1 - y0) * q) * SCALE),
                ],
                fill=color,
                width=round(width * SCALE),
            )
            start = end + gap

    def arrow(
        self,
        points: Sequence[tuple[float, float]],
        label: Sequence[str] = (),
        at: tuple[float, float] | None = None,
        side: str = "above",
        dashed: bool = False,
        color=ARROW,
    ) -> None:
        """A polyline ending in an arrowhead at ``points[-1]``, optionally labelled near ``at`` (default: the
        middle of the longest segment) on ``side`` (above, below, left, right, or on the line)."""
        head = 10.0
        arrow_id = self.arrows
        self.arrows += 1
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            self.lines.append((Rect(min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0)), arrow_id))
        (xa, ya), (xb, yb) = points[-2], points[-1]
        angle = math.atan2(yb - ya, xb - xa)
        # Stop the line at the base of the head so its end does not poke through the tip.
        base = (xb - head * 0.8 * math.cos(angle), yb - head * 0.8 * math.sin(angle))
        path = list(points[:-1]) + [base]
        if dashed:
            for a, b in zip(path, path[1:]):
                self._segment(a, b, dashed=True, color=color)
        else:
            self.draw.line([(x * SCALE, y * SCALE) for x, y in path], fill=color, width=2 * SCALE, joint="curve")
        wing = math.radians(25)
        tip = [
            (xb, yb),
            (xb - head * math.cos(angle - wing), yb - head * math.sin(angle - wing)),
            (xb - head * math.cos(angle + wing), yb - head * math.sin(angle + wing)),
        ]
        self.draw.polygon([(x * SCALE, y * SCALE) for x, y in tip], fill=color)
        if label:
            if at is None:
                a, b = max(zip(points, points[1:]), key=lambda s: math.dist(*s))
                at = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
            self.label(label, at, side, owner=arrow_id)

    def label(
        self, lines: Sequence[str], at: tuple[float, float], side: str = "above", owner: int | None = None
    ) -> None:
        """Small text on a white ground next to (or on) the point ``at``."""
        block = self._text_block([(line, LABEL, False) for line in lines], self.width)
        w, h = max(lw for _, _, lw, _ in block), self._block_height(block)
        x, y = at
        offsets = {
            "above": (x - w / 2, y - h - 5),
            "below": (x - w / 2, y + 5),
            "left": (x - w - 7, y - h / 2),
            "right": (x + 7, y - h / 2),
            "on": (x - w / 2, y - h / 2),
        }
        left, top = offsets[side]
        rect = Rect(left - 2, top - 2, w + 4, h + 4)
        self._claim(rect, f"label {lines[0]!r}", text=True, owner=owner)
        self.draw.rectangle(self._px(rect), fill="white")
        self._draw_block(block, left + w / 2, top, color=MUTED)

    # -- decoration ----------------------------------------------------------------------------------------------

    def title(self, title: str, subtitle: str) -> None:
        self.text(20, 14, title, size=TITLE, bold=True)
        self.text(20, 48, subtitle, size=SUBTITLE, color=MUTED)

    def legend(self, y: float, dashed: str | None = None) -> None:
        """One swatch per kind of block (and the dashed-path meaning, if the figure has one), left to right."""
        x = 20.0
        size = 16
        for style in KINDS.values():
            swatch = Rect(x, y, 26, size)
            self._claim(swatch, f"swatch {style.legend}")
            self.draw.rounded_rectangle(
                self._px(swatch), radius=4 * SCALE, fill=style.fill, outline=style.edge, width=2 * SCALE
            )
            x += 34
            self.text(x, y + 1, style.legend)
            x += self.draw.textlength(style.legend, font=font(BODY * SCALE)) / SCALE + 26
        if dashed:
            self.arrow([(x, y + size / 2), (x + 40, y + size / 2)], dashed=True)
            self.text(x + 50, y + 1, dashed)

    def save(self, path: Path) -> None:
        self.check_lines()
        path.parent.mkdir(parents=True, exist_ok=True)
        image = self.image.resize((self.width, self.height), Image.LANCZOS)
        # A palette PNG is a third of the RGB size. Median cut may blend a colour used only by a small legend
        # swatch with a neighbour, so the entry nearest each block colour is reset to that colour exactly.
        quantized = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette = quantized.getpalette()
        entries = [tuple(palette[i : i + 3]) for i in range(0, len(palette), 3)]
        for colour in [c for style in KINDS.values() for c in (style.fill, style.edge)]:
            nearest = min(range(len(entries)), key=lambda i: sum((a - b) ** 2 for a, b in zip(entries[i], colour)))
            palette[3 * nearest : 3 * nearest + 3] = colour
        quantized.putpalette(palette)
        quantized.save(path, optimize=True)


def draw_ppdm(path: Path) -> list[str]:
    """The image model (``DMADModel``, PPDM): training and inference in one picture. Returns the code names drawn."""
    fig = Figure(PPDM_SIZE)
    code = fig.code
    fig.title(
        f"DMAD for images (PPDM): {code(IMAGE_MODEL, 'DMADModel')}",
        "reverse distillation through a learned pyramid deformation and a prototype codebook",
    )

    # Main flow.
    row_a, h_a = 130, 125
    x = fig.block(20, row_a, 140, h_a, "data", "image x", ["[B,3,H,W]", "H, W multiples of 32"])
    pdm = fig.block(
        240,
        row_a,
        230,
        h_a,
        "trainable",
        code(IMAGE_MODEL, "PyramidDeformation"),
        ["coarse field (stride 8)", "fine field (stride 2)", "+ both inverse fields", "warp x: coarse, then fine"],
    )
    enc = fig.block(
        560,
        row_a,
        200,
        h_a,
        "frozen",
        code(IMAGE_MODEL, "ResNetEncoder"),
        ["layer1 .. layer3", "weights and BN frozen", "(wide_resnet50_2)"],
    )
    bn = fig.block(
        850,
        row_a,
        250,
        h_a,
        "trainable",
        code(IMAGE_MODEL, "Bottleneck"),
        ["f1, f2, f3 + prototypes -> fuse"],
        top=True,
    )
    fig.block(
        bn.x + 12,
        bn.y + 56,
        bn.w - 24,
        58,
        "trainable",
        code(IMAGE_MODEL, "VectorQuantizer"),
        ["codebook: 200 prototypes of f3"],
        nested=True,
        title_size=14,
    )
    dec = fig.block(
        1190,
        row_a,
        190,
        h_a,
        "trainable",
        code(IMAGE_MODEL, "ReverseDecoder"),
        ["mirrors layer3 .. layer1", "transposed-conv", "upsampling x2 per stage"],
    )
    mid = row_a + h_a / 2
    fig.arrow([(x.right, mid), (pdm.x, mid)])
    fig.arrow([(pdm.right, mid), (enc.x, mid)], ["warped x", "[B,3,H,W]"])
    fig.arrow([(enc.right, mid), (bn.x, mid)], ["f1, f2, f3"])
    fig.arrow([(bn.right, mid), (dec.x, mid)], ["[B,512e,", "H/32,W/32]"])
    # The ablation: without the PDM the encoder reads x itself.
    fig.arrow(
        [(x.cx, x.y), (x.cx, 103), (enc.x + 40, 103), (enc.x + 40, enc.y)],
        dashed=True,
        label=["MODEL.pdm=false: x straight to the encoder, no unwarp, no deformation map"],
        at=(335, 103),
    )

    vq = fig.block(900, 78, 150, 40, "loss", "vq loss", [], title_size=13)
    fig.label(["codebook + 0.25 * commitment"], (vq.right, vq.cy), "right")
    fig.arrow([(vq.cx, bn.y), (vq.cx, vq.bottom)])

    # Features, fields and the training losses.
    row_b, h_b = 305, 105
    deform_loss = fig.block(
        20,
        row_b,
        190,
        h_b,
        "loss",
        code(IMAGE_MODEL, "deformation_loss"),
        ["|coarse| + |fine|", "+ smoothness, 4 fields", "+ gamma * MSE(unwarp, x)"],
    )
    deform = fig.block(
        245,
        row_b,
        225,
        h_b,
        "data",
        code(IMAGE_MODEL, "Deformation"),
        ["coarse, fine,", "coarse_inverse, fine_inverse", "fields [B,H,W,2]"],
    )
    enc_f = fig.block(
        545,
        row_b,
        230,
        h_b,
        "data",
        "encoder features",
        ["f1 [B,64e,H/4,W/4]", "f2 [B,128e,H/8,W/8]", "f3 [B,256e,H/16,W/16]"],
    )
    distill = fig.block(
        855,
        row_b,
        240,
        h_b,
        "loss",
        code(IMAGE_MODEL, "distillation_loss"),
        ["sum over scales of", "1 - cos(encoder, decoder),", "each map flattened"],
    )
    dec_f = fig.block(1165, row_b, 215, h_b, "data", "decoder features", ["same shapes as", "f1, f2, f3"])
    fig.arrow([(x.cx, x.bottom), (x.cx, deform_loss.y)], ["x"], side="right")
    fig.arrow([(pdm.cx, pdm.bottom), (pdm.cx, deform.y)])
    fig.arrow([(deform.x, deform.cy), (deform_loss.right, deform.cy)])
    fig.arrow([(enc.cx, enc.bottom), (enc.cx, enc_f.y)])
    fig.arrow([(dec.cx, dec.bottom), (dec.cx, dec_f.y)])
    fig.arrow([(enc_f.right, enc_f.cy), (distill.x, enc_f.cy)])
    fig.arrow([(dec_f.x, dec_f.cy), (distill.right, dec_f.cy)])

    # Inference maps (AnomalyMapGenerator) and the image score.
    fig.group(232, 450, 876, 128, code(IMAGE_MODEL, "AnomalyMapGenerator"), label_x=312)
    row_c, h_c = 480, 88
    magnitude = fig.block(
        245,
        row_c,
        225,
        h_c,
        "op",
        code(IMAGE_MODEL, "Deformation.magnitude_map"),
        ["|fine_inverse| warped back", "+ |coarse_inverse|", f"-> {code(SMOOTHING, 'gaussian_blur2d')}"],
        title_size=14,
    )
    unwarp = fig.block(
        545,
        row_c,
        230,
        h_c,
        "op",
        code(IMAGE_MODEL, "Deformation.unwarp"),
        ["fine_inverse, then", "coarse_inverse", "-> gaussian_blur2d (sigma 4)"],
        title_size=14,
    )
    discrepancy = fig.block(
        855,
        row_c,
        240,
        h_c,
        "op",
        code(IMAGE_MODEL, "feature_discrepancy"),
        ["sum over scales of", "1 - cos per pixel,", "upsampled to H x W"],
        title_size=14,
    )
    fig.arrow(
        [
            (enc_f.right - 35, enc_f.bottom),
            (enc_f.right - 35, 432),
            (discrepancy.x + 45, 432),
            (discrepancy.x + 45, discrepancy.y),
        ]
    )
    fig.arrow(
        [
            (dec_f.cx, dec_f.bottom),
            (dec_f.cx, 432),
            (discrepancy.right - 45, 432),
            (discrepancy.right - 45, discrepancy.y),
        ]
    )
    fig.arrow([(deform.x + 50, deform.bottom), (deform.x + 50, magnitude.y)])
    fig.arrow([(deform.right, deform.bottom - 20), (508, deform.bottom - 20), (508, unwarp.cy), (unwarp.x, unwarp.cy)])
    fig.arrow([(discrepancy.x, unwarp.cy), (unwarp.right, unwarp.cy)], ["[B,1,H,W]"])

    row_d, h_d = 628, 88
    deform_map = fig.block(245, row_d, 225, h_d, "loss", "deformation map", ["[B,1,H,W]", "extras['deformation_map']"])
    anomaly_map = fig.block(
        545, row_d, 230, h_d, "loss", "anomaly map", ["[B,1,H,W]", code(INFERENCE, "InferenceOutput.anomaly_map")]
    )
    fuse = fig.block(
        855,
        row_d,
        240,
        h_d,
        "loss",
        code(IMAGE_MODEL, "fuse_scores"),
        ["minmax(max anomaly)", "+ w * minmax(max deformation)", "min/max: normal train images"],
    )
    score = fig.block(1165, row_d, 215, h_d, "loss", "image score [B]", [code(INFERENCE, "InferenceOutput.score")])
    fig.arrow([(magnitude.cx, magnitude.bottom), (magnitude.cx, deform_map.y)])
    fig.arrow([(unwarp.cx, unwarp.bottom), (unwarp.cx, anomaly_map.y)])
    fig.arrow([(anomaly_map.right, anomaly_map.cy), (fuse.x, anomaly_map.cy)], ["max"])
    fig.arrow(
        [(deform_map.cx, deform_map.bottom), (deform_map.cx, 742), (fuse.x + 40, 742), (fuse.x + 40, fuse.bottom)],
        ["max"],
    )
    fig.arrow([(fuse.right, fuse.cy), (score.x, fuse.cy)])
    # Without the PDM the discrepancy is already in the input frame: smoothed, no unwarp.
    fig.arrow(
        [
            (discrepancy.x + 25, discrepancy.bottom),
            (discrepancy.x + 25, 600),
            (unwarp.right - 30, 600),
            (unwarp.right - 30, anomaly_map.y),
        ],
        dashed=True,
        label=["pdm=false"],
        at=(discrepancy.x + 25, 600),
        side="right",
    )

    fig.legend(772, dashed="MODEL.pdm=false (ablation)")
    fig.text(
        20,
        806,
        f"Training: {code(IMAGE_MODEL, 'DMADLoss')} = distillation_loss + deformation_loss + vq loss; "
        "the frozen encoder still passes gradients back to PyramidDeformation.",
        color=MUTED,
    )
    fig.text(
        20,
        826,
        "e = block expansion (4 for wide_resnet50_2).  w = MODEL.deform_weight "
        "(0.2 for screw, carpet, metal_nut; else 0.05).",
        color=MUTED,
    )
    fig.save(path)
    return fig.code_names


def draw_pdm(path: Path) -> list[str]:
    """The video model (``VideoDMADModel``, PDM), its loss and the frame scoring protocol. Returns the code names."""
    fig = Figure(PDM_SIZE)
    code = fig.code
    fig.title(
        f"DMAD for video (PDM): {code(VIDEO_MODEL, 'VideoDMADModel')}",
        "predict the frame after a clip from memory prototypes, moved by a coarse and a fine deformation field",
    )
    c1, c2, c3, c4, c5, c6 = 20, 210, 455, 700, 945, 1190
    w = 185

    # Prototype path.
    row_a, h_a = 125, 110
    clip = fig.block(
        c1,
        row_a,
        130,
        375,
        "data",
        "clip",
        [
            "[B,T,C,H,W]",
            "T = clip_length",
            "in [-1, 1]",
            "",
            "frames stacked",
            "on channels:",
            "[B,T*C,H,W]",
            "",
            "(+ template with",
            "background_input)",
        ],
    )
    encoder = fig.block(
        c2,
        row_a,
        w,
        h_a,
        "trainable",
        code(VIDEO_MODEL, "ClipEncoder"),
        ["4 conv stages, pool x3", "z_e [B,D,H/8,W/8]", "+ mask head"],
    )
    memory = fig.block(
        c3,
        row_a,
        w,
        h_a,
        "trainable",
        code(VIDEO_MODEL, "PrototypeMemory"),
        ["VQ: nearest of M", "prototypes (M = 200)", "straight-through grad"],
    )
    decoder = fig.block(
        c4,
        row_a,
        w,
        h_a,
        "trainable",
        code(VIDEO_MODEL, "PredictionDecoder"),
        ["coordinate convs,", "upsample x3, tanh", "-> prototype frame"],
    )
    background = fig.block(
        c6,
        row_a,
        190,
        h_a,
        "trainable",
        code(VIDEO_MODEL, "BackgroundTemplates"),
        ["template [V,C,H,W]", "(1, or 1 per video)"],
        title_size=14,
    )
    mid_a = row_a + h_a / 2
    fig.arrow([(clip.right, mid_a), (encoder.x, mid_a)])
    fig.arrow([(encoder.right, mid_a), (memory.x, mid_a)], ["z_e"])
    fig.arrow([(memory.right, mid_a), (decoder.x, mid_a)], ["[B,D,", "H/8,W/8]"])
    fig.arrow(
        [(encoder.cx + 30, encoder.y), (encoder.cx + 30, 103), (decoder.cx, 103), (decoder.cx, decoder.y)],
        ["skip3, skip4 (detached)"],
        at=((encoder.cx + decoder.cx) / 2 + 15, 103),
        side="below",
    )

    # Deformation fields, warps and composition.
    row_b, row_c, h_bc = 290, 410, 90
    pdm = fig.block(
        c2,
        row_b,
        w,
        row_c + h_bc - row_b,
        "trainable",
        code(VIDEO_MODEL, "PyramidDeformation"),
        [
            "coordinate convs",
            "+ residual block",
            "",
            "coarse head:",
            "strides 1,2,2 -> H/4",
            "fine head:",
            "stride 1 -> H",
            "tanh * shift (px)",
        ],
        title_size=14,
    )
    coarse = fig.block(
        c3, row_b, w, h_bc, "data", code(VIDEO_MODEL, "Fields.coarse"), ["[B,H,W,2]", "<= coarse_shift px"]
    )
    fine = fig.block(c3, row_c, w, h_bc, "data", code(VIDEO_MODEL, "Fields.fine"), ["[B,H,W,2]", "<= fine_shift px"])
    warp_coarse = fig.block(
        c4, row_b, w, h_bc, "op", code(WARPING, "warp"), ["(. , grid_coarse)", "prototype and mask"]
    )
    warp_fine = fig.block(c4, row_c, w, h_bc, "op", "warp", ["(. , grid_fine)", "coarse-warped pair"])
    compose = fig.block(
        c5,
        row_b,
        w,
        row_c + h_bc - row_b,
        "op",
        code(VIDEO_MODEL, "compose"),
        [
            "f * m + (1 - m) * bg",
            "",
            "f, m: warped frame",
            "and mask",
            "bg: template,",
            "detached",
            "",
            "(compose_premultiplied",
            "if mask_source=decoder)",
        ],
    )
    output = fig.block(
        c6,
        row_b,
        190,
        row_c + h_bc - row_b,
        "data",
        code(VIDEO_MODEL, "VideoOutput"),
        [
            "coarse_prediction",
            "[B,C,H,W]",
            "coarse warp only",
            "",
            "",
            "prediction",
            "[B,C,H,W]",
            "predicted frame t+1",
        ],
    )
    clip_to_pdm = pdm.cy
    fig.arrow([(clip.right, clip_to_pdm), (pdm.x, clip_to_pdm)])
    mid_b, mid_c = row_b + h_bc / 2, row_c + h_bc / 2
    fig.arrow([(pdm.right, mid_b), (coarse.x, mid_b)])
    fig.arrow([(pdm.right, mid_c), (fine.x, mid_c)])
    fig.arrow([(coarse.right, mid_b), (warp_coarse.x, mid_b)])
    fig.arrow([(fine.right, mid_c), (warp_fine.x, mid_c)])
    fig.arrow([(warp_coarse.cx, warp_coarse.bottom), (warp_coarse.cx, warp_fine.y)])
    fig.arrow([(warp_coarse.right, mid_b), (compose.x, mid_b)])
    fig.arrow([(warp_fine.right, mid_c), (compose.x, mid_c)])
    fig.arrow([(compose.right, mid_b), (output.x, mid_b)], ["coarse"])
    fig.arrow([(compose.right, mid_c), (output.x, mid_c)], ["fine"])
    fig.arrow(
        [(decoder.cx, decoder.bottom), (decoder.cx, warp_coarse.y)],
        ["prototype frame [B,C,H,W]"],
        at=(decoder.cx, (decoder.bottom + warp_coarse.y) / 2),
        side="left",
    )
    # The encoder's mask (mask_source=encoder) goes round the top to be warped with the prototype.
    fig.arrow(
        [
            (encoder.x + 30, encoder.y),
            (encoder.x + 30, 80),
            (c5 - 30, 80),
            (c5 - 30, 262),
            (warp_coarse.right - 25, 262),
            (warp_coarse.right - 25, warp_coarse.y),
        ],
        ["mask [B,C,H,W] (mask_source=encoder)"],
        at=((encoder.x + c5) / 2, 80),
        side="on",
    )
    fig.arrow(
        [(background.cx, background.bottom), (background.cx, 262), (compose.cx, 262), (compose.cx, compose.y)],
        ["template"],
        at=((background.cx + compose.cx) / 2, 262),
    )

    # Training loss and per-frame scores.
    row_d, h_d = 590, 125
    loss = fig.block(
        c1,
        row_d,
        620,
        h_d,
        "loss",
        code(VIDEO_MODEL, "VideoLoss") + "  (training)",
        [
            "MSE(coarse_prediction, target) + MSE(prediction, target)",
            f"+ gradient_weight * {code(VIDEO_MODEL, 'gradient_difference')} of both predictions",
            "+ vq_weight * (codebook + commitment) of the PrototypeMemory",
            "+ field_weight * (|coarse| + |fine| + smoothness of the fields)",
            "+ background: MSE(template, target), trains BackgroundTemplates",
        ],
    )
    target = fig.block(c4, row_d, w, h_d, "data", "target frame", ["[B,C,H,W]", "the frame after", "the clip"])
    scores = fig.block(
        c5,
        row_d,
        c6 + 190 - c5,
        h_d,
        "loss",
        code(VIDEO_MODEL, "frame_scores") + "  (raw, per frame)",
        [
            f"deformation: {code(VIDEO_MODEL, 'window_max')} of |coarse field y|",
            "prediction: mean |prediction - target|",
            "gradient: window_max of gradient_difference",
            "(ShanghaiTech: |coarse|, windowed MSE, + object)",
        ],
    )
    mid_d = row_d + h_d / 2
    fig.arrow([(target.x, mid_d), (loss.right, mid_d)])
    fig.arrow([(target.right, mid_d), (scores.x, mid_d)])
    fig.arrow([(output.cx + 40, output.bottom), (output.cx + 40, scores.y)], ["prediction"], side="right")
    fig.arrow(
        [(output.x + 25, output.bottom), (output.x + 25, 548), (loss.cx + 60, 548), (loss.cx + 60, loss.y)],
        ["coarse_prediction, prediction"],
        at=((output.x + loss.cx) / 2 + 40, 548),
    )
    fig.arrow([(pdm.cx - 40, pdm.bottom), (pdm.cx - 40, loss.y)], ["fields"], side="right")

    # The paper protocol turns the raw scores into one score per frame.
    row_e, h_e = 790, 92
    fig.group(
        c1 - 8, 757, 1376, 140, f"{code(FRAME_SCORING, 'paper_protocol')}  (scoring/; ped2 preset shown)", label_x=960
    )
    bw, gap = 228, 50
    xs = [c1 + i * (bw + gap) for i in range(5)]
    steps = [
        ("op", code(FRAME_SCORING, "normalize"), ["min-max per video,", "then 1 - x (normality)"]),
        ("op", code(FRAME_SCORING, "smooth_sequences"), ["robust window 11,", "keep the 5 nearest the mean"]),
        ("loss", code(FRAME_SCORING, "fuse"), ["0.2 deformation", "+ 0.4 prediction", "+ 0.6 gradient"]),
        (
            "op",
            "POST_SMOOTH, " + code(FRAME_SCORING, "kalman_filter"),
            ["ped2: off", "avenue: POST_SMOOTH", "ShanghaiTech: both"],
        ),
        ("loss", "frame score", ["one per frame", "-> frame AUROC / AUPR"]),
    ]
    boxes = [
        fig.block(bx, row_e, bw, h_e, kind, title, lines, title_size=14) for bx, (kind, title, lines) in zip(xs, steps)
    ]
    mid_e = row_e + h_e / 2
    for a, b in zip(boxes, boxes[1:]):
        fig.arrow([(a.right, mid_e), (b.x, mid_e)])
    fig.arrow(
        [(scores.cx, scores.bottom), (scores.cx, 740), (boxes[0].cx, 740), (boxes[0].cx, boxes[0].y)],
        ["deformation, prediction, gradient per frame"],
        at=((scores.cx + boxes[0].cx) / 2, 740),
        side="on",
    )

    fig.legend(920)
    fig.text(
        20,
        948,
        "D = MODEL.memory_dim (256 for ped2).  Scores and the protocol settings differ per dataset: "
        "see dmad_video/config.py, dmad_video/presets.py and scoring/.",
        color=MUTED,
    )
    fig.save(path)
    return fig.code_names


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "assets", help="output folder (default: assets/)")
    args = parser.parse_args(argv)
    for name, draw in (("dmad_ppdm.png", draw_ppdm), ("dmad_pdm.png", draw_pdm)):
        draw(args.out / name)
        print(args.out / name)


if __name__ == "__main__":
    main()
