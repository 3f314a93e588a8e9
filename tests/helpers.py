"""Helpers shared by the tests: paths, the command-line runners, the error-contract checks, configs and engines.

* ``run_cli(*args, env=...)``: ``python main.py ARGS`` in a real subprocess (CPU only) -> CompletedProcess. Kept for
  the end-to-end path, a killed run, DDP and "no traceback" checks; everything else goes through
  ``main_in_process(*args)``, the same ``main.main`` without an interpreter start-up per case.
* ``assert_user_error(result, *needles)``: exit code 2, exactly one ``error: ...`` line naming every needle, no
  traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "anomaly" / "unsupervised" / "dmad"
DEMO_YAML = CONFIGS / "demo.yaml"
BASE = ["--task_type", "anomaly", "--model_name", "dmad", "--yaml_config", str(DEMO_YAML)]
CATEGORY = "widget"  # not "demo": the run must not depend on the demo's own category name
SIZE = 64
N_TRAIN, N_GOOD, N_DEFECT = 6, 3, 4  # 6 images in batches of 2: 3 steps per epoch, so STEPS crosses an epoch end
STEPS = 4  # last.pt every 2 steps: the step-2 checkpoint is mid-run and mid-epoch
SECRET = "tnv-test-secret-9f3c1a7e5b"  # WANDB_API_KEY of the shared run: must never reach its files
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------- command line
def cpu_env(**extra: str) -> dict[str, str]:
    """This environment, CPU only (runs are bit-reproducible and comparable with ONNX Runtime's CPU float32; on a GPU,
    TF32 convolutions are not), without torchrun's variables (should pytest itself run under torchrun)."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` in a subprocess on the CPU; ``env`` adds variables to this environment."""
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cpu_env(**(env or {})),
    )


@dataclass
class Result:
    """What an in-process ``main.main`` call returned and printed (the fields of a CompletedProcess the tests read)."""

    returncode: int
    stdout: str
    stderr: str


def main_in_process(*args: str) -> Result:
    """``main.main(ARGS)`` in this process on the CPU, capturing stdout and stderr (tqdm writes there too).

    main.py's logging set-up is skipped (pytest owns the root logger's handlers; log records reach ``caplog``), and the
    root level is INFO for the call so that the engine's messages are recorded.
    """
    import torch

    import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    level = root.level
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(main, "setup_logging", lambda: None)
        mp.setattr(torch.cuda, "is_available", lambda: False)
        root.setLevel(logging.INFO)
        try:
            code = main.main(list(args))
        finally:
            root.setLevel(level)
            main.close_progress_bars()
    return Result(code, out.getvalue(), err.getvalue())


def assert_user_error(result, *needles: str) -> str:
    """Exit code 2, exactly one ``error: ...`` line on stderr containing every needle, no traceback; returns the
    line."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # What a terminal shows: a progress bar redrawn with '\r' and cleared when the error closes it leaves no line.
    lines = [line.split("\r")[-1] for line in result.stderr.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    # A training bar stopped mid-run stays on screen (tqdm's leave=True) above the error; nothing else may.
    assert lines and all(re.search(r"\| *\d+/\d+ \[", line) for line in lines[:-1]), result.stderr[-3000:]
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, result.stderr[
        -3000:
    ]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def assert_ok(result) -> None:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])


# ----------------------------------------------------------------------------------------------- engine helpers
def load_run_config(*overrides: str, yaml: Path | None = DEMO_YAML):
    """The demo run's config (the DMAD run schema) with ``overrides``."""
    from task.anomaly.unsupervised.engine.schema import run_schema
    from task.anomaly.unsupervised.models.dmad.config import MODEL_SCHEMA
    from task.common.config import load_config

    return load_config(run_schema(MODEL_SCHEMA), yaml, list(overrides))


def dmad_method():
    import task.anomaly.unsupervised.models.available  # noqa: F401  (registers the methods)
    from task.anomaly.unsupervised.models.registry import get_method

    return get_method("anomaly", "unsupervised", "dmad", "image")


def make_engine(*overrides: str, overridden: frozenset[str] = frozenset(), yaml: Path | None = DEMO_YAML):
    """An Engine for the DMAD image method (on the CPU) and the demo config with ``overrides``."""
    import torch

    from task.anomaly.unsupervised.engine.engine import Engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        return Engine(dmad_method(), load_run_config(*overrides, yaml=yaml), overridden)


# ----------------------------------------------------------------------------------------------- shared data and run
def data_overrides(datadir: Path) -> list[str]:
    return [
        f"DATASET.datadir={datadir}",
        f"DATASET.target={CATEGORY}",
        "DATASET.demo=false",
        f"DATASET.resize=[{SIZE},{SIZE}]",
    ]


def train_overrides(datadir: Path, savedir: Path, assets: Path | None = None) -> list[str]:
    """The shared run's settings: resnet18 (demo.yaml), 64x64, batch 2, STEPS steps, last.pt every 2 steps, maps on."""
    return data_overrides(datadir) + [
        "DATALOADER.batch_size=2",
        f"TRAIN.num_training_steps={STEPS}",
        "TRAIN.save_interval=2",
        "TEST.batch_size=8",
        "TEST.save_maps=true",
        "LOG.log_interval=1",
        f"RESULT.savedir={savedir}",
        f"RESULT.assets_dir={assets}" if assets else "RESULT.assets_dir=null",
    ]


# ----------------------------------------------------------------------------------------------- video runs
VIDEO_YAML = REPO / "configs" / "anomaly" / "unsupervised" / "dmad" / "video_demo.yaml"
# A tiny DMAD-PDM: the checks are about the plumbing, not about accuracy.
TINY = ["MODEL.memory_dim=16", "MODEL.memory_size=8", "MODEL.pdm_width=8", "TEST.batch_size=64", "DATASET.demo=false"]


def video_args(datadir: Path, savedir: Path, *extra: str, mode: str = "train") -> list[str]:
    """main.py arguments of a tiny video run on the demo data under ``datadir``."""
    return [
        "--task_type",
        "anomaly",
        "--model_name",
        "dmad",
        "--yaml_config",
        str(VIDEO_YAML),
        "--mode",
        mode,
        f"DATASET.datadir={datadir}",
        f"RESULT.savedir={savedir}",
        "RESULT.assets_dir=null",
        *TINY,
        *extra,
    ]


def run_dir(savedir: Path) -> Path:
    """The run directory of a video demo run under ``savedir``."""
    return savedir / "dmad" / "video_demo"


# ----------------------------------------------------------------------------------------------- PatchCore runs
PC_YAML = REPO / "configs" / "anomaly" / "unsupervised" / "patchcore" / "demo.yaml"
PC_BASE = ["--task_type", "anomaly", "--model_name", "patchcore", "--yaml_config", str(PC_YAML)]


def patchcore_args(datadir: Path, savedir: Path, *extra: str) -> list[str]:
    return [
        *PC_BASE,
        *data_overrides(datadir),
        f"RESULT.savedir={savedir}",
        "RESULT.assets_dir=null",
        "TEST.batch_size=4",
        *extra,
    ]


# --------------------------------------------------------------------------- hostile files


def npy_header(shape: tuple[int, ...], descr: str = "<i8") -> bytes:
    """The bytes of a version 1.0 .npy header for an array of ``shape`` (the data is up to the caller)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def crc32_of_zeros(crc: int, count: int) -> int:
    """``zlib.crc32(bytes(count), crc)`` without touching ``count`` bytes: CRC-32 over zero bytes is an affine map
    of the register, so it is raised to the ``count``-th power by repeated squaring (32 columns and an offset)."""
    import zlib

    def step(c: int) -> int:
        return zlib.crc32(b"\0", c)

    offset = step(0)
    one = ([step(1 << i) ^ offset for i in range(32)], offset)  # (linear part's columns, offset) of one zero byte

    def apply(m: tuple[list[int], int], c: int) -> int:
        out = m[1]
        for i in range(32):
            if c >> i & 1:
                out ^= m[0][i]
        return out

    def compose(g: tuple[list[int], int], f: tuple[list[int], int]) -> tuple[list[int], int]:  # g after f
        return [apply(g, col) ^ g[1] for col in f[0]], apply(g, f[1])

    result: tuple[list[int], int] = ([1 << i for i in range(32)], 0)
    power = one
    while count:
        if count & 1:
            result = compose(power, result)
        power = compose(power, power)
        count >>= 1
    return apply(result, crc)


def write_zero_bomb(path: Path, member: str, count: int) -> int:
    """An honest .npz (zip64, deflate) holding ``count`` float64 zeros in ``member``, built in well under a second:
    once zlib's state is periodic, every 16 MiB block of zeros compresses to the same bytes after a sync flush, so
    the stream is repeated rather than computed. Returns the file size."""
    import struct
    import zlib

    header = npy_header((count,), "<f8")
    size = len(header) + 8 * count
    chunk = 1 << 24
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(header + bytes(chunk - len(header))) + compressor.flush(zlib.Z_SYNC_FLUSH)
    blocks = [compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_SYNC_FLUSH) for _ in range(3)]
    assert blocks[0] == blocks[1] == blocks[2], "zlib's output is not periodic here; cannot build the bomb quickly"
    full, tail = divmod(size - chunk, chunk)
    assert full >= 3
    stream = first + blocks[0] * full + compressor.compress(bytes(tail)) + compressor.flush()
    crc = crc32_of_zeros(zlib.crc32(header), 8 * count)
    name = member.encode()
    zip64 = struct.pack("<HHQQ", 1, 16, size, len(stream))
    header_fields = (0x04034B50, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(zip64))
    local = struct.pack("<IHHHHHIIIHH", *header_fields) + name + zip64
    central = (
        struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            45,
            45,
            0,
            8,
            0,
            0x21,
            crc,
            0xFFFFFFFF,
            0xFFFFFFFF,
            len(name),
            len(zip64),
            0,
            0,
            0,
            0,
            0,
        )
        + name
        + zip64
    )
    central_at = len(local) + len(stream)
    end64_at = central_at + len(central)
    end64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1, len(central), central_at)
    locator = struct.pack("<IIQI", 0x07064B50, 0, end64_at, 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), central_at, 0)
    path.write_bytes(local + stream + central + end64 + locator + end)
    return path.stat().st_size
