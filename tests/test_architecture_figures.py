"""The README's architecture figures (scripts/draw_architecture.py): drawn, readable, and named after the code."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import REPO

_spec = importlib.util.spec_from_file_location("draw_architecture", REPO / "scripts" / "draw_architecture.py")
draw = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = draw  # dataclasses look their module up there
_spec.loader.exec_module(draw)


def submodule_classes(path: Path, class_name: str) -> set[str]:
    """Classes assigned as ``self.name = Class(...)`` in ``class_name.__init__``: the blocks the model is built of."""
    cls = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    found = set()
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            for call in ast.walk(node.value):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id[0].isupper():
                    found.add(call.func.id)
    return found


FIGURES = [
    pytest.param(draw.draw_ppdm, draw.PPDM_SIZE, draw.IMAGE_MODEL / "torch_model.py", "DMADModel", id="ppdm"),
    pytest.param(draw.draw_pdm, draw.PDM_SIZE, draw.VIDEO_MODEL / "torch_model.py", "VideoDMADModel", id="pdm"),
]


@pytest.mark.parametrize("draw_fn, size, model_file, model_class", FIGURES)
def test_figure_is_drawn_and_names_every_block(tmp_path, draw_fn, size, model_file, model_class):
    path = tmp_path / "figure.png"
    names = draw_fn(path)
    image = Image.open(path).convert("RGB")
    assert image.size == size and image.width == 1400
    assert path.stat().st_size < 200_000
    # Not blank, not a solid fill: a white page with a real share of drawn pixels.
    white = sum(n for n, c in image.getcolors(1 << 20) if c == (255, 255, 255))
    assert 0.4 < white / (image.width * image.height) < 0.95
    colours = {c for _, c in image.getcolors(1 << 20)}
    for style in draw.KINDS.values():  # each kind keeps its exact colour (in a block or at least its legend swatch)
        assert style.fill in colours and style.edge in colours
    # Every submodule the model builds appears under its class name.
    assert submodule_classes(model_file, model_class) <= set(names)
    assert model_class in names


def test_main_writes_both_figures(tmp_path):
    draw.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dmad_pdm.png", "dmad_ppdm.png"]


def test_renamed_code_and_bad_layout_are_errors(tmp_path):
    fig = draw.Figure((400, 300))
    with pytest.raises(LookupError, match="NoSuchBlock"):
        fig.code(draw.IMAGE_MODEL, "NoSuchBlock")
    fig.block(100, 100, 100, 50, "data", "a")
    with pytest.raises(ValueError, match="overlaps"):
        fig.block(150, 120, 100, 50, "data", "b")
    fig.arrow([(20, 125), (380, 125)])  # straight through block "a"
    with pytest.raises(ValueError, match="runs through"):
        fig.save(tmp_path / "bad.png")
