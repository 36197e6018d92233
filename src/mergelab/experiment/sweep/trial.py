"""One trial of a sweep, and the one function that runs it, in this process or as a Ray task.

A trial is a method with fixed parameters on a task subset of the pool, with a seed, evaluated on one split
(``validation`` while a study searches, ``test`` for what it reports). Its id is a hash of that content, so
the same config and seed name the same trials, and a restarted sweep finds the trials it has run.

:func:`execute_trial` loads the pool (once per process: a Ray worker keeps it between trials), restricts it to
the trial's tasks (:meth:`~mergelab.pools.pool.ModelPool.restrict`: the method sees only those experts), runs
the one row through :func:`~mergelab.experiment.runner.run_rows`, and writes the trial's record atomically
into the sweep folder. An exception inside the trial is caught and recorded (``status: failed`` with the
error); the sweep goes on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergelab.core.errors import InputError
from mergelab.experiment.sweep.fence import trial_slot

REFERENCE = "reference"  # the trial kind that evaluates the experts and the pretrained model once


@dataclass(frozen=True)
class Trial:
    """What a trial runs. ``index`` is its place in its study (``final``: the selected parameters on test)."""

    study: str
    index: int | str
    method: str
    params: dict[str, Any]
    tasks: tuple[str, ...]
    seed: int
    split: str  # "validation" or "test"
    pool: str  # pool_key of the pool source
    scaling_grid: tuple[float, ...] | None = None
    kind: str = "trial"
    steps: dict[str, int] = field(default_factory=dict)  # a benchmark's reduced adaptive steps

    @property
    def id(self) -> str:
        content = {k: v for k, v in asdict(self).items() if k != "index"}
        content["tasks"] = list(self.tasks)
        blob = json.dumps(content, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        out["scaling_grid"] = list(self.scaling_grid) if self.scaling_grid else None
        return {"id": self.id, **out}


def reference_trial(pool: str, tasks: Sequence[str]) -> Trial:
    return Trial(REFERENCE, 0, "", {}, tuple(tasks), 0, "test+validation", pool, kind=REFERENCE)


# ---------------------------------------------------------------------------------------------- plugins


_PLUGINS: dict[str, str] = {}  # path -> module name, loaded in this process


def load_plugins(paths: Sequence[str]) -> None:
    """Import each plugin file (methods it registers join the registry) once per process."""
    for p in paths:
        path = str(Path(p).resolve())
        if path in _PLUGINS and _PLUGINS[path] in sys.modules:
            continue
        name = "mergelab_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise InputError(f"plugin {p}: not a Python file")
        from mergelab import methods

        before = set(methods.available())
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:  # half-imported (an error, or a trial cancelled mid-import): undo it all
            sys.modules.pop(name, None)
            for added in set(methods.available()) - before:
                methods.unregister(added)
            if isinstance(exc, Exception):
                raise InputError(f"plugin {p}: {type(exc).__name__}: {exc}") from exc
            raise
        _PLUGINS[path] = name


# ---------------------------------------------------------------------------------------------- pools


_POOLS: dict[str, Any] = {}  # pool_key -> ModelPool, one per process


def load_sweep_pool(source: Mapping[str, Any]):
    """The pool a sweep runs on, loaded once per process: ``validation`` and ``test`` splits per task (a
    stratified seeded sample of ``validation_limit`` / ``test_limit`` examples, :meth:`TaskData.sample`, the
    samples ``mergelab bench`` reads), the experts from the shared cache or model paths.

    A benchmark whose experts are not in the cache yet trains them (the sweep's reference trial runs first,
    alone, so the cache is filled once)."""
    from mergelab.experiment.sweep.config import pool_key

    key = pool_key(source)
    if key in _POOLS:
        return _POOLS[key]
    from rich.console import Console

    quiet = Console(stderr=True, quiet=True)
    if source["kind"] == "benchmark":
        import dataclasses

        from mergelab.experiment.runner import load_context
        from mergelab.pools.benchmarks import get_benchmark, user_benchmark

        base = get_benchmark(source["name"])
        spec = user_benchmark(dict(source["tasks"]), base=base) if source.get("tasks") else base
        if source.get("seed") is not None and source["seed"] != spec.seed:
            spec = dataclasses.replace(spec, seed=source["seed"], recipe=spec.recipe.replace(seed=source["seed"]))
        pool = load_context(spec, cache_dir=source.get("cache"), progress=False, console=quiet)
        val_limit = source.get("validation_limit") or spec.search_per_task
        seed = spec.seed
    else:
        from mergelab.pools.pool import PoolConfig, load_pool

        pool = load_pool(PoolConfig.model_validate(source["pool"]))
        pool.hold_out(int(source.get("validation_per_task", 32)))
        val_limit = source.get("validation_limit")
        seed = 0
    test_limit = source.get("test_limit")
    for s in pool.splits.values():
        s.pop("train", None)  # the trials never train: drop the texts
        if val_limit is not None and "validation" in s:
            s["validation"] = s["validation"].sample(val_limit, seed)
        if test_limit is not None:
            s["test"] = s["test"].sample(test_limit, seed)
    _POOLS.clear()  # one pool per process: a worker that moves to another sweep frees the last one
    _POOLS[key] = pool
    return pool


# ---------------------------------------------------------------------------------------------- running


def execute_trial(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Run one trial and write its record into ``payload["sweep_dir"]/trials/<id>.json`` atomically.

    ``payload``: ``trial`` (:meth:`Trial.to_json`), ``source`` (the pool source), ``sweep_dir`` (absolute),
    ``plugins``, ``threads`` (torch threads: the trial's CPUs), ``reference`` (``{split: {task: expert
    accuracy}}``, for normalised accuracy), ``executor``, ``run_token`` (the driver run's token,
    :mod:`~mergelab.experiment.sweep.fence`: a trial of an interrupted run neither runs nor writes). Never
    raises for a failure inside the trial."""
    trial = dict(payload["trial"])
    with trial_slot(Path(payload["sweep_dir"]), payload.get("run_token")) as current:
        if not current:  # the run that submitted this trial was interrupted before it started
            return {**trial, "status": "cancelled", "executor": payload.get("executor", "inline")}
        return _execute(payload, trial)


def _execute(payload: Mapping[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    import torch

    started = time.time()
    record: dict[str, Any] = {**trial, "status": "running", "host": socket.gethostname(), "pid": os.getpid(),
                              "executor": payload.get("executor", "inline")}
    threads = max(1, int(payload.get("threads") or 1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        load_plugins(payload.get("plugins") or [])
        pool = load_sweep_pool(payload["source"])
        if trial["kind"] == REFERENCE:
            record.update(_reference(pool, trial))
        else:
            record.update(_run(pool, trial, payload.get("reference") or {}))
        record["status"] = "ok"
    except Exception as exc:  # a failed trial is recorded; the others go on
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback="".join(traceback.format_exception(exc)[-6:]))
    finally:
        torch.set_num_threads(before)
    record["seconds"] = round(time.time() - started, 3)
    record["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record["threads"] = threads
    write_record(Path(payload["sweep_dir"]), record)
    return record


def write_record(sweep_dir: Path, record: Mapping[str, Any]) -> Path:
    from mergelab.core.atomic import atomic_write_text

    return atomic_write_text(sweep_dir / "trials" / f"{record['id']}.json", json.dumps(record, indent=1) + "\n")


def _reference(pool, trial: Mapping[str, Any]) -> dict[str, Any]:
    """Each expert on its own task and the pretrained model, on the test and validation splits."""
    from mergelab.pools.evaluate import FeatureCache, evaluate_tasks

    out: dict[str, Any] = {"individual": {}, "pretrained": {}, "sizes": {}}
    cache = FeatureCache()
    for split in ("test", "validation"):
        splits = {t: s[split] for t, s in pool.splits.items() if split in s and len(s[split])}
        if not splits:
            continue
        out["individual"][split] = evaluate_tasks(pool.family, lambda t: pool.experts[t], pool.heads, splits,
                                                  cache=cache)
        out["pretrained"][split] = evaluate_tasks(pool.family, pool.pretrained, pool.heads, splits, cache=cache)
        out["sizes"][split] = {t: len(s) for t, s in splits.items()}
    out["tasks"] = list(pool.tasks)
    return out


def _run(pool, trial: Mapping[str, Any], reference: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The trial's one row on the pool restricted to its tasks, evaluated on its split."""
    import torch

    from mergelab import methods
    from mergelab.experiment.rows import Row
    from mergelab.experiment.runner import RunPool, run_rows
    from mergelab.pools.evaluate import FeatureCache

    split = trial["split"]
    sub = pool.restrict(list(trial["tasks"]))
    missing = [t for t in sub.tasks if split not in sub.splits.get(t, {})]
    if missing:
        raise InputError(f"task(s) {missing} have no {split!r} split")
    seed = int(trial["seed"])
    params = dict(trial["params"])
    info = methods.get(trial["method"])
    if "seed" in info.params and "seed" not in params:
        params["seed"] = seed  # the trial's seed for methods that draw random numbers (DARE)
    torch.manual_seed(seed)
    run = RunPool(sub.family, sub.pretrained, sub.experts, sub.heads, sub.splits, seed=seed, progress=False,
                  input_split=split, cache=FeatureCache(), label=trial["study"])
    grid = trial.get("scaling_grid")
    row = Row(trial["study"], trial["method"], params, search=tuple(grid) if grid else None)
    expert = {t: reference.get(split, {}).get(t, 0.0) for t in sub.tasks}
    validation = {t: s["validation"] for t, s in sub.splits.items() if "validation" in s}
    result = run_rows(run, [row], expert_acc=expert, eval_split=split, validation=validation or None,
                      steps=trial.get("steps") or None)[row.name]
    out = {"per_task": result.per_task, "average": result.average,
           "normalized_average": result.normalized_average if reference.get(split) else None,
           "params_run": _jsonable(result.params), "run_seconds": round(result.seconds, 3)}
    if result.validation:
        out["inner_search"] = _jsonable(result.validation)
    extra = {k: v for k, v in result.extra.items() if k not in ("method", "kind", "data")}
    if extra:
        out["extra"] = _jsonable(extra)
    return out


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


__all__ = ["REFERENCE", "Trial", "execute_trial", "load_plugins", "load_sweep_pool", "reference_trial", "write_record"]
