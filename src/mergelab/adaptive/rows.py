"""Benchmark rows for the adaptive methods.

Row names (stable; the benchmark table and scripts read them):

- ``adamerging_taskwise``:  AdaMerging, one coefficient per task, plain task vectors;
- ``adamerging_layerwise``: AdaMerging, one coefficient per task and parameter tensor;
- ``adamerging_plusplus``:  layer-wise AdaMerging over TIES-processed vectors (AdaMerging++);
- ``symerge``:              SyMerge (layer-wise coefficients + adapted heads, expert self-labels);
- ``task_arithmetic+symerge_heads``, ``ties+symerge_heads``: the static Task Arithmetic / TIES body
  with SyMerge's adapted heads in place of the experts' heads (the paper's transfer experiment).

Protocol: adaptation reads the test split's *texts* only (test-time adaptation); labels are read
afterwards, by the evaluation. Every row's ``seconds`` covers setup (tokenizing, pseudo-labels),
adaptation and evaluation; ``params`` holds the adaptation summary (steps, seconds per step, loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data.tasks import TextTask
from ..errors import InputError
from ..evaluate import FeatureCache, MethodResult, Timer, evaluate_tasks, mean, normalized_average
from ..methods import plan as make_plan
from ..statedict import StateDict, combine, task_vectors
from .adamerging import DEFAULT_ADAMERGING_STEPS, adamerging, ties_vectors
from .result import AdaptResult
from .symerge import DEFAULT_SYMERGE_STEPS, PseudoLabels, symerge

ADAPTIVE_ROWS = (
    "adamerging_taskwise", "adamerging_layerwise", "adamerging_plusplus", "symerge",
    "task_arithmetic+symerge_heads", "ties+symerge_heads",
)
METHODS = ("adamerging_taskwise", "adamerging_layerwise", "adamerging_plusplus", "symerge")


def adapt(
    method: str,
    family,
    pretrained_state: StateDict,
    expert_bodies: Mapping[str, StateDict],
    heads: Mapping[str, nn.Linear],
    texts: Mapping[str, Sequence[str]],
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    vectors: Mapping[str, Mapping[str, Tensor]] | None = None,
    **options: Any,
) -> AdaptResult:
    """Run one adaptive ``method`` (one of :data:`METHODS`) with its defaults on unlabeled ``texts``."""
    if method not in METHODS:
        raise InputError(f"unknown adaptive method {method!r}; choose one of {', '.join(METHODS)}")
    plain = vectors if vectors is not None else task_vectors(pretrained_state, expert_bodies)
    if method == "symerge":
        return symerge(family, pretrained_state, plain, heads, texts, experts=expert_bodies,
                       steps=DEFAULT_SYMERGE_STEPS if steps is None else steps, seed=seed, progress=progress,
                       **options)
    steps = DEFAULT_ADAMERGING_STEPS if steps is None else steps
    if method == "adamerging_plusplus":
        density = options.pop("density", 0.2)
        return adamerging(family, pretrained_state, ties_vectors(plain, density), heads, texts, granularity="layer",
                          steps=steps, seed=seed, progress=progress, name=method, **options)
    granularity = "task" if method == "adamerging_taskwise" else "layer"
    return adamerging(family, pretrained_state, plain, heads, texts, granularity=granularity, steps=steps, seed=seed,
                      progress=progress, name=method, **options)


def _test_texts(splits: Mapping[str, Mapping[str, TextTask]], which: str) -> dict[str, list[str]]:
    out = {}
    for task, s in splits.items():
        if which not in s:
            raise InputError(f"splits[{task!r}] has no {which!r} split; it has {sorted(s)}")
        out[task] = list(s[which].texts)  # texts only: adaptation never sees the labels
    return out


def adaptive_rows(
    family,
    pretrained_state: StateDict,
    expert_bodies: Mapping[str, StateDict],
    heads: Mapping[str, nn.Linear],
    splits: Mapping[str, Mapping[str, TextTask]],
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
    """Adapt and evaluate the rows in ``rows`` (default: all of :data:`ADAPTIVE_ROWS`).

    ``splits``: ``{task: {"validation": TextTask, "test": TextTask, ...}}``; the adaptation uses the
    texts of ``adapt_split`` (test: test-time adaptation; "validation" to choose hyperparameters), the
    evaluation ``eval_split``. ``steps`` / ``options``: per-method overrides (method -> steps / keyword
    arguments of :func:`adapt`). ``adapted``: if given, filled with the :class:`AdaptResult` of each
    method run (e.g. to plug SyMerge's heads into SE-Merging). ``on_row(name, result)`` is called as
    each row is finished. ``cache``: a :class:`~mergelab.evaluate.FeatureCache` shared with the other
    rows of a run: evaluations of a body already run on the same texts (the static Task Arithmetic and
    TIES bodies under SyMerge's heads) and SyMerge's pseudo-labels (each expert on its own task's
    texts: the ``individual`` row's forward) reuse its features.
    """
    wanted = list(ADAPTIVE_ROWS if rows is None else rows)
    unknown = [r for r in wanted if r not in ADAPTIVE_ROWS]
    if unknown:
        raise InputError(f"unknown adaptive row(s) {unknown}; known: {', '.join(ADAPTIVE_ROWS)}")
    tasks = list(expert_bodies)
    texts = _test_texts(splits, adapt_split)
    evaluation = {t: splits[t][eval_split] for t in tasks}
    steps = dict(steps or {})
    options = {k: dict(v) for k, v in (options or {}).items()}
    vectors = task_vectors(pretrained_state, expert_bodies)
    adapted = {} if adapted is None else adapted
    results: dict[str, MethodResult] = {}

    def finish(name: str, per_task: dict[str, float], seconds: float, params: dict[str, Any]) -> None:
        results[name] = MethodResult(per_task, mean(list(per_task.values())),
                                     normalized_average(per_task, expert_acc), seconds, params)
        if on_row is not None:
            on_row(name, results[name])

    needed = [m for m in METHODS if m in wanted]
    if any(r.endswith("+symerge_heads") for r in wanted) and "symerge" not in needed:
        needed.append("symerge")
    for method in needed:
        with Timer() as tm:
            opts = options.get(method, {})
            if method == "symerge" and cache is not None and "pseudo_labels" not in opts and opts.get("loss", "selflabel") == "selflabel":
                opts = {**opts, "pseudo_labels": _cached_pseudo_labels(family, expert_bodies, heads, texts, cache,
                                                                        batch_size)}
            res = adapt(method, family, pretrained_state, expert_bodies, heads, texts, steps=steps.get(method),
                        seed=seed, progress=progress, vectors=vectors, **opts)
            adapted[method] = res
            per_task = evaluate_tasks(family, res.body_fn(), res.heads, evaluation, batch_size=batch_size,
                                      progress=progress, label=method) if method in wanted else None
        if per_task is not None:
            finish(method, per_task, tm.seconds, res.summary())

    if "symerge" in adapted:
        sy = adapted["symerge"]
        transfers = {
            "task_arithmetic+symerge_heads": ("task_arithmetic", {"scaling": task_arithmetic_scaling}),
            "ties+symerge_heads": ("ties", {"scaling": ties_scaling, "density": ties_density}),
        }
        for row, (method, params) in transfers.items():
            if row not in wanted:
                continue
            with Timer() as tm:
                p = make_plan(method, pretrained_state, expert_bodies, **params)
                body = combine(pretrained_state, p.vectors, p.coefficients)
                per_task = evaluate_tasks(family, body, sy.heads, evaluation, batch_size=batch_size,
                                          progress=progress, label=row, cache=cache)
            finish(row, per_task, tm.seconds, {**params, "heads": "symerge", "symerge_steps": sy.steps})
    return {r: results[r] for r in wanted if r in results}


@torch.no_grad()
def _cached_pseudo_labels(family, experts, heads, texts, cache: FeatureCache, batch_size: int) -> dict[str, PseudoLabels]:
    """SyMerge's pseudo-labels (each expert's hard label and confidence on its own task's texts) from the
    run's feature cache: the same numbers as :func:`~mergelab.adaptive.symerge.expert_pseudo_labels`,
    without a second expert pass when the ``individual`` row already ran."""
    out = {}
    for task, seq in texts.items():
        out[task] = PseudoLabels.from_logits(heads[task](cache.features(family, experts[task], seq,
                                                                         batch_size=batch_size)))
    return out
