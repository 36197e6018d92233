"""``mergelab sweep`` (issue 17): studies over methods, parameter spaces, task subsets and seeds, in this process
and on a local Ray with 2 CPUs, on a tiny pool of four tasks written to disk (the trials' shared storage).

What can fail here: the Ray run's records equal the in-process run's trial for trial; an interrupted sweep
restarted runs exactly the trials it had not recorded and leaves the recorded ones untouched; a trial made
to fail is recorded with its error while the rest finish; a subset is a real pool (the method sees only its
experts); per-task coefficients merge as a formula written here says; the same config gives the same trials.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergelab import methods
from mergelab.cli import app
from mergelab.core.errors import InputError
from mergelab.experiment.results import read_results
from mergelab.experiment.sweep import parse_sweep_config, run_sweep
from mergelab.experiment.sweep.studies import task_subsets
from tests.test_bench_tiny import tiny_spec  # noqa: F401  (the tiny benchmark fixture)
from tests.tiny_models import VOCAB, save_tiny_bert

PLUGIN = str(Path(__file__).with_name("sweep_plugin.py"))
TASKS = ["t0", "t1", "t2", "t3"]
runner = CliRunner()


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared storage: a tiny BERT, four perturbed experts (weights and a linear head each), four CSV tasks."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("sweep-storage")
    pre = save_tiny_bert(root / "pre", seed=0)
    weights = load_file(str(pre / "model.safetensors"))
    words = VOCAB[5:]
    for k, t in enumerate(TASKS):
        g = torch.Generator().manual_seed(k + 1)
        (root / f"e{k}").mkdir()
        save_file({n: w + 0.05 * torch.randn(w.shape, generator=g) if w.is_floating_point() else w
                   for n, w in weights.items()}, str(root / f"e{k}" / "model.safetensors"))
        save_file({"weight": torch.randn(2, 32, generator=g), "bias": torch.zeros(2)},
                  str(root / f"e{k}" / "head.safetensors"))
        w = words[k * 8 : (k + 1) * 8]
        rows = ["text,label"] + [f"{w[i % 4]} {w[4 + (i * 3) % 4]} {w[(i * 5) % 8]},{i % 2}" for i in range(30)]
        (root / f"{t}.csv").write_text("\n".join(rows) + "\n")
    yield root
    for name in ("spy_test", "explode_test"):  # registered by the plugin in this process
        methods.unregister(name)
    from mergelab.experiment.sweep import trial

    for path, module in list(trial._PLUGINS.items()):
        sys.modules.pop(module, None)
        trial._PLUGINS.pop(path)


def sweep_yaml(root: Path, **extra) -> str:
    pool = {"family": "text", "pretrained": str(root / "pre"), "device": "cpu", "max_length": 12,
            "experts": {t: str(root / f"e{k}") for k, t in enumerate(TASKS)},
            "tasks": {t: {"path": str(root / f"{t}.csv")} for t in TASKS}}
    cfg = {
        "name": "tiny", "pool": pool, "evaluation": {"validation_per_task": 10}, "plugins": [PLUGIN],
        "methods": [
            {"label": "ta_lambda", "name": "task_arithmetic", "params": {"scaling": [0.2, 1.0]}},
            {"label": "ta_per_task", "name": "task_arithmetic", "search": "optuna", "trials": 4,
             "params": {"scaling": {"low": 0.0, "high": 1.0, "per_task": True}}},
            {"label": "spy", "name": "spy_test"},
            {"label": "boom", "name": "explode_test", "params": {"scaling": [0.3, 0.9]}, "select": "none"},
        ],
        "subsets": {"sizes": [2, 4], "max_per_size": 2, "seed": 0},
        "search": {"batch": 2, "seed": 0},
        **extra,
    }
    return json.dumps(cfg)  # JSON is YAML


# 3 subsets x (2 + 1 grid, 4 + 1 optuna, 1 fixed, 2 on test) + the reference trial
PLANNED = 3 * (3 + 5 + 1 + 2) + 1


@pytest.fixture(scope="module")
def inline_run(storage: Path, tmp_path_factory: pytest.TempPathFactory):
    """The sweep run in this process through the CLI: the reference every other run is compared with."""
    cfg_path = storage / "tiny.yaml"
    cfg_path.write_text(sweep_yaml(storage))
    out = tmp_path_factory.mktemp("inline") / "sweep"
    res = runner.invoke(app, ["sweep", str(cfg_path), "--executor", "inline", "--out", str(out), "-q"],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    return out, res.output


def records(sweep_dir: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (sweep_dir / "trials.jsonl").read_text().splitlines())}


def test_per_task_scaling_matches_the_formula() -> None:
    """Task Arithmetic and TIES with one lambda per task, against the formulas written out here."""
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}
    experts = {t: {k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in ("a", "b", "c")}
    lam = {"a": 0.2, "b": 0.7, "c": 1.3}
    ta = methods.merge("task_arithmetic", pre, experts, scaling=lam)
    for k in pre:
        want = pre[k] + sum(lam[t] * (experts[t][k] - pre[k]) for t in lam)
        assert torch.allclose(ta[k], want, atol=1e-6)
    # TIES (Yadav et al. 2023): keep the top half of |tau| over the whole vector, elect the sign of the sum,
    # average the agreeing entries; with per-task lambdas each task's share of that mean is scaled by its own
    keys = list(pre)
    flat = {t: torch.cat([(experts[t][k] - pre[k]).flatten() for k in keys]) for t in lam}
    trimmed = {}
    for t, v in flat.items():
        keep = torch.zeros_like(v, dtype=torch.bool)
        keep[v.abs().topk(v.numel() // 2).indices] = True
        trimmed[t] = torch.where(keep, v, torch.zeros_like(v))
    sign = torch.sign(sum(trimmed.values()))
    agree = {t: (torch.sign(v) == sign) & (v != 0) for t, v in trimmed.items()}
    count = sum(a.float() for a in agree.values()).clamp(min=1)
    delta = sum(lam[t] * torch.where(agree[t], trimmed[t], torch.zeros_like(trimmed[t])) / count for t in lam)
    ties = methods.merge("ties", pre, experts, scaling=lam, density=0.5)
    got = torch.cat([(ties[k] - pre[k]).flatten() for k in keys])
    assert torch.allclose(got, delta, atol=1e-5)
    # and not the same as one lambda for all (the mean of the three)
    one = methods.merge("ties", pre, experts, scaling=sum(lam.values()) / 3, density=0.5)
    assert not torch.allclose(one["w"], ties["w"])


def test_task_subsets_every_subset_or_a_seeded_sample() -> None:
    tasks = ["a", "b", "c", "d", "e"]
    every = task_subsets(tasks, [2, 3, 4, 5], None, 0)
    assert len(every) == math.comb(5, 2) + math.comb(5, 3) + math.comb(5, 4) + 1 == 26
    assert len(set(every)) == 26 and all(list(s) == sorted(s) for s in every)  # pool order, no repeats
    sample = task_subsets(tasks, [2, 3, 4, 5], 3, seed=7)
    assert [len(s) for s in sample] == [2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    assert set(sample) <= set(every) and sample == task_subsets(tasks, [2, 3, 4, 5], 3, seed=7)
    assert any(task_subsets(tasks, [2, 3], 3, seed=s) != sample[:6] for s in range(8, 12))
    assert task_subsets(tasks, None, None, 0) == [tuple(tasks)]


@pytest.mark.parametrize("change, message", [
    ({"methds": []}, r"tiny.yaml:8: methds: unknown field; expected one of: name, benchmark, pool"),
    ({"methods": [{"name": "task_arithmetic", "params": {"scaling": {"low": 0.1, "high": 1.0}}}]},
     r"methods\[0\]\.params\.scaling: in a grid a range needs num"),
    ({"methods": [{"name": "ties", "params": {"scaling": {"low": 0.1, "high": 1.0, "per_task": True, "num": 3}}}]},
     r"methods\[0\]\.params\.scaling: per_task ranges need search: random or optuna"),
    ({"methods": [{"name": "ties", "params": {"density": [0.2, 2.0]}}]},
     r"methods\[0\]\.params\.density: parameter 'density' must be in \(0, 1\]"),
    ({"methods": [{"name": "ties", "params": {"densty": 0.2}}]}, r"methods\[0\]\.params\.densty: 'ties' has no parameter"),
    ({"methods": [{"name": "ties"}, {"name": "ties"}]}, r"methods\[1\]: study 'ties' is already methods\[0\]"),
    ({"methods": [{"name": "symerge", "params": {"steps": "many"}}]}, r"methods\[0\]\.params\.steps: .*'steps'"),
    ({"subsets": {"sizes": [2, 5]}}, r"subsets\.sizes\[1\]: a subset of 5 tasks; the pool has 4"),
    ({"search": {"sampler": "bayes"}}, r"search\.sampler: expected 'tpe', 'cmaes' or 'random'"),
    ({"resources": {"gpus": -1}}, r"resources\.gpus: .*greater than or equal to 0"),
    ({"evaluation": {"validation_per_task": 0}}, r"tiny.yaml:3: evaluation\.validation_per_task: 0 holds out no "
                                                 r"validation data, and methods\[0, 1\] choose"),
])
def test_bad_sweep_files_name_the_key(storage: Path, change: dict, message: str) -> None:
    text = json.loads(sweep_yaml(storage))
    text.update(change)
    text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in text.items())  # one key per line: lines are checked
    with pytest.raises(InputError, match=message):
        parse_sweep_config(text, where="tiny.yaml")


def test_cli_refuses_bad_input_with_status_2(storage: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbenchmark: {name: text5}\nmethods:\n  - name: task_arithmetc\n")
    res = runner.invoke(app, ["sweep", str(bad), "--executor", "inline", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "methods[0].name: unknown method 'task_arithmetc'" in res.output
    assert "Traceback" not in res.output
    good = tmp_path / "good.yaml"
    good.write_text(sweep_yaml(storage))
    res = runner.invoke(app, ["sweep", str(good), "--executor", "dask", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--executor 'dask': expected one of ray, inline" in res.output
    assert not (tmp_path / "o").exists()


def test_inline_sweep_tables_selection_and_subsets(inline_run) -> None:
    out, output = inline_run
    recs = records(out)
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert len(lines) == PLANNED and len(recs) == PLANNED  # every planned trial, each its own id
    ref = recs[next(i for i, r in recs.items() if r["kind"] == "reference")]
    expert = ref["individual"]
    trials = [r for r in recs.values() if r["kind"] == "trial"]
    # a subset is a real pool: the method saw exactly the subset's experts, and each task got its own head
    for r in trials:
        if r["status"] == "ok":
            assert list(r["per_task"]) == r["tasks"]
            norm = sum(r["per_task"][t] / expert[r["split"]][t] for t in r["tasks"]) / len(r["tasks"])
            assert r["normalized_average"] == pytest.approx(norm)
        if r["study"] == "spy":
            assert r["params_run"]["saw"] == r["tasks"]
    # per-task coefficients: one value per task of the subset, inside the range
    for r in trials:
        if r["study"] == "ta_per_task":
            assert set(r["params"]["scaling"]) == set(r["tasks"])
            assert all(0.0 <= v <= 1.0 for v in r["params"]["scaling"].values())
    # selection: the final test trial runs the parameters of the best validation trial (ties: the first)
    by_study: dict[tuple, list] = {}
    for line in map(json.loads, lines):
        by_study.setdefault((line["study"], tuple(line["tasks"])), []).append(line)
    for (study, _), rows in by_study.items():
        if study in ("ta_lambda", "ta_per_task"):
            val = [r for r in rows if r["split"] == "validation"]
            final = [r for r in rows if r["index"] == "final"]
            assert len(final) == 1 and final[0]["split"] == "test"
            best = max(range(len(val)), key=lambda i: (val[i]["average"], -i))
            assert final[0]["params"] == val[best]["params"]
    # the failing trial is recorded with its error; its sibling and every other trial ran
    failed = [r for r in trials if r["status"] == "failed"]
    assert len(failed) == 3 and all(r["study"] == "boom" and r["params"] == {"scaling": 0.9} for r in failed)
    assert all("explode_test refuses scaling 0.9" in r["error"] for r in failed)
    assert all(r["status"] == "ok" for r in trials if r not in failed)
    # the tables: results.json (a mergelab results file), results.md, the plots, the report
    res = read_results(out / "results.json")
    assert {"individual", "pretrained", "ta_lambda", "ta_per_task", "spy"} <= set(res.methods)
    assert res.methods["ta_per_task"].per_task == next(r["per_task"] for r in trials if r["study"] == "ta_per_task"
                                                        and r["index"] == "final" and len(r["tasks"]) == 4)
    md = (out / "results.md").read_text()
    assert "Normalised test accuracy by number of tasks" in md and "explode_test refuses" in md
    for png in ("task_count.png", "search_history.png", "accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "Normalised accuracy by number of tasks" in report and "task_count.png" in report
    assert "## Environment" in report and "## Configuration" in report
    assert "normalised test accuracy (%) by number of tasks" in output and "3 failed" in output


def test_same_config_and_seed_same_trials(storage: Path, inline_run, tmp_path: Path) -> None:
    """A second run from scratch asks the same trials (grid, Optuna's seeded TPE) with the same results;
    another search seed asks other Optuna trials."""
    cfg = parse_sweep_config(sweep_yaml(storage))
    run = run_sweep(cfg, tmp_path / "again", executor="inline", progress=False, plots=False)
    assert len(run.ran) == PLANNED and records(tmp_path / "again") == _without_run_fields(records(inline_run[0]),
                                                                                            records(tmp_path / "again"))
    other = parse_sweep_config(sweep_yaml(storage, search={"batch": 2, "seed": 1},
                                          methods=[json.loads(sweep_yaml(storage))["methods"][1]]))
    run_sweep(other, tmp_path / "seed1", executor="inline", progress=False, plots=False)
    ids = {r["id"] for r in records(tmp_path / "seed1").values() if r.get("split") == "validation"}
    assert ids and not ids & set(records(inline_run[0]))
    # CMA-ES over the same per-task space: its own trials, inside the range, one value per task
    cma = json.loads(sweep_yaml(storage))["methods"][1] | {"sampler": "cmaes"}
    run = run_sweep(parse_sweep_config(sweep_yaml(storage, methods=[cma])), tmp_path / "cma", executor="inline",
                    progress=False, plots=False)
    val = [r for r in records(tmp_path / "cma").values() if r.get("split") == "validation"]
    assert run.complete and len(val) == 3 * 4
    assert {r["id"] for r in val} - set(records(inline_run[0]))  # (both start from the same seeded random draw)
    assert all(set(r["params"]["scaling"]) == set(r["tasks"]) and 0 <= min(r["params"]["scaling"].values())
               and max(r["params"]["scaling"].values()) <= 1 for r in val)


def _without_run_fields(a: dict, b: dict) -> dict:
    """``a``'s records with ``b``'s host, pid, times (what may differ between two runs of one trial)."""
    varying = ("seconds", "run_seconds", "finished", "pid", "host", "executor", "threads")
    out = {i: {**r, **{k: b[i][k] for k in varying if k in b.get(i, {})}} for i, r in a.items()}
    for i, r in out.items():  # a row's phase timings (results.json's row.timing) are times too
        if isinstance(r.get("extra"), dict) and "timing" in r["extra"] and "timing" in b.get(i, {}).get("extra", {}):
            r["extra"] = {**r["extra"], "timing": b[i]["extra"]["timing"]}
    return out


def _stop_after(n: int):
    seen = []

    def hook(record):
        seen.append(record["id"])
        if len(seen) >= n:
            raise KeyboardInterrupt  # the driver killed mid-way

    return hook


def test_interrupted_sweep_resumes_with_the_missing_trials_only(storage: Path, inline_run, tmp_path: Path) -> None:
    cfg = parse_sweep_config(sweep_yaml(storage))
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, out, executor="inline", progress=False, plots=False, on_result=_stop_after(7))
    before = {p.name: p.read_bytes() for p in (out / "trials").glob("*.json")}
    assert len(before) == 8  # the reference trial and the seven the hook saw
    again = run_sweep(cfg, out, executor="inline", progress=False, plots=False)
    assert sorted(again.ran) == sorted(set(records(inline_run[0])) - {n[:-5] for n in before})
    assert set(again.skipped) >= {n[:-5] for n in before} and again.complete
    assert all((out / "trials" / n).read_bytes() == b for n, b in before.items())  # nothing recorded ran twice
    third = run_sweep(cfg, out, executor="inline", progress=False, plots=False)
    assert third.ran == [] and third.complete
    retry = run_sweep(cfg, out, executor="inline", progress=False, plots=False, retry_failed=True)
    assert sorted(retry.ran) == sorted(r["id"] for r in records(out).values() if r["status"] == "failed")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this module: 2 CPUs, no dashboard."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_sweep_equals_inline_resumes_and_records_failures(storage: Path, inline_run, local_ray,
                                                              tmp_path: Path) -> None:
    """On a local Ray (2 CPUs): interrupted after a few results, restarted, the Ray sweep ran each trial
    once, its records equal the in-process run's, the failing trials are recorded and the rest finished."""
    cfg = parse_sweep_config(sweep_yaml(storage))
    out = tmp_path / "ray"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, out, executor="ray", progress=False, plots=False, on_result=_stop_after(5))
    first = {p.name[:-5]: p.read_bytes() for p in (out / "trials").glob("*.json")}
    assert 5 <= len(first) < PLANNED  # cancelled in flight: nothing more was written after the driver stopped
    again = run_sweep(cfg, out, executor="ray", progress=False, plots=False)
    inline = records(inline_run[0])
    assert sorted(again.ran) == sorted(set(inline) - set(first)) and again.complete
    assert all((out / "trials" / f"{i}.json").read_bytes() == b for i, b in first.items())
    ray_recs = records(out)
    assert ray_recs == _without_run_fields(inline, ray_recs)  # every result equals the in-process trial's
    ran_on = {r["executor"] for r in ray_recs.values()}
    assert ran_on == {"ray"} and os.getpid() not in {r.get("pid") for r in ray_recs.values()}  # Ray workers
    failed = [r for r in ray_recs.values() if r["status"] == "failed"]
    assert len(failed) == 3 and all("explode_test refuses scaling 0.9" in r["error"] for r in failed)


def test_fence_no_record_appears_after_an_interrupted_run_returns(tmp_path: Path) -> None:
    """The race behind a flaky resume: Ray may report a cancelled trial done while its worker still finishes it
    and writes its record. After retire_run + wait_for_trials, a trial that was running has finished writing (the
    wait returns only then), and a trial of the retired run that starts later neither runs nor writes."""
    import threading
    import time

    from mergelab.experiment.sweep.fence import open_run, retire_run, trial_slot, wait_for_trials
    from mergelab.experiment.sweep.trial import execute_trial

    (tmp_path / "trials").mkdir()
    token = open_run(tmp_path)
    entered, late = threading.Event(), tmp_path / "trials" / "late.json"

    def slow_trial() -> None:  # inside its slot before the interrupt, writes 0.3 s after it
        with trial_slot(tmp_path, token) as current:
            assert current
            entered.set()
            time.sleep(0.3)
            late.write_text("{}")

    worker = threading.Thread(target=slow_trial)
    worker.start()
    assert entered.wait(5)
    retire_run(tmp_path)
    assert not wait_for_trials(tmp_path, 0.05)  # still inside its slot
    assert wait_for_trials(tmp_path, 10) and late.is_file()  # returned only once the record was written
    worker.join()
    # a trial of the retired run that starts now: no pool is loaded (the source does not exist), nothing written
    payload = {"trial": {"id": "abc", "kind": "trial"}, "source": {"path": str(tmp_path / "missing")},
               "sweep_dir": str(tmp_path), "run_token": token, "executor": "ray"}
    assert execute_trial(payload)["status"] == "cancelled"
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["late.json"]
    # the next run's trials are current; a trial called without a token (no sweep run) is not fenced
    with trial_slot(tmp_path, open_run(tmp_path)) as current, trial_slot(tmp_path, None) as unfenced:
        assert current and unfenced


def test_benchmark_pool_with_adaptive_and_dynamic_methods_on_subsets(tiny_spec, tmp_path: Path) -> None:  # noqa: F811
    """A named benchmark as the pool (experts trained into the cache by the reference trial, then read from it):
    SyMerge runs with the benchmark's reduced steps on each subset, SE-Merging's fast path routes among the
    subset's experts only, Task Arithmetic searches its scaling inside the trial."""
    from mergelab.pools.benchmarks import BENCHMARKS, register_benchmark

    register_benchmark(tiny_spec, overwrite=True)
    try:
        cfg = parse_sweep_config(json.dumps({
            "name": "tb", "benchmark": {"name": "tiny", "cache": str(tmp_path / "cache")},
            "methods": [{"name": "task_arithmetic", "scaling_grid": [0.3, 0.6]}, {"name": "symerge"},
                        {"label": "se_fast", "name": "se_prototype",
                         "params": {"base": "task_arithmetic", "base_params": {"scaling": 0.3}, "mode": "fast"}}],
            "subsets": {"sizes": [2, 3], "max_per_size": 1}}))
        run = run_sweep(cfg, tmp_path / "sweep", executor="inline", progress=False, plots=False)
    finally:
        BENCHMARKS.pop("tiny", None)
    recs = [r for r in records(tmp_path / "sweep").values() if r["kind"] == "trial"]
    assert run.complete and not run.failed and len(recs) == 3 * 2
    assert (tmp_path / "cache" / "experts").is_dir()  # the reference trial filled the shared cache
    for r in recs:
        assert list(r["per_task"]) == r["tasks"]
        if r["method"] == "symerge":
            assert r["params_run"]["steps"] == dict(tiny_spec.adaptive_steps)["symerge"]
            assert set(r["params_run"]["coefficient_mean"]) == set(r["tasks"])
        if r["method"] == "task_arithmetic":
            assert r["inner_search"]["grid"] == [0.3, 0.6] and r["params_run"]["scaling"] == r["inner_search"]["best"]
