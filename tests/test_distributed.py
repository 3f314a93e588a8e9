"""DistributedDataParallel training on CPU (gloo): two processes, one set of outputs, a checkpoint that loads alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import BASE, REPO, assert_ok, cpu_env, main_in_process
from task.anomaly.unsupervised.data.image.synthetic import make_demo_dataset
from task.common.runtime import DistributedContext


def test_shards_cover_the_batch_and_are_never_empty() -> None:
    ranks = [DistributedContext(rank=r, world_size=2) for r in range(2)]
    assert [ctx.shard([4, 7, 1, 9, 3]) for ctx in ranks] == [[4, 1, 3], [7, 9]]
    # An epoch's last batch smaller than the world: every process still gets an image (DDP needs every rank).
    assert [ctx.shard([5]) for ctx in ranks] == [[5], [5]]
    assert DistributedContext().shard([2, 0, 1]) == [2, 0, 1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], subprocess.CompletedProcess]:
    """3 steps of resnet18 at 64x64 on 2 CPU processes; 5 training images in batches of 4 leave a 1-image batch."""
    root = tmp_path_factory.mktemp("ddp")
    make_demo_dataset(root / "data", "demo", n_train=5, n_test_good=2, n_test_defect=2, size=64)
    overrides = [
        f"DATASET.datadir={root / 'data'}",
        "DATASET.demo=false",
        "DATASET.resize=[64,64]",
        "DATALOADER.batch_size=4",
        "TRAIN.num_training_steps=3",
        "TEST.save_images=false",
        f"RESULT.savedir={root / 'runs'}",
        "RESULT.assets_dir=null",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "main.py"),
        *BASE,
        *overrides,
    ]
    result = subprocess.run(
        command, cwd=root, capture_output=True, text=True, timeout=600, env=cpu_env(OMP_NUM_THREADS="1")
    )
    return root, overrides, result


@pytest.mark.slow
def test_two_process_training_writes_one_set_of_outputs(ddp_run) -> None:
    root, _, result = ddp_run
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = root / "runs" / "dmad" / "demo"
    # No temporary files left over; the run lock (.lock) stays by design (runlock.py) and is empty once released.
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".lock"]
    assert (run_dir / ".lock").read_bytes() == b""
    for name in ("model.pt", "last.pt", "metrics.json", "predictions.csv", "config.yaml", "train.log"):
        assert (run_dir / name).is_file(), name
    # Only rank 0 logs and evaluates.
    assert result.stdout.count("outputs written to") == 1, result.stdout
    assert result.stdout.count("metrics: ") == 1, result.stdout
    assert len((run_dir / "predictions.csv").read_text().splitlines()) == 1 + 4
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == 3
    assert not any(k.startswith("module.") for k in last["state_dict"])  # saved from the unwrapped model


@pytest.mark.slow
def test_ddp_checkpoint_loads_in_a_single_process(ddp_run) -> None:
    root, overrides, result = ddp_run
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = root / "runs" / "dmad" / "demo"
    trained = json.loads((run_dir / "metrics.json").read_text())
    # The same thread count as rank 0 of the DDP job (OMP_NUM_THREADS=1), which evaluated alone: CPU kernels then
    # split and reduce in the same order, so the single process recomputes the same float32 maps and scores. (With
    # 2 threads against 1, reductions regroup and scores moved by ~6e-6 on an AMD EPYC, which 1e-6 does not allow.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_ok(main_in_process(*BASE, "--mode", "test", *overrides))
    finally:
        torch.set_num_threads(threads)
    tested = json.loads((run_dir / "metrics.json").read_text())
    for key, value in trained.items():
        assert tested[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
