"""Evaluation: per-task accuracy of a merged body, normalised accuracy, coefficient search.

The standard protocol of the merging literature (Ilharco et al. 2023; Yadav et al. 2023): the merged
body is evaluated on each task's test set with that task's own classification head. The
*normalised accuracy* of a task is merged accuracy / the task's expert accuracy (Yang et al.,
AdaMerging, ICLR 2024, Sec. 5), averaged over tasks.

Coefficient search picks the candidate with the best average *validation* accuracy; the test split
is only read to report the chosen candidate.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.core.errors import InputError
from mergelab.pools.data.tasks import TaskData
from mergelab.pools.families.text import TextClassifierFamily, accuracy, embed, head_classes

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


def fingerprint(params: BodyParams) -> str:
    """A content hash of a body's parameters (``None``: the family's own weights): equal tensors, equal hash."""
    if params is None:
        return "own-weights"
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(params):
        t = params[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _digest_item(h, x: Any) -> None:
    if isinstance(x, str):
        h.update(b"s" + x.encode())
    elif isinstance(x, tuple):
        h.update(b"(")
        for part in x:
            _digest_item(h, part)
        h.update(b")")
    elif isinstance(x, Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"t{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif hasattr(x, "tobytes") and hasattr(x, "size") and hasattr(x, "mode"):  # a PIL image
        h.update(f"i{x.mode}{x.size}".encode())
        h.update(x.tobytes())
    else:
        raise InputError(f"cannot key the feature cache on an input of type {type(x).__name__}")
    h.update(b"\0")


def input_digest(inputs: Sequence[Any]) -> str:
    """A content hash of a task's inputs (texts, text pairs, tensors, images); a lazily read column of a
    ``datasets.Dataset`` is named by its dataset fingerprint and rows, without decoding an image."""
    h = hashlib.blake2b(digest_size=16)
    if hasattr(inputs, "cache_key"):
        h.update(b"lazy" + inputs.cache_key().encode())
    else:
        for x in inputs:
            _digest_item(h, x)
    return h.hexdigest()


class FeatureCache:
    """Pooled features of (body, texts), computed once per benchmark run and held in memory.

    Keyed by a content hash of the body's tensors and of the texts, so rows that run the same body on
    the same texts (a static merge evaluated again with SyMerge's heads, the experts whose outputs are
    also SyMerge's pseudo-labels) share one forward pass. Features are deterministic given the body
    and texts, so a hit returns exactly what a new pass would.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[str, str], Tensor] = {}
        self.hits = 0
        self.misses = 0

    def features(self, family, params: BodyParams, texts: Sequence[str], *, batch_size: int = 64,
                 progress: bool = False, desc: str | None = None, body_key: str | None = None) -> Tensor:
        """``embed(family, texts, params)``, or the stored result; ``body_key``: ``fingerprint(params)`` if
        the caller has it already."""
        key = (body_key or fingerprint(params), input_digest(texts))
        if key in self._store:
            self.hits += 1
            return self._store[key]
        self.misses += 1
        feats = embed(family, texts, params, batch_size, progress, desc)
        self._store[key] = feats
        return feats


def evaluate_tasks(
    family: TextClassifierFamily,
    body: BodyForTask,
    heads: Mapping[str, nn.Linear],
    splits: Mapping[str, TaskData],
    *,
    batch_size: int = 64,
    progress: bool = False,
    label: str = "",
    cache: FeatureCache | None = None,
) -> dict[str, float]:
    """Accuracy per task: each task's texts through ``body`` (or ``body(task)``) and that task's head.

    With ``cache``, features already computed for the same body and texts are reused."""
    out: dict[str, float] = {}
    shared_key = fingerprint(body) if cache is not None and not callable(body) else None
    for task, split in splits.items():
        if task not in heads:
            raise InputError(f"no head for task {task!r}; heads exist for {sorted(heads)}")
        n_out = head_classes(heads[task])
        bad = [i for i, y in enumerate(split.labels) if not 0 <= y < n_out] if n_out is not None else []
        if bad:
            i = bad[0]
            raise InputError(f"task {task!r}: example {split.ids[i]!r} has label {split.labels[i]}, outside the "
                             f"head's classes 0..{n_out - 1} ({len(bad)} such example(s)); was the head trained "
                             f"on this task's label set?")
        params = body(task) if callable(body) else body
        desc = f"{label} {task}".strip()
        feats = None
        if cache is not None and len(split) > 0:
            feats = cache.features(family, params, split.texts, batch_size=batch_size, progress=progress, desc=desc,
                                   body_key=shared_key)
        out[task] = accuracy(family, split.texts, split.labels, heads[task], params, batch_size=batch_size,
                             progress=progress, desc=desc, features=feats)
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
