"""Golden parity with the official DMAD-PPDM release (FlappyPeggy/DMAD), without any of its code in this repository.

Why this design: the official bottleneck (``BN_layer``) hard-codes a 1024-wide codebook and a 1024 + 48e concat
width, so no official configuration smaller than wide_resnet50_2 exists (with BasicBlock the widths do not
line up). A wide_resnet50_2 checkpoint is ~100 M parameters, far too large to store. So the weights are not
stored: every tensor is generated from a closed-form, platform-independent formula (a splitmix64 integer hash of
``crc32(name)`` and the element index, see ``closed_form_tensor``) that depends on neither torch's RNG nor libm.

How ``tests/golden/`` was made (once, outside this repository, with the official code on CPU):
  * ``official_wres50_schema.json``: names, shapes and dtypes of the official state dicts ``offset``, ``bn``
    (VQ variant), ``decoder`` and the encoder (torchvision wide_resnet50_2 names, up to layer3).
  * every official tensor was set to ``closed_form_tensor("<part>.<key>", ...)`` (strict ``load_state_dict``);
  * two small originals (an RGB 96x80 and a grayscale 72x72 image, stored as uint8) went through the official
    ``get_data_transforms(64, 64)``; per image, the official ``evaluation()`` maths gave ``anomaly_map`` (feature
    discrepancy, inverse-warped, ``gaussian_filter(sigma=4)`` on the [1, 1, H, W] array) and the deformation map
    ``anomaly_os2``; one training forward on the batch of both (train-mode BatchNorm) gave the official
    ``loss_fucntion``, ``offset_loss`` and VQ loss.

The test regenerates the same weights, loads them through our official-checkpoint converter and compares.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torchvision.models import resnet18

from helpers import BASE, REPO, assert_user_error, dmad_method, load_run_config, main_in_process, make_engine
from task.anomaly.unsupervised.data.image.dataset import AnomalyDataset, Sample
from task.anomaly.unsupervised.data.image.synthetic import make_demo_dataset
from task.anomaly.unsupervised.engine.checkpoints import make_payload
from task.anomaly.unsupervised.models.dmad.loss import DMADLoss
from task.anomaly.unsupervised.models.dmad.official_import import check_official, convert_official, describe_official
from task.anomaly.unsupervised.models.dmad.torch_model import DMADModel
from task.common.config import Config
from task.common.errors import UserError
from task.common.io import save_checkpoint

GOLDEN = REPO / "tests" / "golden"
SIZE = 64
# The acceptance bound: maps agree within this fraction of the official map's value range.
MAP_TOLERANCE = 1e-4
_M64 = (1 << 64) - 1


def closed_form_uniform(name: str, n: int) -> np.ndarray:
    """``n`` float64 values in [-1, 1): splitmix64 of (crc32(name), index), 24-bit mantissa; exact on any platform."""
    seed = (zlib.crc32(name.encode()) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _M64
    x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(40)).astype(np.float64) / float(1 << 23) - 1.0


def closed_form_tensor(name: str, shape: list[int], dtype: str) -> Tensor:
    """The tensor ``name`` of ``shape``: BatchNorm statistics and affine terms near their neutral values (but not
    equal to them, so eval-mode BN matters), a positive codebook on the scale of ReLU features, and
    variance-preserving uniform weights elsewhere."""
    if dtype == "int64":  # num_batches_tracked
        return torch.zeros(shape, dtype=torch.int64)
    u = closed_form_uniform(name, math.prod(shape)).reshape(shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_mean":
        value = 0.1 * u
    elif leaf == "running_var":
        value = 1.0 + 0.3 * u
    elif leaf == "weight" and len(shape) == 1:  # BatchNorm gamma
        value = 1.0 + 0.2 * u
    elif "embedding" in name:  # the VQ codebook: compared with post-ReLU features
        value = (u + 1.0) / 2.0
    elif leaf == "bias":
        value = 0.1 * u
    else:
        value = u * math.sqrt(3.0 / math.prod(shape[1:]))
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def closed_form_state(schema: dict[str, list], part: str) -> dict[str, Tensor]:
    """A full state dict for one official part ("offset", "bn", "decoder", "encoder") from its stored schema."""
    return {key: closed_form_tensor(f"{part}.{key}", shape, dtype) for key, shape, dtype in schema[part]}


def _config(*overrides: str) -> Config:
    return load_run_config(f"DATASET.resize=[{SIZE},{SIZE}]", "MODEL.pretrained=false", *overrides, yaml=None)


def load_official(model: DMADModel, state: dict, path: str, cfg: Config) -> None:
    """What Engine.load does with an official file: check it against the config, then convert and load it."""
    method = dmad_method()
    assert method.is_foreign_checkpoint(state)
    method.check_foreign_checkpoint(state, Path(path), cfg)
    method.load_foreign_checkpoint(model, state, Path(path), cfg)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "official_wres50_64.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def schema() -> dict[str, list]:
    return json.loads((GOLDEN / "official_wres50_schema.json").read_text())


@pytest.fixture(scope="module")
def official_state(schema: dict[str, list]) -> dict[str, dict[str, Tensor]]:
    """What ``torch.save({'offset': ..., 'bn': ..., 'decoder': ...})`` of the official code holds."""
    return {part: closed_form_state(schema, part) for part in ("offset", "bn", "decoder")}


@pytest.fixture(scope="module")
def model(schema: dict[str, list], official_state: dict[str, dict[str, Tensor]]) -> DMADModel:
    """Our wide_resnet50_2 VQ model filled through the official-checkpoint path and a torchvision encoder state."""
    net = DMADModel("wide_resnet50_2", pretrained=False, vq=True)
    load_official(net, official_state, "golden.pth", _config())
    encoder_state = closed_form_state(schema, "encoder")
    missing, unexpected = net.encoder.load_state_dict(encoder_state, strict=False)
    assert not missing and not unexpected
    return net.eval()


def _golden_inputs(golden: dict[str, np.ndarray]) -> Tensor:
    """The two originals after the official transforms: [2, 3, 64, 64]."""
    return torch.from_numpy(golden["inputs"])


def test_preprocessing_matches_official_transforms(golden: dict[str, np.ndarray], tmp_path: Path) -> None:
    paths = []
    for i, key in enumerate(("original_rgb", "original_gray")):
        path = tmp_path / f"{i}.png"
        Image.fromarray(golden[key]).save(path)
        paths.append(path)
    dataset = AnomalyDataset([Sample(str(p), 0, None, "good") for p in paths], (SIZE, SIZE))
    ours = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    assert torch.allclose(ours, _golden_inputs(golden), rtol=0, atol=1e-6)


def test_maps_match_official_evaluation(model: DMADModel, golden: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        out = model(_golden_inputs(golden))
    for name, ours in (("anomaly_maps", out.anomaly_map), ("deformation_maps", out.extras["deformation_map"])):
        reference = torch.from_numpy(golden[name]).double()
        for i in range(len(reference)):
            value_range = float(reference[i].max() - reference[i].min())
            diff = float((ours[i, 0].double() - reference[i]).abs().max())
            assert value_range > 0
            assert diff <= MAP_TOLERANCE * value_range, f"{name}[{i}]: max|diff| {diff:.3e} vs range {value_range:.3e}"


def test_training_losses_match_official(model: DMADModel, golden: dict[str, np.ndarray]) -> None:
    # Train-mode BatchNorm uses batch statistics like the official step; momentum 0 keeps the running
    # statistics (shared with the other tests through the module fixture) unchanged.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        model.train()
        x = _golden_inputs(golden)
        with torch.no_grad():
            out = model(x)
            _, terms = DMADLoss(gamma=1.0)(x, out.encoder_features, out.decoder_features, out.deformation, out.vq_loss)
    finally:
        model.eval()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    official = dict(zip(("distillation", "deformation", "vq"), golden["losses"].tolist()))
    for name, expected in official.items():
        assert float(terms[name]) == pytest.approx(expected, rel=1e-5), name


def test_official_conversion_ignores_only_unused_tensors(
    official_state: dict[str, dict[str, Tensor]], model: DMADModel, caplog
) -> None:
    entries, ignored = convert_official(official_state)
    assert sorted(k for k, _ in ignored) == sorted(
        [f"offset.conv_offset1.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")]
        + ["bn.conv4.weight"]
        + [f"bn.bn4.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    )
    # Everything else fills the whole model except the encoder and the score buffers.
    own = model.state_dict()
    assert set(entries) == {
        k for k in own if not k.startswith("encoder.") and k not in ("score_stats", "deform_weight")
    }
    # A DataParallel "module." prefix is accepted.
    prefixed = {part: {f"module.{k}": v for k, v in sd.items()} for part, sd in official_state.items()}
    assert set(convert_official(prefixed)[0]) == set(entries)
    with caplog.at_level(logging.INFO, logger="dmad"):
        load_official(model, official_state, "wres50_bottle_I.pth", _config())
    text = caplog.text
    assert (
        "loaded official DMAD-PPDM checkpoint wres50_bottle_I.pth (MODEL.backbone=wide_resnet50_2, MODEL.vq=true"
        in text
    )
    assert "ignored 4 official tensors, CoordConv2d" in text and "ignored 6 official tensors, conv4/bn4" in text


def test_official_checkpoint_with_wrong_config_is_a_one_line_error(
    official_state: dict[str, dict[str, Tensor]],
) -> None:
    assert describe_official(official_state) == {
        "MODEL.backbone": "wide_resnet50_2",
        "MODEL.vq": True,
        "MODEL.vq_num_embeddings": 200,
    }
    with pytest.raises(UserError) as info:
        check_official(official_state, "wres50_bottle_I.pth", _config("MODEL.backbone=resnet18"))
    message = str(info.value)
    assert "\n" not in message and "pass MODEL.backbone=wide_resnet50_2" in message
    # The pixel-level (_P) release has no codebook: it needs MODEL.vq=false.
    no_vq = dict(official_state, bn={k: v for k, v in official_state["bn"].items() if not k.startswith("vq3.")})
    with pytest.raises(UserError, match=r"pass MODEL.vq=false$"):
        check_official(no_vq, "wres50_bottle_P.pth", _config())
    # The ablation without a PDM cannot hold an official (PPDM) checkpoint.
    with pytest.raises(UserError, match=r"holds a PDM; remove MODEL.pdm=false$"):
        dmad_method().check_foreign_checkpoint(official_state, Path("wres50_bottle_I.pth"), _config("MODEL.pdm=false"))


def test_unrecognised_official_shapes_fail_cleanly(
    official_state: dict[str, dict[str, Tensor]], model: DMADModel
) -> None:
    # A decoder that matches no known backbone passes the config check but cannot fill the model.
    truncated = dict(
        official_state, decoder={k: v for k, v in official_state["decoder"].items() if not k.startswith("layer3.5.")}
    )
    assert describe_official(truncated)["MODEL.backbone"] is None
    with pytest.raises(
        UserError,
        match=(
            r"^official checkpoint odd.pth lacks decoder\.layer3\.5\.conv1\.weight; "
            r"it is not a complete DMAD-PPDM checkpoint$"
        ),
    ) as info:
        load_official(model, truncated, "odd.pth", _config())
    assert "\n" not in str(info.value)


def test_official_checkpoint_with_wrong_backbone_from_the_cli(tmp_path: Path) -> None:
    # Only the tensors the config check reads: a wide_resnet50_2 decoder layer3 (6 blocks, width 128) and a codebook.
    decoder = {f"layer3.{i}.conv{j}.weight": torch.zeros(128 if j == 1 else 1, 1) for i in range(6) for j in (1, 3)}
    checkpoint = tmp_path / "wres50_demo_I.pth"
    torch.save({"offset": {}, "bn": {"vq3.embedding.weight": torch.zeros(200, 1)}, "decoder": decoder}, checkpoint)
    make_demo_dataset(tmp_path / "data", n_train=2, n_test_good=1, n_test_defect=2, size=64)
    result = main_in_process(
        *BASE,
        "--mode",
        "test",
        "--checkpoint",
        str(checkpoint),
        f"DATASET.datadir={tmp_path / 'data'}",
        f"RESULT.savedir={tmp_path / 'runs'}",
        "RESULT.assets_dir=null",
        f"DATASET.resize=[{SIZE},{SIZE}]",
    )
    line = assert_user_error(result)
    assert line == (
        f"error: official checkpoint {checkpoint} needs MODEL.backbone=wide_resnet50_2 but the config has "
        "MODEL.backbone=resnet18; "
        "pass MODEL.backbone=wide_resnet50_2"
    )


def test_backbone_weights_are_used_exactly(tmp_path: Path) -> None:
    # A full torchvision state dict (layer4 and fc included, as downloaded files are); the encoder keeps up to layer3.
    with torch.device("meta"):
        shapes = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in resnet18().state_dict().items()}
    weights = {k: closed_form_tensor(f"encoder.{k}", shape, dtype) for k, (shape, dtype) in shapes.items()}
    path = tmp_path / "resnet18.pth"
    torch.save(weights, path)
    cfg = load_run_config(
        "MODEL.backbone=resnet18", f"MODEL.backbone_weights={path}", "MODEL.pretrained=true", yaml=None
    )
    encoder_state = dmad_method().build(cfg).encoder.state_dict()
    assert set(encoder_state) == {k for k in weights if not k.startswith(("layer4.", "fc."))}
    for key, value in encoder_state.items():
        assert torch.equal(value, weights[key]), key


def test_own_checkpoints_still_load(tmp_path: Path, caplog) -> None:
    overrides = (
        f"DATASET.resize=[{SIZE},{SIZE}]",
        "MODEL.pretrained=false",
        "MODEL.backbone=resnet18",
        f"RESULT.savedir={tmp_path}",
    )
    engine = make_engine(*overrides, yaml=None)
    torch.manual_seed(1)
    source = engine.method.build(engine.cfg)
    path = tmp_path / "model.pt"
    save_checkpoint(make_payload(engine.method, engine.cfg, source, {"image": 0.5, "pixel": 0.25}), path)
    loaded = engine.load(path)
    assert loaded.calibrated and loaded.thresholds == {"image": 0.5, "pixel": 0.25}
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    # MODEL.vq defines the network: from the checkpoint. A YAML value that differs is a warning ...
    with caplog.at_level(logging.WARNING):
        loaded = make_engine(*overrides, "MODEL.vq=false", yaml=None).load(path)
    assert loaded.cfg.MODEL.vq is True and loaded.model.bottleneck.quantizer is not None
    assert "MODEL.vq: using the checkpoint's True (the config says False)" in caplog.text
    # ... and a command-line override that differs is an error naming both values.
    with pytest.raises(
        UserError,
        match=r"MODEL.vq=False was given on the command line but checkpoint .* was trained with MODEL.vq=True",
    ):
        make_engine(*overrides, "MODEL.vq=false", overridden=frozenset({"MODEL.vq"}), yaml=None).load(path)
