"""DMAD-PDM video model: shapes, gradients, background composition, scores, losses, checkpoint import, and parity
with the official model through golden outputs (tests/golden/pdm_ped2_256.npz, computed once from the official
code with the weights and inputs that ``seeded_weights`` / ``golden_inputs`` regenerate here)."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from task.anomaly.unsupervised.models.dmad_video.background import compose, compose_premultiplied
from task.anomaly.unsupervised.models.dmad_video.config import MODEL_SCHEMA, PRESETS
from task.anomaly.unsupervised.models.dmad_video.decoder import coordinate_channels
from task.anomaly.unsupervised.models.dmad_video.deformation import Fields
from task.anomaly.unsupervised.models.dmad_video.loss import LossWeights, VideoLoss, gradient_difference, smoothness_map
from task.anomaly.unsupervised.models.dmad_video.official_import import convert_official
from task.anomaly.unsupervised.models.dmad_video.scores import (
    ScoreSettings,
    error_map,
    frame_scores,
    object_scores,
    window_max,
)
from task.anomaly.unsupervised.models.dmad_video.torch_model import (
    VideoDMADModel,
    VideoOutput,
    official_background_lr,
    optimizer_groups,
)
from task.common.config import Field
from task.common.errors import UserError
from task.common.warping import identity_grid

GOLDEN = Path(__file__).parent / "golden" / "pdm_ped2_256.npz"


def small_model(
    preset: str = "ped2", channels: int = 3, size: tuple[int, int] = (32, 32), num_videos: int = 3
) -> VideoDMADModel:
    """A preset's architecture with tiny widths (memory_dim 32 -> widths 4, 8, 16, 32)."""
    torch.manual_seed(0)
    cfg = {**PRESETS[preset]["MODEL"], "channels": channels, "memory_dim": 32, "memory_size": 10}
    return VideoDMADModel.from_config(cfg, size, num_videos=num_videos)


def seeded_weights(model: nn.Module, seed: int) -> None:
    """Deterministic weights for every float tensor of ``model``'s state dict, independent of torch's init order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype != torch.float32:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() > 1 and "template" not in name:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def golden_inputs(seed: int, batch: int, size: int, backgrounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip [B, 5, 3, S, S] with the target as frame 5, background [V, 3, S, S]), uniform in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    clip = torch.rand(batch, 5, 3, size, size, generator=g) * 2 - 1
    return clip, torch.rand(backgrounds, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize(
    "preset,channels,size", [("ped2", 3, (32, 32)), ("avenue", 1, (32, 48)), ("shanghaitech", 1, (48, 32))]
)
def test_shapes(preset: str, channels: int, size: tuple[int, int]) -> None:
    model = small_model(preset, channels, size)
    h, w = size
    index = torch.tensor([2, 0]) if preset == "shanghaitech" else None
    out = model(torch.rand(2, 4, channels, h, w) * 2 - 1, index)
    for image in (out.prediction, out.coarse_prediction, out.prototype):
        assert image.shape == (2, channels, h, w)
    assert out.fields.coarse.shape == out.fields.fine.shape == out.fields.grid_fine.shape == (2, h, w, 2)
    mask_channels = 1 if preset == "shanghaitech" else channels
    assert out.mask.shape == out.mask_warped.shape == (2, mask_channels, h, w)
    assert out.indices.shape == (2, h // 8, w // 8)
    assert error_map(out, torch.zeros(2, channels, h, w)).shape == (2, 1, h, w)


def test_field_shift_limits() -> None:
    """tanh-bounded fields: |x| <= 2*shift/W and |y| <= 2*shift/H in grid units (per axis on non-square frames)."""
    model = small_model("avenue", 1, (32, 48))
    fields = model(torch.rand(2, 4, 1, 32, 48) * 2 - 1).fields
    for field, shift in ((fields.coarse, 3.0), (fields.fine, 3.0)):
        assert field[..., 0].abs().max() <= 2 * shift / 48 + 1e-6
        assert field[..., 1].abs().max() <= 2 * shift / 32 + 1e-6


def test_gradients_reach_the_right_parameters() -> None:
    model = small_model("ped2")
    model.set_background(torch.rand(1, 3, 32, 32) * 2 - 1)
    clip = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    out = model(clip)
    # The prediction reads the background detached: no gradient reaches it through the composition.
    out.prediction.sum().backward(retain_graph=True)
    assert model.background.template.grad is None
    model.zero_grad(set_to_none=True)
    total, terms = VideoLoss(LossWeights.from_config(PRESETS["ped2"]["MODEL"]))(out, clip[:, -1])
    total.backward()
    for part in (
        "encoder.stage1",
        "encoder.stage4",
        "encoder.skip3",
        "encoder.mask",
        "decoder",
        "deformation",
        "memory",
    ):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), part
    # ... only the plain background term trains it: d MSE(b, x) / db = 2 * sum_batch(b - x) / numel.
    expected = 2 * (model.background.template.detach() - clip[:, -1]).sum(0, keepdim=True) / clip[:, -1].numel()
    torch.testing.assert_close(model.background.template.grad, expected)


def test_skips_do_not_train_the_encoder_stages() -> None:
    """The skips read detached encoder features (as the official model): a loss on them alone leaves stage3
    untouched."""
    model = small_model("ped2")
    _, skip3, skip4, _ = model.encoder(torch.rand(1, 12, 32, 32))
    (skip3.sum() + skip4.sum()).backward()
    assert all(p.grad is None for p in model.encoder.stage3.parameters())
    assert all(p.grad is not None for p in model.encoder.skip3.parameters())


def test_background_composition() -> None:
    fg, bg = torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), -1.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    expected = torch.where(mask.bool(), fg, bg)
    assert torch.equal(compose(fg, mask, bg), expected)
    assert torch.equal(compose_premultiplied(fg * mask, mask, bg), expected)


def test_background_templates_select_and_validate() -> None:
    model = small_model("shanghaitech", 1, (32, 32), num_videos=3)
    template = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 32, 32) / 3
    model.set_background(template)
    assert torch.equal(model.background.select(torch.tensor([2, 0]))[:, 0, 0, 0], torch.tensor([2 / 3, 0.0]))
    with pytest.raises(UserError, match="background template"):
        model.set_background(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="background_index"):
        model(torch.zeros(1, 4, 1, 32, 32))


def test_user_errors() -> None:
    with pytest.raises(UserError, match="memory_dim"):
        VideoDMADModel(memory_dim=36)
    with pytest.raises(UserError, match="num_backgrounds"):
        VideoDMADModel.from_config(PRESETS["shanghaitech"]["MODEL"], (32, 32))


def _output(prediction: torch.Tensor, coarse_field: torch.Tensor, mask: torch.Tensor | None = None) -> VideoOutput:
    b, _, h, w = prediction.shape
    zero = torch.zeros(b, h, w, 2)
    grid = identity_grid(b, h, w, torch.device("cpu"), torch.float32)
    mask = torch.ones(b, 1, h, w) if mask is None else mask
    return VideoOutput(
        prediction,
        prediction,
        prediction,
        Fields(coarse_field, zero, grid, grid),
        mask,
        mask,
        torch.zeros(1, prediction.shape[1], h, w),
        torch.zeros(()),
        torch.zeros(()),
        torch.zeros(b, h // 8, w // 8),
    )


def test_scores_on_hand_built_inputs() -> None:
    target = torch.rand(2, 3, 40, 40)
    field = torch.zeros(2, 40, 40, 2)
    field[0, ..., 1] = -0.5  # |y| = 0.5 everywhere: a full box averages to 0.5
    field[1, ..., 0] = 0.5  # x only: invisible to the official (vertical) deformation score
    scores = frame_scores(_output(target.clone(), field), target)
    assert set(scores) == {"deformation", "prediction", "gradient"}
    torch.testing.assert_close(scores["deformation"], torch.tensor([0.5, 0.0]))
    assert torch.equal(scores["prediction"], torch.zeros(2)) and torch.equal(scores["gradient"], torch.zeros(2))
    magnitude = frame_scores(_output(target, field), target, ScoreSettings(deformation_field="magnitude"))
    torch.testing.assert_close(magnitude["deformation"], torch.tensor([0.5, 0.5]))
    # A constant error e: l1 = e, mse = e^2; a (4, 4) window fits inside and sums the 3 channels' box means: 3 e^2.
    shifted = _output(target + 0.1, field)
    for kind, expected in (("l1", 0.1), ("mse", 0.01), ("window", 0.03)):
        value = frame_scores(shifted, target, ScoreSettings(prediction_score=kind, prediction_window=(4, 4)))[
            "prediction"
        ]
        torch.testing.assert_close(value, torch.full((2,), expected))  # float32 rounding of sums of 4800 terms


def test_window_max_pads_by_the_window() -> None:
    """A single 1 in a 5x5 map: the (2, 3) box mean peaks at 1/6 wherever the box covers it."""
    values = torch.zeros(1, 1, 5, 5)
    values[0, 0, 0, 0] = 1
    assert window_max(values, (2, 3)).item() == pytest.approx(1 / 6)


def test_gradient_difference_by_hand() -> None:
    """d = column index j (summed over 3 channels of j/3): dx = 1 except 0 in column 0, dy = j on row 0 only."""
    a = (torch.arange(4.0).view(1, 1, 1, 4) / 3).expand(1, 3, 3, 4)
    diff = gradient_difference(a, torch.zeros_like(a))[0, 0]
    expected = torch.tensor([[0.0, 2, 3, 4], [0, 1, 1, 1], [0, 1, 1, 1]])
    torch.testing.assert_close(diff, expected)


@pytest.mark.parametrize("kind", ["separable", "box"])
def test_smoothness_is_zero_inside_a_constant_field(kind: str) -> None:
    field = torch.full((1, 12, 12, 2), 0.3)
    response = smoothness_map(field, kind, 7)
    assert response[..., 3:-3, 3:-3].abs().max() < 1e-6  # taps sum to zero; float rounding of 7 or 49 terms
    assert response[..., 0, 0] > 0  # zero padding at the border


def test_object_score() -> None:
    mask = torch.zeros(1, 1, 20, 20)
    mask[0, 0, 2:8, 2:8] = 0.9  # 6x6 blob: polygon area 25 > 13
    mask[0, 0, 15:18, 15:18] = 0.9  # 3x3 blob: area 4, ignored
    errors = torch.zeros(1, 1, 20, 20)
    errors[0, 0, 2:8, 2:8] = 2.0
    errors[0, 0, 15:18, 15:18] = 9.0
    assert object_scores(mask, errors).tolist() == [2.0]
    assert object_scores(torch.zeros(1, 1, 20, 20), errors).tolist() == [0.0]


def test_loss_terms_add_up() -> None:
    cfg = PRESETS["shanghaitech"]["MODEL"]
    model = small_model("shanghaitech", 3)
    clip = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    out = model(clip, torch.tensor([0, 1]))
    total, t = VideoLoss(LossWeights.from_config(cfg))(out, clip[:, -1])
    expected = (
        t["warped_mse"]
        + t["prediction_mse"]
        + t["gradient"]
        + t["vq"]
        + t["commitment"]
        + 0.25 * (t["field_coarse"] + t["field_fine"] + t["smoothness"])
        + t["background"]
    )
    torch.testing.assert_close(total, expected)
    assert all(torch.isfinite(v) for v in t.values())


def test_optimizer_groups_and_background_lr() -> None:
    model = small_model("ped2")
    groups = optimizer_groups(model, 2e-4, 50.0)
    assert [g["name"] for g in groups] == ["encoder", "decoder", "deformation", "memory", "background"]
    assert groups[-1]["lr"] == pytest.approx(1e-2) and groups[-1]["params"] == [model.background.template]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert official_background_lr(5, 2e-4, 20.0, 6) is None
    assert official_background_lr(6, 2e-4, 20.0, 6) == pytest.approx(4e-3)
    assert official_background_lr(9, 2e-4, None, None) is None


def test_presets_fit_the_schema() -> None:
    for name, preset in PRESETS.items():
        assert set(preset["MODEL"]) == set(MODEL_SCHEMA), name
        for key, value in preset["MODEL"].items():
            field: Field = MODEL_SCHEMA[key]
            field.check(f"MODEL.{key}", value)


def test_grids_follow_dtype_and_size() -> None:
    grid = identity_grid(2, 3, 5, torch.device("cpu"), torch.float64)
    assert grid.dtype == torch.float64 and grid.shape == (2, 3, 5, 2)
    assert grid[0, 0, :, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0] and grid[0, :, 0, 1].tolist() == [-1.0, 0.0, 1.0]
    coords = coordinate_channels(1, 64, 32, torch.device("cpu"), torch.float64)
    # Official layout for 64 rows (32 blocks of 2): coarse = 2 * (i // 2) / 31 - 1, fine = 2 * (i / 63 - (i // 2) / 31)
    # - 1.
    i = torch.arange(64.0, dtype=torch.float64)
    torch.testing.assert_close(coords[0, 1, :, 0], 2 * torch.div(i, 2, rounding_mode="floor") / 31 - 1)
    torch.testing.assert_close(coords[0, 0, :, 0], 2 * (i / 63 - torch.div(i, 2, rounding_mode="floor") / 31) - 1)
    model = small_model("avenue", 1, (32, 48))
    model.eval()
    clip = torch.rand(1, 4, 1, 32, 48) * 2 - 1
    single = model(clip).prediction
    double = model.double()(clip.double()).prediction
    assert double.dtype == torch.float64
    # float32 vs float64 through ~20 layers of random weights: agreement to about 1e-5 of the [-1, 1] range.
    torch.testing.assert_close(double.float(), single, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda() -> None:
    model = small_model("shanghaitech", 1).cuda()
    out = model(torch.rand(2, 4, 1, 32, 32, device="cuda"), torch.tensor([0, 1], device="cuda"))
    assert out.prediction.device.type == "cuda" and out.fields.grid_fine.device.type == "cuda"


def test_golden_parity_with_the_official_model() -> None:
    """ped2 preset, seeded weights, one 256x256 clip (the official model needs 256x256 or larger), eval mode.

    The official outputs were computed in float32 on CPU; ours differ only by summation order (measured < 1e-6 of
    the value range), so 1e-4 of the range is a safe bound.
    """
    golden = np.load(GOLDEN)
    model = VideoDMADModel.from_config(PRESETS["ped2"]["MODEL"], (256, 256))
    seeded_weights(model, int(golden["seed"]))
    clip, background = golden_inputs(int(golden["seed"]) + 1, 1, 256, 1)
    model.set_background(background)
    model.eval()
    with torch.no_grad():
        out = model(clip[:, :4])
        scores = frame_scores(out, clip[:, 4], ScoreSettings.from_config(PRESETS["ped2"]["MODEL"]))
        _, terms = VideoLoss(LossWeights.from_config(PRESETS["ped2"]["MODEL"]))(out, clip[:, 4])
    ours = {
        "prediction": out.prediction[0, :, ::16, ::16],
        "prototype": out.prototype[0, :, ::16, ::16],
        "field_coarse": out.fields.coarse[0, ::16, ::16],
        "field_fine": out.fields.fine[0, ::16, ::16],
    }
    for key, value in ours.items():
        ref = torch.from_numpy(golden[key])
        assert (value - ref).abs().max() <= 1e-4 * (ref.max() - ref.min()), key
    for key, value in {
        **{f"score_{k}": v[0] for k, v in scores.items()},
        **{f"loss_{k}": v for k, v in terms.items()},
    }.items():
        assert value.item() == pytest.approx(float(golden[key]), rel=1e-4), key


class _Param(nn.Module):
    """Stand-ins for the official classes: same attribute names, so a pickle of them has the official layout."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(4, 2)


class convAE(nn.Module):  # noqa: N801 - the official class name, as it appears in the pickle
    def __init__(self) -> None:
        super().__init__()
        self.vq_layer = _Param()
        self.bkg = nn.Parameter(torch.rand(3, 8, 8))
        self.offset_net = nn.Module()
        self.offset_net.conv_offset1 = nn.Sequential(nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64))
        self.offset_net.conv_offset1[0].conv = nn.Conv2d(20, 64, 3, bias=False)  # CoordConv2d's inner conv
        self.mse1 = torch.tensor(0.5)  # loss attributes a trained official model carries


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(Path(os.environ["PDM_TEST_MARKER"])),))


def test_convert_official_reads_a_module_pickle_without_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = convAE()
    source.payload = _Evil()
    marker = tmp_path / "executed"
    monkeypatch.setenv("PDM_TEST_MARKER", str(marker))
    path = tmp_path / "model.pth"
    torch.save(source, path)
    converted = convert_official(path)
    assert not marker.exists()
    assert set(converted) == {
        "memory.codebook.weight",
        "background.template",
        "deformation.stem.0.conv.weight",
        "deformation.stem.1.weight",
        "deformation.stem.1.bias",
        "deformation.stem.1.running_mean",
        "deformation.stem.1.running_var",
        "deformation.stem.1.num_batches_tracked",
    }
    assert torch.equal(converted["memory.codebook.weight"], source.vq_layer.embedding.weight.detach())
    assert torch.equal(converted["background.template"], source.bkg.detach()[None])
    assert torch.equal(
        converted["deformation.stem.0.conv.weight"], source.offset_net.conv_offset1[0].conv.weight.detach()
    )
    state_path = tmp_path / "state.pth"
    torch.save(collections.OrderedDict(source.state_dict()), state_path)
    assert set(convert_official(state_path)) == set(converted)
    with pytest.raises(UserError, match="zip"):
        (tmp_path / "bad.pth").write_bytes(b"not a zip")
        convert_official(tmp_path / "bad.pth")
