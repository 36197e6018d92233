"""Batching helpers shared by evaluation and adaptation: length-sorted index batches over inputs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from mergelab.core.errors import InputError


def input_length(x: Any) -> int:
    """A sort key for batching similar inputs together: characters of a text or text pair, else 0."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, (tuple, list)) and all(isinstance(s, str) for s in x):
        return sum(len(s) for s in x)
    return 0


def iter_batches(texts: Sequence[Any], batch_size: int) -> Iterator[list[int]]:
    """Index batches over ``texts`` sorted by length (less padding); callers restore the order."""
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if getattr(texts, "unsorted", False):  # lazily read inputs (images): reading all to sort would cost a pass
        order = list(range(len(texts)))
    else:
        order = sorted(range(len(texts)), key=lambda i: input_length(texts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def progress_bar(total: int, desc: str | None, enabled: bool, unit: str = "ex"):
    """A tqdm bar that leaves no line behind, or ``None`` when progress is off (callers test for it)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
