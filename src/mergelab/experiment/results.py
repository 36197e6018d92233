"""The schema of ``results.json`` (docs/results-schema.md) as pydantic models, to write and to read it.

``schema_version`` 2: rows are named for the method they run (``se_merging_*`` = the paper's rule,
``se_prototype_*`` = mergelab's prototype rule) and each row says its ``method``, ``kind`` and the
``data`` it read. Files without a ``schema_version`` are version 1 (row names of mergelab 0.1 before
the one registry: ``se_merging_*`` then ran the prototype rule).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergelab.core.errors import InputError

SCHEMA_VERSION = 2


class RowResult(BaseModel):
    """One row: per-task accuracies (fractions), their mean, the mean of merged / expert accuracy."""

    model_config = ConfigDict(extra="allow")  # method-specific fields: routing (SE), ...

    per_task: dict[str, float]
    average: float
    normalized_average: float | None = None
    seconds: float = 0.0
    params: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] | None = None
    method: str | None = None  # the registry's method (None: a reference row)
    kind: str | None = None  # static, dynamic, adaptive or reference
    data: str | None = None  # what the row read beyond the input: DATA_NEEDS keys joined by "+"


class Results(BaseModel):
    """A benchmark run: the tasks, one :class:`RowResult` per row, splits, experts, environment, timing."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = 1
    benchmark: str
    tasks: list[str]
    methods: dict[str, RowResult]
    splits: dict[str, dict[str, int]] = Field(default_factory=dict)
    experts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)
    seconds_total: float | None = None
    created: str | None = None


def read_results(path: str | Path) -> Results:
    """Read and validate a ``results.json``; a file that is not one is refused, naming the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such results file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        return Results.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InputError(f"{path}: {where}: {err['msg']}") from None
