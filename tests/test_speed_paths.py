"""The fast paths keep the maths: frozen encoder without gradients, fused optimiser and PDM heads, bf16 autocast,
channels_last, and ``--mode benchmark``'s JSON. No timing assertions.

(Cached vs uncached dataset equivalence is covered by tests/test_data.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import BASE, assert_ok, main_in_process, make_engine
from task.anomaly.unsupervised.engine.training import Stepper, make_optimizer
from task.anomaly.unsupervised.image.benchmark import random_test_batches
from task.anomaly.unsupervised.image.inference import predict_loader
from task.anomaly.unsupervised.models.dmad.deformation import PyramidDeformation
from task.anomaly.unsupervised.models.dmad.torch_model import DMADModel
from task.anomaly.unsupervised.records import Predictions

TINY = [
    "MODEL.backbone=resnet18",
    "MODEL.pretrained=false",
    "DATASET.resize=[64,64]",
    "DATALOADER.batch_size=2",
    "TEST.batch_size=4",
]
CPU = torch.device("cpu")
DEFORMATION = "deformation_map"


def engine_for(*overrides: str):
    return make_engine(*TINY, *overrides, yaml=None)


@pytest.fixture(scope="module")
def trained() -> tuple[object, DMADModel, torch.optim.Optimizer]:
    """A tiny model after three float32 training steps through the training loop's own Stepper."""
    engine = engine_for()
    torch.manual_seed(0)
    model = engine.build_model()
    stepper = Stepper(engine, model)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, 4):
        stepper({"image": torch.randn(2, 3, 64, 64, generator=generator)}, step)
    return engine, model, stepper.optimizer


@pytest.fixture(scope="module")
def test_batches() -> list[dict[str, torch.Tensor]]:
    return random_test_batches(6, (64, 64), 4, torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def float32_preds(trained, test_batches) -> Predictions:
    _, model, _ = trained
    return predict_loader(model, test_batches, CPU)


def test_frozen_encoder_holds_no_gradients_or_optimizer_state(trained) -> None:
    _, model, optimizer = trained
    encoder_params = list(model.encoder.parameters())
    assert encoder_params and all(not p.requires_grad and p.grad is None for p in encoder_params)
    trainable = model.trainable_parameters()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainable}
    assert not in_optimizer & {id(p) for p in encoder_params}
    # Every trainable parameter received gradients (Adam's moments moved); they are freed after the step.
    assert all(float(optimizer.state[p]["exp_avg_sq"].abs().sum()) > 0 for p in trainable)
    assert all(p.grad is None for p in trainable)


def test_fused_optimizer_step_matches_the_plain_one() -> None:
    engine = engine_for()
    torch.manual_seed(0)
    model = engine.build_model()
    fused = make_optimizer(engine, model)
    assert fused.param_groups[0]["fused"]
    params = model.trainable_parameters()
    plain_params = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.AdamW(plain_params, lr=0.005, betas=(0.5, 0.999), weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p, q in zip(params, plain_params):
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, plain_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_stacked_opening_conv_equals_each_head_on_its_own() -> None:
    torch.manual_seed(0)
    pdm = PyramidDeformation().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = pdm(x)
        stem = pdm.stem(x)
        features = torch.cat([pdm.refine(stem), stem], dim=1)
        for head, scale, field in (
            (pdm.coarse_head, pdm.coarse_scale, out.coarse),
            (pdm.fine_head, pdm.fine_scale, out.fine),
            (pdm.coarse_inverse_head, pdm.coarse_scale, out.coarse_inverse),
            (pdm.fine_inverse_head, pdm.fine_scale, out.fine_inverse),
        ):
            expected = F.interpolate(head(features) * scale, (64, 96), mode="bilinear", align_corners=True).permute(
                0, 2, 3, 1
            )
            torch.testing.assert_close(field, expected, rtol=1e-5, atol=1e-7)


def test_bf16_training_step_runs_on_cpu() -> None:
    engine = engine_for("TRAIN.amp=bf16")
    assert engine.channels_last  # implied on CPU, where oneDNN's bf16 kernels want NHWC
    torch.manual_seed(0)
    model = engine.build_model()
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    model.train()
    loss, terms = Stepper(engine, model)({"image": torch.randn(2, 3, 64, 64)}, 1)
    assert torch.isfinite(loss) and set(terms) == {"distillation", "deformation", "vq"}
    # The deformation fields and grids stay float32 under autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.deformation(torch.randn(1, 3, 64, 64)).grid_coarse.dtype == torch.float32


def test_bf16_evaluation_gives_float32_maps_close_to_float32(trained, test_batches, float32_preds) -> None:
    _, model, _ = trained
    bf16 = predict_loader(model, test_batches, CPU, amp="bf16")
    assert bf16.anomaly_maps.dtype == torch.float32
    scale = float32_preds.anomaly_maps.abs().max()
    assert (bf16.anomaly_maps - float32_preds.anomaly_maps).abs().max() <= 0.02 * scale
    assert (bf16.extras[DEFORMATION] - float32_preds.extras[DEFORMATION]).abs().max() <= 0.02 * float32_preds.extras[
        DEFORMATION
    ].abs().max()
    torch.testing.assert_close(bf16.scores, float32_preds.scores, rtol=0.02, atol=0.02)
    # Smoothing runs in float32: the maps are not quantised to bf16's 256 steps per octave.
    assert bf16.anomaly_maps.unique().numel() > 0.5 * float32_preds.anomaly_maps.unique().numel()


def test_channels_last_gives_the_same_maps(trained, test_batches, float32_preds) -> None:
    _, model, _ = trained
    engine = engine_for("TRAIN.channels_last=true")
    fresh = engine.method.build(engine.cfg)
    fresh.load_state_dict(model.state_dict())
    fresh = engine.method.to_device(fresh, engine.device, engine.channels_last)
    assert fresh.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    preds = predict_loader(fresh, test_batches, CPU, channels_last=True)
    torch.testing.assert_close(preds.anomaly_maps, float32_preds.anomaly_maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(preds.extras[DEFORMATION], float32_preds.extras[DEFORMATION], rtol=0, atol=1e-5)
    torch.testing.assert_close(preds.scores, float32_preds.scores, rtol=0, atol=1e-5)


def test_benchmark_mode_prints_one_json_object(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = main_in_process(
        *BASE,
        "--mode",
        "benchmark",
        *TINY,
        f"DATASET.datadir={tmp_path / 'absent'}",
        "DATASET.demo=false",
        f"RESULT.savedir={tmp_path / 'runs'}",
        "BENCHMARK.train_steps=2",
        "BENCHMARK.warmup=1",
        "BENCHMARK.eval_images=4",
    )
    assert_ok(result)
    objects = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(objects) == 1, result.stdout
    report = json.loads(objects[0])
    for key in (
        "train_s_per_step",
        "train_images_per_s",
        "eval_images_per_s",
        "metrics_s",
        "peak_rss_mb",
        "peak_rss_train_mb",
    ):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["peak_cuda_mb"] is None and report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["batch_size"] == 2 and report["image_size"] == [64, 64] and report["backbone"] == "resnet18"
    assert report["method"] == "dmad" and report["pdm"] is True and report["vq"] is True
    assert report["train_steps"] == 2 and report["eval_images"] == 4 and report["data"] == "random"
    assert report["world_size"] == 1 and report["channels_last"] is False and report["compile"] is False
    assert "metrics:" not in result.stdout  # benchmark returns no metrics dict
    assert list(tmp_path.iterdir()) == []  # nothing written
