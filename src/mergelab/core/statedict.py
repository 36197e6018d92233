"""State dicts, task vectors and compatibility checks: the arithmetic every method shares.

A state dict is a mapping from parameter names to tensors. A *task vector* (Ilharco et al., "Editing
Models with Task Arithmetic", ICLR 2023) is the difference tau_t = theta_t - theta_0 between an expert
fine-tuned on task t and the pretrained model it started from. Every merging method in mergelab
ends in the same combination

    theta = theta_0 + sum_t lambda_t * tau_t                                        (1)

with possibly pre-processed task vectors (trimmed, sign-elected, dropped) and coefficients that are
numbers (static), tensors with gradients (adaptive) or functions of the input (dynamic).

Only floating-point tensors are merged. Integer or boolean tensors (position ids, token type ids,
counters) are carried over from the pretrained model unchanged. Arithmetic runs in float32 and the
result is written back in each tensor's original dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from mergelab.core import kernels
from mergelab.core.errors import IncompatibleModelsError, InputError

StateDict = Mapping[str, Tensor]
Number = int | float

_MAX_LISTED_KEYS = 5


def is_mergeable(tensor: Tensor) -> bool:
    """True for tensors that are merged (floating point); others are copied from the pretrained model."""
    return torch.is_floating_point(tensor)


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return f"{shown}{f' and {more} more' if more > 0 else ''} ({len(keys)} in all)"


def _where(spec: object) -> str:
    """`` (file)`` for a tensor read from a file (a header entry with a ``file``), else nothing."""
    file = getattr(spec, "file", None)
    return f" ({file})" if file is not None else ""


def check_compatible(
    pretrained: Mapping[str, object],
    experts: Mapping[str, Mapping[str, object]],
    *,
    check_finite: bool = True,
) -> None:
    """Refuse to merge models that do not fit together: the one compatibility check of every merge.

    Checks, for each expert: the same keys as the pretrained model, the same shape per key, floating
    point where the pretrained tensor is, and (``check_finite``, tensors only) finite values in every
    floating tensor (pretrained included). The values may be tensors or anything with ``shape`` and
    ``dtype`` (the streamed merge passes safetensors header entries, whose ``file`` the messages name).
    Raises :class:`IncompatibleModelsError` naming the expert, the key (and file) and what differs.
    """
    if not experts:
        raise InputError("no experts given: merging needs at least one expert model")
    if check_finite:
        _check_finite("pretrained", pretrained)
    pre_keys = set(pretrained)
    for name, expert in experts.items():
        exp_keys = set(expert)
        missing = sorted(pre_keys - exp_keys)
        extra = sorted(exp_keys - pre_keys)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing keys {_list_keys(missing)}")
            if extra:
                parts.append(f"extra keys {_list_keys(extra)}")
            where = getattr(expert, "path", None)
            raise IncompatibleModelsError(
                f"expert {name!r}{f' ({where})' if where else ''} does not match the pretrained model: "
                f"{'; '.join(parts)}. Are both the same architecture (and both bodies, or both full models)?"
            )
        for key, ref in pretrained.items():
            t = expert[key]
            if tuple(t.shape) != tuple(ref.shape):
                raise IncompatibleModelsError(
                    f"expert {name!r}, key {key!r}{_where(t)}: shape {tuple(t.shape)} differs from the pretrained "
                    f"model's {tuple(ref.shape)}{_where(ref)}"
                )
            if ref.dtype.is_floating_point != t.dtype.is_floating_point:
                raise IncompatibleModelsError(
                    f"expert {name!r}, key {key!r}{_where(t)}: dtype {t.dtype} cannot be merged with the pretrained "
                    f"model's {ref.dtype} (one is floating point, the other is not)"
                )
        if check_finite:
            _check_finite(f"expert {name!r}", expert)


def non_finite_error(owner: str, key: str, count: int, file: object = None) -> IncompatibleModelsError:
    """The one message for a NaN or Inf in an input, in memory or streamed."""
    return IncompatibleModelsError(
        f"{owner}, key {key!r}{f' ({file})' if file is not None else ''}: {count} non-finite value(s) "
        "(NaN or Inf); refusing to merge"
    )


def _check_finite(owner: str, sd: StateDict) -> None:
    for key, t in sd.items():
        if is_mergeable(t) and not kernels.all_finite(t):
            raise non_finite_error(owner, key, int((~torch.isfinite(t)).sum()))


class TaskVector(Mapping[str, Tensor]):
    """A task vector: float32 tensors for the mergeable keys of a model, with + - and scalar *.

    ``TaskVector.between(pretrained, expert)`` computes tau = expert - pretrained. Keys that are not
    floating point are absent: they are never merged.
    """

    __slots__ = ("_tensors",)

    def __init__(self, tensors: Mapping[str, Tensor]):
        self._tensors = dict(tensors)

    @classmethod
    def between(cls, pretrained: StateDict, expert: StateDict) -> TaskVector:
        return cls(
            {
                k: kernels.task_vector(expert[k], p)
                for k, p in pretrained.items()
                if is_mergeable(p)
            }
        )

    # Mapping protocol
    def __getitem__(self, key: str) -> Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    # arithmetic
    def _zip(self, other: TaskVector, op) -> TaskVector:
        if set(self) != set(other):
            diff = sorted(set(self) ^ set(other))
            raise InputError(f"task vectors have different keys: {_list_keys(diff)}")
        return TaskVector({k: op(v, other[k]) for k, v in self.items()})

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._zip(other, torch.add)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._zip(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.items()})

    def __mul__(self, scalar: Number) -> TaskVector:
        return TaskVector({k: v * scalar for k, v in self.items()})

    __rmul__ = __mul__

    def numel(self) -> int:
        return sum(v.numel() for v in self.values())

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, {self.numel():,} values)"


def task_vectors(pretrained: StateDict, experts: Mapping[str, StateDict], *, check: bool = True) -> dict[str, TaskVector]:
    """tau_t = theta_t - theta_0 for each expert, after :func:`check_compatible`."""
    if check:
        check_compatible(pretrained, experts)
    return {name: TaskVector.between(pretrained, sd) for name, sd in experts.items()}


def combine(
    pretrained: StateDict,
    vectors: Mapping[str, Mapping[str, Tensor]],
    coefficients: Mapping[str, Number | Tensor],
) -> dict[str, Tensor]:
    """Equation (1): theta_0 + sum_t lambda_t tau_t, the one combination every method ends in.

    ``coefficients[t]`` is a number, a 0-d tensor, or a mapping key -> number/tensor (layer-wise
    coefficients). Tensors keep their autograd graph, so adaptive methods can learn them.
    Computed in float32; written back in the pretrained tensor's dtype unless a coefficient requires
    grad (then float32 is kept so that gradients flow).
    Keys absent from every task vector (non-floating tensors) are copied from ``pretrained``.
    """
    missing = [t for t in vectors if t not in coefficients]
    if missing:
        raise InputError(f"no coefficient given for task(s) {missing}; coefficients are for {sorted(coefficients)}")
    merged: dict[str, Tensor] = {}
    for key, base in pretrained.items():
        if not is_mergeable(base):
            merged[key] = base.clone()
            continue
        terms = []
        for task, vec in vectors.items():
            if key not in vec:
                continue
            lam = coefficients[task]
            terms.append((lam[key] if isinstance(lam, Mapping) else lam, vec[key]))
        acc = kernels.combine_tensor(base, terms)
        needs_grad = any(isinstance(lam, Tensor) and lam.requires_grad for lam, _ in terms)
        merged[key] = acc if needs_grad else acc.to(base.dtype)
    return merged


def clone_state_dict(sd: StateDict) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}
