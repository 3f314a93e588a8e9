"""DMAD-PDM's per-clip scoring as one tuple-returning module: the graph ``--mode export`` writes.

clip [B, T, C, H, W], target [B, C, H, W] (, background [B, C, H, W] for a run with one template per video), all in
[-1, 1] -> (predicted_frame [B, Cm, H, W], error_map [B, 1, H, W], *raw scores [B] in ``names`` order). A run with one
template per video (ShanghaiTech) takes each clip's own video template as an input, because the trained templates
belong to the training videos; a run with one shared template has it baked into the graph.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from .scores import ScoreSettings, error_map, frame_scores

RAW_SCORES = ("deformation", "prediction", "gradient")
CONTOUR_SCORE = "object"  # OpenCV contours (scores.object_scores): no graph form


def score_names(settings: ScoreSettings, exportable: bool) -> tuple[str, ...]:
    """The raw scores computed with ``settings`` (the contour score only where OpenCV runs, never in a graph)."""
    return RAW_SCORES + ((CONTOUR_SCORE,) if settings.object_score and not exportable else ())


class GivenBackground(nn.Module):
    """Stands in for the model's template store: ``select`` returns the templates it is handed ([B, C, H, W])."""

    def select(self, templates: Tensor) -> Tensor:
        return templates


class ServingModule(nn.Module):
    """A loaded DMAD-PDM model and its score settings as the export graph (see the module docstring)."""

    def __init__(self, model: nn.Module, settings: ScoreSettings, given_background: bool) -> None:
        super().__init__()
        model = model.eval()
        if given_background:  # a copy: the caller's model keeps its trained templates
            model = copy.deepcopy(model)
            model.background = GivenBackground()
        self.model = model
        self.settings = settings
        self.names = score_names(settings, exportable=True)

    def forward(self, clip: Tensor, target: Tensor, background: Tensor | None = None) -> tuple[Tensor, ...]:
        channels = self.model.channels
        if clip.shape[2] != channels:  # grey frames (and templates) feed a colour model replicated
            clip, target = clip.expand(-1, -1, channels, -1, -1), target.expand(-1, channels, -1, -1)
        if background is not None:
            background = background.expand(-1, channels, -1, -1)
        out = self.model(clip, background)
        scores = frame_scores(out, target, self.settings)
        return (out.prediction, error_map(out, target), *(scores[name] for name in self.names))
