"""The one registry of merging methods: static, dynamic and adaptive.

Every method is equation (1) of :mod:`mergelab.core.statedict`, theta = theta_0 + sum_t lambda_t tau_t; the
kinds differ in where lambda comes from (docs/architecture.md):

- **static** (:func:`register`): ``fn(vectors, **params) -> MergePlan``, the (possibly pre-processed)
  per-task vectors and one number per task. Applying a plan is always the merge formula, so the same plan
  serves learned (adaptive) or per-sample (dynamic) coefficients, and streamed merges.
- **dynamic** and **adaptive** (:func:`register_method`): ``run(pool, **params) -> MethodOutput``,
  per-sample features (dynamic) or an adapted body and heads (adaptive), on a pool that offers what
  :class:`PoolView` lists.

An entry also says which data it reads (:data:`DATA_NEEDS`) and has typed parameters (a pydantic model:
defaults, and a validation error that names the field).

A static method may also declare its per-tensor form, ``register(name, stream=form)``: ``form(plan)`` turns
the plan of the method's parameters (computed on empty task vectors, which also validates them)
into a :class:`~mergelab.core.kernels.SliceForm` of shared kernels. :func:`merge` and the streamed merge
(:func:`mergelab.methods.streaming.stream_merge`) then run that form tensor by tensor, slice by slice: the
in-memory merge needs the inputs plus one model, and the streamed merge is bit-identical to it. A
method without a form merges in memory through its plan and cannot be streamed.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from torch import Tensor

from mergelab.core import kernels
from mergelab.core.errors import InputError, ParameterError
from mergelab.core.kernels import SliceForm
from mergelab.core.lora import LoraTaskVector
from mergelab.core.statedict import StateDict, TaskVector, check_compatible, combine, task_vectors

Kind = Literal["static", "dynamic", "adaptive"]
KINDS: tuple[str, ...] = ("static", "dynamic", "adaptive")
# what a method reads beyond the experts, the pretrained model and the input it is asked about
DATA_NEEDS: dict[str, str] = {
    "nothing": "nothing beyond the input",
    "unlabeled": "unlabeled inputs of the evaluated tasks",
    "calibration": "a few inputs per task whose task is known",
    "validation": "labeled validation data",
}

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


class PoolView(Protocol):
    """What a dynamic or adaptive method may read from a pool (the runner's pool implements it).

    ``inputs()`` are the evaluated split's inputs per task, unlabeled; ``calibration(n)`` ``n``
    validation inputs per task (inputs of known task); ``expert_features(task)`` the expert's pooled
    features on ``inputs()[task]`` (a forward pass the run may already have made).

    Optional: ``adapters``, task -> :class:`~mergelab.core.lora.LoraTaskVector` for the experts that are LoRA
    adapters (their ``bodies`` are then W0 + s B A, for the expert's own forward passes); the methods merge
    the factors (:func:`pool_experts`).
    """

    family: Any
    pretrained: StateDict
    bodies: Mapping[str, StateDict]
    heads: Mapping[str, Any]
    seed: int
    progress: bool
    batch_size: int

    def inputs(self) -> dict[str, Sequence[Any]]: ...

    def calibration(self, n: int) -> dict[str, Sequence[Any]]: ...

    def expert_features(self, task: str) -> Tensor: ...


@dataclass
class MethodOutput:
    """What a dynamic or adaptive method returns for the runner to evaluate.

    ``features``: per task, the pooled features of ``pool.inputs()[task]`` in input order (a dynamic
    method); else ``body``: one state dict for every task or a function task -> state dict (an adaptive
    method's merged body). ``heads``: task -> head replacing the experts' heads (SyMerge's adapted heads).
    ``params``: the parameters as run (defaults filled in); ``extra``: what the results keep beside the
    accuracies (routing summary), JSON-serialisable.
    """

    features: dict[str, Tensor] | None = None
    body: Any = None
    heads: Mapping[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    result: Any = None  # the method's own object (an AdaptResult; a dynamic row's SEMerging), for callers that save or probe it


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable[..., Any]  # static: (vectors, **params) -> MergePlan; dynamic/adaptive: (pool, **params) -> MethodOutput
    summary: str
    params: dict[str, Any]  # name -> default
    kind: str = "static"
    needs: str = "nothing"
    model: type[BaseModel] | None = None  # the typed parameters
    stream: Callable[[MergePlan], SliceForm] | None = None  # static: the per-tensor form, if the method has one

    def describe(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({ps}): {self.summary}"

    def check(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Refuse unknown parameters and values of the wrong type, naming the field; the defaults filled in."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise InputError(
                f"method {self.name!r} has no parameter(s) {unknown}; its parameters are {sorted(self.params)}"
            )
        if self.model is not None and self.kind != "static":
            # static methods check their own values (ranges, per-task mappings) with messages naming the field;
            # their signature model documents the types
            try:
                self.model.model_validate(dict(params))
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ParameterError(str(err["loc"][0]), f"method {self.name!r}: parameter {where!r}: {err['msg']}, "
                                     f"got {err.get('input')!r}") from None
        return {**self.params, **params}


def _signature_model(name: str, fn: Callable[..., Any]) -> tuple[dict[str, Any], type[BaseModel]]:
    """Defaults and a pydantic model from ``fn``'s keyword parameters (all but the first)."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: validate that field as Any
        hints = {}
    fields: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        defaults[p.name] = p.default
        fields[p.name] = (hints.get(p.name, Any), p.default)
    model = create_model(f"{name}_params", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                         **fields)
    return defaults, model


def register(name: str, *, stream: Callable[[MergePlan], SliceForm] | None = None
             ) -> Callable[[Callable[..., MergePlan]], Callable[..., MergePlan]]:
    """Decorator: register the static method ``fn(vectors, **params) -> MergePlan`` under ``name``.

    ``stream(plan) -> SliceForm``: the method's per-tensor form (see the module docstring); ``fn`` must
    then accept empty task vectors, which is how the parameters are validated before any tensor is read.
    """

    def deco(fn: Callable[..., MergePlan]) -> Callable[..., MergePlan]:
        if name in _REGISTRY:
            raise RuntimeError(f"merge method {name!r} registered twice")
        params, model = _signature_model(name, fn)
        _REGISTRY[name] = MethodInfo(name, fn, _summary(fn), params, "static", "nothing", model, stream)
        return fn

    return deco


def register_method(name: str, *, kind: str, needs: str, params: type[BaseModel],
                    summary: str | None = None) -> Callable[[Callable[..., MethodOutput]], Callable[..., MethodOutput]]:
    """Decorator: register a dynamic or adaptive method ``run(pool, **params) -> MethodOutput``.

    ``params``: a pydantic model of its parameters (every field with a default); ``needs``: a key of
    :data:`DATA_NEEDS`.
    """
    if kind not in ("dynamic", "adaptive"):
        raise ValueError(f"kind must be 'dynamic' or 'adaptive' (static methods use register), got {kind!r}")
    if needs not in DATA_NEEDS:
        raise ValueError(f"needs must be one of {list(DATA_NEEDS)}, got {needs!r}")

    def deco(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        if name in _REGISTRY:
            raise RuntimeError(f"merge method {name!r} registered twice")
        defaults = {k: f.get_default(call_default_factory=True) for k, f in params.model_fields.items()}
        _REGISTRY[name] = MethodInfo(name, fn, summary or _summary(fn), defaults, kind, needs, params)
        return fn

    return deco


def unregister(name: str) -> None:
    """Remove a method (tests and plugins that register one for a while)."""
    _REGISTRY.pop(name, None)


def _summary(fn: Callable[..., Any]) -> str:
    return (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")


def load_all() -> None:
    """Register the dynamic and adaptive methods (their modules are imported on first need, not by
    ``import mergelab``: a static merge's start-up does without them)."""
    from mergelab.methods import adaptive, dynamic  # noqa: F401  (importing registers them)


def available(kind: str | None = None) -> list[str]:
    """Names of the registered methods, all kinds or one (``"static"``, ``"dynamic"``, ``"adaptive"``)."""
    if kind is not None and kind not in KINDS:
        raise InputError(f"unknown method kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind != "static":
        load_all()
    return sorted(n for n, m in _REGISTRY.items() if kind is None or m.kind == kind)


def get(name: str) -> MethodInfo:
    if name not in _REGISTRY:
        load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown merge method {name!r}; available: {', '.join(available())}") from None


def get_static(name: str) -> MethodInfo:
    """A static method's entry; a dynamic or adaptive one is refused (it has no single merged model)."""
    info = get(name)
    if info.kind != "static":
        raise InputError(
            f"{name!r} is a {info.kind} method: it has no single merged model to write; static methods: "
            f"{', '.join(available('static'))} (run {info.kind} methods with `mergelab bench` or `mergelab adapt`)"
        )
    return info


def plan(method: str, pretrained: StateDict, experts: Mapping[str, StateDict], **params: Any) -> MergePlan:
    """Check compatibility, compute task vectors and run ``method``'s pre-processing: a MergePlan.

    An expert may be a LoRA adapter's :class:`~mergelab.core.lora.LoraTaskVector`. For Task Arithmetic and
    averaging (a weighted sum of the task vectors) the plan keeps it as it is, factored: ``plan.apply`` forms
    s B A one weight at a time, and SE-Merging, AdaMerging and SyMerge mix the factors
    (:class:`~mergelab.core.functional.StackedVectors`). For the other methods (TIES, DARE: elementwise on the
    true update) its task vector is materialised whole (s B A on adapted weights, zeros elsewhere; memory: one
    model per adapter). :func:`merge` visits LoRA experts one weight at a time instead.
    """
    info = check_params(method, params)
    if any(isinstance(e, LoraTaskVector) for e in experts.values()):
        from mergelab.methods import lora

        lora.check_experts(pretrained, experts)
        keep = method in lora.FACTORED_METHODS
        vectors = {t: (e if keep else lora.dense_task_vector(pretrained, e)) if isinstance(e, LoraTaskVector)
                   else TaskVector.between(pretrained, e) for t, e in experts.items()}
    else:
        vectors = task_vectors(pretrained, experts)
    return info.fn(vectors, **params)


def pool_experts(pool: Any) -> dict[str, StateDict | LoraTaskVector]:
    """What a method merges from ``pool``: each expert's LoRA adapter (``pool.adapters[task]``, factored) where the
    pool holds one, else its body. :func:`plan` and the adaptive methods accept both."""
    adapters = getattr(pool, "adapters", None) or {}
    return {t: adapters.get(t, body) for t, body in pool.bodies.items()}


def check_params(method: str, params: Mapping[str, Any]) -> MethodInfo:
    """The static method's info, after refusing parameters it does not have or values of the wrong type."""
    info = get_static(method)
    info.check(params)
    return info


def merge_label(method: str, params: Mapping[str, Any]) -> str:
    """How errors name a merge: ``merge 'ties' with parameters {...}``."""
    return f"merge {method!r} with parameters {dict(params)!r}"


def slice_form(method: str, tasks: list[str], params: Mapping[str, Any]) -> SliceForm:
    """``method``'s per-tensor form for ``tasks`` and ``params``, validated before any tensor is read.

    Raises :class:`InputError` for a method registered without one.
    """
    info = check_params(method, params)
    if info.stream is None:
        raise InputError(f"method {method!r} has no per-tensor form (registered without stream=...), so it cannot "
                         "be streamed; merge it in memory (mergelab merge --in-memory, or mergelab.merge)")
    if not tasks:
        raise InputError("no experts given: merging needs at least one expert model")
    plan = info.fn({t: TaskVector({}) for t in tasks}, **params)
    return info.stream(plan)


def merge(method: str, pretrained: StateDict, experts: Mapping[str, StateDict], **params: Any) -> dict[str, Tensor]:
    """Merge ``experts`` (task name -> state dict) into one state dict with ``method``.

    A method with a per-tensor form runs it tensor by tensor (:mod:`mergelab.methods.streaming.engine`): peak
    memory is the inputs plus the output. Others (and tensors on an accelerator) apply their plan
    (inputs plus T task vectors).

    >>> merged = merge("ties", pre, {"a": sd_a, "b": sd_b}, density=0.2)  # doctest: +SKIP

    An expert may be a LoRA adapter (:func:`mergelab.core.lora.load_lora`): see :mod:`mergelab.methods.lora`
    (Task Arithmetic and averaging of adapters stay factored; TIES and DARE run on each weight's s B A).
    """
    if any(isinstance(e, LoraTaskVector) for e in experts.values()):
        from mergelab.methods import lora

        if lora.has_weightwise_path(method, list(experts), params):
            return lora.merge(method, pretrained, experts, **params)
        return plan(method, pretrained, experts, **params).apply(pretrained)  # a plan-only method: dense vectors
    info = check_params(method, params)
    label = merge_label(method, params)
    on_cpu = all(t.device.type == "cpu" for sd in (pretrained, *experts.values()) for t in sd.values())
    if info.stream is not None and on_cpu:
        form = slice_form(method, list(experts), params)
        check_compatible(pretrained, experts, check_finite=False)
        from mergelab.methods.streaming.engine import merge_state_dicts

        return merge_state_dicts(form, pretrained, experts, label=label)
    merged = plan(method, pretrained, experts, **params).apply(pretrained)
    for key, t in merged.items():
        if t.is_floating_point():
            kernels.require_finite_result(key, t, label)
    return merged


# ---------------------------------------------------------------- parameter checks


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as float or raise ValueError naming ``name`` and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParameterError(name, f"parameter {name!r} must be a finite number, got {value!r}")
    v = float(value)
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        raise ParameterError(name, f"parameter {name!r} must be in {lo or '(-inf'}, {hi or 'inf)'}, got {value!r}")
    return v


def per_task_values(name: str, value: Any, tasks: list[str], **range_kw: Any) -> dict[str, float]:
    """A number for all tasks, or a mapping task -> number covering exactly ``tasks``."""
    if isinstance(value, Mapping):
        missing = [t for t in tasks if t not in value]
        extra = [t for t in value if t not in tasks]
        if missing or extra:
            raise ParameterError(
                name, f"parameter {name!r}: per-task values must name exactly the tasks {tasks}; "
                f"missing {missing}, unknown {extra}"
            )
        return {t: check_number(f"{name}[{t}]", value[t], **range_kw) for t in tasks}
    v = check_number(name, value, **range_kw)
    return dict.fromkeys(tasks, v)
