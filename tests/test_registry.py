"""The one method registry: a method registered here, in the test, reaches `mergelab bench`, its results,
its report and config-file runs with no other code changed (issue 14's acceptance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from mergelab import methods
from mergelab.cli import app
from mergelab.core.errors import InputError
from mergelab.experiment.results import read_results
from mergelab.experiment.runner import load_context, run_benchmark
from mergelab.methods.registry import MergePlan, MethodOutput, per_task_values
from mergelab.pools.benchmarks import BENCHMARKS, register_benchmark
from mergelab.pools.evaluate import evaluate_tasks
from tests.test_bench_tiny import tiny_spec  # noqa: F401  (the tiny benchmark fixture)

runner = CliRunner()


def _halfsum(vectors, scaling: float = 0.5) -> MergePlan:
    """Test method: every task vector at ``scaling`` (Task Arithmetic at 0.5 by another name)."""
    return MergePlan("halfsum_test", dict(vectors), per_task_values("scaling", scaling, list(vectors)), {"scaling": scaling})


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _oracle(pool) -> MethodOutput:
    """Test dynamic method: each input through its own task's expert (a perfect router)."""
    return MethodOutput(features={t: pool.expert_features(t) for t in pool.inputs()})


def _fixed(pool) -> MethodOutput:
    """Test adaptive method: Task Arithmetic at 0.3, nothing learned, the experts' heads."""
    return MethodOutput(body=methods.merge("task_arithmetic", pool.pretrained, pool.bodies, scaling=0.3))


@pytest.fixture
def registered():
    methods.register("halfsum_test")(_halfsum)
    methods.register_method("oracle_test", kind="dynamic", needs="nothing", params=_NoParams)(_oracle)
    methods.register_method("fixed_test", kind="adaptive", needs="unlabeled", params=_NoParams)(_fixed)
    yield ["halfsum_test", "oracle_test", "fixed_test"]
    for name in ("halfsum_test", "oracle_test", "fixed_test"):
        methods.unregister(name)


def test_kinds_needs_and_typed_parameters():
    assert methods.available("static") == ["average", "dare", "task_arithmetic", "ties"]
    assert {"se_merging", "se_prototype", "se_relative"} <= set(methods.available("dynamic"))
    assert {"adamerging_taskwise", "adamerging_layerwise", "adamerging_plusplus", "adamerging_plusplus_taskwise",
            "symerge"} == set(methods.available("adaptive"))
    assert methods.get("se_merging").needs == "nothing" and methods.get("se_prototype").needs == "calibration"
    assert methods.get("symerge").needs == "unlabeled"
    with pytest.raises(InputError, match="'steps'"):  # a typed parameter, named in the message
        methods.get("symerge").check({"steps": "many"})
    with pytest.raises(InputError, match="no parameter"):
        methods.get("symerge").check({"stepz": 3})
    with pytest.raises(InputError, match="dynamic method"):  # no single merged model to write
        methods.merge("se_merging", {"w": torch.zeros(2)}, {"a": {"w": torch.ones(2)}})
    with pytest.raises(InputError, match="unknown method kind"):
        methods.available("static-ish")


def test_mergelab_methods_lists_kinds(registered):
    out = runner.invoke(app, ["methods"], terminal_width=200).output
    for name in methods.available():
        assert name in out
    assert "static methods" in out and "dynamic methods" in out and "adaptive methods" in out
    assert out.index("static methods") < out.index("se_prototype") < out.index("adaptive methods") < out.index("symerge")


def test_registered_methods_reach_bench_results(registered, tiny_spec, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    res = run_benchmark(tiny_spec, out_dir=tmp_path / "run", cache_dir=cache, progress=False,
                        rows=["task_arithmetic_0.3", *registered])
    rows = res["methods"]
    assert res["schema_version"] == 2
    assert set(rows) == {"individual", "pretrained", "task_arithmetic_0.3", *registered}
    # independent references: the static method's merge evaluated directly; the oracle router = the experts;
    # the "adaptive" body = Task Arithmetic 0.3
    ctx = load_context(tiny_spec, cache_dir=cache, progress=False)
    test = {t: s["test"] for t, s in ctx.splits.items()}
    direct = evaluate_tasks(ctx.family, methods.merge("halfsum_test", ctx.pretrained, ctx.experts), ctx.heads, test)
    assert rows["halfsum_test"]["per_task"] == pytest.approx(direct)
    assert rows["oracle_test"]["per_task"] == pytest.approx(rows["individual"]["per_task"])
    assert rows["fixed_test"]["per_task"] == pytest.approx(rows["task_arithmetic_0.3"]["per_task"])
    assert rows["oracle_test"]["data"] == "nothing" and rows["fixed_test"]["data"] == "unlabeled"
    assert rows["oracle_test"]["kind"] == "dynamic" and rows["halfsum_test"]["method"] == "halfsum_test"
    # results.json reads back through the schema's model
    saved = read_results(tmp_path / "run" / "results.json")
    assert saved.schema_version == 2 and saved.methods["fixed_test"].kind == "adaptive"
    assert "halfsum_test" in (tmp_path / "run" / "results.md").read_text()


def test_registered_methods_in_cli_config_and_report(registered, tiny_spec, tmp_path):  # noqa: F811
    register_benchmark(tiny_spec, overwrite=True)
    try:
        cfg = tmp_path / "bench.yaml"
        cfg.write_text(f"benchmark:\n  name: {tiny_spec.name}\n  rows: [halfsum_test, oracle_test]\n"
                       f"  cache: {tmp_path / 'cache'}\n")
        r = runner.invoke(app, ["-q", "bench", "--config", str(cfg), "--out", str(tmp_path / "run")])
        assert r.exit_code == 0, r.output
        saved = json.loads((tmp_path / "run" / "results.json").read_text())
        assert {"halfsum_test", "oracle_test"} <= set(saved["methods"])
        report = (tmp_path / "run" / "report.md").read_text()
        assert "halfsum_test" in report and "oracle_test" in report
    finally:
        BENCHMARKS.pop(tiny_spec.name, None)


def test_registered_static_method_in_merge_config(registered, tmp_path):
    from tests.tiny_models import save_tiny_pool

    _, pre, a, b = save_tiny_pool(tmp_path / "pool")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"pool:\n  pretrained: {pre}\n  experts: {{a: {a}, b: {b}}}\n"
                   "methods:\n  - name: halfsum_test\n    params: {scaling: [0.5, 0.25]}\n"
                   f"outputs: {{run_dir: {tmp_path / 'out'}, save_models: false}}\n")
    r = runner.invoke(app, ["-q", "merge", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    merges = json.loads((tmp_path / "out" / "results.json").read_text())["merges"]
    assert [m["method"] for m in merges.values()] == ["halfsum_test", "halfsum_test"]
    # a dynamic method has no single merged model: a merge config refuses it, naming the field
    cfg.write_text(f"pool:\n  pretrained: {pre}\n  experts: {{a: {a}, b: {b}}}\nmethods:\n  - name: oracle_test\n")
    r = runner.invoke(app, ["merge", "--config", str(cfg)])
    assert r.exit_code == 2 and "methods[0].name" in r.output and "dynamic method" in r.output


def test_row_names_say_what_runs():
    from mergelab.experiment.rows import TABLE, default_rows, resolve

    for row in TABLE:
        info = methods.get(row.method)
        # a row carries the paper's name only when it runs the paper's rule
        if row.name.startswith("se_merging"):
            assert row.method == "se_merging"
        if row.method == "se_prototype":
            assert row.name.startswith("se_prototype") and "calibration" in row.data()
        assert info.kind in ("static", "dynamic", "adaptive")
    assert len({r.name for r in default_rows()}) == len(default_rows())
    data = {r.name: r.data() for r in TABLE}
    assert data["task_arithmetic"] == "validation" and data["task_arithmetic_0.3"] == "nothing"
    assert data["se_merging_task_arithmetic"] == "nothing" and data["symerge"] == "unlabeled"
    assert data["se_prototype_task_arithmetic_fast+symerge_heads"] == "unlabeled+calibration"
    # a row reads what the rows it takes values from read: TIES' searched scaling
    assert data["ties+symerge_heads"] == "unlabeled+validation" and data["se_prototype_ties"] == "calibration+validation"
    with pytest.raises(InputError, match="unknown row"):
        resolve(["nope"])
    assert [r.name for r in resolve(["se_relative"])] == ["se_relative"]  # opt-in rows run when asked
    # any registered method by its name, with its default parameters
    assert [(r.name, r.method, dict(r.params)) for r in resolve(["dare", "se_prototype"])] == \
        [("dare", "dare", {}), ("se_prototype", "se_prototype", {})]


def test_adapt_command_lists_the_registry_methods():
    from mergelab.experiment.adapt import METHOD_NAMES

    assert set(METHOD_NAMES) == set(methods.available("adaptive"))


def test_dynamic_rules_refuse_prototype_only_modes():
    with pytest.raises(InputError, match="approximates the prototype rule"):
        methods.get("se_merging").fn(_NoPool(), mode="fast")


class _NoPool:
    """A pool the check refuses before reading anything."""

    def __getattr__(self, name):
        raise AssertionError(f"the pool was read ({name}) before the mode was checked")


def test_results_schema_reads_both_versions(tmp_path):
    from mergelab.experiment.results import read_results

    old = read_results(Path(__file__).parents[1] / "docs" / "data" / "text5_results_schema1.json")
    assert old.schema_version == 1 and old.methods["individual"].normalized_average == pytest.approx(1.0)
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"benchmark": "x", "tasks": ["a"], "methods": {"r": {"per_task": {"a": "high"}}}}))
    with pytest.raises(InputError, match=r"methods\.r\.per_task\.a"):
        read_results(bad)


def test_parameter_errors_name_their_field():
    from mergelab.core.errors import ParameterError

    pre, experts = {"w": torch.zeros(4)}, {"a": {"w": torch.ones(4)}, "b": {"w": -torch.ones(4)}}
    cases = [("ties", {"density": 2.0}, "density"), ("task_arithmetic", {"scaling": {"a": 0.3}}, "scaling"),
             ("task_arithmetic", {"scaling": {"a": 0.3, "b": float("nan")}}, "scaling[b]"),
             ("dare", {"drop_rate": 0.5, "seed": 0.5}, "seed"), ("average", {"weights": [1.0]}, "weights")]
    for method, params, field in cases:
        with pytest.raises(ParameterError) as err:
            methods.merge(method, pre, experts, **params)
        assert err.value.parameter == field, (method, params)
    with pytest.raises(ParameterError) as err:
        methods.get("se_merging").check({"temperature": "warm"})
    assert err.value.parameter == "temperature"
