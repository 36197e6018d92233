"""A benchmark built from users' own task files (no model loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.core.errors import InputError
from mergelab.pools.benchmarks import TEXT5, user_benchmark


def _csv(path: Path, n: int, prefix: str) -> Path:
    rows = ["text,label"] + [f"{prefix} example number {i},{'pos' if i % 2 else 'neg'}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_user_benchmark_splits_user_files(tmp_path: Path) -> None:
    spec = user_benchmark({"mine": str(_csv(tmp_path / "a.csv", 50, "alpha")),
                           "other": str(_csv(tmp_path / "b.csv", 30, "beta"))})
    assert spec.task_names == ["mine", "other"]
    assert spec.recipe == TEXT5.recipe and spec.backbone == TEXT5.backbone
    splits = spec.load_splits()
    s = splits["mine"]
    assert (len(s["train"]), len(s["validation"]), len(s["test"])) == (35, 5, 10)
    ids = [set(s[k].ids) for k in ("train", "validation", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert s["train"].label_names == ["neg", "pos"]


def test_user_benchmark_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="at least 10"):
        user_benchmark({"tiny": str(_csv(tmp_path / "t.csv", 4, "x"))})
    r = CliRunner().invoke(app, ["bench", "--task", "nopath"])
    assert r.exit_code == 2 and "--task 'nopath': expected NAME=PATH" in r.output
    r = CliRunner().invoke(app, ["bench", "--task", f"x={tmp_path / 'missing.csv'}"])
    assert r.exit_code == 2 and "missing.csv" in r.output and "Traceback" not in r.output
