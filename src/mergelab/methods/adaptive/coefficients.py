"""Learnable merging coefficients and the differentiable merged model they define.

AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
method section) learns the coefficients of equation (1) of :mod:`mergelab.core.statedict` on unlabeled test data:

- *task-wise*:   theta = theta_0 + sum_t lambda_t tau_t                 (one lambda per task)
- *layer-wise*:  theta^l = theta_0^l + sum_t lambda_t^l tau_t^l          (one lambda per task and
  parameter tensor l; AdaMerging's "layer" is a parameter tensor of the network)

The pretrained model's coefficient is fixed at 1. Coefficients start at 0.3 (Task Arithmetic's
customary value, so that adaptation starts from the static merge) and are clamped to [0, 1] in the
forward pass, as in AdaMerging (option ``clamp=False``). The per-task vectors tau_t can be plain,
TIES- or DARE-processed (any mapping task -> key -> tensor, e.g. ``MergePlan.vectors``).

:class:`MergedParams` precomputes, per adapted tensor, the stack [T, *shape] of the task vectors, so
that the merged tensor is one ``tensordot`` of the coefficients with the stack (and the gradient of
every coefficient one dot product with the incoming gradient). LoRA experts
(:class:`~mergelab.core.lora.LoraTaskVector`, Hu et al. 2021, Eq. 3: tau_t = s_t B_t A_t) stay factored: a
weight that only adapters touch is formed each step as ``W_0 + (U diag(lambda[task])) V`` with U = [s_1 B_1 | ...],
V = [A_1; ...] (:class:`~mergelab.core.functional.FactoredStack`), exact and differentiable in lambda, and no
dense task vector is held (``factored=False`` stacks the materialised s B A instead; docs/lora.md has the timings). Only tensors that (a) have a nonzero
task vector for some task and (b) lie on the path from the input to the features (the BERT pooler
does not, with mean pooling) get coefficients; the others are merged once with the fixed initial
coefficient in layer-wise mode, with the task's learned coefficient in task-wise mode (for (a) they
equal the pretrained tensor anyway; (b) does not change any output).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.core import kernels
from mergelab.core.errors import InputError
from mergelab.core.figures import pyplot, save_figure
from mergelab.core.functional import FactoredStack
from mergelab.core.io import atomic_write_text
from mergelab.core.lora import LoraTaskVector
from mergelab.core.statedict import StateDict, is_mergeable

GRANULARITIES = ("task", "layer")
COEFFICIENTS_FORMAT = 1


class Coefficients(nn.Module):
    """lambda: shape ``[T]`` (task-wise) or ``[T, K]`` (layer-wise, K parameter tensors).

    ``values()`` is the clamped tensor used in the forward pass; ``raw`` is what the optimiser moves.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        keys: Sequence[str],
        granularity: str = "layer",
        init: float = 0.3,
        clamp: bool = True,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise InputError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if not tasks:
            raise InputError("coefficients need at least one task")
        if len(set(tasks)) != len(tasks):
            raise InputError(f"tasks must be distinct, got {list(tasks)}")
        if granularity == "layer" and not keys:
            raise InputError("layer-wise coefficients need at least one parameter tensor (keys is empty)")
        if isinstance(init, bool) or not isinstance(init, (int, float)):
            raise InputError(f"init must be a number, got {init!r}")
        self.tasks = list(tasks)
        self.keys = list(keys)
        self.granularity = granularity
        self.init = float(init)
        self.clamp = bool(clamp)
        shape = (len(self.tasks),) if granularity == "task" else (len(self.tasks), len(self.keys))
        self.raw = nn.Parameter(torch.full(shape, self.init, dtype=torch.float32))
        self._key_index = {k: i for i, k in enumerate(self.keys)}

    def values(self) -> Tensor:
        """The coefficients used in the merge: ``raw`` clamped to [0, 1] (if ``clamp``)."""
        return self.raw.clamp(0.0, 1.0) if self.clamp else self.raw

    def column(self, values: Tensor, key: str) -> Tensor:
        """The ``[T]`` coefficients of tensor ``key`` taken from ``values`` (= ``self.values()``)."""
        if self.granularity == "task":
            return values
        return values[:, self._key_index[key]]

    def set_values(self, values: Tensor | Sequence[float] | Sequence[Sequence[float]]) -> None:
        v = torch.as_tensor(values, dtype=torch.float32)
        if tuple(v.shape) != tuple(self.raw.shape):
            raise InputError(f"coefficient values: expected shape {tuple(self.raw.shape)}, got {tuple(v.shape)}")
        with torch.no_grad():
            self.raw.copy_(v)

    def as_mapping(self) -> dict[str, float | dict[str, float]]:
        """Current (clamped) values: task -> number (task-wise) or task -> key -> number (layer-wise)."""
        v = self.values().detach()
        if self.granularity == "task":
            return {t: float(v[i]) for i, t in enumerate(self.tasks)}
        return {t: {k: float(v[i, j]) for j, k in enumerate(self.keys)} for i, t in enumerate(self.tasks)}

    # ------------------------------------------------------------------ save / load / plot
    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {
            "format": COEFFICIENTS_FORMAT,
            "granularity": self.granularity,
            "tasks": self.tasks,
            "keys": self.keys,
            "init": self.init,
            "clamp": self.clamp,
            "values": self.values().detach().tolist(),
            **extra,
        }

    def save(self, path: str | os.PathLike[str], **extra: Any) -> Path:
        """Write the coefficients (and ``extra`` fields) as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_json(**extra), indent=1) + "\n")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "coefficients") -> Coefficients:
        if not isinstance(data, Mapping):
            raise InputError(f"{source}: expected a JSON object")
        for field in ("granularity", "tasks", "keys", "values"):
            if field not in data:
                raise InputError(f"{source}: field {field!r} is missing")
        if data.get("format", COEFFICIENTS_FORMAT) != COEFFICIENTS_FORMAT:
            raise InputError(f"{source}: field 'format' is {data.get('format')!r}, expected {COEFFICIENTS_FORMAT}")
        tasks, keys = data["tasks"], data["keys"]
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise InputError(f"{source}: field 'tasks' must be a list of task names")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InputError(f"{source}: field 'keys' must be a list of parameter names")
        coef = cls(tasks, keys, data["granularity"], float(data.get("init", 0.3)), bool(data.get("clamp", True)))
        try:
            values = torch.as_tensor(data["values"], dtype=torch.float32)
        except (TypeError, ValueError):
            raise InputError(f"{source}: field 'values' must be a list (of lists) of numbers") from None
        if tuple(values.shape) != tuple(coef.raw.shape):
            raise InputError(
                f"{source}: field 'values' has shape {tuple(values.shape)}, expected {tuple(coef.raw.shape)} "
                f"({len(tasks)} tasks{'' if coef.granularity == 'task' else f' x {len(keys)} keys'})"
            )
        if not bool(torch.isfinite(values).all()):
            raise InputError(f"{source}: field 'values' contains non-finite numbers")
        coef.set_values(values)
        return coef

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Coefficients:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return cls.from_json(data, str(p))

    def heatmap(self, path: str | os.PathLike[str], title: str = "merging coefficients") -> Path:
        """Heatmap PNG, tasks x parameter tensors (task-wise: one column), written atomically."""
        plt = pyplot()
        v = self.values().detach().reshape(len(self.tasks), -1).numpy()
        labels = ["all tensors"] if self.granularity == "task" else [short_key(k) for k in self.keys]
        width = min(40.0, max(6.0, 0.14 * v.shape[1] + 3))
        fig, ax = plt.subplots(figsize=(width, 2.8 + 0.45 * len(self.tasks)))
        im = ax.imshow(v, aspect="auto", cmap="viridis", vmin=0.0 if self.clamp else None,
                       vmax=1.0 if self.clamp else None, interpolation="nearest")
        ax.set_yticks(range(len(self.tasks)), self.tasks)
        step = max(1, v.shape[1] // 60)
        ax.set_xticks(range(0, v.shape[1], step), labels[::step], rotation=90, fontsize=6)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
        fig.tight_layout()
        return save_figure(fig, path)


def short_key(key: str) -> str:
    """``encoder.layer.3.attention.self.query.weight`` -> ``3.attention.self.query.w`` (plot labels)."""
    k = key.replace("encoder.layer.", "").replace(".weight", ".w").replace(".bias", ".b")
    return k.replace("embeddings.", "emb.")


def nonzero_keys(pretrained: StateDict, vectors: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Mergeable keys (in the pretrained order) whose task vector is nonzero for at least one task."""
    out = []
    for key, base in pretrained.items():
        if not is_mergeable(base):
            continue
        if any(key in v and bool(v[key].ne(0).any()) for v in vectors.values()):
            out.append(key)
    return out


class MergedParams(nn.Module):
    """theta(lambda) = theta_0 + sum_t lambda_t tau_t, differentiable in lambda (AdaMerging).

    ``keys``: the tensors that get coefficients (default: every mergeable tensor with a nonzero task
    vector). Every other mergeable tensor is theta_0 + sum_t ``init`` * tau_t, computed once.
    ``forward()`` returns the adapted tensors only (for ``functional_call(..., strict=False)``);
    ``state_dict_merged()`` the whole merged state dict, detached. A key that no full task vector holds (only
    LoRA experts adapt it) is kept factored unless ``factored=False``.
    """

    def __init__(
        self,
        pretrained: StateDict,
        vectors: Mapping[str, Mapping[str, Tensor]],
        granularity: str = "layer",
        *,
        keys: Sequence[str] | None = None,
        init: float = 0.3,
        clamp: bool = True,
        device: str | torch.device | None = None,
        factored: bool = True,
    ) -> None:
        super().__init__()
        if not vectors:
            raise InputError("no task vectors given: adaptive merging needs at least one task")
        tasks = list(vectors)
        mergeable = [k for k, v in pretrained.items() if is_mergeable(v)]
        for t, vec in vectors.items():
            extra = sorted(set(vec) - set(mergeable))
            if extra:
                raise InputError(f"task vector {t!r} has keys the pretrained model lacks or cannot merge: {extra[:5]}")
        keys = nonzero_keys(pretrained, vectors) if keys is None else list(keys)
        unknown = [k for k in keys if k not in mergeable]
        if unknown:
            raise InputError(f"keys {unknown[:5]} are not mergeable tensors of the pretrained model")
        self.device = torch.device(device) if device is not None else next(iter(pretrained.values())).device
        self.coefficients = Coefficients(tasks, keys, granularity, init, clamp)
        self.pretrained = pretrained
        self.vectors = vectors
        self._base: dict[str, Tensor] = {}
        self._stack: dict[str, Tensor] = {}
        self._factors: dict[str, FactoredStack] = {}
        lora = {t for t, v in vectors.items() if isinstance(v, LoraTaskVector)}
        for k in keys:
            self._base[k] = pretrained[k].detach().to(self.device, torch.float32)
            if factored and lora and all(t in lora or k not in vectors[t] for t in tasks):
                self._factors[k] = FactoredStack.from_lora(
                    k, [vectors[t].modules.get(k) if t in lora else None for t in tasks], self.device)  # type: ignore[attr-defined]
                continue
            self._stack[k] = torch.stack([
                vectors[t][k].detach().to(self.device, torch.float32) if k in vectors[t]
                else torch.zeros_like(self._base[k]) for t in tasks
            ])

    @property
    def tasks(self) -> list[str]:
        return self.coefficients.tasks

    @property
    def keys(self) -> list[str]:
        return self.coefficients.keys

    def forward(self) -> dict[str, Tensor]:
        """The adapted tensors theta^l(lambda) (float32, carrying the graph to the coefficients)."""
        lam = self.coefficients.values()
        return {k: self._base[k] + self._factors[k].update(self.coefficients.column(lam, k)) if k in self._factors
                else kernels.combine_stacked(self._base[k], self.coefficients.column(lam, k), self._stack[k])
                for k in self.keys}

    def with_values(self, values: Tensor) -> MergedParams:
        """The same merge at other coefficient ``values`` (raw, shape of ``coefficients.raw``): a new object
        sharing this one's (read-only) task-vector stacks, so a snapshot costs no copy of the vectors."""
        other = copy.copy(self)
        other._parameters, other._buffers, other._modules = {}, {}, {}
        c = self.coefficients
        other.coefficients = Coefficients(c.tasks, c.keys, c.granularity, c.init, c.clamp)
        other.coefficients.set_values(values)
        other.coefficients.raw.requires_grad_(False)
        return other

    @torch.no_grad()
    def state_dict_merged(self) -> dict[str, Tensor]:
        """The whole merged state dict (every key of the pretrained model), detached, original dtypes."""
        adapted = self.forward()
        out: dict[str, Tensor] = {}
        for key, base in self.pretrained.items():
            if key in adapted:
                out[key] = adapted[key].to(base.dtype)
            elif not is_mergeable(base):
                out[key] = base.clone()
            else:
                # task-wise: the task's learned coefficient applies to every tensor; layer-wise: the
                # tensors without a coefficient keep the initial one
                lam = self.coefficients.values().detach()
                task_wise = self.coefficients.granularity == "task"
                terms = [(float(lam[i]) if task_wise else self.coefficients.init, vec[key].to(base.device, torch.float32))
                         for i, vec in enumerate(self.vectors.values()) if key in vec]
                out[key] = kernels.combine_tensor(base, terms).to(base.dtype)
        return out
