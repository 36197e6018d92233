"""Classification tasks (the one task type of every family) and their fixed, seeded splits.

A :class:`TaskData` is a list of inputs with integer labels, a stable id per example, an optional group
per example (the speech a paragraph comes from, the movie a review is about...) and a citation string
saying where the data comes from. Inputs are texts, text pairs ``(text, text)`` (GLUE's MNLI, QNLI...),
images (PIL, or a :class:`LazyColumn` of a ``datasets.Dataset`` decoded on demand) or tensors (family
``torch``). Every loader of :mod:`mergelab.pools.data.loaders` returns one, for the benchmarks, a user's
task files and the pool YAMLs alike. ``TextTask`` is its older name, kept as an alias.

:func:`split_task` cuts a task into ``train`` / ``validation`` / ``test``:

- deterministic: the same task and seed always give the same split, on any machine;
- stratified: each split's class proportions follow the task's (to within one example per class);
- grouped when the task has ``groups``: a group's examples all fall into one split, never two;
- nested: the test split is drawn first, then validation, then train, so asking for a larger or smaller
  training set never changes the validation or test examples.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mergelab.core.errors import InputError

SPLITS = ("train", "validation", "test")


class LazyColumn(Sequence):
    """One column of a ``datasets.Dataset``, read (and images decoded) only when an item is asked for:
    a vision test set held as decoded images would take tens of GB of memory."""

    unsorted = True  # batching must not read every item to sort by length

    def __init__(self, dataset: Any, column: str, rows: Sequence[int] | None = None) -> None:
        self.dataset, self.column = dataset, column
        self.rows = rows if rows is not None else range(len(dataset))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return LazyColumn(self.dataset, self.column, self.rows[i])
        return self.dataset[self.rows[i]][self.column]

    def take(self, indices: Sequence[int]) -> LazyColumn:
        """The items at ``indices``, still unread."""
        return LazyColumn(self.dataset, self.column, [self.rows[i] for i in indices])

    def cache_key(self) -> str:
        """Names the items without reading them: the dataset's fingerprint, the column and the rows."""
        fp = getattr(self.dataset, "_fingerprint", None) or f"id{id(self.dataset)}"
        return f"{fp}:{self.column}:{list(self.rows)}"


def _is_input(x: Any) -> bool:
    """A text, a text pair, or a non-text input (image, tensor): anything but a number, a bool or None."""
    if isinstance(x, tuple):
        return len(x) == 2 and all(isinstance(p, str) for p in x)
    return x is not None and not isinstance(x, (bool, int, float))


@dataclass
class TaskData:
    """A classification task: inputs (texts, text pairs, images or tensors) and integer labels.

    ``labels[i]`` is an index into ``label_names``. ``ids`` are unique within the task and stable across
    runs (derived from the source: file name, row number, synset offset...); when left out they are
    ``"<name>-<position>"``. ``groups`` (optional) ties examples that must never be split apart.
    ``texts`` is another name of ``inputs`` (the text families' word for them).
    """

    name: str
    inputs: Sequence[Any]
    labels: list[int]
    ids: list[str] | None = None
    groups: list[str] | None = None
    label_names: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.inputs)
        if len(self.labels) != n:
            raise InputError(f"task {self.name!r}: {n} texts but {len(self.labels)} labels")
        if self.ids is None:
            self.ids = [f"{self.name}-{i}" for i in range(n)]
        elif len(self.ids) != n:
            raise InputError(f"task {self.name!r}: {n} texts but {len(self.ids)} ids")
        if self.groups is not None and len(self.groups) != n:
            raise InputError(f"task {self.name!r}: {n} texts but {len(self.groups)} groups")
        lazy = isinstance(self.inputs, LazyColumn)  # never read every image to check it
        for i, label in enumerate(self.labels):
            if not lazy and not _is_input(self.inputs[i]):
                raise InputError(
                    f"task {self.name!r}: example {self.ids[i]!r}: input is {type(self.inputs[i]).__name__}, "
                    "not a text, a text pair, an image or a tensor"
                )
            if isinstance(label, bool) or not isinstance(label, int):
                raise InputError(
                    f"task {self.name!r}: example {self.ids[i]!r}: label {label!r} is not an int"
                )
        if not self.label_names:
            top = max(self.labels, default=-1)
            self.label_names = [str(i) for i in range(top + 1)]
        bad = [(i, y) for i, y in enumerate(self.labels) if not 0 <= y < len(self.label_names)]
        if bad:
            i, y = bad[0]
            raise InputError(
                f"task {self.name!r}: example {self.ids[i]!r} has label {y}, outside 0..{len(self.label_names) - 1} "
                f"({len(self.label_names)} label names); {len(bad)} such example(s)"
            )
        if len(set(self.ids)) != n:
            dup = next(k for k, c in Counter(self.ids).items() if c > 1)
            raise InputError(f"task {self.name!r}: id {dup!r} occurs more than once; ids must be unique")

    @property
    def texts(self) -> Sequence[Any]:
        return self.inputs

    # ------------------------------------------------------------------ helpers
    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}

    def subset(self, indices: Sequence[int], name: str | None = None) -> TaskData:
        """The examples at ``indices`` (in that order), with the same label names and source."""
        indices = list(indices)
        return TaskData(
            name=self.name if name is None else name,
            inputs=self.inputs.take(indices) if isinstance(self.inputs, LazyColumn)
            else [self.inputs[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            ids=[self.ids[i] for i in indices],  # type: ignore[index]
            groups=None if self.groups is None else [self.groups[i] for i in indices],
            label_names=list(self.label_names),
            source=self.source,
        )

    def sample(self, n: int, seed: int = 0) -> TaskData:
        """``n`` examples drawn without replacement, stratified by label and seeded (the whole task when it
        has ``n`` or fewer), in source order. A prefix of a split would not do: sources are often ordered
        by class or by document (BBC's folders, a movie's reviews)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"task {self.name!r}: a sample size must be a positive int, got {n!r}")
        if n >= len(self):
            return self
        order = _stratified_order(list(zip(range(len(self)), self.labels, strict=True)),
                                  random.Random(f"mergelab-sample:{seed}:{self.name}"))
        return self.subset(sorted(order[:n]))  # type: ignore[type-var]

    def validate(self, min_classes: int = 2) -> None:
        """Raise :class:`~mergelab.core.errors.InputError` (a ``ValueError``) if the task cannot be learned."""
        if len(self) == 0:
            raise InputError(f"task {self.name!r} is empty: it has no examples")
        present = sorted(set(self.labels))
        if len(present) < min_classes:
            only = ", ".join(self.label_names[i] for i in present)
            raise InputError(
                f"task {self.name!r} has a single class ({only}) in its {len(self)} examples; "
                f"a classification task needs at least {min_classes}"
            )

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.class_counts().items())
        groups = "" if self.groups is None else f", {len(set(self.groups))} groups"
        return f"{self.name}: {len(self)} examples{groups}; {counts}"


def _stratified_order(keys_labels: Sequence[tuple[object, int]], rng: random.Random) -> list[object]:
    """Order items so that every contiguous run of the order is (nearly) stratified by label.

    Within each class the items are shuffled; the k-th of n items of a class gets position key
    (k + u) / n with u uniform in [0, 1); sorting by that key interleaves the classes in proportion,
    so any slice of length m holds about m * p_c items of class c (within one per class).
    """
    by_class: dict[int, list[object]] = defaultdict(list)
    for key, label in keys_labels:
        by_class[label].append(key)
    scored: list[tuple[float, int, object]] = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n = len(members)
        for k, key in enumerate(members):
            scored.append(((k + rng.random()) / n, label, key))
    scored.sort(key=lambda t: (t[0], t[1]))
    return [key for _, _, key in scored]


TextTask = TaskData  # the older name of the one task type


def split_task(
    task: TaskData,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
) -> dict[str, TaskData]:
    """Fixed seeded ``{"train", "validation", "test"}`` splits of ``task``.

    Without groups the splits have exactly the sizes asked for (the sum may not exceed the task's size).
    With groups whole groups are dealt out (test first, then validation, then train) until each split
    holds at least its size, then each split is thinned (stratified) to its size; a split may end up
    smaller than asked when the task runs out of groups, never larger, and never empty.
    """
    task.validate()
    for label, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"task {task.name!r}: {label} must be a positive int, got {n!r}")
    sizes = {"test": n_test, "validation": n_val, "train": n_train}
    rng = random.Random(f"mergelab-split:{seed}")

    if task.groups is None:
        total = n_train + n_val + n_test
        if total > len(task):
            raise InputError(
                f"task {task.name!r} has {len(task)} examples; {n_train} train + {n_val} validation + "
                f"{n_test} test = {total} asked"
            )
        order = _stratified_order([(i, y) for i, y in enumerate(task.labels)], rng)
        out: dict[str, list[int]] = {}
        start = 0
        for split in ("test", "validation", "train"):
            out[split] = order[start : start + sizes[split]]  # type: ignore[assignment]
            start += sizes[split]
    else:
        members: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(task.groups):
            members[g].append(i)
        # a group's label for stratification: its most common label (ties: smallest index)
        group_label = {
            g: min(Counter(task.labels[i] for i in idx).items(), key=lambda kv: (-kv[1], kv[0]))[0]
            for g, idx in members.items()
        }
        group_order = _stratified_order(sorted(group_label.items()), rng)
        out = {s: [] for s in sizes}
        pos = 0
        for split in ("test", "validation", "train"):
            while pos < len(group_order) and len(out[split]) < sizes[split]:
                out[split].extend(members[group_order[pos]])  # type: ignore[index]
                pos += 1
        for split in out:
            idx = out[split]
            if len(idx) > sizes[split]:
                thin = _stratified_order([(i, task.labels[i]) for i in sorted(idx)], rng)
                out[split] = thin[: sizes[split]]  # type: ignore[assignment]
        empty = [s for s in ("train", "validation", "test") if not out[s]]
        if empty:
            raise InputError(
                f"task {task.name!r}: {len(members)} groups are too few for the sizes asked "
                f"({n_train}/{n_val}/{n_test}); split(s) {', '.join(empty)} got no group"
            )

    result = {}
    for split in SPLITS:
        idx = sorted(out[split])  # keep the source order inside a split
        result[split] = task.subset(idx)
    return result

