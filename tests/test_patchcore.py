"""PatchCore: coreset, nearest-neighbour map and re-weighted score against hand computations and brute force; the
gradient-free fit through the engine (train -> test, export parity, predict, benchmark, report); the mvtec, visa and
folder layouts; run defaults; the backbone's weight sources and their one-line errors.

Everything is tiny (resnet18, random init, 64x64 images, a few images) and on the CPU (conftest forces it).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import CATEGORY, PC_BASE, PC_YAML, SIZE, assert_ok, assert_user_error, main_in_process
from task.anomaly.unsupervised.deploy.onnx import TOLERANCE
from task.anomaly.unsupervised.models.patchcore.coreset import (
    coreset_size,
    greedy_coreset,
    projection_dim,
    select_coreset,
    sparse_random_projection,
)
from task.anomaly.unsupervised.models.patchcore.embedding import PatchEmbedding, adaptive_pool_matrix, patch_vectors
from task.anomaly.unsupervised.models.patchcore.neighbours import nearest_neighbour
from task.anomaly.unsupervised.models.patchcore.scoring import reweighted_score
from task.anomaly.unsupervised.models.patchcore.torch_model import PatchCoreModel
from task.common.errors import UserError
from task.common.smoothing import gaussian_blur2d


def _tiny_model(**kwargs) -> PatchCoreModel:
    torch.manual_seed(0)
    return PatchCoreModel(backbone="resnet18", pretrained=False, **kwargs).eval()


# ------------------------------------------------------------------------------------------------ coreset
def test_greedy_coreset_picks_the_farthest_point_each_time() -> None:
    # 1-D points 0, 1, 2, 10, 11, 5 from index 0: farthest from {0} is 11; then 5 (5 from 0, 6 from 11); then 2
    # (2 from 0, 3 from 5; 10 is 1 from 11, 1 is 1 from 0).
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [5.0]])
    assert greedy_coreset(points, 4, start=0).tolist() == [0, 4, 5, 2]
    # 2-D corners of a square and its centre, from the centre: the first corner (a tie of four, first index wins),
    # then the opposite corner, then the two others.
    square = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    assert greedy_coreset(square, 5, start=0).tolist() == [0, 1, 2, 3, 4]
    # duplicates are never selected twice
    assert sorted(greedy_coreset(torch.zeros(3, 2), 3, start=1).tolist()) == [0, 1, 2]


def test_select_coreset_sizes_projection_and_subset() -> None:
    assert projection_dim(204_800) == 301  # about 300 dims for 200 images of 32x32 patches (eps 0.9)
    assert coreset_size(1000, 0.1) == 100 and coreset_size(5, 0.01) == 1
    generator = torch.Generator().manual_seed(0)
    matrix = sparse_random_projection(400, 50, generator)
    assert 0.02 < (matrix != 0).float().mean() < 0.08  # density 1 / sqrt(400) = 0.05
    assert torch.allclose(matrix.abs().unique(), torch.tensor([0.0, math.sqrt(20 / 50)]))

    features = torch.randn(2000, 400, generator=generator)
    chunks = list(features.split(700))
    bank = select_coreset(chunks, 0.05, torch.Generator().manual_seed(1))
    assert bank.shape == (100, 400) and chunks == []
    rows = torch.cdist(bank, features).argmin(1)  # every bank row is one of the features, none twice
    assert torch.equal(features[rows], bank) and len(rows.unique()) == 100
    again = select_coreset(list(features.split(700)), 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(again, bank)  # seeded: the same bank on a rerun
    everything = select_coreset(list(features.split(700)), 1.0, torch.Generator())
    assert torch.equal(everything, features)  # ratio 1 keeps every feature in order


def test_coreset_covers_clusters_better_than_random_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 64, generator=generator) * 10
    features = (centres.repeat_interleave(50, 0) + torch.randn(1000, 64, generator=generator)).contiguous()
    bank = select_coreset([features], 0.02, torch.Generator().manual_seed(0))  # 20 features for 20 clusters
    gap = torch.pdist(centres).min()  # ~80: clusters (pairwise spread ~11) lie far apart
    assert torch.cdist(features, bank).min(1).values.max() < gap / 3  # every cluster has a representative
    assert torch.cdist(centres, bank).argmin(0).unique().numel() == 20


# ------------------------------------------------------------------------------------------------ search, map, score
def test_nearest_neighbour_equals_brute_force_cdist() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 48, generator=generator) * 3, torch.randn(5000, 48, generator=generator) * 3
    distance, index = nearest_neighbour(queries, bank, chunk=512)  # ten chunks, one partial
    expected = torch.cdist(queries.double(), bank.double()).min(1)
    assert torch.equal(index, expected.indices)
    assert torch.allclose(distance.double(), expected.values, rtol=1e-6, atol=1e-6)


def test_model_map_is_the_smoothed_upsampled_cdist_minimum() -> None:
    model = _tiny_model(coreset_ratio=1.0, sigma=2.0)
    generator = torch.Generator().manual_seed(0)
    train, image = torch.randn(3, 3, 64, 64, generator=generator), torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        model.set_memory_bank(patch_vectors(model.embed(train)))
        out = model(image)
        patches = patch_vectors(model.embed(image))
    assert model.memory_bank.shape == (3 * 8 * 8, 128 + 256)
    minimum = torch.cdist(patches.double(), model.memory_bank.double()).min(1).values.float().reshape(2, 1, 8, 8)
    expected = gaussian_blur2d(F.interpolate(minimum, size=(64, 64), mode="bilinear", align_corners=False), 2.0)
    assert out.anomaly_map.shape == (2, 1, 64, 64) and out.score.shape == (2,)
    assert torch.allclose(out.anomaly_map, expected, rtol=1e-5, atol=1e-5)


def test_reweighted_score_equals_the_hand_computation() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [10.0, 10.0]])
    patches = torch.tensor([[[0.4, 0.0], [0.0, 0.1]]])  # one image, two patches
    distances, indices = nearest_neighbour(patches[0], bank)
    assert indices.tolist() == [0, 0] and torch.allclose(distances, torch.tensor([0.4, 0.1]))
    # m_test = (0.4, 0), s* = 0.4, m* = (0, 0); its 3 nearest bank features: (0, 0), (1, 0), (0, 3)
    d = [0.4, 0.6, math.sqrt(0.4**2 + 3**2)]
    expected = (1 - math.exp(d[0]) / sum(math.exp(v) for v in d)) * 0.4
    score = reweighted_score(distances[None], indices[None], patches, bank, num_neighbors=3)
    assert score.shape == (1,) and score.item() == pytest.approx(expected, rel=1e-6)
    assert reweighted_score(distances[None], indices[None], patches, bank, num_neighbors=1).item() == pytest.approx(0.4)


def test_channel_pooling_matches_adaptive_avg_pool() -> None:
    x = torch.randn(7, 1536)
    for out_dim in (1024, 100, 1536):
        expected = F.adaptive_avg_pool1d(x[:, None], out_dim)[:, 0]
        assert torch.allclose(x @ adaptive_pool_matrix(1536, out_dim), expected, atol=1e-6)
    embedding = PatchEmbedding([8, 16], embedding_dim=6)
    out = embedding([torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)])
    assert out.shape == (2, 6, 4, 4)


def test_empty_bank_and_score_calibration() -> None:
    model = _tiny_model()
    with pytest.raises(UserError, match="memory bank is empty"):
        model(torch.randn(1, 3, 64, 64))
    raw = torch.tensor([2.0, 3.0, 6.0])
    model.set_score_stats(raw)
    assert torch.allclose(model.normalize(raw), torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(model.denormalize(model.normalize(raw)), raw)  # what calibrate() relies on
    model.set_score_stats(torch.zeros(4))  # no spread (coreset ratio 1 on training images): shifted, not scaled
    assert model.score_stats.tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------ backbone weights
def test_backbone_weights_file_and_pretrained_fetch_errors(tmp_path, monkeypatch) -> None:
    import timm

    source = timm.create_model("resnet18", pretrained=False)  # a full model: layer4 and fc are ignored
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = PatchCoreModel(backbone="resnet18", pretrained=True, backbone_weights=str(path))  # no fetch: the file wins
    assert torch.equal(
        model.features.net.state_dict()["layer3.1.conv2.weight"], source.state_dict()["layer3.1.conv2.weight"]
    )

    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("layer3.")}, path)
    with pytest.raises(UserError, match=r"not a state dict of timm resnet18 \(missing"):
        PatchCoreModel(backbone="resnet18", backbone_weights=str(path))

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        return create(*args, **kwargs)

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(
        UserError,
        match=r"could not fetch timm ImageNet weights for resnet18 .*MODEL.backbone_weights.*MODEL.pretrained=false",
    ):
        PatchCoreModel(backbone="resnet18", pretrained=True)


# ------------------------------------------------------------------------------------------------ through the engine
def test_train_fits_and_the_engine_saves_a_calibrated_model(patchcore_run) -> None:
    args, run_dir, stdout = patchcore_run
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state["format"] == "tnvision-patchcore" and set(state["thresholds"]) == {"image", "pixel"}
    bank = state["state_dict"]["memory_bank"]
    assert bank.shape == (int(6 * 8 * 8 * 0.25), 384)  # 6 training images of 8x8 patches, a quarter kept
    assert not (run_dir / "last.pt").exists()  # no optimiser state to resume
    assert state["config"]["LOG"]["wandb_project"] == "patchcore"  # the method's run default
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["image_auroc"] is not None and json.loads((run_dir / "run.json").read_text())["method"] == "patchcore"
    )
    assert re.search(r"metrics: image_auroc=", stdout)

    again = main_in_process(*args, "--mode", "test")  # the saved model reproduces the metrics
    assert_ok(again)
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics)


def test_test_mode_with_other_scoring_recalibrates(patchcore_run, caplog) -> None:
    args, run_dir, _ = patchcore_run
    result = main_in_process(
        *args, "--mode", "test", "--checkpoint", str(run_dir / "model.pt"), "MODEL.num_neighbors=1"
    )
    assert_ok(result)
    assert (
        "MODEL.num_neighbors: scoring with 1 from the config (the checkpoint was calibrated with 9); recalibrating"
        in caplog.text
    )
    line = assert_user_error(main_in_process(*args, "--mode", "test", "MODEL.coreset_ratio=0.5"))
    assert "MODEL.coreset_ratio=0.5 was given on the command line but checkpoint" in line


def test_export_parity_and_predict_with_both_backends(patchcore_run, dataset: Path, tmp_path: Path) -> None:
    args, run_dir, _ = patchcore_run
    export = main_in_process(*args, "--mode", "export")
    assert_ok(export)
    report = next(line for line in export.stdout.splitlines() if line.startswith("ONNX check"))
    relatives = [float(v) for v in re.findall(r"max \|diff\| \S+ \((\S+) of", report)]
    assert len(relatives) == 2 and all(r <= 1e-5 for r in relatives) and TOLERANCE >= 1e-5, report
    assert (run_dir / "model.onnx").is_file()

    images = dataset / CATEGORY / "test"
    scores = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        assert_ok(
            main_in_process(
                *args, "--mode", "predict", "--backend", backend, "--input", str(images), "--output", str(out)
            )
        )
        with open(out / "predictions.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 7 and all((out / row["picture"]).is_file() for row in rows)
        scores[backend] = np.array([float(row["score"]) for row in rows])
    assert np.allclose(scores["torch"], scores["onnx"], rtol=1e-4, atol=1e-5)


def test_benchmark_times_the_fit_not_optimiser_steps(patchcore_run, caplog) -> None:
    args, _, _ = patchcore_run
    result = main_in_process(
        *args, "--mode", "benchmark", "BENCHMARK.train_steps=1", "BENCHMARK.warmup=0", "BENCHMARK.eval_images=2"
    )
    assert_ok(result)
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert (
        line["train_s_per_step"] is None and line["train_steps"] == 0 and line["fit_s"] > 0 and line["fit_images"] == 8
    )
    assert line["method"] == "patchcore" and line["eval_images"] == 2
    assert (
        "patchcore learns by a gradient-free fit: timing one fit over 1 batch(es) instead of optimiser steps"
        in caplog.text
    )


def test_report_lists_only_this_methods_runs(patchcore_run, tmp_path: Path, monkeypatch) -> None:
    args, run_dir, _ = patchcore_run
    savedir = run_dir.parents[1]
    other = savedir / "dmad" / CATEGORY  # a newer DMAD run of the same category must not replace PatchCore's
    other.mkdir(parents=True, exist_ok=True)
    (other / "metrics.json").write_text(json.dumps({"image_auroc": 0.123}))
    (other / "run.json").write_text(json.dumps({"method": "dmad", "category": CATEGORY}))
    readme = tmp_path / "README.md"
    shared = "<!-- results:start -->\nDMAD\n<!-- results:end -->\n"
    readme.write_text(shared + "<!-- results:patchcore:start -->\n<!-- results:patchcore:end -->\n")
    monkeypatch.chdir(tmp_path)
    result = main_in_process(*args, "--mode", "report", "--update-readme")
    assert_ok(result)
    assert "12.3" not in result.stdout and f"patchcore/{CATEGORY}" in result.stdout
    text = readme.read_text()
    assert text.startswith(shared) and "Image-Level AUC" in text


# ------------------------------------------------------------------------------------------------ layouts, config
def _rgb(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)).save(path)


def _mask(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(path)


def _visa(root: Path) -> None:
    rows = [["object", "split", "label", "image", "mask"]]
    for i in range(5):
        _rgb(root / f"candle/Data/Images/Normal/{i:04d}.JPG", i)
        rows.append(["candle", "train" if i < 4 else "test", "normal", f"candle/Data/Images/Normal/{i:04d}.JPG", ""])
    for i in range(2):
        _rgb(root / f"candle/Data/Images/Anomaly/{i:03d}.JPG", 10 + i)
        _mask(root / f"candle/Data/Masks/Anomaly/{i:03d}.png")
        rows.append(
            [
                "candle",
                "test",
                "anomaly",
                f"candle/Data/Images/Anomaly/{i:03d}.JPG",
                f"candle/Data/Masks/Anomaly/{i:03d}.png",
            ]
        )
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def _folder(root: Path) -> None:
    for i in range(6):
        _rgb(root / "ok" / f"n{i}.png", i)
    for i in range(2):
        _rgb(root / "ng" / f"d{i}.png", 10 + i)
        _mask(root / "ng_masks" / f"d{i}.png")


@pytest.mark.parametrize(
    ("make", "keys"),
    [
        (_visa, ["DATASET.format=visa", "DATASET.target=candle"]),
        (
            _folder,
            [
                "DATASET.format=folder",
                "DATASET.target=widgets",
                "DATASET.normal_dir=ok",
                "DATASET.abnormal_dir=ng",
                "DATASET.mask_dir=ng_masks",
            ],
        ),
    ],
    ids=["visa", "folder"],
)
def test_visa_and_folder_layouts_train_and_test(make, keys, tmp_path: Path) -> None:
    make(tmp_path / "data")
    args = [
        *PC_BASE,
        f"DATASET.datadir={tmp_path / 'data'}",
        "DATASET.demo=false",
        f"DATASET.resize=[{SIZE},{SIZE}]",
        f"RESULT.savedir={tmp_path / 'runs'}",
        "RESULT.assets_dir=null",
        "TEST.save_images=false",
        *keys,
    ]
    assert_ok(main_in_process(*args))
    run_dir = next((tmp_path / "runs" / "patchcore").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["pixel_auroc"] is not None
        and json.loads((run_dir / "run.json").read_text())["format"] == keys[0].split("=")[1]
    )
    assert_ok(main_in_process(*args, "--mode", "test"))


def test_run_defaults_and_config_errors(tmp_path: Path) -> None:
    import task.anomaly.unsupervised.models.available  # noqa: F401  (registers the methods)
    from task.anomaly.unsupervised.engine.schema import method_schema
    from task.anomaly.unsupervised.models.registry import get_method
    from task.common.config import load_config

    patchcore, dmad = (get_method("anomaly", "unsupervised", name, "image") for name in ("patchcore", "dmad"))
    assert patchcore.learning == "fit" and dmad.learning == "gradient"
    cfg = load_config(method_schema(patchcore), PC_YAML)
    assert cfg.LOG.wandb_project == "patchcore" and cfg.RESULT.assets_dir == "assets/patchcore"
    assert load_config(method_schema(dmad)).LOG.wandb_project == "dmad"  # the shared default is untouched
    assert load_config(method_schema(patchcore), PC_YAML, ["LOG.wandb_project=mine"]).LOG.wandb_project == "mine"

    run = [*PC_BASE, f"RESULT.savedir={tmp_path}", f"DATASET.datadir={tmp_path}"]
    assert_user_error(
        main_in_process(*run, "MODEL.backbone=resnet_19"), "MODEL.backbone 'resnet_19' is not a timm model"
    )
    assert_user_error(main_in_process(*run, "MODEL.layers=[layer3,layer2]"), "must be distinct and ordered")
    assert_user_error(
        main_in_process(*run, "MODEL.layers=[layer9]"), "its stages: act1, layer1, layer2, layer3, layer4"
    )
    assert_user_error(main_in_process(*run, "MODEL.coreset_ratio=0"), "MODEL.coreset_ratio must be in (0, 1]")
    assert_user_error(main_in_process(*run, "DATASET.format=video"), "--model_name patchcore has no video variant")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
def test_search_and_coreset_on_cuda_match_the_cpu() -> None:
    generator = torch.Generator().manual_seed(0)
    features, queries = torch.randn(4000, 64, generator=generator), torch.randn(500, 64, generator=generator)
    cuda = torch.device("cuda")
    assert torch.equal(greedy_coreset(features.to(cuda), 50, start=3).cpu(), greedy_coreset(features, 50, start=3))
    distance, index = nearest_neighbour(queries.to(cuda), features.to(cuda), chunk=1000)
    expected = nearest_neighbour(queries, features, chunk=1000)
    assert torch.equal(index.cpu(), expected[1]) and torch.allclose(distance.cpu(), expected[0], atol=1e-5)
    chunks = [c.to(cuda) for c in features.split(1000)]
    bank = select_coreset(chunks, 0.1, torch.Generator().manual_seed(0))
    assert bank.device.type == "cuda" and bank.shape == (400, 64)
