"""Results report: every run's metrics.json under a save directory -> MVTec AD markdown tables.

Each run directory (``<savedir>/<model_name>/<category>[/<exp>]``) holds ``metrics.json`` and ``run.json`` (category,
backbone, image size, steps, device). Values are shown as percentages with one decimal; the newest run of each
category is used when there are several.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from task.common.errors import UserError, short_repr
from task.common.io import write_text

log = logging.getLogger("anomaly")

__all__ = [
    "MVTEC_CATEGORIES",
    "TABLES",
    "RunRecord",
    "collect_runs",
    "latest_runs",
    "format_report",
    "replace_results",
    "write_report",
]

# Folder name -> column title, in the order of the published tables (textures, then objects).
MVTEC_CATEGORIES: dict[str, str] = {
    "carpet": "Carpet",
    "grid": "Grid",
    "leather": "Leather",
    "tile": "Tile",
    "wood": "Wood",
    "bottle": "Bottle",
    "cable": "Cable",
    "capsule": "Capsule",
    "hazelnut": "Hazelnut",
    "metal_nut": "Metal Nut",
    "pill": "Pill",
    "screw": "Screw",
    "toothbrush": "Toothbrush",
    "transistor": "Transistor",
    "zipper": "Zipper",
}
# metrics.json key -> table title.
TABLES: dict[str, str] = {
    "image_auroc": "Image-Level AUC",
    "pixel_auroc": "Pixel-Level AUC",
    "pixel_f1": "Pixel F1 Score",
}
# Video runs' metrics.json key -> column title (paper protocol, then the online one).
VIDEO_TABLE: dict[str, str] = {
    "frame_auroc": "Frame AUC",
    "frame_aupr": "Frame AUPR",
    "frame_auroc_online": "Frame AUC (online)",
    "frame_aupr_online": "Frame AUPR (online)",
}
# Every metric a table shows: fractions in [0, 1].
REPORTED = (*TABLES, *VIDEO_TABLE)
START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"
MISSING = "–"


@dataclass(frozen=True)
class RunRecord:
    """One evaluated run: its category, folder, metrics (None = undefined) and run.json details."""

    category: str
    run_dir: Path
    metrics: dict[str, float | None]
    mtime: float
    info: dict[str, Any] = field(default_factory=dict)


def _category_from_path(run_dir: Path, savedir: Path) -> str:
    """``<savedir>/<model_name>/<category>[/<exp>]`` -> category (for runs whose run.json does not say)."""
    parts = run_dir.relative_to(savedir).parts
    return parts[1] if len(parts) >= 2 else run_dir.name


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _shown_metrics(metrics: dict[str, Any], path: Path) -> dict[str, float | None]:
    """Numbers of ``metrics``; a reported metric (AUROC, AUPR, F1: fractions) that is not a finite number in [0, 1]
    (7.5, NaN, a string, a list) becomes None, shown as a dash, with one warning naming the file and key. JSON null
    (a metric the data cannot define) is None without a warning."""
    out = {k: _number(v) for k, v in metrics.items()}
    for key in REPORTED:
        value = metrics.get(key)
        if value is None:
            continue
        number = out.get(key)
        if number is None or not 0.0 <= number <= 1.0:
            log.warning(
                "%s: %s = %s is not a number in [0, 1]; shown as %s (re-run --mode test to rewrite the file)",
                path,
                key,
                short_repr(value, 40),
                MISSING,
            )
            out[key] = None
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("skipping %s: not readable JSON (%s)", path, exc)
        return None


def collect_runs(savedir: str | Path, method: str | None = None) -> list[RunRecord]:
    """Every ``metrics.json`` under ``savedir`` (recursively) as a RunRecord, sorted by path; with ``method``, the
    runs whose run.json names another method are left out (runs that name none are kept)."""
    savedir = Path(savedir)
    if not savedir.is_dir():
        raise UserError(
            f"RESULT.savedir {savedir} does not exist; train a model first or set RESULT.savedir to the folder "
            "holding the runs"
        )
    records = []
    for path in sorted(savedir.rglob("metrics.json")):
        if (
            "tests" in path.relative_to(savedir).parts[2:-1]
        ):  # a foreign checkpoint tested inside a run: not the run's result
            continue
        metrics = _read_json(path)
        if not isinstance(metrics, dict):
            continue
        info_path = path.with_name("run.json")
        info = _read_json(info_path) if info_path.is_file() else None
        info = info if isinstance(info, dict) else {}
        if method is not None and info.get("method", method) != method:
            continue
        category = info.get("category")
        if not isinstance(category, str) or not category:
            category = _category_from_path(path.parent, savedir)
        values = _shown_metrics(metrics, path)
        if (
            values.get("pixel_f1_max") is not None and 0.0 <= values["pixel_f1_max"] <= 1.0
        ):  # the table's pixel F1 is the paper's F1-max (test-optimal threshold), not the F1 at the deployed one
            values["pixel_f1"] = values["pixel_f1_max"]
        records.append(RunRecord(category, path.parent, values, path.stat().st_mtime, info))
    return records


def latest_runs(runs: list[RunRecord]) -> tuple[dict[str, RunRecord], dict[str, int]]:
    """(category -> its most recently modified run, category -> number of runs found)."""
    chosen: dict[str, RunRecord] = {}
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.category] = counts.get(run.category, 0) + 1
        if run.category not in chosen or run.mtime > chosen[run.category].mtime:
            chosen[run.category] = run
    return chosen, counts


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _display_path(path: Path) -> str:
    """Relative to the working directory when inside it (README-friendly), else as given."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _describe(run: RunRecord) -> str:
    info = run.info
    size = info.get("image_size")
    details = [
        str(info["backbone"]) if info.get("backbone") else None,
        "x".join(map(str, size)) if isinstance(size, list) else None,
        f"{info['steps']} steps" if info.get("steps") is not None else None,
        str(info["device"]) if info.get("device") else None,
    ]
    described = ", ".join(d for d in details if d)
    return f"`{_display_path(run.run_dir)}`" + (f" ({described})" if described else "")


def format_report(runs: list[RunRecord]) -> str:
    """Markdown: one table per metric over the 15 MVTec AD categories, video datasets, extra categories, provenance."""
    chosen, counts = latest_runs(runs)
    lines = [
        "Values are percentages with one decimal (98.7 = 0.987); "
        f"{MISSING} = no result for that category. Avg is the mean over the categories that have a result.",
        "",
    ]
    columns = ["Avg"] + list(MVTEC_CATEGORIES.values())
    for key, title in TABLES.items():
        values = [chosen[c].metrics.get(key) if c in chosen else None for c in MVTEC_CATEGORIES]
        present = [v for v in values if v is not None]
        average = sum(present) / len(present) if present else None
        lines += [
            f"#### {title}",
            "",
            _row(columns),
            _row(["---:"] * len(columns)),
            _row([_percent(average)] + [_percent(v) for v in values]),
            "",
            f"_Avg over {len(present)} of {len(MVTEC_CATEGORIES)} categories._",
            "",
        ]
    video = sorted(c for c in chosen if "frame_auroc" in chosen[c].metrics)
    extra = sorted(c for c in chosen if c not in MVTEC_CATEGORIES and c not in video)
    if video:
        lines += [
            "#### Video (frame level)",
            "",
            _row(["Dataset"] + list(VIDEO_TABLE.values())),
            _row(["---"] + ["---:"] * len(VIDEO_TABLE)),
        ]
        lines += [_row([c] + [_percent(chosen[c].metrics.get(k)) for k in VIDEO_TABLE]) for c in video]
        lines.append("")
    if extra:
        lines += [
            "#### Other categories (not in MVTec AD, not in Avg)",
            "",
            _row(["Category"] + list(TABLES.values())),
            _row(["---"] + ["---:"] * len(TABLES)),
        ]
        lines += [_row([c] + [_percent(chosen[c].metrics.get(k)) for k in TABLES]) for c in extra]
        lines.append("")
    if chosen:
        lines += ["<details><summary>Runs used</summary>", ""]
        for category in [c for c in MVTEC_CATEGORIES if c in chosen] + extra + video:
            note = f" — newest of {counts[category]} runs" if counts[category] > 1 else ""
            lines.append(f"- {category}: {_describe(chosen[category])}{note}")
        lines += ["", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_results(
    readme_text: str, block: str, where: str = "README.md", markers: tuple[str, str] = (START_MARKER, END_MARKER)
) -> str:
    """``readme_text`` with everything between the results ``markers`` replaced by ``block`` (markers kept)."""
    start_marker, end_marker = markers
    start = readme_text.find(start_marker)
    end = readme_text.find(end_marker, start + len(start_marker)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise UserError(
            f"{where} lacks the markers {start_marker} ... {end_marker}; add both lines where the results tables belong"
        )
    return readme_text[: start + len(start_marker)] + "\n" + block.rstrip("\n") + "\n" + readme_text[end:]


def method_markers(readme_text: str, method: str | None) -> tuple[str, str]:
    """The markers of ``method``'s own results block (``<!-- results:<method>:start -->``) when the README has them,
    else the shared ones: a second method's tables never replace the first one's."""
    own = (f"<!-- results:{method}:start -->", f"<!-- results:{method}:end -->")
    return own if method and own[0] in readme_text else (START_MARKER, END_MARKER)


def write_report(savedir: str | Path, readme: str | Path | None = None, method: str | None = None) -> str:
    """Build the report of ``savedir`` (``method``'s runs only, when given), save ``<savedir>/results.md``, optionally
    update ``readme``; returns it."""
    runs = collect_runs(savedir, method)
    if not runs:
        raise UserError(f"no metrics.json under {savedir}; train or test a model first (--mode train / --mode test)")
    report = format_report(runs)
    write_text(Path(savedir) / "results.md", report)
    if readme is not None:
        readme = Path(readme)
        if not readme.is_file():
            raise UserError(f"{readme} not found; run --mode report --update-readme from the repository root")
        text = readme.read_text(encoding="utf-8")
        write_text(readme, replace_results(text, report, str(readme), method_markers(text, method)))
    return report
