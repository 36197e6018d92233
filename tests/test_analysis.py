"""SE-Merging analyses on a tiny model: numbers against direct computation, plots are real PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.experiment.analysis.representations import (
    auto_adaptation,
    collect_probes,
    routing_accuracy,
    routing_report,
)
from mergelab.experiment.analysis.run import run_analysis
from mergelab.experiment.se_evaluate import evaluate_se
from mergelab.methods import plan as make_plan
from mergelab.methods.dynamic import RouterConfig, SEMerging
from mergelab.pools.data.tasks import TextTask
from mergelab.pools.pool import ModelPool
from tests.tiny_models import VOCAB, tiny_bert_pool

PNG = b"\x89PNG\r\n\x1a\n"
WORDS = VOCAB[5:]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> ModelPool:
    rng = torch.Generator().manual_seed(1)

    def splits_for(i: int, t: str) -> dict:
        texts = [" ".join(WORDS[(i * 7 + j * 3 + int(torch.randint(0, 5, (1,), generator=rng))) % len(WORDS)]
                          for j in range(4)) + f" {k}" for k in range(50)]
        task = TextTask(t, texts, [k % 2 for k in range(50)], label_names=["x", "y"])
        return {"train": task.subset(range(10)), "validation": task.subset(range(10, 50)), "test": task.subset(range(10))}

    return tiny_bert_pool(tmp_path_factory.mktemp("tiny-bert-analysis"), splits_for)


def test_probe_analyses_match_direct_computation(ctx) -> None:
    plan = make_plan("task_arithmetic", ctx.pretrained, ctx.experts, scaling=0.3)
    merged = plan.apply(ctx.pretrained)
    texts = {t: s["validation"].texts[:6] for t, s in ctx.splits.items()}
    probes = collect_probes(ctx.family, {"merged": merged, "pretrained": ctx.pretrained, **ctx.experts}, texts, batch_size=4)
    assert probes.reps["merged"].shape == (3, 18, 32)
    # direct: layer 2 of sample 7 (task t1, 2nd text) under expert t2
    batch = ctx.family.tokenize([texts["t1"][1]])
    direct = ctx.family.hidden_states(batch, ctx.experts["t2"])[2][0]
    assert torch.allclose(probes.reps["t2"][2, 7], direct, atol=1e-5)

    aa = auto_adaptation(probes)
    m, e = probes.reps["merged"][1], torch.stack([probes.reps[t][1] for t in probes.tasks])
    d = torch.stack([(m - e[j]).norm(dim=-1) for j in range(3)], -1)
    assert aa["nearest_own_expert"][1] == pytest.approx(float((d.argmin(-1) == probes.task_of).float().mean()))
    assert aa["distance"][1][0][2] == pytest.approx(float(d[probes.task_of == 0, 2].mean()), rel=1e-5)

    acc = routing_accuracy(probes, ["raw", "relative"])
    p = probes.reps["pretrained"][1]
    rel = d - torch.stack([(p - e[j]).norm(dim=-1) for j in range(3)], -1)
    assert acc["relative"][1] == pytest.approx(float((rel.argmin(-1) == probes.task_of).float().mean()))
    rep = routing_report(probes, 1, "raw", 0.3)
    assert sum(map(sum, rep["confusion"])) == 18
    assert 0 <= rep["mean_entropy"] <= rep["max_entropy"]


def test_evaluate_se_routing_summary_is_consistent(ctx) -> None:
    plan = make_plan("task_arithmetic", ctx.pretrained, ctx.experts, scaling=0.3)
    se = SEMerging(ctx.family, ctx.pretrained, plan, ctx.experts, RouterConfig(layer=1, normalisation="raw", temperature=0.3))
    test = {t: s["test"] for t, s in ctx.splits.items()}
    acc, routing = evaluate_se(se, ctx.heads, test, batch_size=4)
    # accuracy by hand, sample by sample through the exact path
    for t, split in test.items():
        feats, _ = se.features(ctx.family.tokenize(split.texts), "exact")
        expect = float((ctx.heads[t](feats).argmax(-1) == torch.tensor(split.labels)).float().mean())
        assert acc[t] == pytest.approx(expect)
    assert sum(map(sum, routing["confusion"])) == 30


@pytest.mark.parametrize("kind", ["routing", "probe-sweep", "cost", "se-select", "lowrank", "fast-groups"])
def test_run_analysis_writes_json_and_pngs(ctx, tmp_path: Path, kind: str) -> None:
    files = run_analysis(kind, ctx, tmp_path, config=RouterConfig(layer=1), n_per_task=6, n_calib=4, layers=[1, 2],
                         temperatures=(0.3,), gains=(3.0,), ranks=(1, 64), groups_per_task=(1, 2), progress=False)
    assert files["json"].is_file()
    pngs = [p for k, p in files.items() if k != "json"]
    assert pngs
    for p in pngs:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 2000
    if kind == "fast-groups":
        study = json.loads(files["json"].read_text())
        rows = {r["name"]: r for r in study["fast"]}
        assert list(rows) == ["prototype groups", "quantized, 1 per task", "quantized, 2 per task"]
        assert rows["prototype groups"]["n_models"] == 3  # one per task
        assert 1 <= rows["quantized, 1 per task"]["n_models"] <= 3 and rows["quantized, 2 per task"]["n_models"] <= 6
        assert study["static"]["ratio_to_static"] == 1.0
    if kind == "probe-sweep":
        rows = json.loads(files["json"].read_text())
        assert [r["layer"] for r in rows] == [1, 2]
        for r in rows:
            assert {"exact", "fast", "fast_prototype_groups"} <= set(r)
            # every path routes with the same prototypes here (the default rule), so the same routing accuracy
            assert r["fast"]["routing_accuracy"] == pytest.approx(r["fast_prototype_groups"]["routing_accuracy"])


def test_lowrank_study_full_rank_matches_exact(ctx) -> None:
    from mergelab.experiment.analysis.se_study import lowrank_study

    study = lowrank_study(ctx, ranks=(1, 10_000), config=RouterConfig(layer=1), n_per_task=6, n_calib=4)
    full = study["lowrank"][1]
    assert full["relative_error_mean"] < 1e-5
    assert full["per_task"] == study["exact"]["per_task"]  # full rank: same predictions as the exact path
    assert study["lowrank"][0]["relative_error_mean"] > 1e-3  # rank 1 truncates
    for row in study["lowrank"]:
        assert row["ratio_to_static"] > 0 and 0 <= row["average"] <= 1


def test_analyze_cli_bad_input_exits_2() -> None:
    r = CliRunner().invoke(app, ["analyze", "nonsense"])
    assert r.exit_code == 2 and "unknown analysis 'nonsense'" in r.output
    r = CliRunner().invoke(app, ["analyze", "routing", "--temperature", "-1"])
    assert r.exit_code == 2 and "temperature" in r.output
    assert "Traceback" not in r.output


def test_approximations_study_against_direct_computation(ctx, tmp_path: Path) -> None:
    """Each approximate path's agreement, coefficient L1 and feature error, recomputed here sample by sample."""
    files = run_analysis("approximations", ctx, tmp_path, config=RouterConfig(layer=1, temperature=0.3, gain=2.0),
                         n_per_task=10, n_calib=4, ranks=(2,), progress=False)  # 10: the whole test split
    study = json.loads(files["json"].read_text())
    assert "| fast | exact |" in files["markdown"].read_text()
    paths = study["paths"]
    assert set(paths) == {"static", "exact", "fast", "single-pass", "lowrank 2", "paper exact",
                          "paper prototype-exact", "paper cached"}
    cfg = RouterConfig(layer=1, temperature=0.3, gain=2.0)
    se = SEMerging(ctx.family, ctx.pretrained, make_plan("task_arithmetic", ctx.pretrained, ctx.experts, scaling=0.3),
                   ctx.experts, cfg)
    se.calibrate({t: s["validation"].texts[:4] for t, s in ctx.splits.items()})
    agree = l1 = ferr = 0.0
    n = 0
    for t, s in ctx.splits.items():  # the test split, all of it
        b = ctx.family.tokenize(s["test"].texts)
        exact, r = se.features(b, "exact")
        fast, fr = se.features(b, "fast")
        agree += float((ctx.heads[t](fast).argmax(-1) == ctx.heads[t](exact).argmax(-1)).sum())
        l1 += float((fr.coefficients - r.coefficients).abs().sum())
        ferr += float(((fast - exact).norm(dim=-1) / exact.norm(dim=-1)).sum())
        n += len(s["test"])
    got = paths["fast"]["against_reference"]
    assert got["reference"] == "exact" and got["samples"] == n == 30
    assert got["agreement"] == pytest.approx(agree / n)
    assert got["coefficient_l1"] == pytest.approx(l1 / n, rel=1e-4, abs=1e-6)
    assert got["feature_error"] == pytest.approx(ferr / n, rel=1e-3, abs=1e-6)
    # the lowrank path routes like the exact one (no coefficient error) and differs in its features only
    assert paths["lowrank 2"]["against_reference"]["coefficient_l1"] == pytest.approx(0.0, abs=1e-6)
    assert paths["lowrank 2"]["against_reference"]["feature_error"] > 1e-4
    assert paths["paper cached"]["against_reference"]["reference"] == "paper exact"


def test_defaults_study_grid_old_defaults_and_best(ctx, tmp_path: Path) -> None:
    files = run_analysis("se-defaults", ctx, tmp_path, config=RouterConfig(layer=1), n_per_task=6, n_calib=4,
                         temperatures=(0.1, 1.0), gains=(2.0,), progress=False)
    study = json.loads(files["json"].read_text())
    assert [s["tasks"] for s in study["subsets"]] == [["t0", "t1"], ["t0", "t1", "t2"]]
    sub = ctx.restrict(["t0", "t1"])
    se = SEMerging(sub.family, sub.pretrained, make_plan("task_arithmetic", sub.pretrained, sub.experts, scaling=0.3),
                   sub.experts, RouterConfig(layer=1, temperature=1.0, gain=1.0, scale="std"))
    se.calibrate({t: s["validation"].texts[:4] for t, s in sub.splits.items()})
    acc = evaluate_se(se, sub.heads, {t: s["validation"].subset(range(4, 10)) for t, s in sub.splits.items()},
                      mode="exact", progress=False)[0]
    # the old defaults on two tasks: standardised distances, temperature 1, mass 0.5 = gain 0.5 x 2
    assert study["subsets"][0]["old_defaults"]["average"] == pytest.approx(sum(acc.values()) / 2)
    means = {(c["temperature"], c["gain"]): c["average"] for c in study["mean_over_subsets"]}
    assert means[(study["best"]["temperature"], study["best"]["gain"])] == max(means.values())
    assert "| old: standardised, 1.0 | mass 0.5 |" in files["markdown"].read_text()


def test_representation_bias_matches_distances_computed_directly(ctx, tmp_path: Path) -> None:
    """Per task and layer, the mean ||r_merged(x) - r_expert_t(x)|| of task t's test inputs: for Task Arithmetic
    0.3 against a merge materialised here, for the paper's SE-Merging rule against a per-sample merge materialised
    here from the router's coefficients (one sample at a time), for SyMerge against its adapted body."""
    from mergelab import methods
    from mergelab.experiment.analysis.bias import bias_rows, representation_bias
    from mergelab.experiment.rows import Row
    from mergelab.experiment.runner import RunPool

    n = 2
    splits = {t: {**s, "test": s["test"].subset(range(n))} for t, s in ctx.splits.items()}
    pool = RunPool(ctx.family, ctx.pretrained, dict(ctx.experts), dict(ctx.heads), splits, progress=False,
                   batch_size=2)
    rows = [*bias_rows(["task_arithmetic_0.3", "se_merging_task_arithmetic"]), Row("symerge", "symerge", {"steps": 3})]
    study = representation_bias(pool, rows, batch_size=2)
    assert study["rows"] == ["pretrained", "task_arithmetic_0.3", "se_merging_task_arithmetic", "symerge"]
    assert study["layers"] == [0, 1, 2]

    pre, experts = ctx.pretrained, ctx.experts
    taus = {t: {k: experts[t][k] - v for k, v in pre.items() if v.is_floating_point()} for t in experts}

    def merged_with(coef: dict[str, float]) -> dict:
        return {k: v + sum(c * taus[t][k] for t, c in coef.items()) if v.is_floating_point() else v
                for k, v in pre.items()}

    def dist(body, text: str, task: str) -> torch.Tensor:  # [layers]
        batch = ctx.family.tokenize([text])
        mine, own = ctx.family.hidden_states(batch, body), ctx.family.hidden_states(batch, experts[task])
        return torch.stack([(a[0] - b[0]).norm() for a, b in zip(mine, own)])

    ta = merged_with(dict.fromkeys(experts, 0.3))
    se = methods.get("se_merging").fn(pool).result  # the row's router, with the registry's defaults
    sym = methods.get("symerge").fn(pool, steps=3).body
    for task in experts:
        texts = splits[task]["test"].texts
        want_ta = torch.stack([dist(ta, x, task) for x in texts]).mean(0)
        want_pre = torch.stack([dist(pre, x, task) for x in texts]).mean(0)
        per_sample = []
        for x in texts:
            c = se.route(ctx.family.tokenize([x])).coefficients[0]
            per_sample.append(dist(merged_with({t: float(c[i]) for i, t in enumerate(se.tasks)}), x, task))
        want_se = torch.stack(per_sample).mean(0)
        want_sym = torch.stack([dist(sym(task), x, task) for x in texts]).mean(0)
        for row, want in [("task_arithmetic_0.3", want_ta), ("pretrained", want_pre),
                          ("se_merging_task_arithmetic", want_se), ("symerge", want_sym)]:
            assert study["distance"][row][task] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-5), (row, task)
    assert study["distance"]["task_arithmetic_0.3"]["t0"] != study["distance"]["se_merging_task_arithmetic"]["t0"]
    mean_ta = [sum(study["distance"]["task_arithmetic_0.3"][t][1] for t in experts) / 3]
    assert study["mean"]["task_arithmetic_0.3"][1] == pytest.approx(mean_ta[0], rel=1e-5)
    assert study["relative_to_pretrained"]["pretrained"] == pytest.approx([1.0, 1.0, 1.0])
    assert study["max_feature_error"]["se_merging_task_arithmetic"] < 1e-4  # the probe's last layer = the row's features


def test_representation_bias_analysis_writes_json_and_png(ctx, tmp_path: Path) -> None:
    files = run_analysis("representation-bias", ctx, tmp_path, n_per_task=2, n_calib=4,
                         rows=["ties", "se_prototype_task_arithmetic"], progress=False)
    study = json.loads(files["json"].read_text())
    assert study["split"] == "test" and study["n_per_task"] == {"t0": 2, "t1": 2, "t2": 2}
    assert study["params"]["ties"] == {"density": 0.2, "scaling": 1.0}  # no validation search here
    assert files["png"].read_bytes()[:8] == PNG and files["png"].stat().st_size > 2000
    r = CliRunner().invoke(app, ["analyze", "representation-bias", "--row", "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown row 'nope'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["analyze", "routing", "--row", "ties", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--row" in r.output
