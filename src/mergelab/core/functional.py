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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergelab.core.errors import InputError
from mergelab.core.statedict import StateDict, combine


class StackedVectors:
    """Per-task vectors stacked along a leading task axis: ``tensors[key]`` is ``[T, *shape]`` float32.

    ``tasks`` fixes the order of the task axis, the order of the columns of a coefficient matrix.
    """

    def __init__(self, tasks: Sequence[str], tensors: Mapping[str, Tensor]):
        self.tasks = list(tasks)
        self.tensors = dict(tensors)

    @classmethod
    def from_vectors(cls, vectors: Mapping[str, Mapping[str, Tensor]], device: torch.device | str | None = None) -> StackedVectors:
        tasks = list(vectors)
        if not tasks:
            raise InputError("no task vectors to stack")
        keys = list(vectors[tasks[0]])
        for t in tasks[1:]:
            if set(vectors[t]) != set(keys):
                raise InputError(f"task vector {t!r} has other keys than {tasks[0]!r}")
        tensors = {
            k: torch.stack([vectors[t][k].to(device=device, dtype=torch.float32) for t in tasks])
            for k in keys
        }
        return cls(tasks, tensors)

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
        """Equation (1) with one coefficient per task (a ``[T]`` tensor or a mapping)."""
        c = self.coefficient_matrix(coefficients)
        if c.ndim != 1 or c.numel() != len(self.tasks):
            raise InputError(f"coefficients must have shape [{len(self.tasks)}], got {tuple(c.shape)}")
        return combine(pretrained, self.as_vectors(), {t: float(c[i]) for i, t in enumerate(self.tasks)})

    def as_vectors(self) -> dict[str, dict[str, Tensor]]:
        return {t: {k: v[i] for k, v in self.tensors.items()} for i, t in enumerate(self.tasks)}


# ---------------------------------------------------------------------------------------------- per sample
def _mix(stack: Tensor, coeffs: Tensor) -> Tensor:
    """``[B, *shape]``: sum_t coeffs[b, t] * stack[t]."""
    return torch.einsum("bt,t...->b...", coeffs.to(stack.dtype), stack)


def _leading(x: Tensor, batch: int, what: str) -> None:
    if x.shape[0] != batch:
        raise InputError(
            f"per-sample merge: {what} has leading dimension {x.shape[0]}, expected the batch size {batch} "
            "(per-sample coefficients need the batch first)"
        )


def _linear_forward(weight0: Tensor, bias0: Tensor | None, dw: Tensor | None, db: Tensor | None,
                    coeffs: Tensor, transposed: bool,
                    factors: tuple[Tensor, Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """Forward of a Linear (``weight [out, in]``) or Conv1D (``weight [in, out]``, transposed) per sample.

    With ``factors = (U [out, T*r], V [T*r, in])`` the weight's task vectors are taken as
    ``tau_t = U[:, t*r:(t+1)*r] @ V[t*r:(t+1)*r]`` (the Linear orientation, Conv1D included)."""

    def forward(x: Tensor) -> Tensor:
        b = coeffs.shape[0]
        _leading(x, b, "a linear layer's input")
        flat = x.reshape(b, -1, x.shape[-1])
        w_b = None
        if factors is not None:
            u, v = factors
            y = F.linear(flat, weight0.T if transposed else weight0)
            z = F.linear(flat, v)  # [B, L, T*r]
            scale = coeffs.to(z.dtype).repeat_interleave(v.shape[0] // coeffs.shape[1], dim=1)
            y = y + F.linear(z * scale.unsqueeze(1), u)
        elif dw is None:
            y = F.linear(flat, weight0.T if transposed else weight0)
        else:
            w_b = weight0.unsqueeze(0) + _mix(dw, coeffs).to(weight0.dtype)  # [B, out, in] or [B, in, out]
            y = torch.bmm(flat, w_b if transposed else w_b.transpose(1, 2))
        del w_b
        if bias0 is not None:
            bias = bias0.unsqueeze(0) + (_mix(db, coeffs).to(bias0.dtype) if db is not None else 0)
            y = y + bias.unsqueeze(1)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


def _embedding_forward(module: nn.Embedding, weight0: Tensor, dw: Tensor | None, coeffs: Tensor):
    def forward(ids: Tensor) -> Tensor:
        base = F.embedding(ids, weight0, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)
        if dw is None:
            return base
        b = coeffs.shape[0]
        if ids.shape[0] not in (1, b):
            _leading(ids, b, "an embedding's index tensor")
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
    their low-rank factors.
    """
    factors = factors or {}
    get = coeffs if callable(coeffs) else (lambda: coeffs)
    mixed = set(stacked.tensors) if keys is None else set(keys) & set(stacked.tensors)
    patched: list[nn.Module] = []

    def dw_of(name: str) -> Tensor | None:
        return stacked.tensors[name] if name in mixed else None

    try:
        for mod_name, module in body.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            full = {n: f"{mod_name}.{n}" if mod_name else n for n in own}
            if not any(full[n] in mixed for n in own):
                continue
            p = {n: pretrained[full[n]] for n in own}
            d = {n: dw_of(full[n]) for n in own}
            if isinstance(module, nn.Linear) or _is_conv1d(module):
                transposed = not isinstance(module, nn.Linear)

                wkey = full["weight"]
                f = factors.get(wkey) if wkey in mixed else None

                def fwd(self, x, _w=p["weight"], _b=p.get("bias"), _dw=d["weight"], _db=d.get("bias"), _t=transposed,
                        _f=f):
                    return _linear_forward(_w, _b, _dw, _db, get(), _t, _f)(x)
            elif isinstance(module, nn.Embedding):
                def fwd(self, ids, _w=p["weight"], _dw=d["weight"]):
                    return _embedding_forward(self, _w, _dw, get())(ids)
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

