"""The adaptive rows of a benchmark, and :func:`adapt`: one adaptive method on given unlabeled inputs.

Rows (stable names; :mod:`mergelab.experiment.rows` defines them, docs/results-schema.md lists them):
``adamerging_taskwise``, ``adamerging_layerwise``, ``adamerging_plusplus``, ``adamerging_plusplus_taskwise``,
``symerge``, and the transfers
``task_arithmetic+symerge_heads``, ``ties+symerge_heads`` (the static body with SyMerge's adapted heads, the
paper's transfer experiment). Both go through the one runner (:func:`~mergelab.experiment.runner.run_rows`).

Protocol: adaptation reads the inputs of ``adapt_split`` only (test-time adaptation on ``test``); labels
are read afterwards, by the evaluation. Every row's ``seconds`` covers setup (tokenizing, pseudo-labels),
adaptation and evaluation; ``params`` holds the adaptation summary (steps, seconds per step, loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from mergelab import methods
from mergelab.core.errors import InputError
from mergelab.core.statedict import StateDict
from mergelab.experiment.rows import TABLE
from mergelab.experiment.runner import RunPool, run_rows
from mergelab.methods.adaptive.result import AdaptResult
from mergelab.pools.evaluate import FeatureCache, MethodResult

ADAPTIVE_ROWS = tuple(r.name for r in TABLE if r.kind == "adaptive" or (r.heads_from and r.kind == "static"))


@dataclass
class _Inputs:
    """A pool view over given inputs (no splits): what :func:`adapt` hands the method."""

    family: Any
    pretrained: StateDict
    bodies: Mapping[str, StateDict]
    heads: Mapping[str, nn.Module]
    texts: Mapping[str, Sequence[Any]]
    seed: int = 0
    progress: bool = True
    batch_size: int = 64
    adapters: Mapping[str, Any] | None = None  # LoRA experts' factors (merged instead of the bodies)

    def inputs(self) -> dict[str, list]:
        return {t: list(v) for t, v in self.texts.items()}

    def calibration(self, n: int) -> dict[str, list]:
        raise InputError("adapt() has no calibration inputs (inputs of known task); give a pool with splits")


def adapt(method: str, family, pretrained_state: StateDict, expert_bodies: Mapping[str, StateDict],
          heads: Mapping[str, nn.Module], texts: Mapping[str, Sequence[str]], *, steps: int | None = None,
          seed: int = 0, progress: bool = True, adapters: Mapping[str, Any] | None = None, **options: Any) -> AdaptResult:
    """Run the registered adaptive ``method`` (``mergelab methods``) on unlabeled ``texts`` (task -> inputs).

    ``adapters``: task -> LoRA adapter (factored task vector) of the experts that are adapters (a pool's)."""
    info = methods.get(method)
    if info.kind != "adaptive":
        raise InputError(f"unknown adaptive method {method!r}; choose one of {', '.join(methods.available('adaptive'))}")
    params = {**options, **({} if steps is None else {"steps": steps})}
    info.check(params)
    pool = _Inputs(family, pretrained_state, expert_bodies, heads, texts, seed=seed, progress=progress,
                   adapters=adapters)
    return info.fn(pool, **params).result


def adaptive_rows(
    family,
    pretrained_state: StateDict,
    expert_bodies: Mapping[str, StateDict],
    heads: Mapping[str, nn.Module],
    splits: Mapping[str, Mapping[str, Any]],
    expert_acc: Mapping[str, float],
    *,
    rows: Sequence[str] | None = None,
    steps: Mapping[str, int] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    task_arithmetic_scaling: float = 0.3,
    ties_scaling: float = 1.0,
    ties_density: float = 0.2,
    adapt_split: str = "test",
    eval_split: str = "test",
    batch_size: int = 64,
    progress: bool = True,
    adapted: dict[str, AdaptResult] | None = None,
    on_row=None,
    cache: FeatureCache | None = None,
) -> dict[str, MethodResult]:
    """Adapt and evaluate the rows in ``rows`` (default: all of :data:`ADAPTIVE_ROWS`) with the one runner.

    ``splits``: ``{task: {"test": ..., "validation": ...}}``; adaptation reads the inputs of ``adapt_split``,
    the evaluation ``eval_split``. ``steps`` / ``options``: per-method adaptation steps / parameters. The
    transfer rows' static bodies are Task Arithmetic at ``task_arithmetic_scaling`` and TIES at
    ``ties_scaling`` and ``ties_density`` (no validation search here). ``adapted``: filled with each adaptive
    method's :class:`AdaptResult` (e.g. to save SyMerge's heads). ``cache``: a
    :class:`~mergelab.pools.evaluate.FeatureCache` shared with the run's other rows (SyMerge's pseudo-labels
    and the transfer rows' static bodies reuse its features).
    """
    wanted = list(ADAPTIVE_ROWS if rows is None else rows)
    unknown = [r for r in wanted if r not in ADAPTIVE_ROWS]
    if unknown:
        raise InputError(f"unknown adaptive row(s) {unknown}; known: {', '.join(ADAPTIVE_ROWS)}")
    pool = RunPool(family, pretrained_state, dict(expert_bodies), dict(heads), splits, seed=seed,
                   batch_size=batch_size, progress=progress, input_split=adapt_split, cache=cache)
    static = {"task_arithmetic+symerge_heads": {"scaling": task_arithmetic_scaling},
              "ties+symerge_heads": {"density": ties_density, "scaling": ties_scaling}}
    table = []
    for r in TABLE:
        if r.name in static:
            r = replace(r, params=static[r.name])
        elif r.kind == "adaptive" and r.method in (options or {}):
            r = replace(r, params={**r.params, **options[r.method]})
        table.append(r)
    outputs: dict[str, Any] = {}
    by_name = {r.name: r for r in table}
    out = run_rows(pool, [by_name[n] for n in wanted], table=table, expert_acc=expert_acc,
                   eval_split=eval_split, steps=steps, on_row=on_row, outputs=outputs)
    if adapted is not None:
        adapted.update({n: o.result for n, o in outputs.items() if getattr(o, "result", None) is not None})
    return out
