"""Weak experts: what one degraded expert costs each merging method, on its own task and on the others.

One task's expert is fine-tuned again with a weaker recipe: fewer steps, and a seeded share of its training
labels shuffled (:func:`shuffle_labels`). Being a different recipe on different labels, it has its own
expert-cache entry (the cache key hashes the recipe and the training labels). The same rows then run on the
benchmark's pool twice, with the original experts and with the weak one in place (its body and its head),
and the table compares each row's average and per-task accuracy. SyMerge (Jung et al., arXiv 2412.19098)
trains on each expert's pseudo-labels, so a weak expert teaches it its own mistakes; the static merges
only carry its task vector and its head.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

from mergelab.core.errors import InputError
from mergelab.pools.data.tasks import TaskData

WEAK_ROWS = ("task_arithmetic_0.3", "ties", "se_prototype_task_arithmetic_fast", "symerge")


def shuffle_labels(train: TaskData, fraction: float, seed: int = 0) -> tuple[TaskData, int]:
    """``train`` with the labels of ``round(fraction * n)`` seeded examples permuted among those examples,
    and how many labels that actually changed (a permutation leaves some in place)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise InputError(f"the share of shuffled training labels must be in [0, 1], got {fraction!r}")
    rng = random.Random(f"mergelab-weak:{seed}:{train.name}")
    chosen = sorted(rng.sample(range(len(train)), round(fraction * len(train))))
    donors = chosen[:]
    rng.shuffle(donors)
    labels = list(train.labels)
    for i, j in zip(chosen, donors, strict=True):
        labels[i] = train.labels[j]
    changed = sum(labels[i] != train.labels[i] for i in chosen)
    return dataclasses.replace(train, labels=labels,
                               source=f"{train.source} (labels of {len(chosen)} examples shuffled, seed {seed})"), changed


def with_expert(pool, task: str, expert) -> Any:
    """``pool`` (a :class:`~mergelab.pools.pool.ModelPool`) with ``task``'s expert body and head replaced."""
    if task not in pool.experts:
        raise InputError(f"--weak-task {task!r}: not a task of {pool.name!r} ({', '.join(pool.experts)})")
    return dataclasses.replace(pool, experts={**pool.experts, task: expert.body_state},
                               heads={**pool.heads, task: expert.head.eval()},
                               expert_meta={**pool.expert_meta, task: dict(expert.meta)})


def weak_expert_study(spec, task: str, *, steps: int, shuffle: float, seed: int | None = None,
                      rows: Sequence[str] = WEAK_ROWS, cache_dir=None, progress: bool = True, console=None) -> dict:
    """Run ``rows`` on ``spec``'s pool with its experts, then with ``task``'s expert replaced by a weak one
    (``steps`` fine-tuning steps, ``shuffle`` of its training labels shuffled); the two results and their
    differences. ``seed`` draws another weak expert: the shuffle's seed and the weak fine-tuning's (default:
    the benchmark's seed for the shuffle and its recipe's for the fine-tuning, as before the option existed);
    the rows themselves keep the benchmark's seed."""
    from mergelab.experiment.rows import resolve
    from mergelab.experiment.runner import load_context, run_pool
    from mergelab.pools.finetune import get_or_train_expert

    if task not in spec.task_names:
        raise InputError(f"--weak-task {task!r}: not a task of {spec.name!r} ({', '.join(spec.task_names)})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"--weak-steps must be a positive integer, got {steps!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InputError(f"--weak-seed must be a non-negative integer, got {seed!r}")
    shuffle_labels(TaskData("check", ["x"], [0]), shuffle)  # a bad share is refused before any work
    chosen = resolve(rows)
    pool = load_context(spec, cache_dir=cache_dir, progress=progress, console=console)
    kwargs: dict[str, Any] = dict(lambdas=spec.lambdas, seed=spec.seed, search_per_task=spec.search_per_task,
                                  steps=dict(spec.adaptive_steps) if spec.adaptive_steps else None,
                                  progress=progress, console=console)
    normal = run_pool(pool, chosen, **kwargs)
    train, changed = shuffle_labels(pool.splits[task]["train"], shuffle, spec.seed if seed is None else seed)
    recipe = spec.recipe.replace(steps=steps) if seed is None else spec.recipe.replace(steps=steps, seed=seed)
    expert = get_or_train_expert(pool.family, train, recipe, cache_dir=cache_dir, progress=progress)
    weak = run_pool(with_expert(pool, task, expert), chosen, **kwargs)
    names = ["individual", *[r.name for r in chosen]]
    table = {}
    for name in names:
        a, b = normal["methods"][name], weak["methods"][name]
        table[name] = {"average": a["average"], "average_weak": b["average"],
                       "per_task": a["per_task"], "per_task_weak": b["per_task"],
                       "others_average": _others(a["per_task"], task), "others_average_weak": _others(b["per_task"], task)}
    return {"benchmark": spec.name, "weak_task": task, "weak_recipe": recipe.to_dict(), "shuffle": shuffle,
            "weak_seed": seed,
            "labels_shuffled": round(shuffle * len(train)), "labels_changed": changed, "n_train": len(train),
            "weak_expert_cache_hit": bool(expert.meta.get("cache_hit")), "rows": table,
            "tasks": normal["tasks"], "test": normal["splits"]}


def _others(per_task: Mapping[str, float], task: str) -> float:
    rest = [v for t, v in per_task.items() if t != task]
    return sum(rest) / len(rest) if rest else float("nan")


def weak_table(study: Mapping) -> str:
    """Markdown: per row, the average with the original and the weak expert, the weak task's accuracy, and the
    other tasks' average and each other task's change."""
    task = study["weak_task"]
    others = [t for t in study["tasks"] if t != task]
    lines = [f"| row | average | with weak {task} | {task} | with weak | other tasks' average | with weak | "
             + " | ".join(f"{t} change" for t in others) + " |", "|---|" + "---:|" * (6 + len(others))]
    for name, r in study["rows"].items():
        p, q = r["per_task"], r["per_task_weak"]
        lines.append(f"| {name} | {100 * r['average']:.1f} | {100 * r['average_weak']:.1f} | {100 * p[task]:.1f} | "
                     f"{100 * q[task]:.1f} | {100 * r['others_average']:.1f} | {100 * r['others_average_weak']:.1f} | "
                     + " | ".join(f"{100 * (q[t] - p[t]):+.1f}" for t in others) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["WEAK_ROWS", "shuffle_labels", "weak_expert_study", "weak_table", "with_expert"]
