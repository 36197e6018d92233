"""Rows of a results table: a (method, parameters) pair with a stable name (docs/results-schema.md).

A row names a registered method (:mod:`mergelab.methods`) and its parameters; a static row may also
search its scaling coefficient on labeled validation data, and any row may take the heads another row
adapted (SyMerge's, the paper's transfer experiment). Parameter values written ``"@ROW.KEY"`` are the
value row ``ROW`` ran with (the scaling TIES chose on validation).

:data:`TABLE` is the benchmark's table. Every other registered method gets a row named after it, with its
default parameters, unless it is in :data:`OPT_IN`, so a newly registered method shows up in ``mergelab
bench`` with no other change; ``--row NAME`` runs any registered method with its default parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergelab import methods
from mergelab.core.errors import InputError
from mergelab.methods.dynamic.run import PROTOTYPE_MODES

# rows that are no method but the reference points of normalised accuracy
REFERENCE_ROWS = ("individual", "pretrained")
LAMBDAS = "lambdas"  # a search grid written so: the benchmark's Task Arithmetic grid
TIES_GRID = (0.5, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    search: Sequence[float] | str | None = None  # static rows: scaling grid searched on labeled validation data
    heads_from: str | None = None  # use the heads this row's method adapted (SyMerge) instead of the experts'

    @property
    def kind(self) -> str:
        return methods.get(self.method).kind

    def data(self) -> str:
        """What data the row reads beyond the input: keys of :data:`mergelab.methods.DATA_NEEDS` joined by
        ``+`` (a searched row reads labeled validation data; the prototype fast paths and the paper's rule with
        cached expert representations (``probes="cached"``), calibration inputs;
        a row also reads what the rows it takes values or heads from read)."""
        needs = {methods.get(self.method).needs}
        if self.search:
            needs.add("validation")
        table = {r.name: r for r in TABLE}
        for dep in dependencies(self):  # what the rows it reads from (@ROW.KEY, heads_from) read
            needs |= set((table.get(dep) or Row(dep, dep)).data().split("+"))
        if methods.get(self.method).kind == "dynamic" and (self.params.get("mode") in PROTOTYPE_MODES
                                                           or self.params.get("probes") == "cached"):
            needs.add("calibration")  # prototypes, or the cache of expert representations
        if len(needs) > 1:
            needs.discard("nothing")
        return "+".join(k for k in methods.DATA_NEEDS if k in needs)


TA03 = {"scaling": 0.3}
TABLE: tuple[Row, ...] = (
    Row("average", "average"),
    Row("task_arithmetic", "task_arithmetic", {}, LAMBDAS),
    Row("task_arithmetic_0.3", "task_arithmetic", TA03),
    Row("ties", "ties", {"density": 0.2}, TIES_GRID),
    Row("dare_task_arithmetic", "dare", {"drop_rate": 0.5, "seed": 0, "combine": "task_arithmetic"}, LAMBDAS),
    Row("dare_ties", "dare", {"drop_rate": 0.5, "seed": 0, "combine": "ties", "density": 0.2}, TIES_GRID),
    Row("se_merging_task_arithmetic", "se_merging", {"base": "task_arithmetic", "base_params": TA03}),
    Row("se_merging_task_arithmetic_cached", "se_merging",
        {"base": "task_arithmetic", "base_params": TA03, "probes": "cached"}),
    Row("se_prototype_task_arithmetic", "se_prototype", {"base": "task_arithmetic", "base_params": TA03}),
    Row("se_prototype_ties", "se_prototype", {"base": "ties", "base_params": {"density": 0.2, "scaling": "@ties.scaling"}}),
    Row("se_prototype_task_arithmetic_fast", "se_prototype",
        {"base": "task_arithmetic", "base_params": TA03, "mode": "fast"}),
    Row("adamerging_taskwise", "adamerging_taskwise"),
    Row("adamerging_layerwise", "adamerging_layerwise"),
    Row("adamerging_plusplus", "adamerging_plusplus"),
    Row("adamerging_plusplus_taskwise", "adamerging_plusplus_taskwise"),
    Row("symerge", "symerge"),
    Row("task_arithmetic+symerge_heads", "task_arithmetic", TA03, heads_from="symerge"),
    Row("ties+symerge_heads", "ties", {"density": 0.2, "scaling": "@ties.scaling"}, heads_from="symerge"),
    Row("se_prototype_task_arithmetic_fast+symerge_heads", "se_prototype",
        {"base": "task_arithmetic", "base_params": TA03, "mode": "fast"}, heads_from="symerge"),
)
OPT_IN = ("se_relative", "se_ratio")  # registered, not in the default table: run with --row NAME


def default_rows() -> list[Row]:
    """The table's rows, then a row for each registered method no table row runs (unless opt-in)."""
    used = {r.method for r in TABLE}
    extra = [Row(m, m) for m in methods.available() if m not in used and m not in OPT_IN]
    return [*TABLE, *extra]


def row_names() -> list[str]:
    """Every row name ``mergelab bench`` knows: the reference rows, the default rows, then every registered
    method's name (a row of that method with its default parameters)."""
    names = [*REFERENCE_ROWS, *(r.name for r in default_rows())]
    return [*names, *(m for m in methods.available() if m not in names)]


def resolve(names: Sequence[str] | None) -> list[Row]:
    """The rows named (default: every default row), in table order; unknown names are refused."""
    rows = default_rows()
    if names is None:
        return rows
    by_name = {r.name: r for r in rows}
    for m in methods.available():  # any method by its name, with its default parameters
        by_name.setdefault(m, Row(m, m))
    unknown = [n for n in names if n not in by_name and n not in REFERENCE_ROWS]
    if unknown:
        raise InputError(f"unknown row(s) {unknown}; rows: {', '.join(row_names())}")
    return [by_name[n] for n in dict.fromkeys(names) if n in by_name]


def dependencies(row: Row) -> list[str]:
    """Rows whose results this row reads: ``@ROW.KEY`` parameters and ``heads_from``."""
    deps: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str) and v.startswith("@"):
            deps.append(v[1:].split(".", 1)[0])
        elif isinstance(v, Mapping):
            for x in v.values():
                walk(x)

    walk(dict(row.params))
    if row.heads_from is not None:
        deps.append(row.heads_from)
    return deps


def substitute(params: Mapping[str, Any], lookup) -> dict[str, Any]:
    """``params`` with each ``"@ROW.KEY"`` replaced by ``lookup(ROW, KEY)``."""

    def sub(v: Any) -> Any:
        if isinstance(v, str) and v.startswith("@"):
            row, _, key = v[1:].partition(".")
            return lookup(row, key)
        if isinstance(v, Mapping):
            return {k: sub(x) for k, x in v.items()}
        return v

    return {k: sub(v) for k, v in params.items()}
