"""``--mode predict --input DIR --watch``: score every new image of a folder an inspection line keeps filling.

The folder is polled (``WatchLimits.poll_s``); an image is scored once it is completely written: its size and
modification time are the same at two polls in a row (a writer renaming a finished file into place passes at once;
temporary names such as hidden ``.name.tmp`` files or other extensions are never looked at), and it decodes (a file
that stops growing half-written is retried when it changes). Every scored image gets its picture and one row appended
to ``predictions.csv`` (``predict.CSV_HEADER``; flushed and fsynced at once), then its name goes into the state file
``.watch-state.json`` in the output folder (written atomically). Images already there when a watch starts are scored
too, unless the state file (or predictions.csv, should a crash have come between the two) lists them: a restart never
scores an image twice. SIGINT/SIGTERM, ``--max-images`` or ``--duration`` stop the watch between two images, with
every output complete.

Heatmap colours: each picture's range is its own map's (``display_bounds`` with the pixel threshold), since the set
of images is not known in advance.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from task.anomaly.unsupervised.data.image.preprocess import IMAGE_EXTENSIONS, load_image, resize_image, to_tensor
from task.anomaly.unsupervised.deploy.append_log import AppendLog
from task.anomaly.unsupervised.deploy.output_folder import OutputFolder
from task.anomaly.unsupervised.deploy.stop import StopSignal
from task.anomaly.unsupervised.drawing import display_bounds
from task.anomaly.unsupervised.engine.modes import ModeOptions
from task.anomaly.unsupervised.image.inference import predict_loader
from task.anomaly.unsupervised.image.predict import CSV_HEADER, Runner, regions_cell, render_picture, verdict
from task.common.errors import UserError
from task.common.io import atomic_write_bytes, csv_cell, write_json

log = logging.getLogger("anomaly")

STATE_FILE = ".watch-state.json"


@dataclass(frozen=True)
class WatchLimits:
    """When a watch stops by itself (None: never) and how often it looks."""

    max_images: int | None = None
    duration: float | None = None
    poll_s: float = 0.5

    @classmethod
    def from_options(cls, options: ModeOptions) -> WatchLimits:
        if options.max_images is not None and options.max_images < 1:
            raise UserError(f"--max-images must be at least 1, got {options.max_images}")
        if options.duration is not None and not options.duration > 0:
            raise UserError(f"--duration must be a positive number of seconds, got {options.duration}")
        return cls(options.max_images, options.duration)


def _candidates(folder: Path) -> dict[str, os.stat_result]:
    """relative posix path -> stat of every visible image file under ``folder`` (hidden files and folders skipped)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(root) / name
            try:
                found[path.relative_to(folder).as_posix()] = path.stat()
            except OSError:  # removed or renamed between the listing and the stat
                continue
    return found


class WatchState:
    """The images already scored (relative paths), kept in ``<output>/.watch-state.json``."""

    def __init__(self, path: Path, input_folder: Path) -> None:
        self.path = path
        self.done: set[str] = set()
        if path.is_file():
            try:
                recorded = json.loads(path.read_text(encoding="utf-8"))
                self.done = set(recorded["done"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(
                    f"{path} is unreadable ({type(exc).__name__}); move it away to rescore the whole folder"
                ) from None
            if recorded.get("input") != str(input_folder.resolve()):
                raise UserError(
                    f"{path} belongs to a watch of {recorded.get('input')}, not {input_folder}; choose another --output"
                )
        self.input = str(input_folder.resolve())

    def add(self, name: str) -> None:
        self.done.add(name)
        write_json(self.path, {"input": self.input, "done": sorted(self.done)})


def _recorded_in_csv(log_file: AppendLog, input_folder: Path) -> set[str]:
    """Relative paths of the images predictions.csv already has a row for (cells may carry the formula escape)."""
    rows = list(csv.reader(io.StringIO("\n".join(log_file.lines()[1:]))))
    names = set()
    for row in rows:
        # csv_cell may have put a quote before a cell that starts like a formula: try the cell both ways.
        for cell in (row[:1] + [row[0][1:]]) if row and row[0].startswith("'") else row[:1]:
            try:
                names.add(Path(cell).relative_to(input_folder).as_posix())
            except ValueError:
                continue
    return names


def _score(runner: Runner, paths: list[Path]) -> list[tuple[Path, torch.Tensor, float]]:
    """(path, anomaly map [h, w], score) of the images that decode; the others are left out (logged by the caller)."""
    batch = []
    for path in paths:
        try:
            batch.append((path, to_tensor(resize_image(load_image(path), runner.size))))
        except UserError:
            continue
    results = []
    for start in range(0, len(batch), runner.batch_size):
        chunk = batch[start : start + runner.batch_size]
        loader = [{"image": torch.stack([t for _, t in chunk]), "path": [str(p) for p, _ in chunk]}]
        preds = predict_loader(
            runner.model, loader, runner.device, runner.amp, desc="watch", channels_last=runner.channels_last
        )
        results += [(p, m, float(s)) for (p, _), m, s in zip(chunk, preds.anomaly_maps, preds.scores.tolist())]
    return results


def watch_folder(runner: Runner, input_folder: Path, out_dir: Path, source: str, limits: WatchLimits) -> int:
    """Score the images of ``input_folder`` as they are completely written, until a signal or a limit; returns the
    number scored by this call."""
    if not input_folder.is_dir():
        raise UserError(f"--watch needs --input to be a folder; {input_folder} is not one")
    output = OutputFolder(out_dir, input_folder)
    output.claim([Path("predictions.csv"), Path(STATE_FILE)])
    state = WatchState(out_dir / STATE_FILE, input_folder)
    table = AppendLog(out_dir / "predictions.csv", ",".join(CSV_HEADER))
    state.done |= _recorded_in_csv(table, input_folder)
    thresholds = runner.thresholds
    log.info(
        "watching %s with %s: %d image(s) already scored; outputs in %s", input_folder, source, len(state.done), out_dir
    )
    seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime) at the previous poll
    unreadable: dict[str, tuple[int, int]] = {}  # name -> the version that did not decode (retried when it changes)
    scored = 0
    with StopSignal(limits.duration) as stop:
        while not stop.is_set():
            current = {
                n: (st.st_size, st.st_mtime_ns) for n, st in _candidates(input_folder).items() if n not in state.done
            }
            ready = sorted(n for n, v in current.items() if v[0] > 0 and seen.get(n) == v and unreadable.get(n) != v)
            seen = current
            if limits.max_images is not None:
                ready = ready[: limits.max_images - scored]
            results = {str(p): (m, s) for p, m, s in _score(runner, [input_folder / n for n in ready])} if ready else {}
            for name in ready:
                path = input_folder / name
                if str(path) not in results:
                    unreadable[name] = current[name]
                    log.warning("%s does not decode (yet): retried when it changes", path)
                    continue
                anomaly_map, score = results[str(path)]
                picture = Path(name).with_name(Path(name).name + ".png")
                output.claim([picture])
                data, regions = render_picture(
                    path,
                    anomaly_map.numpy(),
                    display_bounds(anomaly_map, thresholds.get("pixel", math.nan)),
                    score,
                    thresholds,
                    runner.region_min_area,
                )
                atomic_write_bytes(out_dir / picture, lambda handle, data=data: handle.write(data))
                prediction, label = verdict(score, thresholds.get("image", math.nan))
                row = io.StringIO()
                csv.writer(row, lineterminator="\n").writerow(
                    [
                        csv_cell(str(path)),
                        f"{score:.6f}",
                        prediction,
                        label,
                        csv_cell(picture.as_posix()),
                        regions_cell(regions),
                    ]
                )
                table.write(row.getvalue())
                state.add(name)
                scored += 1
                print(f"{path}: score={score:.6f} {label} regions={len(regions)}", flush=True)
                if limits.max_images is not None and scored >= limits.max_images:
                    stop.set("--max-images reached")
                    break
            if not stop.is_set():
                stop.wait(limits.poll_s)
    table.close()
    log.info("watch stopped (%s): %d image(s) scored in this run, %d in all", stop.reason, scored, len(state.done))
    return scored
