"""The one runner: a pool and a list of rows -> per-task accuracies (docs/architecture.md).

``run_rows(pool, rows)`` evaluates any registered method, whatever its kind, on a :class:`RunPool` (the
pretrained model, the experts' bodies and heads, and each task's splits): a static row builds its merge
(and searches its scaling on labeled validation data if the row says so), a dynamic row gets per-sample
features from its method, an adaptive row an adapted body and heads; the runner scores them all with each
task's head on the evaluation split. :func:`run_pool` runs rows on a loaded
:class:`~mergelab.pools.pool.ModelPool` end to end: the reference rows ``individual`` (each expert on its own
task) and ``pretrained``, then the rows, results.json validated against
:class:`~mergelab.experiment.results.Results`. Every pool goes through it: :func:`run_benchmark` (a named
benchmark or a user's task files, loaded by :func:`load_context`) and ``mergelab bench --config POOL.yaml``
(a pool YAML, :func:`mergelab.experiment.commands.run_pool_config`).

Forward passes the rows share are made once: identical static merges are evaluated once, test features are
kept by body content (:class:`~mergelab.pools.evaluate.FeatureCache`: the transfer rows' static bodies,
SyMerge's pseudo-labels = each expert on its own task's inputs), and a dynamic row's features are reused
when another row asks for the same method and parameters with other heads.

``seconds`` of a row is the wall time to build the merged model(s), run its search or adaptation and
evaluate it on the test splits.
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

from mergelab import __version__, methods
from mergelab.core.errors import InputError
from mergelab.core.statedict import combine
from mergelab.experiment.results import SCHEMA_VERSION, Results
from mergelab.experiment.rows import LAMBDAS, Row, default_rows, dependencies, resolve, substitute
from mergelab.methods import plan as make_plan
from mergelab.pools.benchmarks import BenchmarkSpec
from mergelab.pools.data.tasks import LazyColumn
from mergelab.pools.evaluate import (
    FeatureCache,
    MethodResult,
    Timer,
    evaluate_tasks,
    mean,
    normalized_average,
    search,
)
from mergelab.pools.families.text import accuracy
from mergelab.pools.finetune import get_or_train_experts
from mergelab.pools.finetune_lora import get_or_train_lora_expert
from mergelab.pools.pool import ModelPool

REFERENCE_EXTRA = {"method": None, "kind": "reference", "data": "nothing"}



def _environment() -> dict[str, Any]:
    import transformers

    return {
        "mergelab": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(),
        "threads": torch.get_num_threads(), "device": "cpu",
    }


def load_context(spec: BenchmarkSpec, *, cache_dir=None, progress: bool = True, console=None) -> ModelPool:
    """A named benchmark as a loaded :class:`~mergelab.pools.pool.ModelPool`: its seeded splits, the
    pretrained body, and the experts fine-tuned or taken from the cache (``expert_meta``: each one's
    training record). A benchmark with a LoRA recipe (``spec.lora``) trains LoRA adapters
    (:mod:`mergelab.pools.finetune_lora`): the pool's ``adapters`` are their factors, its ``experts`` W0 + s B A."""
    from rich.console import Console

    console = console or Console(stderr=True)
    torch.manual_seed(spec.seed)
    console.print(f"[bold]{spec.name}[/]: {spec.description}")
    t0 = time.perf_counter()
    splits = spec.load_splits()
    for t, s in splits.items():
        console.print(f"  {t}: train {len(s['train'])}, validation {len(s['validation'])}, test {len(s['test'])}, "
                      f"{s['train'].n_classes} classes", highlight=False)
    family = spec.family()
    for task_spec in spec.tasks:  # users' files: refuse texts the tokenizer reduces to nothing, before training
        if task_spec.path is not None:
            for split in splits[task_spec.name].values():
                family.check_texts(split.texts, f"task {task_spec.name!r} ({task_spec.path})", split.ids)
    t1 = time.perf_counter()
    if spec.lora is not None:
        experts = {t: get_or_train_lora_expert(family, splits[t], spec.recipe, spec.lora, cache_dir=cache_dir,
                                               progress=progress) for t in splits}
    else:
        experts = get_or_train_experts(family, splits, spec.recipe, cache_dir=cache_dir, progress=progress)
    setup = {"data_and_backbone": round(t1 - t0, 3), "experts": round(time.perf_counter() - t1, 3)}
    for t in splits:
        hit = experts[t].meta.get("cache_hit")
        console.print(f"  {'LoRA ' if spec.lora else ''}expert {t}: {'cached' if hit else 'trained'} "
                      f"({experts[t].meta.get('train_seconds', 0):.0f}s to train)", highlight=False)
    return ModelPool(family=family, pretrained=family.pretrained_state(),
                     experts={t: e.body_state for t, e in experts.items()},
                     heads={t: e.head.eval() for t, e in experts.items()}, splits=splits, name=spec.name,
                     expert_meta={t: dict(e.meta) for t, e in experts.items()}, setup_seconds=setup,
                     adapters={t: e.adapter for t, e in experts.items() if getattr(e, "adapter", None) is not None})


def _unread(inputs):
    """A list of ``inputs``; a lazily read image column stays lazy (listing it would decode every image)."""
    return inputs if isinstance(inputs, LazyColumn) else list(inputs)


@dataclass
class RunPool:
    """A loaded pool as the methods see it (:class:`mergelab.methods.PoolView`): inputs of ``input_split``
    without labels, calibration inputs from the validation split, expert features from the run's cache;
    ``adapters``: the LoRA experts' factors (the methods merge those, :func:`mergelab.methods.pool_experts`)."""

    family: Any
    pretrained: dict
    bodies: dict
    heads: dict
    splits: Mapping[str, Mapping[str, Any]]
    seed: int = 0
    batch_size: int = 64
    progress: bool = True
    input_split: str = "test"
    cache: FeatureCache | None = None
    label: str = ""
    adapters: Mapping[str, Any] = field(default_factory=dict)
    on_snapshot: Any = None  # adaptive rows with eval_at: called with each snapshot's AdaptResult as it is taken

    def inputs(self) -> dict[str, list]:
        out = {}
        for task, s in self.splits.items():
            if self.input_split not in s:
                raise InputError(f"splits[{task!r}] has no {self.input_split!r} split; it has {sorted(s)}")
            out[task] = _unread(s[self.input_split].inputs)  # inputs only: the methods never see the labels
        return out

    def calibration(self, n: int) -> dict[str, list]:
        return {t: _unread(s["validation"].sample(n, self.seed).inputs) for t, s in self.splits.items()}

    def expert_features(self, task: str):
        texts = _unread(self.splits[task][self.input_split].inputs)
        cache = self.cache if self.cache is not None else FeatureCache()
        return cache.features(self.family, self.bodies[task], texts, batch_size=self.batch_size)


@dataclass
class _Done:
    params: dict
    per_task: dict[str, float] | None
    output: Any = None  # MethodOutput of a dynamic or adaptive row


def run_rows(
    pool: RunPool,
    rows: Sequence[Row],
    *,
    expert_acc: Mapping[str, float],
    eval_split: str = "test",
    validation: Mapping[str, Any] | None = None,
    lambdas: Sequence[float] = (0.3,),
    steps: Mapping[str, int] | None = None,
    report: Sequence[str] | None = None,
    table: Sequence[Row] | None = None,
    on_row=None,
    outputs: dict[str, Any] | None = None,
) -> dict[str, MethodResult]:
    """Evaluate ``rows`` on ``pool``; rows they depend on (``@ROW.KEY``, ``heads_from``) run first.

    ``validation``: task -> labeled validation split for the coefficient searches; ``lambdas``: the grid a
    row with ``search="lambdas"`` reads; ``steps``: method -> adaptation steps (a benchmark's reduced
    budget) where the row does not set them; ``report``: the rows to return (default ``rows``).
    ``table``: the rows dependencies are looked up in (default: :func:`~mergelab.experiment.rows.default_rows`).
    ``on_row(name, result)`` is called as each reported row is finished; ``outputs``, if given, receives
    each dynamic or adaptive row's :class:`~mergelab.methods.MethodOutput` (dependencies included).
    """
    family, bodies = pool.family, pool.bodies
    tasks = list(bodies)
    evaluation = {t: pool.splits[t][eval_split] for t in tasks}
    by_name = {r.name: r for r in [*(default_rows() if table is None else table), *rows]}
    wanted = list(report if report is not None else [r.name for r in rows])
    steps = dict(steps or {})
    done: dict[str, _Done] = {}
    static_evals: dict[str, dict[str, float]] = {}  # identical static merges with the experts' heads run once
    dynamic_out: dict[str, Any] = {}  # (method, params) -> MethodOutput: features do not depend on the heads
    results: dict[str, MethodResult] = {}

    def ran_with(row: str, key: str) -> Any:
        compute(row)
        if key not in done[row].params:
            raise InputError(f"row {row!r} has no parameter {key!r} to refer to")
        return done[row].params[key]

    def compute(name: str) -> None:
        if name in done:
            return
        if name not in by_name:
            raise InputError(f"unknown row {name!r}; rows: {', '.join(by_name)}")
        row = by_name[name]
        for dep in dependencies(row):
            compute(dep)
        with Timer() as tm:
            params = substitute(row.params, ran_with)
            info = methods.get(row.method)
            heads = dict(pool.heads)
            if row.heads_from is not None:
                adapted = done[row.heads_from].output
                if adapted is None or adapted.heads is None:
                    raise InputError(f"row {name!r}: row {row.heads_from!r} adapted no heads")
                heads = dict(adapted.heads)
            search_grid = list(lambdas) if row.search == LAMBDAS else (list(row.search) if row.search else None)
            extra: dict[str, Any] = {}
            validation_scores: dict[str, Any] = {}
            output = None
            timing: dict[str, float] = {}  # seconds of the row's phases (docs/performance.md's profile)
            t0 = time.perf_counter()
            if info.kind == "static":
                body, params, validation_scores = _static_body(pool, row, params, search_grid, validation, tasks)
                timing["merge_and_search" if search_grid else "merge"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                key = json.dumps([row.method, params], sort_keys=True, default=str)
                if row.heads_from is None and key in static_evals:
                    per_task = static_evals[key]
                else:
                    per_task = evaluate_tasks(family, body, heads, evaluation, batch_size=pool.batch_size,
                                              progress=pool.progress, label=name, cache=pool.cache)
                    if row.heads_from is None:
                        static_evals[key] = per_task
                timing["evaluation"] = time.perf_counter() - t0
                del body
            else:
                if info.kind == "adaptive" and row.method in steps and "steps" not in params:
                    params["steps"] = steps[row.method]
                info.check(params)
                key = json.dumps([row.method, params], sort_keys=True, default=str)
                if info.kind == "dynamic" and key in dynamic_out:
                    output = dynamic_out[key]
                else:
                    pool.label = name
                    output = info.fn(pool, **params)
                    if info.kind == "dynamic":
                        dynamic_out[key] = output
                timing[info.kind] = time.perf_counter() - t0
                t0 = time.perf_counter()
                if output.heads is not None and row.heads_from is None:
                    heads = dict(output.heads)
                if output.features is not None:
                    if pool.input_split != eval_split:
                        raise InputError(f"row {name!r}: a dynamic method's inputs are the evaluated split's; "
                                         f"input split {pool.input_split!r} != evaluation split {eval_split!r}")
                    per_task = {t: accuracy(family, evaluation[t].texts, evaluation[t].labels, heads[t],
                                            features=output.features[t]) for t in tasks}
                else:
                    per_task = evaluate_tasks(family, output.body, heads, evaluation, batch_size=pool.batch_size,
                                              progress=pool.progress, label=name)
                timing["evaluation"] = time.perf_counter() - t0
                params = dict(output.params)
                extra = dict(output.extra)
            if row.heads_from is not None:
                params["heads"] = row.heads_from
                if output is None and "steps" in done[row.heads_from].params:
                    params[f"{row.heads_from}_steps"] = done[row.heads_from].params["steps"]
        done[name] = _Done(params, per_task, output)
        if outputs is not None and output is not None:
            outputs[name] = output
        if name in wanted:
            results[name] = MethodResult(per_task, mean(list(per_task.values())),
                                         normalized_average(per_task, expert_acc), tm.seconds,
                                         params, validation_scores, {**extra, "method": row.method,
                                                                     "kind": info.kind, "data": row.data(),
                                                                     "timing": {k: round(v, 3) for k, v in timing.items()}})
            if on_row is not None:
                on_row(name, results[name])

    for name in wanted:
        compute(name)
    return {n: results[n] for n in wanted if n in results}


def _static_body(pool: RunPool, row: Row, params: dict, grid, validation, tasks):
    """The merged body of a static row, with its scaling searched on labeled validation data if ``grid``."""
    plan = make_plan(row.method, pool.pretrained, methods.pool_experts(pool), **params)
    if not grid:
        return plan.apply(pool.pretrained), dict(plan.params), {}
    if validation is None:
        raise InputError(f"row {row.name!r} searches its scaling on validation data; none was given")
    pre = pool.pretrained

    def score(lam):
        merged = combine(pre, plan.vectors, dict.fromkeys(tasks, lam))
        return mean(list(evaluate_tasks(pool.family, merged, pool.heads, validation, batch_size=pool.batch_size,
                                        progress=pool.progress, label=f"{row.name} λ={lam}").values()))

    best, scores = search(list(grid), score)
    found = {"searched": "scaling", "grid": [c for c, _ in scores], "average": [round(s, 4) for _, s in scores],
             "best": best}
    return combine(pre, plan.vectors, dict.fromkeys(tasks, best)), {**plan.params, "scaling": best}, found


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
    """A named benchmark end to end: its data, experts fine-tuned or cached, every row (:func:`run_pool`)."""
    chosen = resolve(rows or spec.rows)  # an unknown row would be skipped silently: refuse it before any work
    t_start = time.perf_counter()
    pool = load_context(spec, cache_dir=cache_dir, progress=progress, console=console)
    return run_pool(pool, chosen, out_dir=out_dir, lambdas=spec.lambdas, seed=spec.seed,
                    search_per_task=spec.search_per_task,
                    steps=dict(spec.adaptive_steps) if spec.adaptive_steps else None,
                    reference_params={"recipe": spec.recipe.to_dict(),
                                      **({"lora": spec.lora.to_dict()} if spec.lora else {})},
                    progress=progress, batch_size=batch_size,
                    console=console, t_start=t_start)


def run_pool(
    pool: ModelPool,
    rows: Sequence[Row],
    *,
    out_dir: str | Path | None = None,
    lambdas: Sequence[float] = (0.3,),
    seed: int = 0,
    search_per_task: int | None = None,
    steps: Mapping[str, int] | None = None,
    reference_params: Mapping[str, Any] | None = None,
    progress: bool = True,
    batch_size: int = 64,
    console=None,
    t_start: float | None = None,
) -> dict[str, Any]:
    """Evaluate the reference rows (``individual``: each expert on its own task; ``pretrained``) and
    ``rows`` on a loaded pool's ``test`` splits; validate the results against
    :class:`~mergelab.experiment.results.Results` and write them (``out_dir``).

    The searched rows read the ``validation`` splits (a stratified sample of ``search_per_task`` examples each, if given),
    ``se_prototype`` its calibration inputs from them, the adaptive rows the test inputs without labels."""
    from rich.console import Console

    console = console or Console(stderr=True)
    t_start = time.perf_counter() if t_start is None else t_start
    torch.manual_seed(seed)
    splits, family = pool.splits, pool.family
    missing = [t for t in pool.tasks if "test" not in splits.get(t, {}) or t not in pool.heads]
    if missing:
        raise InputError(f"task(s) {missing} have no test split or no head: evaluation needs both (family "
                         "'text': a head.safetensors in each expert folder)")
    val = {t: s["validation"] for t, s in splits.items() if "validation" in s}
    if search_per_task is not None:  # the coefficient searches read N validation examples (stratified sample)
        val = {t: v.sample(search_per_task, seed) for t, v in val.items()}
    test = {t: splits[t]["test"] for t in pool.tasks}
    test_cache = FeatureCache()
    run = RunPool(family, pool.pretrained, pool.experts, pool.heads, splits, seed=seed, batch_size=batch_size,
                  progress=progress, cache=test_cache, adapters=pool.adapters)

    progress_line = RowProgress(len(rows) + 2)  # from the first row on, so the estimate counts them
    results: dict[str, MethodResult] = {}
    with Timer() as tm:
        per_task = evaluate_tasks(family, lambda t: pool.experts[t], pool.heads, test, batch_size=batch_size,
                                  progress=progress, label="individual", cache=test_cache)
    expert_acc = per_task
    results["individual"] = MethodResult(per_task, mean(list(per_task.values())), 1.0, tm.seconds,
                                         dict(reference_params or {}), extra=dict(REFERENCE_EXTRA))
    with Timer() as tm:
        per_task = evaluate_tasks(family, pool.pretrained, pool.heads, test, batch_size=batch_size,
                                  progress=progress, label="pretrained", cache=test_cache)
    results["pretrained"] = MethodResult(per_task, mean(list(per_task.values())),
                                         normalized_average(per_task, expert_acc), tm.seconds,
                                         extra=dict(REFERENCE_EXTRA))
    for name in ("individual", "pretrained"):
        _print_row(console, name, results[name], progress_line.step())
    results.update(run_rows(run, rows, expert_acc=expert_acc, validation=val or None, lambdas=lambdas, steps=steps,
                            on_row=lambda name, r: _print_row(console, name, r, progress_line.step())))

    out = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": pool.name,
        "tasks": pool.tasks,
        "methods": {name: r.to_json() for name, r in results.items()},
        "splits": {t: {k: len(v) for k, v in s.items()} for t, s in splits.items()},
        "experts": {t: {k: v for k, v in m.items() if k in ("train_seconds", "steps", "cache_hit")}
                    for t, m in pool.expert_meta.items()},
        "environment": _environment(),
        "setup_seconds": dict(pool.setup_seconds),  # data and backbone; experts (fine-tuned or read from the cache)
        "feature_cache": {"hits": test_cache.hits, "misses": test_cache.misses},
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    Results.model_validate(out)  # the schema of docs/results-schema.md, checked before anything is written
    if out_dir is not None:
        from mergelab.experiment.report import write_results

        write_results(out, out_dir)
    return out


class RowProgress:
    """The run's one progress line: rows done of the total, time since the rows began, an estimate of the
    time left (the mean time per row so far times the rows left)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self) -> str:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        return f"[{self.done}/{self.total} rows, {_clock(elapsed)} elapsed, ~{_clock(left)} left]"


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _print_row(console, name: str, r: MethodResult, progress: str = "") -> None:
    console.print(f"  {name:<22} avg {100 * r.average:5.1f}  "
                  + "  ".join(f"{t} {100 * a:5.1f}" for t, a in r.per_task.items())
                  + f"  ({r.seconds:.0f}s)  {progress}".rstrip(), highlight=False)


def default_run_dir(benchmark: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{benchmark}-{stamp}"
