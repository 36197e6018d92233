"""The registry of static merging methods.

A method is a small function ``fn(vectors, **params) -> MergePlan`` registered by name with
:func:`register`. It receives the task vectors tau_t (one :class:`~mergelab.statedict.TaskVector`
per task) and returns a :class:`MergePlan`: the (possibly pre-processed) per-task vectors and one
coefficient per task. Applying a plan is always equation (1) of :mod:`mergelab.statedict`, so the
same plan can be reused with learned (adaptive) or per-sample (dynamic) coefficients.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .. import kernels
from ..errors import InputError
from ..statedict import StateDict, TaskVector, combine, task_vectors

_REGISTRY: dict[str, MethodInfo] = {}


@dataclass(frozen=True)
class MergePlan:
    """Per-task vectors and their static coefficients: theta = theta_0 + sum_t coefficients[t] * vectors[t]."""

    method: str
    vectors: dict[str, TaskVector]
    coefficients: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)

    def apply(self, pretrained: StateDict) -> dict[str, Tensor]:
        return combine(pretrained, self.vectors, self.coefficients)

    @property
    def tasks(self) -> list[str]:
        return list(self.vectors)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable[..., MergePlan]
    summary: str
    params: dict[str, Any]  # name -> default

    def describe(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({ps}): {self.summary}"


def register(name: str) -> Callable[[Callable[..., MergePlan]], Callable[..., MergePlan]]:
    """Decorator: register ``fn(vectors, **params) -> MergePlan`` under ``name``."""

    def deco(fn: Callable[..., MergePlan]) -> Callable[..., MergePlan]:
        if name in _REGISTRY:
            raise RuntimeError(f"merge method {name!r} registered twice")
        sig = inspect.signature(fn)
        params = {
            p.name: p.default
            for p in list(sig.parameters.values())[1:]
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = MethodInfo(name, fn, doc.split("\n\n")[0].replace("\n", " "), params)
        return fn

    return deco


def available() -> list[str]:
    """Names of the registered static methods."""
    return sorted(_REGISTRY)


def get(name: str) -> MethodInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown merge method {name!r}; available: {', '.join(available())}") from None


def plan(method: str, pretrained: StateDict, experts: Mapping[str, StateDict], **params: Any) -> MergePlan:
    """Check compatibility, compute task vectors and run ``method``'s pre-processing: a MergePlan."""
    info = check_params(method, params)
    vectors = task_vectors(pretrained, experts)
    return info.fn(vectors, **params)


def check_params(method: str, params: Mapping[str, Any]) -> MethodInfo:
    """The method's info, after refusing parameters it does not have."""
    info = get(method)
    unknown = sorted(set(params) - set(info.params))
    if unknown:
        raise InputError(
            f"method {method!r} has no parameter(s) {unknown}; its parameters are {sorted(info.params)}"
        )
    return info


def merge(method: str, pretrained: StateDict, experts: Mapping[str, StateDict], **params: Any) -> dict[str, Tensor]:
    """Merge ``experts`` (task name -> state dict) into one state dict with ``method``.

    >>> merged = merge("ties", pre, {"a": sd_a, "b": sd_b}, density=0.2)  # doctest: +SKIP
    """
    merged = plan(method, pretrained, experts, **params).apply(pretrained)
    for key, t in merged.items():
        if t.is_floating_point():
            kernels.require_finite_result(key, t, f"merge {method!r} with parameters {params!r}")
    return merged


# ---------------------------------------------------------------- parameter checks


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as float or raise ValueError naming ``name`` and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"parameter {name!r} must be a finite number, got {value!r}")
    v = float(value)
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        raise InputError(f"parameter {name!r} must be in {lo or '(-inf'}, {hi or 'inf)'}, got {value!r}")
    return v


def per_task_values(name: str, value: Any, tasks: list[str], **range_kw: Any) -> dict[str, float]:
    """A number for all tasks, or a mapping task -> number covering exactly ``tasks``."""
    if isinstance(value, Mapping):
        missing = [t for t in tasks if t not in value]
        extra = [t for t in value if t not in tasks]
        if missing or extra:
            raise InputError(
                f"parameter {name!r}: per-task values must name exactly the tasks {tasks}; "
                f"missing {missing}, unknown {extra}"
            )
        return {t: check_number(f"{name}[{t}]", value[t], **range_kw) for t in tasks}
    v = check_number(name, value, **range_kw)
    return dict.fromkeys(tasks, v)
