"""Results as a terminal table, Markdown, JSON and a PNG bar chart.

``results`` is the dict written to ``results.json``:
``{"benchmark": str, "tasks": [str], "methods": {NAME: {"per_task": {TASK: acc}, "average": float,
"normalized_average": float, "seconds": float, "params": {...}}}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergelab.core.figures import pyplot, save_figure
from mergelab.core.io import atomic_write_text


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def rich_table(results: Mapping[str, Any]):
    from rich.table import Table

    tasks = results["tasks"]
    table = Table(title=f"{results['benchmark']}: test accuracy (%)")
    table.add_column("method", style="bold")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("norm", justify="right")
    table.add_column("s", justify="right")
    for name, row in results["methods"].items():
        table.add_row(name, *[_pct(row["per_task"].get(t)) for t in tasks], _pct(row["average"]),
                      _pct(row.get("normalized_average")), f"{row.get('seconds', 0):.0f}")
    return table


def markdown_table(results: Mapping[str, Any]) -> str:
    tasks = results["tasks"]
    lines = [
        "| method | " + " | ".join(tasks) + " | average | normalised | seconds |",
        "|---|" + "---:|" * (len(tasks) + 3),
    ]
    for name, row in results["methods"].items():
        cells = [_pct(row["per_task"].get(t)) for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(row['average'])} | "
                     f"{_pct(row.get('normalized_average'))} | {row.get('seconds', 0):.0f} |")
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
        "merged / expert accuracy.",
        "",
        markdown_table(results),
        "",
        params_table(results),
    ]
    if results.get("command"):
        parts += ["", f"Command: `{results['command']}`"]
    return "\n".join(parts) + "\n"


def bar_chart(results: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bars: accuracy per task for each method; written atomically as PNG."""
    import numpy as np

    plt = pyplot()
    tasks = list(results["tasks"]) + ["average"]
    names = list(results["methods"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks)), 4.8))
    x = np.arange(len(tasks))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        row = results["methods"][name]
        vals = [100 * row["per_task"].get(t, float("nan")) for t in results["tasks"]] + [100 * row["average"]]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name, color=cmap(i % 20))
    ax.set_xticks(x, tasks, rotation=15)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['benchmark']}: accuracy per task and method")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n"),
        "md": atomic_write_text(out_dir / "results.md", results_markdown(results)),
    }
    files["png"] = bar_chart(results, out_dir / "accuracy.png")
    return files
