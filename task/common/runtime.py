"""Device selection, seeding, the numeric precision policy and the (optional) torch.distributed context.

Precision policy (``apply_precision_policy``, called once by the engine after ``select_device``):

==============================================  =====================================  =============================
Computation                                     Precision                              Why
==============================================  =====================================  =============================
Frozen encoder (backbone convolutions)          TRAIN.amp autocast (bf16/fp16);        throughput; features are
                                                float32 convs may use TF32 on CUDA     compared, not thresholded
Decoder, bottleneck convs, PDM heads, losses    TRAIN.amp autocast; TF32 convs         as above; the optimiser and
                                                allowed (cuDNN)                        master weights stay float32
Matrix products (VQ codebook distances,         float32, TF32 off                      nearest-code argmin must not
affine maps, any ``@`` / ``linear``)            (``matmul.allow_tf32 = False``)        flip on 10-bit mantissas
Warps (``grid_sample``) and coordinate grids    float32 (autocast off in the model)    a bf16 coordinate is off by
                                                                                       up to half a pixel at 256
Feature discrepancy and Gaussian smoothing      float32, no cuDNN, no TF32             maps must be CPU/CUDA equal
(``gaussian_blur2d``)                           (elementwise multiply-adds)            and free of bf16 ties
Score fusion, calibration statistics            float32                                thresholds are compared to
                                                                                       these values
Metrics (``task.common.metrics``)               exact: float32 scores, int64 counts,   reported to 4 decimals;
                                                float64 region weights (numpy, CPU)    must not depend on device
==============================================  =====================================  =============================

cuDNN autotuning (``cudnn.benchmark``) is on: training and evaluation run at one fixed image size, so the
one-off search per shape pays for itself; ``fixed_size=False`` turns it off for variable-size inputs.
On CPU only the matmul setting applies (oneDNN has no TF32; bf16 autocast is the CPU fast path).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import logging
import os
import random
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from task.common.errors import UserError

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DistributedContext:
    """Rank and world size from torchrun's environment; a single process when absent."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistributedContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        ctx = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(ctx.local_rank)
            dist.init_process_group(backend=backend)
            atexit.register(_destroy_process_group)
        return ctx

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: list[int]) -> list[int]:
        """This process's share of a global batch (the batch is split across processes).

        Every process must take part in every step (DDP all-reduces the gradients), so a batch with fewer items
        than processes (an epoch's last one) gives each process one item, some of them repeated.
        """
        if self.world_size <= 1:
            return batch
        if len(batch) < self.world_size:
            return [batch[self.rank % len(batch)]]
        return batch[self.rank :: self.world_size]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size <= 1:
            return model
        device_ids = [self.local_rank] if torch.cuda.is_available() else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc serve large CPU tensors from its heap and keep freed memory for reuse.

    By default every allocation above 32 MiB (most activations at 256x256) gets fresh pages from the kernel and
    returns them when freed, so each training step page-faults its whole working set again: about a second of
    kernel time per wide_resnet50_2 step on two cores. Numerics are untouched. Returns False where this is not
    glibc (the call is then skipped).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def select_device(ctx: DistributedContext | None = None) -> torch.device:
    """CUDA when available (one GPU per process under torchrun), else CPU.

    Also applies the precision policy for the chosen device (see the module docstring).
    """
    device = torch.device("cuda", ctx.local_rank if ctx else 0) if torch.cuda.is_available() else torch.device("cpu")
    apply_precision_policy(device)
    return device


@dataclass(frozen=True)
class PrecisionPolicy:
    """The global backend flags the policy sets (see the module docstring for the per-computation table)."""

    cudnn_allow_tf32: bool
    matmul_allow_tf32: bool
    cudnn_benchmark: bool
    float32_matmul_precision: str


def apply_precision_policy(device: torch.device, fixed_size: bool = True) -> PrecisionPolicy:
    """Set the process-wide numeric flags of the precision policy for ``device``; idempotent.

    Args:
        device: the training / evaluation device.
        fixed_size: every batch has the same image size (cuDNN autotuning pays off).

    Returns:
        The flags now in effect.
    """
    # Convolutions (encoder, decoder) may use TF32 tensor cores: ~1e-3 relative error is below what their
    # features need, and amp=bf16/fp16 rounds far more anyway.
    torch.backends.cudnn.allow_tf32 = True
    # Matrix products stay true float32: the VQ codebook's nearest-neighbour argmin and the affine grids
    # are decisions and coordinates, not features.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = device.type == "cuda" and fixed_size
    policy = PrecisionPolicy(
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )
    log.debug("precision policy on %s: %s", device, policy)
    return policy


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def compile_model(model: torch.nn.Module, device: torch.device) -> None:
    """``torch.compile`` the module's forward in place (its state dict keys are unchanged).

    Compilation happens at the first call of each mode (train / eval); should it fail there, torch falls back to
    eager execution with a warning instead of stopping the run.
    """
    if device.type == "cpu" and not any(
        shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")
    ):
        raise UserError(
            "TRAIN.compile=true needs a C++ compiler on the PATH to build CPU kernels (g++ or clang++); install one "
            "or set TRAIN.compile=false"
        )
    import torch._dynamo

    try:
        model.compile()
    except RuntimeError as exc:  # e.g. a Python version torch.compile does not support yet
        raise UserError(
            f"torch.compile is unavailable here ({str(exc).splitlines()[0]}); set TRAIN.compile=false"
        ) from None
    torch._dynamo.config.suppress_errors = True
    log.info("TRAIN.compile: the first training and evaluation steps compile the model (this takes a while)")


def autocast(device: torch.device, amp: str):
    """Autocast context for ``amp`` in {none, bf16, fp16}; fp16 only on CUDA."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
