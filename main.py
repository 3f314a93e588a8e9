"""Command-line entry point: CLI -> config -> registry -> trainer.

    python main.py --task_type anomaly --model_name dmad --yaml_config configs/anomaly/unsupervised/dmad/bottle.yaml
    python main.py ... --mode test --checkpoint runs/dmad/bottle/model.pt DATASET.datadir=/data/mvtec
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings

MODES = ("train", "test", "gif", "report", "export", "predict", "benchmark")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train and evaluate anomaly-detection models (DMAD).")
    parser.add_argument("--task_type", required=True, help="e.g. anomaly")
    parser.add_argument("--model_type", default="unsupervised", help="default: unsupervised")
    parser.add_argument("--model_name", required=True, help="e.g. dmad")
    parser.add_argument("--yaml_config", required=True, help="YAML file, e.g. configs/anomaly/unsupervised/dmad/bottle.yaml")
    parser.add_argument("--mode", default="train", choices=MODES, help="train (then evaluate), test a checkpoint, or another mode")
    parser.add_argument("--checkpoint", default=None, help="checkpoint for test/gif/export/predict (default: the run's model.pt)")
    parser.add_argument("--input", default=None, help="--mode predict: an image or a folder of images (--mode export: images for the ONNX check)")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"), help="--mode predict: run with PyTorch or the exported ONNX model")
    parser.add_argument("--output", default=None, help="--mode predict: output folder (default: predict/ next to the checkpoint)")
    parser.add_argument("--update-readme", dest="update_readme", action="store_true", help="--mode report: rewrite the tables in README.md")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. TRAIN.num_training_steps=50")
    # Intermixed: KEY=VALUE overrides may come before, between or after the options.
    return parser.parse_intermixed_args(argv)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger().handlers[0].setLevel(logging.INFO)
    logging.getLogger().setLevel(logging.DEBUG)
    for noisy in ("PIL", "matplotlib", "urllib3", "wandb", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")


def run(args: argparse.Namespace) -> int:
    from task.common.config import load_config
    from task.common.errors import UserError
    from task.registry import get_trainer
    import task.trainers  # noqa: F401  (registers the trainers)

    trainer_cls = get_trainer(args.task_type, args.model_type, args.model_name)
    cfg = load_config(trainer_cls.schema, args.yaml_config, args.overrides)
    trainer = trainer_cls(cfg, checkpoint=args.checkpoint)
    handler = getattr(trainer, f"mode_{args.mode}", None)
    if handler is None:
        raise UserError(f"--mode {args.mode} is not supported by {args.model_name}")
    metrics = handler(args)
    if metrics:
        print("metrics: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        print(f"run directory: {trainer.run_dir}")
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
