"""Results as a terminal table, Markdown, JSON and a PNG bar chart.

``results`` is the dict written to ``results.json``:
``{"benchmark": str, "tasks": [str], "methods": {NAME: {"per_task": {TASK: acc}, "average": float,
"normalized_average": float, "seconds": float, "params": {...}}}}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergelab.core.figures import pyplot, save_figure
from mergelab.core.io import atomic_write_text


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def standard_error(accuracy: float, n: int | None) -> float | None:
    """Binomial standard error of an accuracy measured on ``n`` examples: sqrt(p (1 - p) / n)."""
    if not n or accuracy is None:
        return None
    return math.sqrt(max(0.0, accuracy * (1 - accuracy)) / n)


def _pct_se(x: float | None, se: float | None) -> str:
    return _pct(x) if se is None or x is None else f"{100 * x:.1f} ±{100 * se:.1f}"


STDERR_NOTE = ("± one standard error (binomial, from each task's test-set size; the average's from the tasks' "
               "errors, taken as independent): differences within about two of them are noise.")


def accuracy_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The accuracy table every renderer shows (terminal, Markdown, HTML): header and rows of cells, each
    accuracy in % with its standard error where the test-set sizes are known (``results["splits"]``), and a
    ``reads`` column (``row.data``: nothing, unlabeled, calibration, validation) where the rows record it."""
    tasks = list(results["tasks"])
    sizes = {t: (results.get("splits") or {}).get(t, {}).get("test") for t in tasks}
    # what each row read beyond the input it scores (results.json's row.data), where the file records it
    reads = any("data" in row for row in results["methods"].values())
    header = ["method", *(["reads"] if reads else []), *tasks, "average", "normalised", "seconds"]
    rows = []
    for name, row in results["methods"].items():
        per_task = row["per_task"]
        errors = {t: standard_error(per_task.get(t), sizes[t]) for t in tasks}
        avg_se = None
        if tasks and all(e is not None for e in errors.values()):
            avg_se = math.sqrt(sum(e * e for e in errors.values())) / len(tasks)
        rows.append([name, *([row.get("data") or "-"] if reads else []), *[_pct_se(per_task.get(t), errors[t]) for t in tasks], _pct_se(row.get("average"), avg_se),
                     _pct(row.get("normalized_average")), f"{row.get('seconds') or 0:.0f}"])
    return header, rows


def rich_table(results: Mapping[str, Any], width: int | None = None):
    """The accuracy table for a terminal. Every column when it fits in ``width`` characters (None: always);
    on a narrower terminal the per-task columns are left out (they are in results.md and results.json) and
    the caption says so, so that the method names and averages stay readable instead of squeezed."""
    from rich.table import Table

    header, rows = accuracy_table(results)
    short = {"normalised": "norm", "seconds": "s", "average": "avg"}
    cols = list(range(len(header)))
    # each cell plus rich's padding and border (3 characters a column, 1 for the closing border)
    needed = sum(max([len(short.get(header[j], header[j])), *(len(r[j]) for r in rows)]) + 3 for j in cols) + 1
    compact = width is not None and needed > width
    if compact:
        tasks = set(results["tasks"])
        cols = [j for j in cols if header[j] not in tasks]
    table = Table(title=f"{results['benchmark']}: test accuracy (%)",
                  caption="per task: results.md (the terminal is too narrow for every column)" if compact else None)
    for j in cols:
        h = header[j]
        table.add_column(short.get(h, h), justify="left" if j == 0 else "right",
                         style="bold" if h in ("method", "average") else None, no_wrap=h == "method")
    for r in rows:
        table.add_row(*(r[j] for j in cols))
    return table


def markdown_table(results: Mapping[str, Any]) -> str:
    header, rows = accuracy_table(results)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def params_table(results: Mapping[str, Any]) -> str:
    lines = ["| method | parameters (chosen on validation where searched) |", "|---|---|"]
    for name, row in results["methods"].items():
        params = ", ".join(f"{k}={v}" for k, v in (row.get("params") or {}).items())
        lines.append(f"| {name} | {params or '-'} |")
    return "\n".join(lines)


def results_markdown(results: Mapping[str, Any]) -> str:
    parts = [
        f"# {results['benchmark']}",
        "",
        "Test accuracy (%) per task with each task's own head; *normalised* is the mean over tasks of "
        "merged / expert accuracy; " + STDERR_NOTE,
        "",
        markdown_table(results),
        "",
        params_table(results),
    ]
    if results.get("command"):
        parts += ["", f"Command: `{results['command']}`"]
    return "\n".join(parts) + "\n"


def accuracy_chart(results: Mapping[str, Any], path: str | Path) -> Path:
    """Test accuracy per method (rows) and task (columns, then the average), every cell written out; coloured by
    the difference from the task's own expert (the ``individual`` row) where the results have it, else by
    accuracy. A grid stays readable with twenty rows, where grouped bars did not. Written atomically as PNG."""
    import numpy as np

    plt = pyplot()
    tasks = list(results["tasks"])
    names = list(results["methods"])
    cols = [*tasks, "average"]

    def row_values(row: Mapping[str, Any]) -> list[float]:
        avg = row.get("average")
        return [100 * row["per_task"].get(t, float("nan")) for t in tasks] + [100 * avg if avg is not None else float("nan")]

    vals = np.array([row_values(results["methods"][n]) for n in names], dtype=float).reshape(len(names), len(cols))
    fig, ax = plt.subplots(figsize=(3.5 + 1.2 * len(cols), 1.6 + 0.36 * len(names)))
    if "individual" in results["methods"]:
        shown = vals - np.array(row_values(results["methods"]["individual"]), dtype=float)
        span = max(1.0, float(np.nanmax(np.abs(shown)))) if np.isfinite(shown).any() else 1.0
        image = ax.imshow(shown, cmap="RdYlGn", vmin=-span, vmax=span, aspect="auto")
        label = "points from the task's expert"
    else:
        image = ax.imshow(vals, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        label = "test accuracy (%)"
    for i in range(len(names)):
        for j in range(len(cols)):
            if np.isfinite(vals[i, j]):
                ax.text(j, i, f"{vals[i, j]:.1f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title(f"{results['benchmark']}: test accuracy (%) per task and method")
    fig.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.02)
    fig.tight_layout()
    return save_figure(fig, path)


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n"),
        "md": atomic_write_text(out_dir / "results.md", results_markdown(results)),
    }
    files["png"] = accuracy_chart(results, out_dir / "accuracy.png")
    return files
