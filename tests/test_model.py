"""DMAD model: shapes through every module, warping, VQ straight-through, loss, smoothing."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from task.anomaly.unsupervised.models.dmad.anomaly_map import feature_discrepancy, fuse_scores
from task.anomaly.unsupervised.models.dmad.bottleneck import Bottleneck, VectorQuantizer
from task.anomaly.unsupervised.models.dmad.decoder import ReverseDecoder
from task.anomaly.unsupervised.models.dmad.deformation import PyramidDeformation, coordinate_channels
from task.anomaly.unsupervised.models.dmad.encoder import ResNetEncoder, backbone_spec
from task.anomaly.unsupervised.models.dmad.loss import DMADLoss, distillation_loss, smoothness
from task.anomaly.unsupervised.models.dmad.torch_model import DMADModel
from task.anomaly.unsupervised.records import InferenceOutput
from task.common.errors import UserError
from task.common.smoothing import gaussian_blur2d
from task.common.warping import identity_grid, warp

EXPECTED_CHANNELS = {
    "resnet18": (64, 128, 256),
    "resnet34": (64, 128, 256),
    "resnet50": (256, 512, 1024),
    "wide_resnet50_2": (256, 512, 1024),
}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"])
@pytest.mark.parametrize("vq", [True, False])
def test_shapes_through_every_module(backbone: str, vq: bool) -> None:
    """Shapes only: the wide backbones are built and run on the meta device (no weights, no arithmetic), which checks
    the same module wiring in milliseconds; resnet18 runs for real, where the VQ loss value is checked too."""
    torch.manual_seed(0)
    real = backbone == "resnet18"
    with contextlib.nullcontext() if real else torch.device("meta"):
        spec = backbone_spec(backbone)
        x = torch.randn(2, 3, 64, 96)
        pdm = PyramidDeformation()
        deformation = pdm(x)
        assert deformation.warped.shape == x.shape
        for field in (deformation.coarse, deformation.fine, deformation.coarse_inverse, deformation.fine_inverse):
            assert field.shape == (2, 64, 96, 2)
        encoder = ResNetEncoder(backbone, pretrained=False)
        feats = encoder(deformation.warped)
        c1, c2, c3 = EXPECTED_CHANNELS[backbone]
        assert [tuple(f.shape) for f in feats] == [(2, c1, 16, 24), (2, c2, 8, 12), (2, c3, 4, 6)]
        bottleneck = Bottleneck(spec, vq=vq)
        embedding, vq_loss = bottleneck(feats)
        assert embedding.shape == (2, 512 * spec.expansion, 2, 3)
        assert vq_loss.shape == ()
        if real:
            assert (vq_loss > 0) == vq
        decoded = ReverseDecoder(spec)(embedding)
        assert [tuple(f.shape) for f in decoded] == [tuple(f.shape) for f in feats]


def test_model_eval_outputs() -> None:
    model = DMADModel("resnet18", pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
    assert isinstance(out, InferenceOutput) and set(out.extras) == {"deformation_map"}
    assert out.anomaly_map.shape == (3, 1, 64, 64)
    assert out.extras["deformation_map"].shape == (3, 1, 64, 64)
    assert out.score.shape == (3,)
    assert torch.all(out.anomaly_map >= 0) and torch.all(out.extras["deformation_map"] >= 0)


def test_model_without_pdm_has_no_deformation_map_or_loss_term() -> None:
    """MODEL.pdm=false (the ablation): plain reverse distillation, no deformation map, no deformation loss term, and
    the score is the normalised anomaly maximum alone."""
    torch.manual_seed(0)
    model = DMADModel("resnet18", pretrained=False, pdm=False, deform_weight=0.5)
    assert model.deformation is None and not any(name.startswith("deformation.") for name in model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    assert out.deformation is None
    loss, terms = DMADLoss(gamma=1.0)(x, out.encoder_features, out.decoder_features, out.deformation, out.vq_loss)
    assert set(terms) == {"distillation", "vq"} and torch.isclose(loss, terms["distillation"] + terms["vq"])
    model.eval()
    with torch.no_grad():
        result = model(x)
    assert result.extras == {}
    stats = model.score_stats
    expected = (result.anomaly_map.amax(dim=(1, 2, 3)) - stats[0]) / (stats[1] - stats[0])
    torch.testing.assert_close(result.score, expected)


def test_deformation_bounded_by_configured_shift() -> None:
    pdm = PyramidDeformation(coarse_shift=8 / 256, fine_shift=3 / 256)
    out = pdm(torch.randn(1, 3, 64, 64) * 10)
    assert out.coarse.abs().max() <= 2 * 8 / 256 + 1e-6
    assert out.fine.abs().max() <= 2 * 3 / 256 + 1e-6


def test_warp_with_zero_fields_is_identity() -> None:
    x = torch.randn(2, 3, 32, 48)
    grid = identity_grid(2, 32, 48, x.device, x.dtype)
    assert torch.allclose(warp(x, grid), x, atol=1e-5)
    pdm = PyramidDeformation()
    for head in (pdm.coarse_head, pdm.fine_head, pdm.coarse_inverse_head, pdm.fine_inverse_head):
        torch.nn.init.zeros_(head[-2].weight)
        torch.nn.init.zeros_(head[-2].bias)
    out = pdm(x)
    assert torch.count_nonzero(out.coarse) == 0
    assert torch.allclose(out.warped, x, atol=1e-4)  # grid_sample rounding only
    assert torch.allclose(out.unwarp(x), x, atol=1e-4)
    assert torch.allclose(out.magnitude_map(), torch.zeros(2, 1, 32, 48))


def test_warp_shifts_by_one_pixel() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    grid = identity_grid(1, 4, 4, x.device, x.dtype).clone()
    grid[..., 0] += 2 / 3  # one pixel in align_corners coordinates on a width of 4
    out = warp(x, grid)
    assert torch.allclose(out[0, 0, :, :3], x[0, 0, :, 1:])
    assert torch.allclose(out[0, 0, :, 3], torch.zeros(4))  # sampled outside: zero padding


def test_coordinate_channels_ranges() -> None:
    coords = coordinate_channels(16, 32)
    assert coords.shape == (1, 4, 16, 32)
    assert coords[0, 1, 0, 0] == -1 and coords[0, 1, -1, 0] == 1  # coarse row block
    assert torch.all(coords[0, 0, :, 0] == coords[0, 0, :, 5])  # row channels constant along W
    assert torch.all(coords[0, 2, 0, :] == coords[0, 2, 7, :])  # column channels constant along H


def test_vq_straight_through_gradient() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_embeddings=5, dim=4, beta=0.25)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, loss = vq(x)
    # Forward value is the nearest prototype.
    flat = x.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, vq.codebook.weight.detach()).argmin(1)
    assert torch.allclose(quantized.permute(0, 2, 3, 1).reshape(-1, 4), vq.codebook.weight[nearest], atol=1e-6)
    # Gradient w.r.t. the input is the identity (straight-through).
    g = torch.randn_like(quantized)
    (quantized * g).sum().backward()
    assert torch.allclose(x.grad, g)
    # Loss = codebook MSE + 0.25 * commitment MSE (equal in value).
    expected = 1.25 * ((quantized.detach() - x.detach()) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_vq_loss_gradients_reach_codebook_and_input() -> None:
    vq = VectorQuantizer(num_embeddings=3, dim=2)
    x = torch.randn(1, 2, 2, 2, requires_grad=True)
    _, loss = vq(x)
    loss.backward()
    assert vq.codebook.weight.grad is not None and vq.codebook.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_distillation_loss_hand_computed() -> None:
    a = [torch.tensor([[[[1.0, 0.0]]]])]  # one sample, flattened [1, 0]
    b = [torch.tensor([[[[0.0, 1.0]]]])]  # orthogonal: cosine 0 -> loss 1
    assert torch.isclose(distillation_loss(a, b), torch.tensor(1.0))
    assert torch.isclose(distillation_loss(a + a, a + a), torch.tensor(0.0), atol=1e-6)


def test_smoothness_hand_computed() -> None:
    field = torch.zeros(1, 3, 3, 2)
    assert smoothness(field) == 0
    field[0, 1, 1, 0] = 8.0  # centre response 8; each of 8 neighbours sees -8/8 = -1
    assert torch.isclose(smoothness(field), torch.tensor((8 + 8 * 1) / 9))


def test_feature_discrepancy_sums_scales() -> None:
    enc = [torch.ones(1, 4, 2, 2), torch.ones(1, 4, 1, 1)]
    dec = [-torch.ones(1, 4, 2, 2), torch.ones(1, 4, 1, 1)]
    out = feature_discrepancy(enc, dec, (8, 8))
    assert out.shape == (1, 1, 8, 8) and torch.allclose(out, torch.full((1, 1, 8, 8), 2.0))


def test_fuse_scores_uses_training_statistics() -> None:
    stats = torch.tensor([1.0, 3.0, 0.0, 0.5])
    score = fuse_scores(torch.tensor([2.0]), torch.tensor([0.5]), stats, torch.tensor(0.2))
    assert torch.isclose(score, torch.tensor([0.5 + 0.2 * 1.0]))


def test_loss_decreases_over_a_dozen_steps() -> None:
    torch.manual_seed(0)
    model = DMADModel("resnet18", pretrained=False).train()
    criterion = DMADLoss(gamma=1.0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.005, betas=(0.5, 0.999))
    x = torch.randn(2, 3, 64, 64)
    losses = []
    for _ in range(12):
        out = model(x)
        loss, _ = criterion(x, out.encoder_features, out.decoder_features, out.deformation, out.vq_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])  # seeded CPU run: 0.60


def test_encoder_is_frozen_and_passes_gradients_to_input() -> None:
    model = DMADModel("resnet18", pretrained=False).train()
    assert not model.encoder.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert not any(p is q for p in model.trainable_parameters() for q in model.encoder.parameters())
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    sum(f.sum() for f in model.encoder(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(64, 64), (37, 50), (10, 12), (1, 5)])
def test_smoothing_matches_scipy(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((2, 1, *shape)).astype(np.float32)
    ours = gaussian_blur2d(torch.from_numpy(maps), sigma=4).numpy()
    for i in range(2):
        np.testing.assert_allclose(ours[i], gaussian_filter(maps[i : i + 1], sigma=4)[0], atol=1e-6)


def test_unknown_backbone_is_a_user_error() -> None:
    with pytest.raises(UserError, match="resnet18"):
        backbone_spec("vgg16")


def test_pretrained_weights_failure_names_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(UserError, match="MODEL.backbone_weights.*MODEL.pretrained=false"):
        ResNetEncoder("resnet18", pretrained=True)


def test_backbone_weights_file_is_loaded(tmp_path) -> None:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    encoder = ResNetEncoder("resnet18", pretrained=False, weights_path=str(tmp_path / "r18.pth"))
    assert torch.equal(encoder.layer3[1].conv2.weight, net.layer3[1].conv2.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not a torchvision resnet18"):
        ResNetEncoder("resnet18", pretrained=False, weights_path=str(tmp_path / "bad.pth"))
