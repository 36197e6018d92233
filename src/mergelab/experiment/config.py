"""Run configuration files (YAML), validated with pydantic.

A configuration describes either a **pool** of models (pretrained model, experts, each task's data),
or a named **benchmark** (``mergelab bench --config``), plus the **outputs**, the **seed** and the
**device**. A pool is merged with its list of **methods** (``mergelab merge --config``) and evaluated
with the rows of its **evaluation** section (``mergelab bench --config``; a pool config needs one of
the two, and may have both). docs/cli.md lists every field. Example::

    pool:
      pretrained: ./models/base
      experts: {sentiment: ./models/sentiment, topic: ./models/topic}
    methods:
      - name: task_arithmetic
        params: {scaling: [0.2, 0.3, 0.4]}     # a list is a sweep: three merges
      - name: ties
        params: {density: [0.1, 0.2], scaling: [0.8, 1.0]}   # cartesian product: four merges
    outputs: {run_dir: runs/sweep, save_models: true}

**Sweeps.** In ``params`` a list value is a sweep: each entry of ``methods`` expands to the
cartesian product of its list values (in the order the keys are written), the other values fixed. A
parameter whose value itself is a list (``average``'s ``weights``) is written as a list of lists:
``weights: [[1, 2]]`` is one merge, ``weights: [[1, 2], [2, 1]]`` a sweep of two.

**Errors.** :func:`load_config` raises :class:`ConfigError` naming the file, the line (from the YAML
node tree), the field path (``methods[1].params.density``) and what was expected; unknown fields are
refused. Method names and parameters are checked against the methods registry by planning each sweep
point on a small synthetic pool with the pool's task names, so a value the method would refuse is
refused before any model is loaded.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.core import yamlio
from mergelab.core.errors import InputError
from mergelab.pools.pool import PoolConfig

Loc = tuple[str | int, ...]


class ConfigError(InputError):
    """A configuration file that is not what was expected; the message names file, line and field."""


class MethodSpec(BaseModel):
    """One entry of ``methods``: a registered method, its parameters (lists are sweeps), an optional label."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a merge method of `mergelab methods`")
    params: dict[str, Any] = Field(default_factory=dict, description="parameters; a list value is a sweep")
    label: str | None = Field(default=None, description="name of the merged model(s) (default: method and params)")

    def expand(self) -> list[tuple[dict[str, Any], dict[str, int]]]:
        """The sweep points: ``(params, {swept key: index in its list})`` in cartesian order."""
        swept = [k for k, v in self.params.items() if isinstance(v, list)]
        choices = [range(len(self.params[k])) for k in swept]
        points = []
        for idx in itertools.product(*choices):
            params = dict(self.params)
            for k, i in zip(swept, idx):
                params[k] = self.params[k][i]
            points.append((params, dict(zip(swept, idx))))
        return points


class OutputsConfig(BaseModel):
    """What a run writes, and where."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str | None = Field(default=None, description="run directory (default runs/<config name>-<time>)")
    save_models: bool = Field(default=True, description="merge: write each merged model as a HF directory")
    plots: bool = Field(default=True, description="write PNG plots")
    report: bool = Field(default=True, description="write report.md and report.html at the end")


class BenchmarkConfig(BaseModel):
    """A named benchmark (``text5``, ``text5-demo``, ``text5-lora``, ``reduced``), optionally on your own task files."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="text5", description="text5 (every row), text5-demo (its headline rows), text5-lora or reduced")
    rows: list[str] | None = Field(default=None, description="only these method rows (default: the benchmark's)")
    tasks: dict[str, str] = Field(default_factory=dict, description="task name -> CSV/JSONL/dataset folder; replaces the benchmark's tasks")
    cache: str | None = Field(default=None, description="expert cache (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    steps: dict[str, int] = Field(default_factory=dict, description="adaptive method -> adaptation steps, over the benchmark's own")

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, v: dict[str, int]) -> dict[str, int]:
        from mergelab import methods  # noqa: PLC0415

        for name, n in v.items():
            if name not in methods.available("adaptive"):
                raise ValueError(f"steps: {name!r} is no adaptive method; adaptive: {', '.join(methods.available('adaptive'))}")
            if n < 0:
                raise ValueError(f"steps: {name}={n}; steps must be at least 0")
        return v


class EvaluationConfig(BaseModel):
    """``mergelab bench --config`` on a pool: the rows, and how each task's one data set is split.

    A pool YAML gives one labeled data set per task. Its first ``validation_per_task`` examples are held
    out: they are the labeled validation data of the searched rows (``task_arithmetic``, ``ties``...) and
    the calibration inputs of ``se_prototype`` rows, and no row is evaluated on them. Every row is
    evaluated on the rest (the first ``limit`` of it, if given)."""

    model_config = ConfigDict(extra="forbid")

    rows: list[str] | None = Field(default=None, description="rows to run (default: every row of mergelab bench)")
    validation_per_task: int = Field(default=32, ge=0, description="first N examples of each task held out as "
                                     "validation / calibration data, never evaluated")
    limit: int | None = Field(default=None, ge=1, description="evaluate the first N remaining examples per task only")
    lambdas: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0],
                                 min_length=1, description="Task Arithmetic scaling grid of the searched rows")
    steps: dict[str, int] = Field(default_factory=dict, description="adaptive method -> steps (default: its own)")
    batch_size: int = Field(default=64, ge=1)


_DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


class RunConfig(BaseModel):
    """A whole run: a pool and methods (merge), or a benchmark (bench); outputs; seed; device."""

    model_config = ConfigDict(extra="forbid")

    pool: PoolConfig | None = None
    methods: list[MethodSpec] = Field(default_factory=list)
    benchmark: BenchmarkConfig | None = None
    evaluation: EvaluationConfig | None = None
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    seed: int = Field(default=0, ge=0)
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N, mps or auto")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"expected cpu, cuda, cuda:N, mps or auto, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> RunConfig:
        if (self.pool is None) == (self.benchmark is None):
            raise ValueError("give exactly one of 'pool' (with 'methods', for merge) or 'benchmark' (for bench)")
        if self.pool is not None and not self.methods and self.evaluation is None:
            raise ValueError("a 'pool' needs a non-empty 'methods' list (mergelab merge --config) or an "
                             "'evaluation' section (mergelab bench --config)")
        if self.benchmark is not None and self.methods:
            raise ValueError("'methods' applies to a 'pool'; a benchmark runs its own rows (benchmark.rows)")
        if self.benchmark is not None and self.evaluation is not None:
            raise ValueError("'evaluation' applies to a 'pool'; a benchmark's rows are benchmark.rows")
        return self

    @property
    def kind(self) -> Literal["merge", "bench"]:
        """``merge``: a pool (merged by ``merge --config``, evaluated by ``bench --config``); ``bench``: a
        named benchmark."""
        return "merge" if self.pool is not None else "bench"

    def pool_evaluation(self) -> EvaluationConfig:
        """The pool's ``evaluation`` section, its defaults if the config has none."""
        return self.evaluation or EvaluationConfig()

    def resolved_dict(self) -> dict[str, Any]:
        """The configuration with every default filled in, as plain YAML-able data."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------- YAML lines


def _node_lines(node: yaml.Node, where: str, loc: Loc = (), out: dict[Loc, int] | None = None) -> dict[Loc, int]:
    """Map each field path of the YAML node tree to its 1-based line; refuse duplicate keys."""
    out = {} if out is None else out
    out.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{where}:{line}: {_fmt(loc + (key,))}: duplicate key (first on line {seen[key]})")
            seen[key] = line
            out[loc + (key,)] = line
            _node_lines(value_node, where, loc + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[loc + (i,)] = item.start_mark.line + 1
            _node_lines(item, where, loc + (i,), out)
    return out


def _fmt(loc: Loc) -> str:
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s or "(top level)"


def _line(lines: Mapping[Loc, int], loc: Loc) -> int:
    """The line of ``loc``, or of its nearest written ancestor (a missing field: its parent's line)."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


# ---------------------------------------------------------------------------------------------- messages


def _unwrap(annotation: Any) -> Any:
    """The model class inside ``X | None``, ``list[X]``, ``dict[str, X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _is_dict(annotation: Any) -> bool:
    return get_origin(annotation) is dict or any(get_origin(a) is dict for a in get_args(annotation))


def _model_at(loc: Loc, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The pydantic model whose field set applies at ``loc`` (for 'unknown field' messages)."""
    model: Any = root or RunConfig
    skip = False
    for part in loc:
        if skip or isinstance(part, int):  # a dict key or a list index: the item type is already unwrapped
            skip = False
            continue
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        skip = _is_dict(ann)
        model = _unwrap(ann)
    return model


def _describe(err: Mapping[str, Any], root: type[BaseModel] | None = None) -> str:
    kind, loc = err["type"], tuple(err["loc"])
    got = err.get("input")
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], root)
        allowed = f"; expected one of: {', '.join(model.model_fields)}" if model is not None else ""
        return f"unknown field{allowed}"
    if kind == "missing":
        return "missing (required)"
    msg = err["msg"]
    msg = msg.replace("Input should be", "expected").replace("Value error, ", "")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind.startswith(("greater", "less")):
        msg += f", got {json.dumps(got, default=str)}"
    return msg


def validation_message(exc: ValidationError, where: str, lines: Mapping[Loc, int],
                       root: type[BaseModel] | None = None) -> str:
    """``FILE:LINE: FIELD: what was expected`` for the first three errors of a model validation (``root``: the
    model validated, default :class:`RunConfig`)."""
    errors = exc.errors()
    msgs = [f"{where}:{_line(lines, tuple(e['loc']))}: {_fmt(tuple(e['loc']))}: {_describe(e, root)}"
            for e in errors[:3]]
    return "; ".join(msgs) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")


def read_yaml(text: str, where: str, *, empty: str) -> tuple[Any, dict[Loc, int]]:
    """YAML ``text`` (YAML 1.2 numbers) and the line of each field path; a syntax error, an empty file, a
    duplicate key or a top level that is not a mapping is refused naming ``where`` and the line."""
    try:
        node = yamlio.compose(text)
        data = yamlio.load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    if node is None or data is None:
        raise ConfigError(f"{where}: empty configuration; expected {empty}")
    lines = _node_lines(node, where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}:1: expected a mapping (key: value lines) at the top level, got {type(data).__name__}")
    return data, lines


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a configuration file; a missing file, a folder or another encoding is refused."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such configuration file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML configuration file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, *, check_methods: bool = True) -> RunConfig:
    """Read, validate and return the configuration at ``path`` (pool paths made relative to its folder).

    Raises :class:`ConfigError` (an :class:`~mergelab.core.errors.InputError`) with ``FILE:LINE: FIELD: what
    was expected``.
    """
    path = Path(path)
    text = read_text(path)
    return parse_config(text, where=str(path), base=path.parent.resolve(), check_methods=check_methods)


def parse_config(text: str, *, where: str = "<config>", base: str | Path | None = None,
                 check_methods: bool = True) -> RunConfig:
    """Validate YAML ``text``; ``where`` names it in messages, ``base`` anchors relative pool paths."""
    data, lines = read_yaml(text, where, empty="a mapping with 'pool' and 'methods', or 'benchmark'")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, where, lines)) from None
    if cfg.pool is not None and base is not None:
        cfg = cfg.model_copy(update={"pool": cfg.pool.resolve_relative(base)})
    if cfg.benchmark is not None and base is not None:
        fixed = {k: _relative(v, Path(base)) for k, v in cfg.benchmark.tasks.items()}
        cfg = cfg.model_copy(update={"benchmark": cfg.benchmark.model_copy(update={"tasks": fixed})})
    if cfg.pool is not None and check_methods and cfg.methods:
        check_methods_against_registry(cfg, where, lines)
    if cfg.evaluation is not None and cfg.evaluation.rows is not None:
        _check_rows(cfg.evaluation.rows, ("evaluation", "rows"), where, lines)
    if cfg.benchmark is not None:
        _check_benchmark(cfg, where, lines)
    return cfg


def _relative(spec: str, base: Path) -> str:
    p = Path(spec).expanduser()
    if p.is_absolute() or p.exists() or not (base / p).exists():
        return spec
    return str(base / p)


def _check_benchmark(cfg: RunConfig, where: str, lines: Mapping[Loc, int]) -> None:
    from mergelab.pools.benchmarks import BENCHMARKS

    bench = cfg.benchmark
    assert bench is not None
    if bench.name not in BENCHMARKS:
        loc: Loc = ("benchmark", "name")
        raise ConfigError(f"{where}:{_line(lines, loc)}: {_fmt(loc)}: unknown benchmark {bench.name!r}; "
                          f"expected one of {', '.join(BENCHMARKS)}")
    if bench.rows is not None:
        _check_rows(bench.rows, ("benchmark", "rows"), where, lines)
    if cfg.device not in ("cpu", "auto"):
        loc = ("device",)
        raise ConfigError(f"{where}:{_line(lines, loc)}: device: benchmarks run on the CPU; "
                          f"expected cpu or auto, got {cfg.device!r}")


def _check_rows(rows: Sequence[str], at: Loc, where: str, lines: Mapping[Loc, int]) -> None:
    known = benchmark_rows()
    for i, row in enumerate(rows):
        if row not in known:
            loc = (*at, i)
            raise ConfigError(f"{where}:{_line(lines, loc)}: {_fmt(loc)}: unknown row {row!r}; "
                              f"expected one of {', '.join(known)}")


def benchmark_rows() -> list[str]:
    """Every row name ``mergelab bench`` knows (``individual`` and ``pretrained`` always run)."""
    from mergelab.experiment.rows import row_names

    return row_names()


# ---------------------------------------------------------------------------------------------- methods



def _synthetic_pool(tasks: Sequence[str]):
    import torch

    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.zeros(16)}
    return pre, {t: {"w": torch.randn(16, generator=g)} for t in tasks}


def check_methods_against_registry(cfg: RunConfig, where: str = "<config>", lines: Mapping[Loc, int] | None = None) -> None:
    """Refuse unknown methods or parameters, empty sweeps, duplicate labels and values a method refuses."""
    from mergelab import methods

    lines = lines or {}
    assert cfg.pool is not None
    tasks = list(cfg.pool.experts)
    pre, experts = _synthetic_pool(tasks)

    def fail(loc: Loc, msg: str) -> None:
        raise ConfigError(f"{where}:{_line(lines, loc)}: {_fmt(loc)}: {msg}")

    seen: dict[str, int] = {}
    for i, spec in enumerate(cfg.methods):
        if spec.name not in methods.available():
            fail(("methods", i, "name"), f"unknown merge method {spec.name!r}; expected one of {', '.join(methods.available('static'))}")
        info = methods.get(spec.name)
        if info.kind != "static":
            fail(("methods", i, "name"), f"{spec.name!r} is a {info.kind} method: it has no single merged model to "
                 f"write; a merge config takes static methods ({', '.join(methods.available('static'))}); "
                 "run it with mergelab bench: a row of the pool's 'evaluation.rows' or of 'benchmark.rows'")
        for key, value in spec.params.items():
            if key not in info.params:
                fail(("methods", i, "params", key), f"{spec.name!r} has no parameter {key!r}; its parameters are "
                     f"{', '.join(info.params) or '(none)'}")
            if isinstance(value, list) and not value:
                fail(("methods", i, "params", key), "empty list; a sweep needs at least one value")
        for params, index in spec.expand():
            try:
                methods.plan(spec.name, pre, experts, **params)
            except (InputError, TypeError, ValueError) as exc:
                named = getattr(exc, "parameter", "").split("[")[0]  # a ParameterError names its field
                key = named if named in spec.params else None
                loc: Loc = ("methods", i, "params")
                if key is not None:
                    loc += (key,) + ((index[key],) if key in index else ())
                point = ", ".join(f"{k}={v!r}" for k, v in params.items() if k in index)
                fail(loc, f"{exc}" + (f" (sweep point {point})" if point else ""))
            label = run_label(spec, params)
            if label in seen:
                fail(("methods", i), f"the merge {label!r} is already made by methods[{seen[label]}]; "
                     "give one of them a different 'label' or different params")
            seen[label] = i


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def run_label(spec: MethodSpec, params: Mapping[str, Any]) -> str:
    """A file-name-safe name for one sweep point: ``label`` or the method, then the given params."""
    base = spec.label or spec.name
    parts = [f"{k}={json.dumps(v, separators=(',', ':'), sort_keys=True) if isinstance(v, (dict, list)) else v}"
             for k, v in params.items()]
    name = "_".join([base, *parts]) if parts else base
    return _UNSAFE.sub("-", name).strip("-.") or "merge"


def sweep(cfg: RunConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """Every merge of ``cfg``: ``(label, method, params)`` in the order written."""
    out = []
    for spec in cfg.methods:
        for params, _ in spec.expand():
            out.append((run_label(spec, params), spec.name, params))
    return out


__all__ = ["BenchmarkConfig", "ConfigError", "EvaluationConfig", "MethodSpec", "OutputsConfig", "RunConfig", "benchmark_rows",
           "read_text", "read_yaml", "validation_message",
           "check_methods_against_registry", "load_config", "parse_config", "run_label", "sweep"]
