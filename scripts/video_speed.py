"""Training and evaluation speed of the video model (DMAD-PDM), ours next to the official code, on the same machine.

    python scripts/video_speed.py --official /path/to/DMAD-PDM --threads 2 --train-steps 3 --eval-clips 32

Both sides get the same random weights (ours, mapped into the official ``convAE`` by the checkpoint converter), the
same synthetic frames (random RGB, 256x256, clips of 4 + the target frame, held in memory as uint8 and converted
per item as each loader does) and the same thread count; data loading runs in the timing process (no workers).

ours      training: the engine's ``Stepper`` (the step ``--mode benchmark`` times), batch 8.
          evaluation: ``video_evaluation.score_clips`` (the evaluation path, per-frame raw scores included),
          batch TEST.batch_size of the YAML unless ``--eval-batch``.
ours_openvino  (with ``--backend openvino``) the same evaluation (``run_clips``, same clips and batch) through the
          OpenVINO IR of our model at ``--precision`` (``video/openvino.convert_video_graph``: fp16 runs its
          convolutions in bf16 where the CPU has the units, grids, codebook lookup and maps in float32), timed in the
          same alternation as the other sides; its largest raw-score and error-map differences from PyTorch fp32 on
          the first evaluation batch are reported too (``max_diff_relative``: error map of its range, scores of their
          largest magnitude: random weights have no training spread).
official  training: ``forward`` + ``loss_function`` + backward + AdamW step with Train_ped2.py's parameter groups
          and its per-step ``latest_losses`` floats, batch 8.
          evaluation: Evaluate_ped2.py's loop: batch 1, ``forward(x, True)`` + ``loss_function(..., True)`` +
          three ``float()`` scores per frame.
Neither side includes the protocol after the raw scores (normalisation, smoothing, AUROC).

The official code is imported from ``--official`` at run time only: a DMAD-PDM folder (``model/``,
``Evaluate_ped2.py``) whose hard-coded ``.cuda()`` calls are removed so it runs on CPU. Without ``--official`` only
our side is timed. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # a CPU comparison: never pick up a GPU

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, default_collate  # noqa: E402

CLIP = 4


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights for every float tensor (BN statistics included, so eval mode is not an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() > 1 and "template" not in name:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


class OurClips(Dataset):
    """The items of ``ClipDataset`` (one video, shared background) from in-memory uint8 frames [F, H, W, C]."""

    def __init__(self, frames: np.ndarray, count: int) -> None:
        self.frames, self.count = frames, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        target = i + CLIP
        pixels = (
            torch.from_numpy(self.frames[i : target + 1]).permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)
        )
        zero = torch.tensor(0, dtype=torch.int64)
        return {"clip": pixels[:-1], "target": pixels[-1], "video": zero, "frame": torch.tensor(target), "label": zero}


class OfficialClips(Dataset):
    """The items of the official ``model.utils.DataLoader``: ([15, H, W] float32 in [-1, 1], video index)."""

    def __init__(self, frames: np.ndarray, count: int) -> None:
        self.frames, self.count = frames, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        batch = [
            torch.from_numpy((f.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy())
            for f in self.frames[i : i + CLIP + 1]
        ]
        return np.concatenate(batch, axis=0), np.array([[0]])


class _Video:
    name = "synthetic"


def timed_alternating(fns: dict, warmup: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall s, process CPU s) of each call, the sides alternating call by call so that both see the same load
    (the CPU time is the steadier figure on a shared machine)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def build_ours(args):
    import task.anomaly.unsupervised.models.available  # noqa: F401  (registers the methods)
    from task.anomaly.unsupervised.engine.engine import Engine
    from task.anomaly.unsupervised.engine.schema import method_schema
    from task.anomaly.unsupervised.models.registry import get_method
    from task.common.config import load_config

    method = get_method("anomaly", "unsupervised", "dmad", "video")
    overrides = [
        "DATASET.resize=[256,256]",
        "DATASET.clip_length=4",
        "DATASET.grayscale=false",
        "DATALOADER.batch_size=8",
        "DATALOADER.num_workers=0",
    ]
    if args.eval_batch:
        overrides.append(f"TEST.batch_size={args.eval_batch}")
    cfg = load_config(method_schema(method), args.yaml, overrides)
    engine = Engine(method, cfg, frozenset())
    model = method.build(cfg, num_videos=1)
    randomise(model, args.seed)
    return engine, method.to_device(model, engine.device, engine.channels_last)


def ours_steps(args, engine, model, frames: np.ndarray):
    """(one training step, one evaluation pass over ``args.eval_clips`` clips), both warmed up once."""
    from task.anomaly.unsupervised.engine.training import Stepper
    from task.anomaly.unsupervised.video.evaluation import score_clips

    train_set = OurClips(frames, len(frames) - CLIP)
    stepper = Stepper(engine, model)
    model.train()
    step = iter(range(1, 10**6))

    def train_step():
        i = next(step)
        stepper(default_collate([train_set[(i * 8 + j) % len(train_set)] for j in range(8)]), i)

    eval_set = OurClips(frames, args.eval_clips)
    score_clips(engine, model, OurClips(frames, engine.cfg.TEST.batch_size), [_Video()], "warmup")
    return train_step, lambda: score_clips(engine, model, eval_set, [_Video()], "ours")


def openvino_eval(args, engine, model, frames: np.ndarray):
    """(one evaluation pass through our model's OpenVINO IR at ``args.precision``, differences from PyTorch fp32)."""
    from task.anomaly.unsupervised.video.export import trace_video_graph
    from task.anomaly.unsupervised.video.inference import run_clips
    from task.anomaly.unsupervised.video.openvino import convert_video_graph

    cfg, method = engine.cfg, engine.method
    model = model.float().eval()
    first = default_collate([OurClips(frames, args.eval_clips)[i] for i in range(min(cfg.TEST.batch_size, 8))])
    traced = trace_video_graph(method, model, cfg, [first["clip"], first["target"]], cfg.EXPORT.opset)
    _, ir = convert_video_graph(traced.data, traced.metadata, args.precision, [], args.threads, calibrated=False)
    out = ir.run([first["clip"].numpy(), first["target"].numpy()])
    diffs = {}  # random weights: no training spread, so scores relative to their magnitude, maps to their range
    for name, expected in traced.reference.items():
        scale = float(expected.max() - expected.min()) if name == "error_map" else float(expected.abs().max())
        diffs[name] = float(np.abs(out[name] - expected.numpy()).max()) / (scale or 1.0)
    loader = DataLoader(OurClips(frames, args.eval_clips), batch_size=cfg.TEST.batch_size, shuffle=False)
    run_clips(ir, loader, [_Video()], torch.device("cpu"), "none", "warmup")
    return (
        lambda: run_clips(ir, loader, [_Video()], torch.device("cpu"), "none", "ours_openvino"),
        {"ir": ir.runner.description, "max_diff_relative": diffs},
    )


def build_official(path: str, ours: torch.nn.Module):
    """The official ped2 ``convAE`` holding our weights (the inverse of ``checkpoint.convert_state``)."""
    from task.anomaly.unsupervised.models.dmad_video.official_import import convert_state

    sys.path.insert(0, str(Path(path).resolve()))
    official = importlib.import_module("model.final_future_prediction_ped2").convAE(3, CLIP + 1, 200, 256)
    state = official.state_dict()
    name_of = {t.data_ptr(): k for k, t in state.items()}
    mapped = {name_of[t.data_ptr()]: ours_name for ours_name, t in convert_state(state).items()}
    own = ours.state_dict()
    official.load_state_dict({k: own[mapped[k]].reshape(v.shape) if k in mapped else v for k, v in state.items()})
    return official


def official_steps(args, official: torch.nn.Module, frames: np.ndarray):
    """(one training step, one evaluation pass), as Train_ped2.py / Evaluate_ped2.py run them."""
    # Train_ped2.py's optimiser (torch defaults otherwise, as the script).
    optimizer = torch.optim.AdamW(
        [
            {"params": official.encoder.parameters()},
            {"params": official.decoder.parameters()},
            {"params": official.offset_net.parameters()},
            {"params": official.vq_layer.parameters()},
            {"params": official.bkg, "lr": 50 * 2e-4},
        ],
        lr=2e-4,
    )
    train_set = OfficialClips(frames, len(frames) - CLIP)
    official.train()
    step = iter(range(1, 10**6))

    def train_step():
        i = next(step)
        imgs = default_collate([train_set[(i * 8 + j) % len(train_set)] for j in range(8)])[0]
        outputs = official.forward(imgs[:, 0:12])
        optimizer.zero_grad()
        loss = official.loss_function(imgs[:, -3:], *outputs)
        loss.backward()
        optimizer.step()
        with warnings.catch_warnings():  # the official loop floats tensors that require grad
            warnings.simplefilter("ignore")
            for value in official.latest_losses().values():
                float(value)

    def evaluate(count: int) -> None:
        scores = ([], [], [])
        official.eval()
        with torch.no_grad():
            for imgs, _ in DataLoader(OfficialClips(frames, count), batch_size=1, shuffle=False, num_workers=0):
                outputs = official.forward(imgs[:, 0:12], True)
                official.loss_function(imgs[:, -3:], *outputs, True)
                losses = official.latest_losses()
                for store, key in zip(scores, ("err1", "mse2", "grad")):
                    store.append(float(losses[key]))

    evaluate(1)
    return train_step, lambda: evaluate(args.eval_clips)


def summary(train: list[tuple[float, float]], evals: list[tuple[float, float]], clips: int, eval_batch: int) -> dict:
    """Medians (wall and CPU) and every timing; clips/s from the median wall time."""
    out: dict = {"eval_batch_size": eval_batch}
    for key, times, count in (("train", train, 8), ("eval", evals, clips)):
        if not times:
            continue
        wall, cpu = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        out.update(
            {
                f"{key}_s": round(wall, 3),
                f"{key}_cpu_s": round(cpu, 3),
                f"{key}_clips_per_s": round(count / wall, 3),
                f"{key}_clips_per_cpu_s": round(count / cpu, 3),
                f"{key}_s_all": [round(t[0], 3) for t in times],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--official", default=None, help="a CPU-runnable copy of the official DMAD-PDM folder (model/, utils.py)"
    )
    parser.add_argument("--yaml", default=str(ROOT / "configs/anomaly/unsupervised/dmad/ped2.yaml"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps per side first")
    parser.add_argument("--eval-clips", type=int, default=32)
    parser.add_argument(
        "--eval-repeats", type=int, default=2, help="timed evaluation passes per side (median reported)"
    )
    parser.add_argument(
        "--eval-batch", type=int, default=None, help="our evaluation batch (default: the YAML's TEST.batch_size)"
    )
    parser.add_argument("--skip-train", action="store_true", help="time evaluation only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backend",
        choices=("torch", "openvino"),
        default="torch",
        help="openvino: also time our evaluation through the OpenVINO IR (side ours_openvino)",
    )
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16", help="the IR's precision")
    args = parser.parse_args()
    if args.backend == "openvino" and args.precision == "int8":
        parser.error("--precision int8 needs calibration clips; time fp32 or fp16 here, int8 with --mode benchmark")

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    frames = rng.integers(
        0,
        256,
        size=(max(args.eval_clips, 8 * (args.warmup + args.train_steps + 1)) + CLIP, 256, 256, 3),
        dtype=np.uint8,
    )

    engine, model = build_ours(args)
    official = build_official(args.official, model) if args.official else None  # before ours trains: same weights
    result = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "image_size": [256, 256],
        "clip_length": CLIP,
        "channels": 3,
        "train_batch": 8,
        "eval_clips": args.eval_clips,
    }
    evals_only = {}
    if args.backend == "openvino":  # built before our training steps change the weights
        evals_only["ours_openvino"], result["openvino"] = openvino_eval(args, engine, model, frames)
    sides = {"ours": ours_steps(args, engine, model, frames)}
    if official is not None:
        sides["official"] = official_steps(args, official, frames)
    train = (
        {} if args.skip_train else timed_alternating({k: v[0] for k, v in sides.items()}, args.warmup, args.train_steps)
    )
    evals = timed_alternating({**{k: v[1] for k, v in sides.items()}, **evals_only}, 0, args.eval_repeats)
    for name in evals:
        result[name] = summary(
            train.get(name, []), evals[name], args.eval_clips, 1 if name == "official" else engine.cfg.TEST.batch_size
        )
    if official is not None:
        f = result["official"]
        for side in ("ours", "ours_openvino"):
            for key in ("train_clips_per_s", "train_clips_per_cpu_s", "eval_clips_per_s", "eval_clips_per_cpu_s"):
                if key in result.get(side, {}):
                    prefix = "ratio_" if side == "ours" else "ratio_openvino_"
                    result[prefix + key.replace("_clips", "")] = round(result[side][key] / f[key], 2)
    if "ours_openvino" in result:
        result["ratio_openvino_vs_torch_eval_per_s"] = round(
            result["ours_openvino"]["eval_clips_per_s"] / result["ours"]["eval_clips_per_s"], 2
        )
    result["load_average"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
