"""Run a named benchmark end to end: data, experts, every method, the table, results.json.

Rows (names are stable; scripts read them):

- ``pretrained``: the pretrained body with each task's expert head;
- ``individual``: each task's own expert (body and head);
- ``average``, ``task_arithmetic``, ``ties``, ``dare_task_arithmetic``, ``dare_ties``: static merges,
  their scaling coefficient chosen by grid search on the validation splits (average validation
  accuracy; ties broken toward the earlier grid value); the grid and each candidate's validation
  score are stored under ``validation`` in results.json;
- ``task_arithmetic_0.3``: Task Arithmetic at the customary lambda = 0.3, unsearched;
- ``se_merging_task_arithmetic``, ``se_merging_ties``: SE-Merging (exact per-sample forward) over
  Task Arithmetic 0.3 and over TIES; ``se_merging_task_arithmetic_fast``: its fast grouped path;
- ``adamerging_taskwise``, ``adamerging_layerwise``, ``adamerging_plusplus``, ``symerge`` and the
  transfers ``task_arithmetic+symerge_heads``, ``ties+symerge_heads``,
  ``se_merging_task_arithmetic_fast+symerge_heads`` (:mod:`mergelab.adaptive.rows`).

``seconds`` of a row is the wall time to build the merged model(s), run its search and evaluate it
on the test splits.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import InputError
from ..evaluate import FeatureCache, MethodResult, Timer, evaluate_tasks, mean, normalized_average, search
from ..families.text import accuracy
from ..methods import plan as make_plan
from ..statedict import combine
from .finetune import get_or_train_expert
from .registry import BenchmarkSpec


@dataclass(frozen=True)
class StaticSearch:
    """A static method row: the registry method, fixed parameters, and the scaling grid to search."""

    row: str
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    scalings: Sequence[float] | None = None  # None: no search (the method's own coefficients)


def default_static_rows(lambdas: Sequence[float], ties_scalings: Sequence[float] = (0.5, 1.0, 1.5, 2.0)) -> list[StaticSearch]:
    ties_grid = tuple(ties_scalings)
    return [
        StaticSearch("average", "average"),
        StaticSearch("task_arithmetic", "task_arithmetic", {}, tuple(lambdas)),
        StaticSearch("task_arithmetic_0.3", "task_arithmetic", {"scaling": 0.3}),
        StaticSearch("ties", "ties", {"density": 0.2}, ties_grid),
        StaticSearch("dare_task_arithmetic", "dare", {"drop_rate": 0.5, "seed": 0, "combine": "task_arithmetic"}, tuple(lambdas)),
        StaticSearch("dare_ties", "dare", {"drop_rate": 0.5, "seed": 0, "combine": "ties", "density": 0.2}, ties_grid),
    ]


def _environment() -> dict[str, Any]:
    import transformers

    return {
        "mergelab": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(),
        "threads": torch.get_num_threads(), "device": "cpu",
    }


@dataclass
class BenchmarkContext:
    """A benchmark's data splits, family, pretrained body and experts (bodies and heads)."""

    spec: BenchmarkSpec
    splits: dict
    family: Any
    pretrained: dict
    experts: dict
    heads: dict
    bodies: dict


def load_context(spec: BenchmarkSpec, *, cache_dir=None, progress: bool = True, console=None) -> BenchmarkContext:
    """Load the splits and the pretrained body; fine-tune the experts or take them from the cache."""
    from rich.console import Console

    console = console or Console(stderr=True)
    torch.manual_seed(spec.seed)
    console.print(f"[bold]{spec.name}[/]: {spec.description}")
    splits = spec.load_splits()
    for t, s in splits.items():
        console.print(f"  {t}: train {len(s['train'])}, validation {len(s['validation'])}, test {len(s['test'])}, "
                      f"{s['train'].n_classes} classes", highlight=False)
    family = spec.family()
    for task_spec in spec.tasks:  # users' files: refuse texts the tokenizer reduces to nothing, before training
        if task_spec.path is not None:
            for split in splits[task_spec.name].values():
                family.check_texts(split.texts, f"task {task_spec.name!r} ({task_spec.path})", split.ids)
    experts = {}
    for t in splits:
        experts[t] = get_or_train_expert(family, splits[t], spec.recipe, cache_dir=cache_dir, progress=progress)
        hit = experts[t].meta.get("cache_hit")
        console.print(f"  expert {t}: {'cached' if hit else 'trained'} "
                      f"({experts[t].meta.get('train_seconds', 0):.0f}s to train)", highlight=False)
    heads = {t: e.head.eval() for t, e in experts.items()}
    bodies = {t: e.body_state for t, e in experts.items()}
    return BenchmarkContext(spec, splits, family, family.pretrained_state(), experts, heads, bodies)


def run_benchmark(
    spec: BenchmarkSpec,
    *,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    rows: Sequence[str] | None = None,
    progress: bool = True,
    batch_size: int = 64,
    console=None,
) -> dict[str, Any]:
    """Prepare data, fine-tune or load the experts, evaluate every row; write results if ``out_dir``."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if rows is not None:  # an unknown row would be skipped silently: refuse it before any work
        from ..adaptive import ADAPTIVE_ROWS

        known = ["individual", "pretrained", *(r.row for r in default_static_rows(spec.lambdas)), *SE_ROWS,
                 *ADAPTIVE_ROWS, "se_merging_task_arithmetic_fast+symerge_heads"]
        unknown = [r for r in rows if r not in known]
        if unknown:
            raise InputError(f"unknown row(s) {unknown}; rows: {', '.join(known)}")
    t_start = time.perf_counter()
    ctx = load_context(spec, cache_dir=cache_dir, progress=progress, console=console)
    splits, family, pre, experts, heads, bodies = ctx.splits, ctx.family, ctx.pretrained, ctx.experts, ctx.heads, ctx.bodies
    tasks = list(splits)
    test = {t: s["test"] for t, s in splits.items()}
    val = {t: s["validation"] for t, s in splits.items()}
    if spec.search_per_task is not None:  # the coefficient searches read the first N validation examples
        val = {t: v.subset(range(min(len(v), spec.search_per_task))) for t, v in val.items()}
    evaluated: dict[str, dict[str, float]] = {}  # (method, params) -> test accuracies: identical merges run once
    # test features by body content: rows that rerun a body on the test texts (SyMerge's pseudo-labels are the
    # experts' outputs; the transfer rows put SyMerge's heads on the static bodies) reuse the forward pass
    test_cache = FeatureCache()

    def run_eval(body, which, label) -> dict[str, float]:
        return evaluate_tasks(family, body, heads, which, batch_size=batch_size, progress=progress, label=label,
                              cache=test_cache if which is test else None)

    results: dict[str, MethodResult] = {}
    wanted = set(rows) if rows is not None else None

    with Timer() as tm:
        per_task = run_eval(lambda t: bodies[t], test, "individual")
    expert_acc = per_task
    results["individual"] = MethodResult(per_task, mean(list(per_task.values())), 1.0, tm.seconds,
                                         {"recipe": spec.recipe.to_dict()})
    with Timer() as tm:
        per_task = run_eval(None, test, "pretrained")
    results["pretrained"] = MethodResult(per_task, mean(list(per_task.values())),
                                         normalized_average(per_task, expert_acc), tm.seconds)
    _print_row(console, "individual", results["individual"])
    _print_row(console, "pretrained", results["pretrained"])

    for row in default_static_rows(spec.lambdas):
        if wanted is not None and row.row not in wanted:
            continue
        with Timer() as tm:
            plan = make_plan(row.method, pre, bodies, **row.params)
            validation: dict[str, Any] = {}
            params = dict(plan.params)
            if row.scalings:
                def score(lam, plan=plan, row=row):
                    merged = combine(pre, plan.vectors, dict.fromkeys(tasks, lam))
                    return mean(list(run_eval(merged, val, f"{row.row} λ={lam}").values()))

                best, scores = search(list(row.scalings), score)
                validation = {"searched": "scaling", "grid": [c for c, _ in scores],
                              "average": [round(s, 4) for _, s in scores], "best": best}
                params["scaling"] = best
                merged = combine(pre, plan.vectors, dict.fromkeys(tasks, best))
            else:
                merged = plan.apply(pre)
            key = json.dumps([row.method, params], sort_keys=True, default=str)
            if key not in evaluated:
                evaluated[key] = run_eval(merged, test, row.row)
            per_task = evaluated[key]
            del merged, plan
        results[row.row] = MethodResult(per_task, mean(list(per_task.values())),
                                        normalized_average(per_task, expert_acc), tm.seconds, params, validation)
        _print_row(console, row.row, results[row.row])

    se_features: dict[str, dict] = {}
    se_rows = se_merging_rows(spec, family, pre, bodies, heads, splits, results, expert_acc, wanted,
                              batch_size=batch_size, progress=progress, console=console, features=se_features)
    results.update(se_rows)

    from ..adaptive import ADAPTIVE_ROWS, adaptive_rows

    adaptive_wanted = [r for r in ADAPTIVE_ROWS if wanted is None or r in wanted]
    transfer_se = "se_merging_task_arithmetic_fast+symerge_heads"
    if wanted is not None and transfer_se in wanted and "symerge" not in adaptive_wanted:
        adaptive_wanted.append("symerge")
    adapted: dict[str, Any] = {}
    if adaptive_wanted:
        ties_params = results["ties"].params if "ties" in results else {}
        results.update(adaptive_rows(
            family, pre, bodies, heads, splits, expert_acc, rows=adaptive_wanted, seed=spec.seed,
            steps=dict(spec.adaptive_steps) if spec.adaptive_steps else None,
            ties_scaling=ties_params.get("scaling", 1.0), ties_density=ties_params.get("density", 0.2),
            batch_size=batch_size, progress=progress, adapted=adapted, cache=test_cache,
            on_row=lambda name, r: _print_row(console, name, r)))
    if "symerge" in adapted and (wanted is None or transfer_se in wanted):
        results.update(se_merging_rows(spec, family, pre, bodies, adapted["symerge"].heads, splits, results,
                                       expert_acc, {"se_merging_task_arithmetic_fast"}, batch_size=batch_size,
                                       progress=progress, console=console, rename={"se_merging_task_arithmetic_fast": transfer_se},
                                       features=se_features))

    out = {
        "benchmark": spec.name,
        "tasks": tasks,
        "methods": {name: r.to_json() for name, r in results.items()},
        "splits": {t: {k: len(v) for k, v in s.items()} for t, s in splits.items()},
        "experts": {t: {k: v for k, v in e.meta.items() if k in ("train_seconds", "steps", "cache_hit")}
                    for t, e in experts.items()},
        "environment": _environment(),
        "feature_cache": {"hits": test_cache.hits, "misses": test_cache.misses},
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if out_dir is not None:
        from ..report import write_results

        write_results(out, out_dir)
    return out


SE_ROWS = ("se_merging_task_arithmetic", "se_merging_ties", "se_merging_task_arithmetic_fast")


def se_merging_rows(spec, family, pre, bodies, heads, splits, results, expert_acc, wanted, *, batch_size=64,
                    progress=True, console=None, calibration_size: int = 32,
                    rename: dict[str, str] | None = None, features: dict[str, dict] | None = None) -> dict[str, MethodResult]:
    """SE-Merging over Task Arithmetic (base lambda 0.3, the paper's) and over TIES (its scaling as chosen
    on validation above), exact per-sample forward; plus the fast single-pass path over Task Arithmetic.

    The router's parameters are :class:`~mergelab.dynamic.RouterConfig`'s defaults (chosen on the
    validation splits, docs/methods.md). The fast path's prototypes come from the first
    ``calibration_size`` *validation* texts of each task (inputs only). ``features``: row -> the test
    features and routing of each row computed (filled), reused when the same row is asked for again
    with other heads (``rename``): SE-Merging's routing and features do not depend on the heads.
    """
    from ..dynamic import RouterConfig, SEMerging
    from ..dynamic.evaluate import evaluate_se

    config = RouterConfig()
    test = {t: s["test"] for t, s in splits.items()}
    calib = {t: s["validation"].texts[:calibration_size] for t, s in splits.items()}
    ties_scaling = results["ties"].params.get("scaling", 1.0) if "ties" in results else 1.0
    todo = [
        ("se_merging_task_arithmetic", "task_arithmetic", {"scaling": 0.3}, "exact"),
        ("se_merging_ties", "ties", {"density": 0.2, "scaling": ties_scaling}, "exact"),
        ("se_merging_task_arithmetic_fast", "task_arithmetic", {"scaling": 0.3}, "fast"),
    ]
    out: dict[str, MethodResult] = {}
    for row, method, params, mode in todo:
        if wanted is not None and row not in wanted:
            continue
        with Timer() as tm:
            if features is not None and row in features:
                feats, routing = features[row]["features"], features[row]["routing"]
                per_task = {t: accuracy(family, test[t].texts, test[t].labels, heads[t], features=feats[t])
                            for t in test}
            else:
                se = SEMerging(family, pre, make_plan(method, pre, bodies, **params), bodies, config)
                if mode == "fast" or config.normalisation == "prototype":
                    se.calibrate(calib)
                feats = {}
                per_task, routing = evaluate_se(se, heads, test, mode=mode, batch_size=batch_size, progress=progress,
                                                label=row, features_out=feats if features is not None else None)
                if features is not None:
                    features[row] = {"features": feats, "routing": routing}
                del se
        name = (rename or {}).get(row, row)
        out[name] = MethodResult(per_task, mean(list(per_task.values())), normalized_average(per_task, expert_acc),
                                 tm.seconds, {"base": method, **params, **config.to_dict(), "mode": mode,
                                              **({"heads": "symerge"} if name != row else {})},
                                 extra={"routing": routing})
        if console is not None:
            _print_row(console, name, out[name])
    return out


def _print_row(console, name: str, r: MethodResult) -> None:
    console.print(f"  {name:<22} avg {100 * r.average:5.1f}  "
                  + "  ".join(f"{t} {100 * a:5.1f}" for t, a in r.per_task.items())
                  + f"  ({r.seconds:.0f}s)", highlight=False)


def default_run_dir(benchmark: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{benchmark}-{stamp}"
