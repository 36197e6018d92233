"""SE-Merging studies on a benchmark: probe/routing analyses, parameter selection, probe sweep, cost.

Everything here reads the *validation* split by default (parameter choice never looks at test data):
the first ``n_calib`` texts of each task calibrate the prototype rule, the next ``n_per_task`` are
evaluated. Each function returns plain JSON-able dicts; :mod:`mergelab.experiment.plots` draws them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

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
def grid_study(ctx, *, layer: int, normalisation: str, temperatures: Sequence[float], gains: Sequence[float],
               scale: str = "mean", base: str = "task_arithmetic", split: str = "validation", n_per_task: int = 100,
               n_calib: int = 32, batch_size: int = 64, progress: bool = False) -> list[dict]:
    """Average accuracy of SE-Merging (exact path) for each (temperature, gain); probes computed once per batch."""
    se = se_model(ctx, base, RouterConfig(layer=layer, normalisation=normalisation))
    if normalisation == "prototype":
        se.calibrate(_texts(ctx, split, 0, n_calib))
    grid = [(t, g) for t in temperatures for g in gains]
    correct = {g: {t: 0 for t in ctx.splits} for g in grid}
    data = _subsplits(ctx, split, n_calib, n_per_task)
    bar = progress_bar(sum(len(s) for s in data.values()), "SE-Merging grid", progress)
    for task, sub in data.items():
        for idx in iter_batches(sub.texts, batch_size):
            batch = ctx.family.tokenize([sub.texts[i] for i in idx])
            reps = se.representations(batch)
            s = R.scores(normalisation, **reps)
            y = torch.tensor([sub.labels[i] for i in idx])
            for temp, gain in grid:
                c = R.rescale(R.routing_weights(s, temp, scale), se.base, gain)
                pred = ctx.heads[task](se.mixed_features(batch, c)).argmax(-1).cpu()
                correct[(temp, gain)][task] += int((pred == y).sum())
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    out = []
    for temp, gain in grid:
        per = {t: correct[(temp, gain)][t] / len(data[t]) for t in data}
        out.append({"temperature": temp, "gain": gain, "scale": scale,
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


def _compare_paths(ctx, paths: dict, batches: list[tuple], data, *, timing: list[tuple], repeats: int,
                   references: Mapping[str, str] | None = None) -> tuple:
    """Accuracy per task of each ``paths[name](batch, routing)`` on ``batches``, and its seconds per sample on
    ``timing`` (:func:`_timing_batches`): the paths interleaved over ``repeats`` rounds, median, each after a
    warm-up call (which also builds what a path caches); ``repeats=0`` times nothing.

    A path returns its features, or ``(features, coefficients [B, T])``. For each ``references[name] = ref``
    the summary adds, sample by sample against path ``ref`` (computed on the same batches): the share of
    predictions that agree, the mean L1 distance between the coefficient vectors, and the mean relative
    feature error ``||f - f_ref|| / ||f_ref||``."""
    references = dict(references or {})
    acc, agree = {}, {}
    correct = {name: dict.fromkeys(data, 0) for name in paths}
    sums = {name: {"agree": 0, "coef_l1": 0.0, "feature_error": 0.0, "n": 0} for name in references}
    for task, b, y, routing, _n in batches:
        got = {}
        for name, fn in paths.items():
            out = fn(b, routing)
            feats, coeffs = out if isinstance(out, tuple) else (out, None)
            pred = ctx.heads[task](feats).argmax(-1).cpu()
            got[name] = (feats.float().cpu(), None if coeffs is None else coeffs.float().cpu(), pred)
            correct[name][task] += int((pred == y).sum())
        for name, ref in references.items():
            (f, c, p), (fr, cr, pr) = got[name], got[ref]
            acc_s = sums[name]
            acc_s["agree"] += int((p == pr).sum())
            if c is not None and cr is not None:
                acc_s["coef_l1"] += float((c - cr).abs().sum(-1).sum())
            acc_s["feature_error"] += float(((f - fr).norm(dim=-1) / fr.norm(dim=-1).clamp_min(1e-12)).sum())
            acc_s["n"] += len(p)
    for name in paths:
        acc[name] = {t: correct[name][t] / len(data[t]) for t in data}
    for name, ref in references.items():
        n = max(1, sums[name]["n"])
        agree[name] = {"reference": ref, "agreement": sums[name]["agree"] / n,
                       "coefficient_l1": sums[name]["coef_l1"] / n, "feature_error": sums[name]["feature_error"] / n,
                       "samples": sums[name]["n"]}
    n_timed = sum(n for *_, n in timing)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            fn(timing[0][1], timing[0][3])
            t0 = time.perf_counter()
            for _task, b, _y, r, _n in timing:
                fn(b, r)
            times[name].append((time.perf_counter() - t0) / n_timed)
    sec = {k: sorted(v)[len(v) // 2] for k, v in times.items() if v}

    def summary(name: str) -> dict:
        a = acc[name]
        out = {"average": sum(a.values()) / len(a), "per_task": a}
        if sec:
            out.update(seconds_per_sample=sec[name], ratio_to_static=sec[name] / sec["static"])
        if name in agree:
            out["against_reference"] = agree[name]
        return out

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


@torch.no_grad()
def approximations_study(ctx, *, ranks: Sequence[int] = (8, 32, 128), config: RouterConfig | None = None,
                         split: str = "test", n_per_task: int | None = None, n_calib: int = 32,
                         batch_size: int = 64, progress: bool = False) -> dict:
    """Every approximate SE-Merging path against the exact one, sample by sample (issue 19).

    Reference 1, the exact per-sample forward under the prototype rule (``config``'s router with
    ``normalisation="prototype"``): the fast path (quantized groups), the single pass and the low-rank path
    at each of ``ranks``; the static merge for scale. Reference 2, the exact forward under the paper's rule
    (``raw``, live expert probes): ``prototype-exact`` (prototype routing, then the same exact forward) and
    the paper's rule with cached expert representations (``probes="cached"``). Per path: average accuracy,
    prediction agreement with its reference, mean L1 distance of the per-sample coefficient vectors and mean
    relative feature error. Evaluated on ``split`` (default the benchmark's test split, all of it unless
    ``n_per_task``: a stratified seeded sample per task); the prototypes and the expert cache read the first ``n_calib`` validation texts per task.
    Nothing is chosen here: the router's parameters come in fixed.
    """
    cfg = config or RouterConfig()
    proto_cfg = RouterConfig(**{**cfg.to_dict(), "normalisation": "prototype", "probes": "live"})
    paper_cfg = RouterConfig(**{**cfg.to_dict(), "normalisation": "raw", "probes": "live"})
    calib = _texts(ctx, "validation", 0, n_calib)
    se = se_model(ctx, config=proto_cfg)
    se.calibrate(calib)
    paper = se_model(ctx, config=paper_cfg)
    paper.calibrate(calib)  # the prototypes of prototype-exact
    cached = se_model(ctx, config=RouterConfig(**{**paper_cfg.to_dict(), "probes": "cached"}))
    cached.cache_experts(calib)
    start = n_calib if split == "validation" else 0  # validation: after the calibration texts
    data = _subsplits(ctx, split, start, 10**9)
    if n_per_task is not None:  # a stratified seeded sample of each task, not a prefix
        data = {t: s.sample(n_per_task, 0) for t, s in data.items()}
    batches = _routed_batches(ctx, se, data, batch_size)
    base = se.base

    def static(b, r):
        return ctx.family.features(b, se.static), base.expand(len(r.coefficients), -1)

    def mode(model, m):
        def fn(b, r):
            feats, routing = model.features(b, m, routing=r if model is se and m in ("exact", "lowrank") else None)
            return feats, routing.coefficients
        return fn

    def lowrank(rank):
        def fn(b, r):
            se.lowrank_rank = int(rank)
            return se.features(b, "lowrank", routing=r)[0], r.coefficients
        return fn

    paths = {"static": static, "exact": mode(se, "exact"), "fast": mode(se, "fast"),
             "single-pass": mode(se, "single-pass"), **{f"lowrank {r}": lowrank(r) for r in ranks},
             "paper exact": mode(paper, "exact"), "paper prototype-exact": mode(paper, "prototype-exact"),
             "paper cached": mode(cached, "exact")}
    refs = {"static": "exact", "fast": "exact", "single-pass": "exact", **{f"lowrank {r}": "exact" for r in ranks},
            "paper prototype-exact": "paper exact", "paper cached": "paper exact"}
    summary, _ = _compare_paths(ctx, paths, batches, data, timing=[], repeats=0, references=refs)
    errors = {}
    for rank in ranks:
        se.lowrank_rank = int(rank)
        e = se.low_rank_factors()[1]
        errors[int(rank)] = sum(e.values()) / max(1, len(e))
    return {"split": split, "n_per_task": {t: len(s) for t, s in data.items()}, "n_calib": n_calib,
            "router": cfg.to_dict(), "groups_per_task": se.groups_per_task, "task_vector_rank_error": errors,
            "paths": {name: summary(name) for name in paths}}


@torch.no_grad()
def defaults_study(ctx, *, subsets: Sequence[Sequence[str]], temperatures: Sequence[float], gains: Sequence[float],
                   layer: int = 1, normalisation: str = "prototype", old: tuple[float, float] = (1.0, 0.5),
                   n_per_task: int = 100, n_calib: int = 32, batch_size: int = 64, progress: bool = False) -> dict:
    """SE-Merging's temperature and gain on *validation* data for several task counts (issue 19).

    For each task subset (``ModelPool.restrict``): the exact path's average validation accuracy for every
    (temperature, gain) with the scale-free distances (``scale="mean"``), the old defaults (standardised
    distances, temperature ``old[0]``, relative mass ``old[1]`` = gain ``old[1] * T``) and the static Task
    Arithmetic 0.3 merge. ``best``: the cell with the highest mean over the subsets of the average accuracy.
    """
    out = {"split": "validation", "n_per_task": n_per_task, "n_calib": n_calib, "layer": layer,
           "normalisation": normalisation, "subsets": []}
    for tasks in subsets:
        sub = ctx.restrict(list(tasks))
        grid = grid_study(sub, layer=layer, normalisation=normalisation, temperatures=temperatures, gains=gains,
                          n_per_task=n_per_task, n_calib=n_calib, batch_size=batch_size, progress=progress)
        before = grid_study(sub, layer=layer, normalisation=normalisation, temperatures=(old[0],),
                            gains=(old[1] * len(tasks),), scale="std", n_per_task=n_per_task, n_calib=n_calib,
                            batch_size=batch_size, progress=progress)[0]
        se = se_model(sub)
        static = {}
        for task, s in _subsplits(sub, "validation", n_calib, n_per_task).items():
            ok = 0
            for idx in iter_batches(s.texts, batch_size):
                b = sub.family.tokenize([s.texts[i] for i in idx])
                ok += int((sub.heads[task](sub.family.features(b, se.static)).argmax(-1).cpu()
                           == torch.tensor([s.labels[i] for i in idx])).sum())
            static[task] = ok / len(s)
        out["subsets"].append({"tasks": list(tasks), "grid": grid, "old_defaults": before,
                               "static": {"per_task": static, "average": sum(static.values()) / len(static)}})
    cells = [(g["temperature"], g["gain"]) for g in out["subsets"][0]["grid"]]
    mean = {c: sum(next(g["average"] for g in s["grid"] if (g["temperature"], g["gain"]) == c)
                   for s in out["subsets"]) / len(out["subsets"]) for c in cells}
    best = max(cells, key=lambda c: mean[c])
    out["mean_over_subsets"] = [{"temperature": t, "gain": g, "average": mean[(t, g)]} for t, g in cells]
    out["best"] = {"temperature": best[0], "gain": best[1], "average": mean[best]}
    return out
