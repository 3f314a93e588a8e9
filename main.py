"""Command-line entry point: CLI -> config -> registry -> engine -> method.

python main.py --task_type anomaly --model_name dmad --yaml_config configs/anomaly/unsupervised/dmad/bottle.yaml
python main.py ... --mode test --checkpoint runs/dmad/bottle/model.pt DATASET.datadir=/data/mvtec
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings

MODES = ("train", "test", "gif", "report", "export", "predict", "benchmark", "score")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train and evaluate anomaly-detection models (DMAD).")
    parser.add_argument("--task_type", required=True, help="e.g. anomaly")
    parser.add_argument("--model_type", default="unsupervised", help="default: unsupervised")
    parser.add_argument("--model_name", required=True, help="e.g. dmad")
    parser.add_argument(
        "--yaml_config", required=True, help="YAML file, e.g. configs/anomaly/unsupervised/dmad/bottle.yaml"
    )
    parser.add_argument(
        "--mode", default="train", choices=MODES, help="train (then evaluate), test a checkpoint, or another mode"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint for test/gif/export/predict (default: the run's model.pt)"
    )
    parser.add_argument(
        "--input",
        default=None,
        help="--mode predict: an image or a folder of images, or a video/frame folder, or a stream URL (rtsp://, "
        "http(s)://), camera index or /dev/videoN (--mode export: images for the ONNX check; --mode score: a "
        "scores.npz)",
    )
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx", "openvino", "auto"),
        help=(
            "--mode predict: run with PyTorch, the exported ONNX model or the OpenVINO IR (EXPORT.precision); auto: "
            "the export-checked IR beside the checkpoint on a CPU (fp16 where the CPU has bf16 units), else PyTorch"
        ),
    )
    parser.add_argument(
        "--output", default=None, help="--mode predict: output folder (default: predict/ next to the checkpoint)"
    )
    parser.add_argument(
        "--update-readme",
        dest="update_readme",
        action="store_true",
        help="--mode report: rewrite the tables in README.md",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="--mode predict with --input FOLDER: keep scoring new images as they are written (stop with Ctrl-C)",
    )
    parser.add_argument("--max-images", type=int, default=None, help="--watch: stop after scoring this many new images")
    parser.add_argument("--max-frames", type=int, default=None, help="--mode predict on a stream: stop after N frames")
    parser.add_argument("--duration", type=float, default=None, help="--watch or a stream: stop after N seconds")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. TRAIN.num_training_steps=50"
    )
    # Intermixed: KEY=VALUE overrides may come before, between or after the options.
    return parser.parse_intermixed_args(argv)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger().handlers[0].setLevel(logging.INFO)
    logging.getLogger().setLevel(logging.DEBUG)
    for noisy in ("PIL", "matplotlib", "urllib3", "wandb", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")


def modality_of(yaml_path: str, overrides: list[str]) -> str:
    """ "video" when the run's DATASET.format is video (YAML or override), else "image": it picks the method variant
    and with it the schema the whole config is then validated against."""
    from task.common.config import parse_override, read_yaml
    from task.common.errors import UserError

    dataset = read_yaml(yaml_path).get("DATASET")
    fmt = dataset.get("format", "mvtec") if isinstance(dataset, dict) else "mvtec"
    for text in overrides:
        key, value = parse_override(text)
        if key == "DATASET.format":
            fmt = value
    if fmt not in ("mvtec", "visa", "folder", "video"):
        raise UserError(f"config key DATASET.format must be one of mvtec, visa, folder, video, got {str(fmt)[:40]!r}")
    return "video" if fmt == "video" else "image"


def run(args: argparse.Namespace) -> int:
    import task.anomaly.unsupervised.models.available  # noqa: F401  (registers the methods)
    from task.anomaly.unsupervised.engine.engine import Engine
    from task.anomaly.unsupervised.engine.modes import ModeOptions
    from task.anomaly.unsupervised.engine.schema import method_schema
    from task.anomaly.unsupervised.modalities import modes_for
    from task.anomaly.unsupervised.models.registry import get_method
    from task.common.config import load_config, parse_override
    from task.common.errors import UserError

    method = get_method(args.task_type, args.model_type, args.model_name, modality_of(args.yaml_config, args.overrides))
    cfg = load_config(method_schema(method), args.yaml_config, args.overrides)
    overridden = frozenset(parse_override(text)[0] for text in args.overrides)
    modes = modes_for(method.modality)
    if args.mode not in modes:
        raise UserError(
            f"--mode {args.mode} is not available for {method.modality} runs; use one of {', '.join(modes)}"
        )
    engine = Engine(method, cfg, overridden)
    options = ModeOptions(
        checkpoint=args.checkpoint,
        input=args.input,
        backend=args.backend,
        output=args.output,
        update_readme=args.update_readme,
        watch=args.watch,
        max_images=args.max_images,
        max_frames=args.max_frames,
        duration=args.duration,
    )
    metrics = modes[args.mode](engine, options)
    if metrics:
        print("metrics: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))))
        print(f"run directory: {engine.run_dir}")
    return 0


def close_progress_bars() -> None:
    """Close tqdm bars left open by an exception, so the error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def one_line(exc: Exception) -> str:
    """The error message on one line.

    A UserError raised inside a DataLoader worker is re-raised by torch with the worker's traceback as its
    message; the original message is the traceback's last line (``<module>.UserError: <message>``).
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        match = re.match(r"^[\w.]+: (.*)$", lines[-1])
        return match.group(1) if match else lines[-1]
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    from task.common.errors import UserError

    try:
        return run(args)
    except UserError as exc:
        close_progress_bars()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
