"""The one accuracy table (terminal, Markdown, HTML report) and its standard errors, by hand."""

from __future__ import annotations

import json
import math

from mergelab.experiment.report import accuracy_table, markdown_table, rich_table, standard_error
from mergelab.experiment.report_page import render_report

RESULTS = {
    "benchmark": "hand", "tasks": ["a", "b"],
    "splits": {"a": {"test": 100}, "b": {"test": 100}},
    "methods": {"m": {"per_task": {"a": 0.5, "b": 0.9}, "average": 0.7, "normalized_average": 0.8, "seconds": 3}},
}


def test_standard_errors_by_hand():
    assert standard_error(0.5, 100) == 0.05 and standard_error(0.9, 100) == math.sqrt(0.09 / 100)
    assert standard_error(0.5, None) is None
    header, rows = accuracy_table(RESULTS)
    assert header == ["method", "a", "b", "average", "normalised", "seconds"]
    # average: sqrt(0.05^2 + 0.03^2) / 2 = 0.02915
    assert rows == [["m", "50.0 ±5.0", "90.0 ±3.0", "70.0 ±2.9", "80.0", "3"]]
    assert "| m | 50.0 ±5.0 | 90.0 ±3.0 | 70.0 ±2.9 | 80.0 | 3 |" in markdown_table(RESULTS)
    assert rich_table(RESULTS).row_count == 1
    # without test-set sizes, no error is made up
    no_sizes = {k: v for k, v in RESULTS.items() if k != "splits"}
    assert accuracy_table(no_sizes)[1] == [["m", "50.0", "90.0", "70.0", "80.0", "3"]]


def test_terminal_table_drops_per_task_columns_only_when_too_narrow():
    from rich.console import Console

    wide = {**RESULTS, "methods": {"se_prototype_task_arithmetic_fast": RESULTS["methods"]["m"]}}
    full = rich_table(wide)
    assert [str(c.header) for c in full.columns] == ["method", "a", "b", "avg", "norm", "s"]
    # widest cells 33 + 9 + 9 + 9 + 4 + 1 characters, with 3 each of padding and border, + 1: 84 needed
    fits = Console(width=84, record=True)
    fits.print(rich_table(wide, width=84))
    assert len(rich_table(wide, width=84).columns) == 6 and "…" not in fits.export_text()
    narrow = rich_table(wide, width=83)
    assert [str(c.header) for c in narrow.columns] == ["method", "avg", "norm", "s"]
    assert "results.md" in str(narrow.caption)
    console = Console(width=60, record=True)
    console.print(narrow)
    text = console.export_text()
    assert "se_prototype_task_arithmetic_fast" in text and "70.0 ±2.9" in text  # readable, not squeezed
    assert rich_table({**RESULTS, "methods": {}}, width=60).row_count == 0  # no rows yet: no crash


def test_accuracy_chart_with_and_without_the_experts_row(tmp_path):
    from mergelab.experiment.report import accuracy_chart

    with_experts = {**RESULTS, "methods": {"individual": RESULTS["methods"]["m"], **RESULTS["methods"]}}
    for name, results in (("with.png", with_experts), ("without.png", RESULTS)):
        path = accuracy_chart(results, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["with.png", "without.png"]  # nothing left behind


def test_report_page_shows_the_same_table(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    files = render_report(tmp_path)
    md = files["md"].read_text()
    assert "| m | 50.0 ±5.0 | 90.0 ±3.0 | 70.0 ±2.9 | 80.0 | 3 |" in md
    assert '<td class="num">70.0 ±2.9</td>' in files["html"].read_text()


def test_row_progress_line(monkeypatch):
    from mergelab.experiment import runner

    clock = iter([100.0, 130.0, 160.0, 3700.0])
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    line = runner.RowProgress(4)
    assert line.step() == "[1/4 rows, 0:30 elapsed, ~1:30 left]"  # 30 s a row, 3 rows left
    assert line.step() == "[2/4 rows, 1:00 elapsed, ~1:00 left]"
    assert line.step() == "[3/4 rows, 1:00:00 elapsed, ~20:00 left]"
