"""Run a network with merged parameters: one set for the batch, or one set per sample.

Every method in mergelab is equation (1) of :mod:`mergelab.core.statedict`,
``theta = theta_0 + sum_t lambda_t tau_t``. Static and adaptive methods have one ``lambda`` for the
whole batch and run the network with :func:`torch.func.functional_call`. A dynamic method
(SE-Merging) has coefficients ``C[b, t]`` per sample ``b``: this module runs a batch through

    theta_b = theta_0 + sum_t C[b, t] tau_t                                             (2)

exactly, without building a model per sample. Each module that owns merged parameters gets a
per-sample forward while :func:`per_sample_mixing` is active:

- ``nn.Linear`` and GPT-2's ``Conv1D``: the per-sample weight ``W_b = W_0 + sum_t C[b, t] tau_t`` is
  formed for this one layer only (``einsum`` over the stacked task vectors), used in a batched matrix
  product, and freed; costs ``T * out * in`` per sample against ``tokens * out * in`` for the product
  itself, so ``1 + T / tokens`` times a static layer.
- ``nn.Embedding``: ``E_0[ids] + sum_t C[b, t] tau_t[ids]`` (a gather, no matrix formed).
- ``nn.LayerNorm``: the affine weight and bias mixed per sample and broadcast over the tokens.
- low rank (optional, ``factors``): a weight's task vectors given as rank-r factors
  ``tau_t ~ U_t V_t`` (:func:`low_rank_factors`, truncated SVD) mix as
  ``y = W_0 x + sum_t C[b, t] U_t (V_t x)``: two thin products of ``T * r`` columns instead of a
  per-sample ``out x in`` matrix; exact when ``r`` is the full rank.
- LoRA experts (factored task vectors, :class:`FactoredStack`): a weight whose every task vector is a
  LoRA update ``tau_t = s_t B_t A_t`` (Hu et al. 2021, Eq. 3; :mod:`mergelab.core.lora`) mixes exactly in
  activation space, ``y = W_0 x + sum_t C[b, t] s_t B_t (A_t x)``: no per-sample (or per-task) weight is
  ever formed, and the per-sample part costs ``tokens * sum_t r_t * (in + out)``, against
  ``tokens * out * in`` for the layer (MiniLM, 5 experts of rank 16: 31% more multiply-adds on the adapted
  linears). ``W_0 x`` and all the ``A_t x`` are one matrix product with ``[W_0; A_1; ...; A_T]``, formed once
  when the block is entered (a copy of the adapted weights, for its duration). An embedding adapter mixes the
  same way on the looked-up rows of ``A^T``. Weights no adapter touches are not mixed at all.
- ``nn.Conv2d`` (CLIP's patch embedding): one grouped convolution over the batch, ``groups = B``, with
  the per-sample kernels stacked along the output channels.
- CLIP's vision embeddings: the class token ``c_0 + sum_t C[b, t] tau_t`` per sample.

A module type with merged parameters that is not in that list is refused with an error naming it, so
a result is never silently wrong. :func:`per_sample_reference` is the slow oracle: it materialises each
sample's parameters with :func:`~mergelab.core.statedict.combine` and runs the sample alone.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergelab.core.errors import InputError
from mergelab.core.lora import LoraModule, LoraTaskVector
from mergelab.core.statedict import StateDict, combine


@dataclass(frozen=True)
class FactoredStack:
    """One weight's per-task updates kept as low-rank factors: LoRA experts (Hu et al. 2021, Eq. 3).

    In the ``nn.Linear`` orientation ``[out, in]``, task t's update is ``u[:, task == t] @ v[task == t]``
    (``u`` [out, R] holds the columns ``s_t B_t``, the scaling folded in; ``v`` [R, in] the rows ``A_t``;
    ``task`` [R] the task of each column; R = sum_t r_t). A task that does not adapt the weight has no
    columns: its update is zero. ``transposed``: the weight is stored ``[in, out]`` (GPT-2's Conv1D with
    ``fan_in_fan_out``, an embedding ``[num_embeddings, dim]``), so its update is the transpose.
    """

    u: Tensor
    v: Tensor
    task: Tensor
    n_tasks: int
    transposed: bool = False

    @classmethod
    def from_lora(cls, key: str, modules: Sequence[LoraModule | None],
                  device: torch.device | str | None = None) -> FactoredStack:
        """The factors of ``key`` from each task's :class:`~mergelab.core.lora.LoraModule` (None: not adapted)."""
        present = [(i, m) for i, m in enumerate(modules) if m is not None]
        if not present:
            raise InputError(f"weight {key!r}: no task adapts it, nothing to stack")
        first = present[0][1]
        for _, m in present[1:]:
            if (m.transposed, m.B.shape[0], m.A.shape[1]) != (first.transposed, first.B.shape[0], first.A.shape[1]):
                raise InputError(f"weight {key!r}: the adapters disagree on its shape or layout (fan_in_fan_out, embedding)")
        u = torch.cat([m.B.to(torch.float32) * m.scaling for _, m in present], dim=1)
        v = torch.cat([m.A.to(torch.float32) for _, m in present], dim=0)
        task = torch.cat([torch.full((m.rank,), i, dtype=torch.long) for i, m in present])
        return cls(u.to(device).contiguous(), v.to(device).contiguous(), task.to(device), len(modules), first.transposed)

    @property
    def rank(self) -> int:
        return int(self.v.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's shape (its layout)."""
        out, inp = self.u.shape[0], self.v.shape[1]
        return (inp, out) if self.transposed else (out, inp)

    def columns(self, coeffs: Tensor) -> Tensor:
        """Each column's coefficient: ``[T] -> [R]`` or ``[B, T] -> [B, R]``."""
        return coeffs.to(self.u.device, self.u.dtype)[..., self.task]

    def update(self, coeffs: Tensor) -> Tensor:
        """``sum_t coeffs[t] tau_t`` in the weight's layout: one product ``(u diag(c)) v``, differentiable in ``coeffs``."""
        d = (self.u * self.columns(coeffs)) @ self.v
        return d.T if self.transposed else d

    def dense(self, t: int) -> Tensor:
        """Task ``t``'s update tau_t, materialised (references and small models)."""
        keep = self.task == t
        d = self.u[:, keep] @ self.v[keep]
        return d.T.contiguous() if self.transposed else d


class StackedVectors:
    """Per-task vectors stacked along a leading task axis: ``tensors[key]`` is ``[T, *shape]`` float32, and
    ``factors[key]`` a :class:`FactoredStack` for the weights whose task vectors are all LoRA factors.

    ``tasks`` fixes the order of the task axis, the order of the columns of a coefficient matrix. ``keys``: every
    key with a task vector, dense or factored.
    """

    def __init__(self, tasks: Sequence[str], tensors: Mapping[str, Tensor],
                 factors: Mapping[str, FactoredStack] | None = None):
        self.tasks = list(tasks)
        self.tensors = dict(tensors)
        self.factors = dict(factors or {})

    @property
    def keys(self) -> list[str]:
        return [*self.tensors, *self.factors]

    @classmethod
    def from_vectors(cls, vectors: Mapping[str, Mapping[str, Tensor]], device: torch.device | str | None = None) -> StackedVectors:
        """Stack per-task vectors. A :class:`~mergelab.core.lora.LoraTaskVector` is zero on the keys it does not
        adapt; a key that no full task vector holds stays factored (its task vectors are LoRA factors or zero),
        any other key is stacked dense (the LoRA updates of that key materialised). Full task vectors must all
        have the same keys."""
        tasks = list(vectors)
        if not tasks:
            raise InputError("no task vectors to stack")
        full = [t for t in tasks if not isinstance(vectors[t], LoraTaskVector)]
        keys: list[str] = list(vectors[full[0]]) if full else []
        for t in full[1:]:
            if set(vectors[t]) != set(keys):
                raise InputError(f"task vector {t!r} has other keys than {full[0]!r}")
        seen = set(keys)
        factored: list[str] = []
        for t in tasks:
            if t not in full:
                new = [k for k in vectors[t].modules if k not in seen]  # type: ignore[attr-defined]
                factored += new
                seen.update(new)

        def dense(t: str, k: str, like: Tensor) -> Tensor:
            v = vectors[t]
            if k in v:
                return v[k].to(device=device, dtype=torch.float32)
            return torch.zeros(like.shape, dtype=torch.float32, device=device)  # an adapter that skips k

        tensors = {}
        for k in keys:
            like = vectors[full[0]][k]
            tensors[k] = torch.stack([dense(t, k, like) for t in tasks])
        factors = {k: FactoredStack.from_lora(k, [None if t in full else vectors[t].modules.get(k)  # type: ignore[attr-defined]
                                                  for t in tasks], device)
                   for k in factored}
        return cls(tasks, tensors, factors)

    def __len__(self) -> int:
        return len(self.tasks)

    def coefficient_matrix(self, coefficients: Mapping[str, float] | Tensor) -> Tensor:
        """``[T]`` float32 (columns in ``tasks`` order) from a mapping task -> number, or a tensor as it is."""
        if isinstance(coefficients, Tensor):
            return coefficients.to(torch.float32)
        missing = [t for t in self.tasks if t not in coefficients]
        if missing:
            raise InputError(f"no coefficient for task(s) {missing}")
        return torch.tensor([float(coefficients[t]) for t in self.tasks], dtype=torch.float32)

    def merged(self, pretrained: StateDict, coefficients: Mapping[str, float] | Tensor) -> dict[str, Tensor]:
        """Equation (1) with one coefficient per task (a ``[T]`` tensor or a mapping); a factored weight is
        ``W_0 + (u diag(c)) v``, formed once."""
        c = self.coefficient_matrix(coefficients)
        if c.ndim != 1 or c.numel() != len(self.tasks):
            raise InputError(f"coefficients must have shape [{len(self.tasks)}], got {tuple(c.shape)}")
        dense = {t: {k: v[i] for k, v in self.tensors.items()} for i, t in enumerate(self.tasks)}
        out = combine(pretrained, dense, {t: float(c[i]) for i, t in enumerate(self.tasks)})
        for key, f in self.factors.items():
            base = pretrained[key]
            out[key] = (base.detach().to(f.u.device, torch.float32) + f.update(c)).to(base.device, base.dtype)
        return out

    def as_vectors(self) -> dict[str, dict[str, Tensor]]:
        """Per-task dense vectors (factored weights materialised): the references' form."""
        return {t: {**{k: v[i] for k, v in self.tensors.items()}, **{k: f.dense(i) for k, f in self.factors.items()}}
                for i, t in enumerate(self.tasks)}


# ---------------------------------------------------------------------------------------------- per sample
def _mix(stack: Tensor, coeffs: Tensor) -> Tensor:
    """``[B, *shape]``: sum_t coeffs[b, t] * stack[t]."""
    return torch.einsum("bt,t...->b...", coeffs.to(stack.dtype), stack)


class _Scratch:
    """One reusable buffer for the per-sample weights ``[B, out, in]`` of the layer being run.

    A fresh ``[B, out, in]`` tensor per layer and batch costs more in page faults (the allocator hands large
    blocks back to the system) and in the separate ``W_0 +`` pass than the mixing product itself: reusing one
    buffer and adding ``W_0`` in place ran the mix-and-multiply of a MiniLM layer 2.6-3x faster
    (docs/performance.md). Layers run one after another and each uses its weights only inside its own
    forward, so one buffer serves them all; it lives as long as the :func:`per_sample_mixing` block."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def mixed(self, weight0: Tensor, dw: Tensor, coeffs: Tensor) -> Tensor:
        """``W_0 + sum_t C[b, t] dw[t]`` as ``[B, *weight0.shape]``: in the buffer when nothing needs a
        gradient (the result is overwritten by the next layer), else as a new tensor autograd can track."""
        tracked = torch.is_grad_enabled() and (coeffs.requires_grad or dw.requires_grad or weight0.requires_grad)
        if tracked or dw.dtype != weight0.dtype or dw.device != weight0.device:
            return weight0.unsqueeze(0) + _mix(dw, coeffs).to(weight0.dtype)
        b, n = coeffs.shape[0], weight0.numel()
        buf = self.buf
        if buf is None or buf.numel() < b * n or buf.dtype != dw.dtype or buf.device != dw.device:
            buf = self.buf = torch.empty(b * n, dtype=dw.dtype, device=dw.device)
        out = buf[: b * n].view(b, n)
        torch.mm(coeffs.to(dw.dtype), dw.reshape(dw.shape[0], n), out=out)
        out += weight0.reshape(1, n)
        return out.view(b, *weight0.shape)


def _leading(x: Tensor, batch: int, what: str) -> None:
    if x.shape[0] != batch:
        raise InputError(
            f"per-sample merge: {what} has leading dimension {x.shape[0]}, expected the batch size {batch} "
            "(per-sample coefficients need the batch first)"
        )


def _column_scale(factors: tuple[Tensor, ...], coeffs: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, R]``: each factor column's per-sample coefficient. ``factors`` is ``(u, v)`` with T equal blocks of
    columns (:func:`low_rank_factors`) or ``(u, v, task)`` with the task of each column (:class:`FactoredStack`)."""
    c = coeffs.to(dtype)
    if len(factors) == 3:
        return c[:, factors[2]]
    return c.repeat_interleave(factors[1].shape[0] // coeffs.shape[1], dim=1)


@dataclass(frozen=True)
class _FusedLora:
    """A LoRA-factored linear prepared for the per-sample forward: ``wcat = [W_0; V]`` ([out + R, in], the Linear
    orientation) so that ``W_0 x`` and ``V x`` are one matrix product, ``bcat = [b_0; 0]`` (the static bias folded
    into it), ``ut = U^T`` [R, out] for the second product, ``task`` [R] each column's task."""

    wcat: Tensor
    bcat: Tensor | None
    ut: Tensor
    task: Tensor

    @classmethod
    def of(cls, weight0: Tensor, bias0: Tensor | None, f: FactoredStack, transposed: bool) -> _FusedLora:
        w = weight0.T if transposed else weight0
        v = f.v.to(w.dtype)
        bcat = None if bias0 is None else torch.cat([bias0, bias0.new_zeros(v.shape[0])])
        return cls(torch.cat([w, v]).contiguous(), bcat, f.u.T.to(w.dtype).contiguous(), f.task)


def _fused_lora_forward(fused: _FusedLora, bias0: Tensor | None, db: Tensor | None,
                        coeffs: Tensor) -> Callable[[Tensor], Tensor]:
    """``y = W_0 x + b + U ((V x) * C[b, task])`` per sample: one product with ``[W_0; V]`` (bias included), the
    per-sample column scaling, one ``addmm`` with U^T. A bias with task vectors (``db``) is mixed per sample."""

    def forward(x: Tensor) -> Tensor:
        b = coeffs.shape[0]
        _leading(x, b, "a linear layer's input")
        out, rank = fused.ut.shape[1], fused.ut.shape[0]
        flat = x.reshape(-1, x.shape[-1])
        yz = F.linear(flat, fused.wcat, fused.bcat if db is None else None)
        y, z = yz[:, :out], yz[:, out:]
        scale = coeffs.to(z.dtype)[:, fused.task].unsqueeze(1)  # [B, 1, R]
        y = torch.addmm(y, (z.view(b, -1, rank) * scale).view(-1, rank), fused.ut).view(b, -1, out)
        if db is not None and bias0 is not None:
            y = y + (bias0.unsqueeze(0) + _mix(db, coeffs).to(bias0.dtype)).unsqueeze(1)
        return y.reshape(*x.shape[:-1], out)

    return forward


def _linear_forward(weight0: Tensor, bias0: Tensor | None, dw: Tensor | None, db: Tensor | None,
                    coeffs: Tensor, transposed: bool,
                    factors: tuple[Tensor, ...] | None = None,
                    scratch: _Scratch | None = None) -> Callable[[Tensor], Tensor]:
    """Forward of a Linear (``weight [out, in]``) or Conv1D (``weight [in, out]``, transposed) per sample.

    With ``factors = (U [out, R], V [R, in])`` or ``(U, V, task [R])`` the weight's task vectors are taken as
    ``tau_t = U[:, cols_t] @ V[cols_t]`` (the Linear orientation, Conv1D included; ``cols_t``: the t-th of T
    equal blocks, or the columns with ``task == t``), and ``y = W_0 x + U ((V x) * C[b, task])``."""

    def forward(x: Tensor) -> Tensor:
        b = coeffs.shape[0]
        _leading(x, b, "a linear layer's input")
        flat = x.reshape(b, -1, x.shape[-1])
        w_b = None
        if factors is not None:
            u, v = factors[0], factors[1]
            y = F.linear(flat, weight0.T if transposed else weight0)
            z = F.linear(flat, v)  # [B, L, R]
            y = y + F.linear(z * _column_scale(factors, coeffs, z.dtype).unsqueeze(1), u)
        elif dw is None:
            y = F.linear(flat, weight0.T if transposed else weight0)
        else:
            w_b = (scratch or _Scratch()).mixed(weight0, dw, coeffs)  # [B, out, in] or [B, in, out]
            y = torch.bmm(flat, w_b if transposed else w_b.transpose(1, 2))
        del w_b
        if bias0 is not None:
            bias = bias0.unsqueeze(0) + (_mix(db, coeffs).to(bias0.dtype) if db is not None else 0)
            y = y + bias.unsqueeze(1)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


def _embedding_forward(module: nn.Embedding, weight0: Tensor, dw: Tensor | None, coeffs: Tensor,
                       factors: tuple[Tensor, Tensor, Tensor] | None = None):
    """Per-sample embedding: ``E_0[ids] + sum_t C[b, t] tau_t[ids]``. With LoRA ``factors = (u [dim, R], v [R,
    num_embeddings], task)`` (tau_t = (u_t v_t)^T), the rows are ``(v^T[ids] * C[b, task]) u^T``."""

    def forward(ids: Tensor) -> Tensor:
        base = F.embedding(ids, weight0, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)
        if dw is None and factors is None:
            return base
        b = coeffs.shape[0]
        if ids.shape[0] not in (1, b):
            _leading(ids, b, "an embedding's index tensor")
        if factors is not None:
            u, v, _ = factors
            z = F.embedding(ids, v.T)  # [ids.shape..., R]
            z = z.expand(b, *z.shape[1:])
            scale = _column_scale(factors, coeffs, z.dtype).reshape(b, *(1,) * (z.ndim - 2), -1)
            return base + F.linear(z * scale, u).to(base.dtype)
        gathered = dw[:, ids]  # [T, ids.shape..., H]
        gathered = gathered.expand(gathered.shape[0], b, *gathered.shape[2:])
        delta = torch.einsum("bt,tb...->b...", coeffs.to(dw.dtype), gathered)
        return base + delta.to(base.dtype)

    return forward


def _layernorm_forward(module: nn.LayerNorm, weight0: Tensor | None, bias0: Tensor | None,
                       dw: Tensor | None, db: Tensor | None, coeffs: Tensor):
    def forward(x: Tensor) -> Tensor:
        b = coeffs.shape[0]
        _leading(x, b, "a layer norm's input")
        y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        extra = (1,) * (x.ndim - 1 - len(module.normalized_shape))
        if weight0 is not None:
            w = weight0.unsqueeze(0) + (_mix(dw, coeffs).to(weight0.dtype) if dw is not None else 0)
            y = y * w.reshape(b, *extra, *module.normalized_shape)
        if bias0 is not None:
            bb = bias0.unsqueeze(0) + (_mix(db, coeffs).to(bias0.dtype) if db is not None else 0)
            y = y + bb.reshape(b, *extra, *module.normalized_shape)
        return y

    return forward


def _conv2d_forward(module: nn.Conv2d, weight0: Tensor, bias0: Tensor | None, dw: Tensor | None,
                    db: Tensor | None, coeffs: Tensor):
    """Per-sample ``Conv2d`` as one grouped convolution: sample b's channels convolve with ``W_b`` only."""

    def forward(x: Tensor) -> Tensor:
        b = coeffs.shape[0]
        _leading(x, b, "a convolution's input")
        if module.padding_mode != "zeros":
            raise InputError(f"per-sample Conv2d supports padding_mode 'zeros', not {module.padding_mode!r}")
        w = weight0.unsqueeze(0) + (_mix(dw, coeffs).to(weight0.dtype) if dw is not None else 0)
        w = w.expand(b, *weight0.shape).reshape(b * weight0.shape[0], *weight0.shape[1:])
        bias = None
        if bias0 is not None:
            bias = bias0.unsqueeze(0) + (_mix(db, coeffs).to(bias0.dtype) if db is not None else 0)
            bias = bias.expand(b, -1).reshape(-1)
        y = F.conv2d(x.reshape(1, b * x.shape[1], *x.shape[2:]), w, bias, module.stride, module.padding,
                     module.dilation, module.groups * b)
        return y.reshape(b, weight0.shape[0], *y.shape[2:])

    return forward


def _clip_embeddings_forward(module: nn.Module, cls0: Tensor, dcls: Tensor | None, coeffs: Tensor):
    """CLIP's vision embeddings with a per-sample class token (patches and positions: their own modules)."""

    def forward(pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        b, _, height, width = pixel_values.shape
        _leading(pixel_values, b, "CLIP's pixel values")
        patch = module.patch_embedding(pixel_values.to(dtype=cls0.dtype)).flatten(2).transpose(1, 2)
        cls = cls0.unsqueeze(0) + (_mix(dcls, coeffs).to(cls0.dtype) if dcls is not None else 0)
        emb = torch.cat([cls.expand(b, -1).unsqueeze(1).to(patch.dtype), patch], dim=1)
        if interpolate_pos_encoding:
            return emb + module.interpolate_pos_encoding(emb, height, width)
        return emb + module.position_embedding(module.position_ids)

    return forward


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: weight [in, out], y = x @ W + b
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@contextlib.contextmanager
def per_sample_mixing(
    body: nn.Module,
    pretrained: StateDict,
    stacked: StackedVectors,
    coeffs: Tensor | Callable[[], Tensor],
    *,
    keys: set[str] | None = None,
    factors: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> Iterator[None]:
    """Within the block, ``body(...)`` computes equation (2) for its batch.

    ``coeffs`` is ``[B, T]`` (columns in ``stacked.tasks`` order), or a function returning it that is
    called at each patched module's forward: that lets a hook set the coefficients mid-forward (the
    single-pass SE-Merging of :mod:`mergelab.methods.dynamic`). ``keys`` limits per-sample mixing to those
    parameter names (default: every key of ``stacked``). A patched module computes from
    ``pretrained`` (theta_0) and the task vectors; every other module runs with the parameters the
    body has at call time, so wrap the call in :func:`run_with` to give those (a static merge, say).
    ``factors`` (from :func:`low_rank_factors`) replaces the task vectors of those linear weights by
    their low-rank factors. The factored weights of ``stacked`` (LoRA experts, ``stacked.factors``) always mix
    through their own factors, exactly.
    """
    factors = factors or {}
    get = coeffs if callable(coeffs) else (lambda: coeffs)
    mixed = set(stacked.keys) if keys is None else set(keys) & set(stacked.keys)
    patched: list[nn.Module] = []
    scratch = _Scratch()

    def dw_of(name: str) -> Tensor | None:
        return stacked.tensors[name] if name in mixed and name in stacked.tensors else None

    def lora_of(name: str) -> tuple[Tensor, Tensor, Tensor] | None:
        f = stacked.factors.get(name) if name in mixed else None
        return None if f is None else (f.u, f.v, f.task)

    try:
        for mod_name, module in body.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            full = {n: f"{mod_name}.{n}" if mod_name else n for n in own}
            if not any(full[n] in mixed for n in own):
                continue
            p = {n: pretrained[full[n]] for n in own}
            d = {n: dw_of(full[n]) for n in own}
            lora = {n: lora_of(full[n]) for n in own}
            if isinstance(module, nn.Linear) or _is_conv1d(module):
                transposed = not isinstance(module, nn.Linear)

                wkey = full["weight"]
                if lora["weight"] is not None:  # LoRA factors: fused once here, for every forward in the block
                    fused = _FusedLora.of(p["weight"], p.get("bias"), stacked.factors[wkey], transposed)

                    def fwd(self, x, _fu=fused, _b=p.get("bias"), _db=d.get("bias")):
                        return _fused_lora_forward(_fu, _b, _db, get())(x)
                else:
                    f = factors.get(wkey) if wkey in mixed else None

                    def fwd(self, x, _w=p["weight"], _b=p.get("bias"), _dw=d["weight"], _db=d.get("bias"),
                            _t=transposed, _f=f):
                        return _linear_forward(_w, _b, _dw, _db, get(), _t, _f, scratch)(x)
            elif isinstance(module, nn.Embedding):
                def fwd(self, ids, _w=p["weight"], _dw=d["weight"], _f=lora["weight"]):
                    return _embedding_forward(self, _w, _dw, get(), _f)(ids)
            elif any(lora.values()):
                names = ", ".join(sorted(full[n] for n in own if lora[n] is not None))
                raise InputError(f"per-sample merging: LoRA factors of {names} on a {type(module).__name__}; factored "
                                 "task vectors mix on Linear, Conv1D and Embedding weights only")
            elif isinstance(module, nn.LayerNorm):
                def fwd(self, x, _w=p.get("weight"), _b=p.get("bias"), _dw=d.get("weight"), _db=d.get("bias")):
                    return _layernorm_forward(self, _w, _b, _dw, _db, get())(x)
            elif isinstance(module, nn.Conv2d):
                def fwd(self, x, _w=p["weight"], _b=p.get("bias"), _dw=d["weight"], _db=d.get("bias")):
                    return _conv2d_forward(self, _w, _b, _dw, _db, get())(x)
            elif type(module).__name__ == "CLIPVisionEmbeddings" and set(own) == {"class_embedding"}:
                def fwd(self, pixel_values, interpolate_pos_encoding=False, _w=p["class_embedding"],
                        _dw=d["class_embedding"]):
                    return _clip_embeddings_forward(self, _w, _dw, get())(pixel_values, interpolate_pos_encoding)
            else:
                names = ", ".join(sorted(full[n] for n in own if full[n] in mixed))
                raise InputError(
                    f"per-sample merging does not support module type {type(module).__name__} "
                    f"(parameters {names}); supported: Linear, Conv1D, Conv2d, Embedding, LayerNorm, CLIPVisionEmbeddings"
                )
            module.forward = types.MethodType(fwd, module)
            patched.append(module)
        yield
    finally:
        scratch.buf = None
        for module in patched:
            with contextlib.suppress(AttributeError):
                del module.forward


def low_rank_factors(stacked: StackedVectors, body: nn.Module, rank: int) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, float]]:
    """Rank-``rank`` truncated SVD of the task vectors of every ``nn.Linear`` / Conv1D weight of ``body``.

    Returns ``(factors, error)``: ``factors[key] = (U [out, T*r], V [T*r, in])`` in the ``nn.Linear``
    orientation (GPT-2's Conv1D weights, ``[in, out]``, are transposed first), ``U_t`` carrying the
    singular values, and ``error[key]`` the relative Frobenius error ``||tau - U V|| / ||tau||`` over all
    tasks (0 at full rank). By Eckart-Young each ``U_t V_t`` is the best rank-r approximation of tau_t.
    """
    if rank < 1:
        raise InputError(f"low-rank rank must be at least 1, got {rank}")
    linear = {f"{n}.weight" if n else "weight": _is_conv1d(m) for n, m in body.named_modules()
              if isinstance(m, nn.Linear) or _is_conv1d(m)}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    error: dict[str, float] = {}
    for key, stack in stacked.tensors.items():
        if key not in linear:
            continue
        mats = stack.transpose(1, 2) if linear[key] else stack  # [T, out, in]
        r = min(rank, mats.shape[1], mats.shape[2])
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
        us = u[:, :, :r] * s[:, None, :r]  # [T, out, r]
        v = vh[:, :r, :]  # [T, r, in]
        approx = us @ v
        denom = float(mats.norm())
        error[key] = float((mats - approx).norm()) / denom if denom > 0 else 0.0
        factors[key] = (us.permute(1, 0, 2).reshape(mats.shape[1], -1).contiguous(),
                        v.reshape(-1, mats.shape[2]).contiguous())
    return factors, error


def run_with(body: nn.Module, params: StateDict | None, *args, **kwargs):
    """``body(*args, **kwargs)`` with its parameters and buffers replaced by ``params`` (all or some)."""
    if params is None:
        return body(*args, **kwargs)
    return torch.func.functional_call(body, dict(params), args=args, kwargs=kwargs, strict=False)


@torch.no_grad()
def per_sample_reference(
    run: Callable[[Mapping[str, Tensor], int], Tensor],
    pretrained: StateDict,
    stacked: StackedVectors,
    coeffs: Tensor,
) -> Tensor:
    """The oracle for equation (2): for each sample ``b``, build ``theta_b`` and call ``run(theta_b, b)``.

    ``run`` returns that sample's output with a leading batch dimension of 1; the outputs are stacked.
    """
    outs = []
    vectors = stacked.as_vectors()
    for b in range(coeffs.shape[0]):
        theta = combine(pretrained, vectors, {t: float(coeffs[b, i]) for i, t in enumerate(stacked.tasks)})
        outs.append(run(theta, b))
    return torch.cat(outs, 0)

