"""Evaluation: per-task accuracy of a merged body, normalised accuracy, coefficient search.

The standard protocol of the merging literature (Ilharco et al. 2023; Yadav et al. 2023): the merged
body is evaluated on each task's test set with that task's own classification head. The
*normalised accuracy* of a task is merged accuracy / the task's expert accuracy (Yang et al.,
AdaMerging, ICLR 2024, Sec. 5), averaged over tasks.

Coefficient search picks the candidate with the best average *validation* accuracy; the test split
is only read to report the chosen candidate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .data.tasks import TextTask
from .errors import InputError
from .families.text import TextClassifierFamily, accuracy

BodyParams = Mapping[str, Tensor] | None
# a body for every task (one merged model), or a function task -> body (experts, dynamic methods)
BodyForTask = BodyParams | Callable[[str], BodyParams]


@dataclass
class MethodResult:
    """One row of a results table. Accuracies are fractions in [0, 1]."""

    per_task: dict[str, float]
    average: float
    normalized_average: float | None = None
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. SE-Merging's routing summary

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "per_task": self.per_task,
            "average": self.average,
            "normalized_average": self.normalized_average,
            "seconds": round(self.seconds, 3),
            "params": self.params,
        }
        if self.validation:
            out["validation"] = self.validation
        out.update(self.extra)
        return out


def mean(values: Sequence[float]) -> float:
    if not values:
        raise InputError("average of no values")
    return float(sum(values) / len(values))


def normalized_average(per_task: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """mean_t per_task[t] / reference[t]: accuracy relative to each task's expert."""
    missing = [t for t in per_task if t not in reference]
    if missing:
        raise InputError(f"no expert accuracy for task(s) {missing}")
    return mean([per_task[t] / reference[t] if reference[t] > 0 else 0.0 for t in per_task])


def evaluate_tasks(
    family: TextClassifierFamily,
    body: BodyForTask,
    heads: Mapping[str, nn.Linear],
    splits: Mapping[str, TextTask],
    *,
    batch_size: int = 64,
    progress: bool = False,
    label: str = "",
) -> dict[str, float]:
    """Accuracy per task: each task's texts through ``body`` (or ``body(task)``) and that task's head."""
    out: dict[str, float] = {}
    for task, split in splits.items():
        if task not in heads:
            raise InputError(f"no head for task {task!r}; heads exist for {sorted(heads)}")
        n_out = heads[task].out_features
        bad = [i for i, y in enumerate(split.labels) if not 0 <= y < n_out]
        if bad:
            i = bad[0]
            raise InputError(f"task {task!r}: example {split.ids[i]!r} has label {split.labels[i]}, outside the "
                             f"head's classes 0..{n_out - 1} ({len(bad)} such example(s)); was the head trained "
                             f"on this task's label set?")
        params = body(task) if callable(body) else body
        out[task] = accuracy(family, split.texts, split.labels, heads[task], params, batch_size=batch_size,
                             progress=progress, desc=f"{label} {task}".strip())
    return out


def search(
    candidates: Sequence[Any],
    score: Callable[[Any], float],
) -> tuple[Any, list[tuple[Any, float]]]:
    """Evaluate ``score`` (validation accuracy) for each candidate; return the best and all scores.

    Ties go to the earlier candidate, so list candidates in order of preference.
    """
    if not candidates:
        raise InputError("coefficient search needs at least one candidate")
    scores = [(c, float(score(c))) for c in candidates]
    best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))
    return scores[best][0], scores


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
