"""SE-Merging studies on a benchmark: probe/routing analyses, parameter selection, probe sweep, cost.

Everything here reads the *validation* split by default (parameter choice never looks at test data):
the first ``n_calib`` texts of each task calibrate the prototype rule, the next ``n_per_task`` are
evaluated. Each function returns plain JSON-able dicts; :mod:`mergelab.experiment.plots` draws them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from mergelab.core.batching import iter_batches, progress_bar
from mergelab.experiment.analysis.representations import (
    auto_adaptation,
    collect_probes,
    routing_accuracy,
    routing_report,
)
from mergelab.methods import plan as make_plan
from mergelab.methods.dynamic import RouterConfig, SEMerging
from mergelab.methods.dynamic import router as R


def _texts(ctx, split: str, start: int, n: int) -> dict[str, list[str]]:
    return {t: s[split].texts[start : start + n] for t, s in ctx.splits.items()}


def _subsplits(ctx, split: str, start: int, n: int):
    return {t: s[split].subset(list(range(start, min(len(s[split]), start + n)))) for t, s in ctx.splits.items()}


def se_model(ctx, base: str = "task_arithmetic", config: RouterConfig | None = None, **params) -> SEMerging:
    params = params or ({"scaling": 0.3} if base == "task_arithmetic" else {"density": 0.2})
    return SEMerging(ctx.family, ctx.pretrained, make_plan(base, ctx.pretrained, ctx.experts, **params), ctx.experts,
                     config or RouterConfig())


def probe_study(ctx, *, config: RouterConfig | None = None, split: str = "validation", n_per_task: int = 100,
                n_calib: int = 32, progress: bool = False) -> dict:
    """Auto-adaptation check and routing accuracy of every rule at every layer (Task Arithmetic 0.3);
    the confusion matrix and weight entropy of ``config``'s rule (and of the prototype rule) at its layer."""
    cfg = config or RouterConfig(layer=min(RouterConfig().layer, ctx.family.n_layers))
    se = se_model(ctx, config=cfg)
    params = {"merged": se.static, "pretrained": ctx.pretrained, **ctx.experts}
    evalp = collect_probes(ctx.family, params, _texts(ctx, split, n_calib, n_per_task), progress=progress)
    calib = collect_probes(ctx.family, params, _texts(ctx, split, 0, n_calib), progress=progress)
    return {
        "split": split, "n_per_task": n_per_task, "n_calib": n_calib, "tasks": evalp.tasks,
        "auto_adaptation": auto_adaptation(evalp),
        "routing_accuracy": routing_accuracy(evalp, calibration=calib),
        "routing": routing_report(evalp, cfg.layer, cfg.normalisation, cfg.temperature, calib),
        "routing_prototype": routing_report(evalp, cfg.layer, "prototype", cfg.temperature, calib),
    }


@torch.no_grad()
def grid_study(ctx, *, layer: int, normalisation: str, temperatures: Sequence[float], masses: Sequence[float],
               base: str = "task_arithmetic", split: str = "validation", n_per_task: int = 100, n_calib: int = 32,
               batch_size: int = 64, progress: bool = False) -> list[dict]:
    """Average accuracy of SE-Merging (exact path) for each (temperature, mass); probes computed once per batch."""
    se = se_model(ctx, base, RouterConfig(layer=layer, normalisation=normalisation))
    if normalisation == "prototype":
        se.calibrate(_texts(ctx, split, 0, n_calib))
    grid = [(t, m) for t in temperatures for m in masses]
    correct = {g: {t: 0 for t in ctx.splits} for g in grid}
    data = _subsplits(ctx, split, n_calib, n_per_task)
    bar = progress_bar(sum(len(s) for s in data.values()), "SE-Merging grid", progress)
    for task, sub in data.items():
        for idx in iter_batches(sub.texts, batch_size):
            batch = ctx.family.tokenize([sub.texts[i] for i in idx])
            reps = se.representations(batch)
            s = R.scores(normalisation, **reps)
            y = torch.tensor([sub.labels[i] for i in idx])
            for temp, mass in grid:
                c = R.rescale(R.routing_weights(s, temp), se.base, mass)
                pred = ctx.heads[task](se.mixed_features(batch, c)).argmax(-1).cpu()
                correct[(temp, mass)][task] += int((pred == y).sum())
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    out = []
    for temp, mass in grid:
        per = {t: correct[(temp, mass)][t] / len(data[t]) for t in data}
        out.append({"temperature": temp, "mass": mass,
                    "per_task": per, "average": sum(per.values()) / len(per)})
    return out


@torch.no_grad()
def probe_sweep(ctx, *, layers: Sequence[int], config: RouterConfig | None = None, split: str = "validation",
                n_per_task: int = 60, n_calib: int = 32, batch_size: int = 64, progress: bool = False) -> list[dict]:
    """Accuracy and seconds per sample of SE-Merging for each probe layer: the exact path, the fast path
    (``fast``: quantized groups, the default) and the fast path with one group per task at its prototype
    (``fast_prototype_groups``)."""
    from mergelab.experiment.se_evaluate import evaluate_se

    base_cfg = config or RouterConfig()
    data = _subsplits(ctx, split, n_calib, n_per_task)
    n = sum(len(s) for s in data.values())
    out = []
    for layer in layers:
        row: dict = {"layer": layer}
        se = se_model(ctx, config=RouterConfig(**{**base_cfg.to_dict(), "layer": layer}))
        se.calibrate(_texts(ctx, split, 0, n_calib))
        for name, mode, groups in (("exact", "exact", None), ("fast", "fast", "quantized"),
                                   ("fast_prototype_groups", "fast", "prototype")):
            se.groups = groups or se.groups
            t0 = time.perf_counter()
            acc, routing = evaluate_se(se, ctx.heads, data, mode=mode, batch_size=batch_size, progress=progress,
                                       label=f"layer {layer}")
            row[name] = {"average": sum(acc.values()) / len(acc), "per_task": acc,
                         "routing_accuracy": routing["routing_accuracy"],
                         "seconds_per_sample": (time.perf_counter() - t0) / n}
        out.append(row)
    return out


def _routed_batches(ctx, se: SEMerging, data, batch_size: int) -> list[tuple]:
    """``(task, batch, labels, routing, n)`` for every batch of ``data``, routed once by ``se``."""
    out = []
    for task, sub in data.items():
        for idx in iter_batches(sub.texts, batch_size):
            b = ctx.family.tokenize([sub.texts[i] for i in idx])
            out.append((task, b, torch.tensor([sub.labels[i] for i in idx]), se.route(b), len(idx)))
    return out


def _timing_batches(ctx, se: SEMerging, data, batch_size: int, n_batches: int) -> list[tuple]:
    """``n_batches`` batches for timing, evenly spaced among the length-sorted batches of every task's texts
    pooled: tasks mixed as in a stream of inputs, short and long texts both (the first batches alone
    would be the shortest texts). Same tuple shape as :func:`_routed_batches`, without task and labels."""
    texts = [x for sub in data.values() for x in sub.texts]
    all_idx = list(iter_batches(texts, batch_size))
    pick = sorted({round(i * (len(all_idx) - 1) / max(1, n_batches - 1)) for i in range(n_batches)})
    out = []
    for j in pick:
        b = ctx.family.tokenize([texts[i] for i in all_idx[j]])
        out.append((None, b, None, se.route(b), len(all_idx[j])))
    return out


def _compare_paths(ctx, paths: dict, batches: list[tuple], data, *, timing: list[tuple], repeats: int) -> tuple:
    """Accuracy per task of each ``paths[name](batch, routing) -> features`` on ``batches``, and its seconds
    per sample on ``timing`` (:func:`_timing_batches`): the paths interleaved over ``repeats`` rounds,
    median, each after a warm-up call (which also builds what a path caches)."""
    acc = {}
    for name, fn in paths.items():
        correct = dict.fromkeys(data, 0)
        for task, b, y, routing, _n in batches:
            correct[task] += int((ctx.heads[task](fn(b, routing)).argmax(-1).cpu() == y).sum())
        acc[name] = {t: correct[t] / len(data[t]) for t in data}
    n_timed = sum(n for *_, n in timing)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            fn(timing[0][1], timing[0][3])
            t0 = time.perf_counter()
            for _task, b, _y, r, _n in timing:
                fn(b, r)
            times[name].append((time.perf_counter() - t0) / n_timed)
    sec = {k: sorted(v)[len(v) // 2] for k, v in times.items()}

    def summary(name: str) -> dict:
        a = acc[name]
        return {"average": sum(a.values()) / len(a), "per_task": a, "seconds_per_sample": sec[name],
                "ratio_to_static": sec[name] / sec["static"]}

    return summary, n_timed


@torch.no_grad()
def lowrank_study(ctx, *, ranks: Sequence[int] = (4, 16, 64), config: RouterConfig | None = None,
                  split: str = "validation", n_per_task: int = 100, n_calib: int = 32, batch_size: int = 64,
                  repeats: int = 3, timing_batches: int = 3, progress: bool = False) -> dict:
    """The low-rank lever of the per-sample forward: for each rank r, the validation accuracy of
    SE-Merging's ``"lowrank"`` mode against the exact path (same routing, computed once per batch), the
    relative Frobenius error of the rank-r task vectors, and seconds per sample next to the static merge
    and the exact path: the paths interleaved over ``repeats`` rounds on ``timing_batches`` batches of
    mixed tasks, median (this machine is shared: ratios within one run, not absolute times)."""
    se = se_model(ctx, config=config)
    if se.config.normalisation == "prototype":
        se.calibrate(_texts(ctx, split, 0, n_calib))
    data = _subsplits(ctx, split, n_calib, n_per_task)
    batches = _routed_batches(ctx, se, data, batch_size)

    def lowrank(rank):
        def fn(b, r):
            se.lowrank_rank = int(rank)
            return se.features(b, "lowrank", routing=r)[0]
        return fn

    paths = {"static": lambda b, r: ctx.family.features(b, se.static),
             "exact": lambda b, r: se.features(b, "exact", routing=r)[0],
             **{f"rank {rank}": lowrank(rank) for rank in ranks}}
    timing = _timing_batches(ctx, se, data, batch_size, timing_batches)
    summary, n_timed = _compare_paths(ctx, paths, batches, data, timing=timing, repeats=repeats)
    errors = {}
    for rank in ranks:
        se.lowrank_rank = int(rank)
        errors[rank] = se.low_rank_factors()[1]
    rows = [{"rank": int(rank), **summary(f"rank {rank}"),
             "relative_error_mean": sum(errors[rank].values()) / max(1, len(errors[rank]))} for rank in ranks]
    return {
        "split": split, "n_per_task": n_per_task, "router": se.config.to_dict(), "threads": torch.get_num_threads(),
        "timed_samples": n_timed, "repeats": repeats,
        "static": summary("static"), "exact": summary("exact"), "lowrank": rows,
    }


@torch.no_grad()
def fast_groups_study(ctx, *, groups_per_task: Sequence[int] = (1, 2, 3, 4), config: RouterConfig | None = None,
                      split: str = "validation", n_per_task: int = 100, n_calib: int = 32, batch_size: int = 64,
                      repeats: int = 3, timing_batches: int = 3, progress: bool = False) -> dict:
    """How the fast path picks its merged models: validation accuracy and seconds per sample of the fast
    path with one group per task at its prototype (``groups="prototype"``) and with quantized groups
    (``groups="quantized"``, up to ``g * T`` codes for each ``g`` in ``groups_per_task``), next to the
    static merge and the exact path (same routing rule), timed interleaved like :func:`lowrank_study`."""
    se = se_model(ctx, config=config)
    se.calibrate(_texts(ctx, split, 0, n_calib))
    data = _subsplits(ctx, split, n_calib, n_per_task)
    batches = _routed_batches(ctx, se, data, batch_size)

    variants = {"prototype groups": ("prototype", 1),
                **{f"quantized, {g} per task": ("quantized", int(g)) for g in groups_per_task}}

    def fast(variant: tuple[str, int]):
        def fn(b, r):
            se.groups, se.groups_per_task = variant
            return se.features(b, "fast")[0]
        return fn

    paths = {"static": lambda b, r: ctx.family.features(b, se.static),
             "exact": lambda b, r: se.features(b, "exact", routing=r)[0],
             **{name: fast(v) for name, v in variants.items()}}
    timing = _timing_batches(ctx, se, data, batch_size, timing_batches)
    summary, n_timed = _compare_paths(ctx, paths, batches, data, timing=timing, repeats=repeats)
    rows = []
    for name, (groups, g) in variants.items():
        se.groups, se.groups_per_task = groups, g  # the variant's codebook: its number of merged models
        rows.append({"name": name, "groups": groups, "groups_per_task": g, "n_models": len(se.group_coefficients()),
                     **summary(name)})
    return {
        "split": split, "n_per_task": n_per_task, "n_calib": n_calib, "router": se.config.to_dict(),
        "threads": torch.get_num_threads(), "timed_samples": n_timed, "repeats": repeats,
        "static": summary("static"), "exact": summary("exact"), "fast": rows,
    }


@torch.no_grad()
def cost_study(ctx, *, n_samples: int = 128, n_reference: int = 16, batch_size: int = 64, repeats: int = 3,
               config: RouterConfig | None = None, split: str = "validation") -> dict:
    """Seconds per sample of: the static merged model, SE-Merging reference / exact / fast / lowrank /
    single-pass (and prototype-exact when the rule is not already the prototype one), and running every expert (an ensemble's cost), all in this one run, interleaved.

    Takes the median over ``repeats`` rounds; the reference path runs on ``n_reference`` samples only.
    """
    se = se_model(ctx, config=config)
    per_task = max(1, n_samples // len(ctx.splits))
    texts = [x for t in ctx.splits for x in ctx.splits[t][split].texts[:per_task]]
    se.calibrate(_texts(ctx, split, per_task, 32))
    batches = [ctx.family.tokenize([texts[i] for i in idx]) for idx in iter_batches(texts, batch_size)]
    ref_batch = ctx.family.tokenize(texts[:n_reference])
    family = ctx.family

    def static():
        for b in batches:
            family.features(b, se.static)

    def mode(m):
        def run():
            for b in batches:
                se.features(b, m)
        return run

    def ensemble():
        for b in batches:
            for t in se.tasks:
                family.features(b, ctx.experts[t])

    def reference():
        se.features(ref_batch, "reference")

    runs = {"static": (static, len(texts)), "se_exact": (mode("exact"), len(texts)),
            "se_fast": (mode("fast"), len(texts)), "se_lowrank": (mode("lowrank"), len(texts)), "se_single_pass": (mode("single-pass"), len(texts)),
            "ensemble": (ensemble, len(texts)), "se_reference": (reference, n_reference)}
    if se.config.normalisation != "prototype":  # with the prototype rule, exact already is prototype-exact
        runs["se_prototype_exact"] = (mode("prototype-exact"), len(texts))
    times: dict[str, list[float]] = {k: [] for k in runs}
    static()  # warm-up
    for _ in range(repeats):
        for name, (fn, n) in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / n)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {
        "seconds_per_sample": med,
        "ratio_to_static": {k: v / med["static"] for k, v in med.items()},
        "exact_speedup_over_reference": med["se_reference"] / med["se_exact"],
        "n_samples": len(texts), "n_reference": n_reference, "batch_size": batch_size, "repeats": repeats,
        "router": se.config.to_dict(), "lowrank_rank": se.lowrank_rank, "threads": torch.get_num_threads(),
    }
