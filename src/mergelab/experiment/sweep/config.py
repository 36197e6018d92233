"""The YAML file of ``mergelab sweep``, validated with pydantic (docs/cluster.md lists every field).

A sweep is a list of **studies**. A study is one entry of ``methods`` on one task subset with one seed; it
runs the trials its search asks for (a grid, random draws or an Optuna search) and, if it searched,
reports the test accuracy of the trial with the best validation accuracy. Example::

    name: per-task
    benchmark: {name: text5, cache: /shared/mergelab-cache}   # or pool: (+ evaluation:), as in bench --config
    methods:
      - label: ta_lambda                         # one lambda, chosen on validation (a grid)
        name: task_arithmetic
        params: {scaling: [0.1, 0.2, 0.3, 0.5]}
      - label: ta_per_task                       # one lambda per task, an Optuna search
        name: task_arithmetic
        params: {scaling: {low: 0.0, high: 1.0, per_task: true}}
        search: optuna
        trials: 24
      - name: adamerging_taskwise               # no search: one trial, evaluated on test
    subsets: {sizes: [2, 3], max_per_size: 4, seed: 0}   # default: every task at once
    seeds: [0]
    search: {trials: 20, sampler: tpe, batch: 4, seed: 0}
    resources: {cpus: 1, gpus: 0}               # each trial's Ray resources

**Parameter values** (``methods[i].params``): a number, string or mapping is fixed; a **list** is a set of
choices (a grid's axis, a random draw's or Optuna's categorical choice); ``{low: A, high: B}`` is a range
(``log: true``, ``step: S``; in a grid ``num: N`` points), and with ``per_task: true`` one value per task
of the study's subset (a mapping task -> value, which Task Arithmetic and TIES take as per-task scaling).
A parameter whose value is itself a list is written as a list of lists, as in ``merge --config``.

**Errors** name the file, the line and the field (``methods[1].params.scaling``) and what was expected.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergelab.core.errors import InputError
from mergelab.experiment.config import (
    ConfigError,
    Loc,
    _fmt,
    _line,
    _relative,
    _synthetic_pool,
    read_text,
    read_yaml,
    validation_message,
)
from mergelab.pools.pool import PoolConfig

Mode = Literal["grid", "random", "optuna"]
Sampler = Literal["tpe", "cmaes", "random"]
RANGE_KEYS = {"low", "high", "log", "step", "num", "per_task"}
MAX_GRID = 10_000  # points of one study's grid


class BenchmarkSource(BaseModel):
    """A named benchmark as the sweep's pool: its seeded splits, the experts from the cache."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="text5", description="text5 or reduced")
    cache: str | None = Field(default=None, description="expert cache on storage every node reads (default "
                              "$MERGELAB_CACHE or ~/.cache/mergelab of each node)")
    tasks: dict[str, str] = Field(default_factory=dict, description="task name -> your CSV/JSONL file; replaces the tasks")
    seed: int | None = Field(default=None, ge=0, description="seed of the splits and the experts (default: the benchmark's)")


class EvaluationSection(BaseModel):
    """Which examples the trials read."""

    model_config = ConfigDict(extra="forbid")

    validation_per_task: int = Field(default=32, ge=0, description="pool configs: first N examples of each task "
                                     "held out as its validation split")
    validation_limit: int | None = Field(default=None, ge=1, description="validation trials read a stratified "
                                         "sample of N validation examples per task (default: the benchmark's search_per_task)")
    test_limit: int | None = Field(default=None, ge=1, description="test trials read a stratified sample of N test examples per task")
    batch_size: int = Field(default=64, ge=1)


class MethodEntry(BaseModel):
    """One entry of ``methods``: a registered method, its parameter space, how to search it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a method of `mergelab methods`")
    label: str | None = Field(default=None, description="the study's name in the tables (default: the method)")
    params: dict[str, Any] = Field(default_factory=dict)
    search: Mode | None = Field(default=None, description="grid, random or optuna (default: search.mode)")
    trials: int | None = Field(default=None, ge=1, description="random / optuna: trials (default: search.trials)")
    sampler: Sampler | None = Field(default=None, description="optuna: tpe, cmaes or random (default: search.sampler)")
    scaling_grid: list[float] | None = Field(default=None, min_length=1, description="static methods: inside each "
                                             "trial, search the scaling over this grid on validation data")
    select: Literal["validation", "none"] = Field(default="validation", description="validation: report the test "
                                                  "accuracy of the best trial on validation; none: every trial on test")

    @property
    def study_label(self) -> str:
        return self.label or self.name


class SubsetsSection(BaseModel):
    """Task subsets: every subset of each size, or a seeded sample of at most ``max_per_size`` of them."""

    model_config = ConfigDict(extra="forbid")

    sizes: list[int] | None = Field(default=None, min_length=1, description="subset sizes (default: all tasks)")
    max_per_size: int | None = Field(default=None, ge=1, description="seeded sample of at most N subsets per size")
    seed: int = Field(default=0, ge=0)


class SearchSection(BaseModel):
    """Defaults of every study's search."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "grid"
    trials: int = Field(default=20, ge=1, description="random / optuna: trials per study")
    sampler: Sampler = Field(default="tpe", description="optuna: tpe (Bergstra et al. 2011), cmaes (Hansen) or random")
    batch: int = Field(default=4, ge=1, description="optuna: trials asked per round; fixed in the config, so the "
                       "same config and seed give the same trials on any cluster")
    seed: int = Field(default=0, ge=0)


class ResourcesSection(BaseModel):
    """What one trial asks Ray for (and the torch threads it runs with)."""

    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(default=1, gt=0)
    gpus: float = Field(default=0, ge=0)


class SweepConfig(BaseModel):
    """A whole sweep: a pool or a benchmark, the studies, the subsets and seeds, the search, the resources."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="the sweep's name (default: the file's stem)")
    benchmark: BenchmarkSource | None = None
    pool: PoolConfig | None = None
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    methods: list[MethodEntry] = Field(min_length=1)
    subsets: SubsetsSection = Field(default_factory=SubsetsSection)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    search: SearchSection = Field(default_factory=SearchSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    plugins: list[str] = Field(default_factory=list, description="Python files registering methods, imported by "
                               "the driver and by every trial's process")

    @model_validator(mode="after")
    def _one_source(self) -> SweepConfig:
        if (self.pool is None) == (self.benchmark is None):
            raise ValueError("give exactly one of 'benchmark' (a named benchmark) or 'pool' (models and task files)")
        return self

    def pool_source(self) -> dict[str, Any]:
        """What a trial's process needs to load the pool: plain JSON, absolute paths."""
        ev = self.evaluation
        common = {"validation_limit": ev.validation_limit, "test_limit": ev.test_limit}
        if self.benchmark is not None:
            return {"kind": "benchmark", **self.benchmark.model_dump(mode="json"), **common}
        assert self.pool is not None
        return {"kind": "pool", "pool": self.pool.model_dump(mode="json"),
                "validation_per_task": ev.validation_per_task, **common}

    def task_names(self) -> list[str]:
        if self.pool is not None:
            return list(self.pool.experts)
        assert self.benchmark is not None
        if self.benchmark.tasks:
            return list(self.benchmark.tasks)
        from mergelab.pools.benchmarks import get_benchmark

        return get_benchmark(self.benchmark.name).task_names

    def mode_of(self, entry: MethodEntry) -> Mode:
        return entry.search or self.search.mode


def pool_key(source: Mapping[str, Any]) -> str:
    """The pool's identity in trial ids: what fixes its models and splits (not where the cache lives)."""
    keep = {k: v for k, v in source.items() if k != "cache"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- parameter spaces


def is_range(value: Any) -> bool:
    return isinstance(value, Mapping) and "low" in value and "high" in value and set(value) <= RANGE_KEYS


def grid_axis(value: Any) -> list[Any]:
    """The values of one parameter in a grid: a list's entries, a range's ``num`` points, or the value."""
    if isinstance(value, list):
        return list(value)
    if is_range(value):
        lo, hi, n = float(value["low"]), float(value["high"]), int(value["num"])
        if n == 1:
            return [lo]
        if value.get("log"):
            return [float(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]
        return [float(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
    return [value]


def _check_range(value: Mapping[str, Any], mode: str) -> str | None:
    """Why a range is not usable in ``mode``, or None."""
    for k in ("low", "high", "step"):
        v = value.get(k)
        if k in value and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            return f"{k}: expected a finite number, got {v!r}"
    if value["low"] > value["high"]:
        return f"low {value['low']} > high {value['high']}"
    if value.get("log") and value["low"] <= 0:
        return "log: true needs low > 0"
    if value.get("log") and value.get("step") is not None:
        return "log and step cannot be combined"
    if mode == "grid":
        if value.get("per_task"):
            return "per_task ranges need search: random or optuna (a grid over one value per task grows as N^T)"
        num = value.get("num")
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            return "in a grid a range needs num: N (the number of points), e.g. {low: 0.1, high: 1.0, num: 5}"
    elif "num" in value:
        return f"num: is for grids; search {mode} draws from the range"
    return None


def corner_points(params: Mapping[str, Any], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Parameter sets to check a space against the registry: each choice and each range end, the rest at their first."""
    def first(v: Any) -> Any:
        if isinstance(v, list):
            return v[0]
        if is_range(v):
            return dict.fromkeys(tasks, v["low"]) if v.get("per_task") else v["low"]
        return v

    base = {k: first(v) for k, v in params.items()}
    points = [base]
    for k, v in params.items():
        options = v[1:] if isinstance(v, list) else ([v["high"]] if is_range(v) else [])
        for o in options:
            points.append({**base, k: dict.fromkeys(tasks, o) if is_range(v) and v.get("per_task") else o})
    return points


# ---------------------------------------------------------------------------------------------- loading


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file; relative paths (pool, cache, task files, plugins) are made absolute
    against the file's folder, so no trial depends on the driver's working directory."""
    path = Path(path)
    return parse_sweep_config(read_text(path), where=str(path), base=path.parent.resolve(), default_name=path.stem)


def parse_sweep_config(text: str, *, where: str = "<sweep>", base: str | Path | None = None,
                       default_name: str = "sweep") -> SweepConfig:
    data, lines = read_yaml(text, where, empty="a mapping with 'benchmark' or 'pool', and 'methods'")
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, where, lines, SweepConfig)) from None
    base = Path(base) if base is not None else Path.cwd()
    update: dict[str, Any] = {"name": cfg.name or default_name,
                              "plugins": [str(_absolute(p, base)) for p in cfg.plugins]}
    if cfg.pool is not None:
        update["pool"] = cfg.pool.resolve_relative(base)
    if cfg.benchmark is not None:
        b = cfg.benchmark
        update["benchmark"] = b.model_copy(update={
            "cache": str(_absolute(b.cache, base)) if b.cache else None,
            "tasks": {k: _relative(v, base) for k, v in b.tasks.items()}})
    cfg = cfg.model_copy(update=update)
    check_sweep(cfg, where, lines)
    return cfg


def _absolute(spec: str, base: Path) -> Path:
    p = Path(spec).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def check_sweep(cfg: SweepConfig, where: str = "<sweep>", lines: Mapping[Loc, int] | None = None) -> None:
    """Refuse what would only fail once trials run: unknown benchmarks, methods or parameters, spaces a
    search cannot use, values a method refuses, duplicate study labels, subset sizes the pool cannot have."""
    from mergelab import methods
    from mergelab.experiment.sweep.trial import load_plugins

    lines = lines or {}

    def fail(loc: Loc, msg: str) -> None:
        raise ConfigError(f"{where}:{_line(lines, loc)}: {_fmt(loc)}: {msg}")

    for i, p in enumerate(cfg.plugins):
        if not Path(p).is_file():
            fail(("plugins", i), f"no such Python file {p}")
    try:
        load_plugins(cfg.plugins)
    except InputError as exc:
        fail(("plugins",), str(exc))
    if cfg.benchmark is not None:
        from mergelab.pools.benchmarks import BENCHMARKS

        if cfg.benchmark.name not in BENCHMARKS:
            fail(("benchmark", "name"), f"unknown benchmark {cfg.benchmark.name!r}; expected one of {', '.join(BENCHMARKS)}")
    tasks = cfg.task_names()
    if cfg.subsets.sizes is not None:
        for j, k in enumerate(cfg.subsets.sizes):
            if not 1 <= k <= len(tasks):
                fail(("subsets", "sizes", j), f"a subset of {k} tasks; the pool has {len(tasks)} ({', '.join(tasks)})")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        fail(("seeds",), f"a seed twice in {cfg.seeds}")
    searching = [i for i, e in enumerate(cfg.methods) if e.scaling_grid or (e.select == "validation" and any(
        isinstance(v, list) and len(v) > 1 or is_range(v) for v in e.params.values()))]
    if cfg.pool is not None and cfg.evaluation.validation_per_task == 0 and searching:
        fail(("evaluation", "validation_per_task"), f"0 holds out no validation data, and methods{searching} choose "
             "their parameters on it; hold out some examples per task (e.g. 32)")
    seen: dict[str, int] = {}
    pre, experts = _synthetic_pool(tasks)
    for i, entry in enumerate(cfg.methods):
        at: Loc = ("methods", i)
        if entry.name not in methods.available():
            fail((*at, "name"), f"unknown method {entry.name!r}; expected one of {', '.join(methods.available())}")
        info = methods.get(entry.name)
        label = entry.study_label
        if label in ("individual", "pretrained"):
            fail((*at, "label") if entry.label else at, f"{label!r} names a reference row of the results; give the "
                 "entry another 'label'")
        if label in seen:
            fail((*at, "label") if entry.label else at, f"study {label!r} is already methods[{seen[label]}]; give "
                 "each entry its own 'label'")
        seen[label] = i
        mode = cfg.mode_of(entry)
        if entry.scaling_grid is not None and (info.kind != "static" or "scaling" not in info.params):
            fail((*at, "scaling_grid"), f"{entry.name!r} has no scaling to search (a static method with 'scaling' has)")
        n_points = 1
        for key, value in entry.params.items():
            if key not in info.params:
                fail((*at, "params", key), f"{entry.name!r} has no parameter {key!r}; its parameters are "
                     f"{', '.join(info.params) or '(none)'}")
            if isinstance(value, list) and not value:
                fail((*at, "params", key), "empty list; a choice needs at least one value")
            if isinstance(value, Mapping) and not is_range(value) and ({"low", "high"} & set(value)):
                fail((*at, "params", key), f"a range is {{low, high}} with optional {', '.join(sorted(RANGE_KEYS - {'low', 'high'}))}; "
                     f"got keys {sorted(value)}")
            if is_range(value):
                why = _check_range(value, mode)
                if why:
                    fail((*at, "params", key), why)
            if mode == "optuna" and isinstance(value, list):
                for j, v in enumerate(value):
                    if not (v is None or isinstance(v, (bool, int, float, str))):
                        fail((*at, "params", key, j), "Optuna's choices are numbers, strings, booleans or null; "
                             f"got {v!r}")
            n_points *= len(grid_axis(value)) if mode == "grid" else 1
        if n_points > MAX_GRID:
            fail((*at, "params"), f"a grid of {n_points} points (at most {MAX_GRID}); use search: random or optuna")
        if entry.scaling_grid is not None and "scaling" in entry.params:
            fail((*at, "scaling_grid"), "scaling is searched inside each trial; drop params.scaling")
        for point in corner_points(entry.params, tasks):
            try:
                if info.kind == "static":
                    methods.plan(entry.name, pre, experts, **point)
                else:
                    info.check(point)
            except (InputError, TypeError, ValueError) as exc:
                named = getattr(exc, "parameter", "").split("[")[0]
                fail((*at, "params", named) if named in entry.params else (*at, "params"), str(exc))


def expand_grid(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every point of a grid, in the order the keys are written (the last key varies fastest)."""
    keys = list(params)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid_axis(params[k]) for k in keys))]


__all__ = ["BenchmarkSource", "EvaluationSection", "MethodEntry", "ResourcesSection", "SearchSection", "SubsetsSection",
           "SweepConfig", "check_sweep", "corner_points", "expand_grid", "grid_axis", "is_range", "load_sweep_config",
           "parse_sweep_config", "pool_key"]
