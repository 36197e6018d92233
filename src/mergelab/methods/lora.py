"""Static merges of LoRA experts, exact (issue 16; docs/lora.md).

A LoRA expert's task vector is tau_t = s_t B_t A_t on each adapted weight and zero elsewhere (Hu et al.,
"LoRA", 2021, Eq. 3: h = W0 x + (alpha / r) B A x; s = alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023),
read by :func:`mergelab.core.lora.load_lora`. Two paths, both equal to the merge of the dense task vectors:

- **factored** (``task_arithmetic``, ``average``, every expert a LoRA adapter): the merged update of a
  weight is sum_t lambda_t s_t B_t A_t = [lambda_1 s_1 B_1 | lambda_2 s_2 B_2 | ...] @ [A_1; A_2; ...], a
  LoRA update of rank sum_t r_t with scaling 1 (:func:`merged_factors`). It is written as a full model
  (W0 + that product) or as a PEFT adapter folder (:func:`save_adapter`) whose ``merge_and_unload`` is the
  same model. Nothing is approximated: the ranks are concatenated, never truncated.
- **dense** (TIES, DARE, or LoRA and full experts mixed): TIES and DARE are elementwise on the true
  update, so they act on ``s B A`` (never on A and B separately: the trimmed or dropped product is not the
  product of trimmed or dropped factors). Each weight's update is materialised one key at a time, run
  through the same per-tensor kernels as the in-memory and streamed merges (the method's
  :class:`~mergelab.core.kernels.SliceForm`), and dropped. TIES' global threshold (top-k over the whole task vector, the
  zeros of the keys an adapter does not touch included) comes from two passes of the exact radix selection
  over the materialised updates; memory stays at one key's updates for all experts at a time.

Adapter output (:func:`adapter_factors`, :func:`save_adapter`): exact for the factored methods; for TIES and DARE,
whose merged update is not low-rank, each weight's merged update is replaced by its truncated SVD of the smallest
rank whose relative Frobenius error is at most a tolerance (:func:`svd_factors`), and the error reached is reported
per weight and over all adapted weights.

PEFT's ``add_weighted_adapter`` combines A and B separately for several ``combination_type``s, so that its
result is not the weighted sum of the updates (cross terms B_i A_j appear, or TIES/DARE act on factors);
``benchmarks/lora_vs_peft.py`` measures how far.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergelab.core import kernels
from mergelab.core.errors import IncompatibleModelsError, InputError
from mergelab.core.io import atomic_write_dir, check_output_path, load_state_dict
from mergelab.core.lora import PEFT_PREFIX, LoraModule, LoraTaskVector, is_adapter_dir, load_lora
from mergelab.core.statedict import StateDict, TaskVector, check_compatible, is_mergeable
from mergelab.methods.registry import check_params, merge_label, slice_form

Expert = StateDict | LoraTaskVector
FACTORED_METHODS = ("task_arithmetic", "average")


def is_lora(expert: Any) -> bool:
    return isinstance(expert, LoraTaskVector)


def load_experts(pretrained: StateDict, experts: Mapping[str, str | os.PathLike[str]]) -> dict[str, Expert]:
    """Each expert path loaded: a PEFT adapter folder as a :class:`LoraTaskVector` over ``pretrained``, anything
    else as a state dict (:func:`mergelab.core.io.load_state_dict`). Errors name the expert."""
    out: dict[str, Expert] = {}
    for name, path in experts.items():
        try:
            out[name] = load_lora(path, pretrained) if is_adapter_dir(path) else load_state_dict(path)
        except InputError as exc:
            raise type(exc)(f"expert {name!r}: {exc}") from exc
    return out


def check_experts(pretrained: StateDict, experts: Mapping[str, Expert]) -> None:
    """Full experts: :func:`~mergelab.core.statedict.check_compatible`; LoRA experts: every module fits a floating
    weight of ``pretrained`` (an adapter read against another base is refused, naming the expert and module)."""
    if not experts:
        raise InputError("no experts given: merging needs at least one expert model")
    full = {t: e for t, e in experts.items() if not is_lora(e)}
    if full:
        check_compatible(pretrained, full)
    for t, vec in experts.items():
        if not is_lora(vec):
            continue
        for key, m in vec.modules.items():
            ref = pretrained.get(key)
            shape = (m.A.shape[1], m.B.shape[0]) if m.transposed else (m.B.shape[0], m.A.shape[1])
            if ref is None or tuple(ref.shape) != shape or not is_mergeable(ref):
                raise IncompatibleModelsError(
                    f"expert {t!r} ({vec.source}): module {m.name!r} does not fit the pretrained model's "
                    f"{key!r} ({'absent' if ref is None else tuple(ref.shape)}; the update is {shape})")


@dataclass(frozen=True)
class _Steps:
    """A static method's per-tensor form (:class:`~mergelab.core.kernels.SliceForm`) read as the few numbers the
    dense LoRA path needs: coefficients, DARE's drop, TIES' trim and sign election."""

    coefficients: tuple[float, ...]
    label: str
    drop_rate: float = 0.0
    seed: int = 0
    ties: bool = False
    density: float = 1.0
    scope: str = "global"

    @property
    def trims(self) -> bool:
        return self.ties and self.density < 1.0


_KNOWN_STEPS = (kernels.Drop, kernels.Trim, kernels.ElectDisjoint)


def has_weightwise_path(method: str, tasks: list[str], params: Mapping[str, Any]) -> bool:
    """Whether :func:`merge` can visit LoRA experts one weight at a time: the method has a per-tensor form made of
    Drop, Trim and ElectDisjoint steps (every registered method of mergelab). A method without one (a user's,
    registered with its plan only) is merged by :func:`mergelab.methods.registry.merge` through its plan over the
    materialised task vectors instead."""
    if check_params(method, params).stream is None:
        return False
    return all(isinstance(s, _KNOWN_STEPS) for s in slice_form(method, tasks, params).steps)


def _plan_of(method: str, tasks: list[str], params: Mapping[str, Any]) -> _Steps:
    form = slice_form(method, tasks, params)
    unknown = [type(s).__name__ for s in form.steps if not isinstance(s, _KNOWN_STEPS)]
    if unknown:
        raise InputError(f"method {method!r}: LoRA experts merge through Drop, Trim and ElectDisjoint steps; "
                         f"its form has {unknown}")
    drop = next((s for s in form.steps if isinstance(s, kernels.Drop)), None)
    trim = next((s for s in form.steps if isinstance(s, kernels.Trim)), None)
    return _Steps(tuple(form.coefficients[t] for t in tasks), merge_label(method, params),
                  drop_rate=drop.rate if drop else 0.0, seed=drop.seed if drop else 0,
                  ties=any(isinstance(s, kernels.ElectDisjoint) for s in form.steps),
                  density=trim.density if trim else 1.0, scope=trim.scope if trim else "global")


def is_factored(method: str, experts: Mapping[str, Expert]) -> bool:
    """True when the merge stays factored: Task Arithmetic or averaging of LoRA experts only."""
    return method in FACTORED_METHODS and all(is_lora(e) for e in experts.values())


def merged_factors(method: str, experts: Mapping[str, LoraTaskVector], **params: Any) -> dict[str, LoraModule]:
    """The merged update of each adapted weight as one LoRA module of scaling 1 (Task Arithmetic, averaging).

    B = [lambda_1 s_1 B_1 | ... | lambda_T s_T B_T] (the coefficients and scalings folded into B), A = [A_1; ...;
    A_T], rank = the sum of the ranks of the experts adapting that weight; B A = sum_t lambda_t s_t B_t A_t.
    """
    if method not in FACTORED_METHODS:
        raise InputError(f"method {method!r} does not stay factored on LoRA experts (only {', '.join(FACTORED_METHODS)} "
                         "do: the merged update of TIES or DARE is not low-rank); write a full model instead")
    bad = [t for t, e in experts.items() if not is_lora(e)]
    if bad:
        raise InputError(f"expert(s) {bad} are full models, not LoRA adapters: the merge cannot stay factored")
    coeffs = _plan_of(method, list(experts), params).coefficients
    first_vec = next(iter(experts.values()))
    rename = _name_rule(next(iter(first_vec.modules.values())))
    keys: list[str] = []
    for vec in experts.values():
        keys += [k for k in vec.modules if k not in keys]
    out: dict[str, LoraModule] = {}
    for key in keys:
        mods = [(lam, vec.modules[key]) for lam, vec in zip(coeffs, experts.values()) if key in vec.modules]
        first = mods[0][1]
        for _, m in mods[1:]:
            if (m.fan_in_fan_out, m.embedding) != (first.fan_in_fan_out, first.embedding):
                raise InputError(f"weight {key!r}: the adapters disagree on its layout (fan_in_fan_out or embedding)")
        B = torch.cat([m.B * (lam * m.scaling) for lam, m in mods], dim=1)
        A = torch.cat([m.A for _, m in mods], dim=0)
        out[key] = LoraModule(key, rename(key), B, A, 1.0, first.fan_in_fan_out, first.embedding)
    return out


def _name_rule(m: LoraModule):
    """key -> module name under the first adapter's naming (body or task model: a prefix added or dropped), so that
    one merged adapter names every module the same way even when its inputs were trained on different wrappers."""
    stem = m.key[: -len(".weight")]
    if m.name.endswith(stem):
        add = m.name[: len(m.name) - len(stem)]
        return lambda key: add + key[: -len(".weight")]
    drop = stem[: len(stem) - len(m.name)]
    return lambda key: key[len(drop): -len(".weight")] if key.startswith(drop) else key[: -len(".weight")]


def _apply_factors(pretrained: StateDict, factors: Mapping[str, LoraModule]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, base in pretrained.items():
        m = factors.get(key)
        if m is None:
            out[key] = base.clone()
            continue
        merged = base.detach().to(torch.float32) + m.delta()
        kernels.require_finite_result(key, merged, "factored LoRA merge")
        out[key] = merged.to(base.dtype)
    return out


def _tau(pretrained: StateDict, expert: Expert, key: str) -> Tensor | None:
    """The expert's task-vector tensor for ``key`` (float32), or None where it is zero (a key an adapter skips)."""
    if is_lora(expert):
        return expert[key] if key in expert.modules else None
    return kernels.task_vector(expert[key], pretrained[key])


def _support(pretrained: StateDict, expert: Expert, mergeable: list[str]) -> list[str]:
    """The keys where the expert's task vector may be non-zero."""
    return [k for k in mergeable if k in expert.modules] if is_lora(expert) else list(mergeable)


def merge(method: str, pretrained: StateDict, experts: Mapping[str, Expert], **params: Any) -> dict[str, Tensor]:
    """Merge LoRA experts (:class:`LoraTaskVector`), possibly with full experts (state dicts), into a full state dict.

    Equal to :func:`mergelab.merge` on the dense task vectors (s B A on adapted weights, 0 elsewhere), up to
    float rounding: factored for Task Arithmetic and averaging of adapters only, else one key at a time.
    """
    check_params(method, params)
    check_experts(pretrained, experts)
    if is_factored(method, experts):
        return _apply_factors(pretrained, merged_factors(method, experts, **params))
    return _merge_dense(method, pretrained, experts, params)


def _merge_dense(method: str, pretrained: StateDict, experts: Mapping[str, Expert], params: Mapping[str, Any]
                 ) -> dict[str, Tensor]:
    merge_key = _dense_merger(method, pretrained, experts, params)
    return {key: merge_key(key, base) if is_mergeable(base) else base.clone() for key, base in pretrained.items()}


def merged_updates(method: str, pretrained: StateDict, experts: Mapping[str, LoraTaskVector], **params: Any
                   ) -> dict[str, Tensor]:
    """The merged update ``merged - W0`` of every weight some adapter touches (zero elsewhere), dense, in the
    weight's layout: the method run on the true updates s B A exactly as :func:`merge` runs it, from a zero base."""
    check_params(method, params)
    check_experts(pretrained, experts)
    bad = [t for t, e in experts.items() if not is_lora(e)]
    if bad:
        raise InputError(f"expert(s) {bad} are full models, not LoRA adapters: their update is not confined to the "
                         "adapted weights")
    merge_key = _dense_merger(method, pretrained, experts, params)
    keys = [k for k in pretrained if any(k in e.modules for e in experts.values())]
    return {k: merge_key(k, torch.zeros(pretrained[k].shape, dtype=torch.float32)) for k in keys}


def _dense_merger(method: str, pretrained: StateDict, experts: Mapping[str, Expert], params: Mapping[str, Any]):
    """``merge_key(key, base) -> base + merged update of key``: the method on the true updates, one key at a time."""
    tasks = list(experts)
    pipe = _plan_of(method, tasks, params)
    mergeable = [k for k, t in pretrained.items() if is_mergeable(t) and t.numel()]

    def taus(key: str) -> list[Tensor | None]:
        out = []
        for t in tasks:
            v = _tau(pretrained, experts[t], key)
            if v is not None and pipe.drop_rate > 0:
                v = kernels.drop(v, pipe.drop_rate, pipe.seed, t, key)
            out.append(v)
        return out

    global_thr: list[Tensor] | None = None
    if pipe.trims and pipe.scope == "global":
        global_thr = _global_thresholds(pretrained, experts, mergeable, pipe.density, taus)

    def merge_key(key: str, base: Tensor) -> Tensor:  # a function, so that one key's updates die with its frame
        vs = taus(key)
        if pipe.ties:
            zeros = torch.zeros(base.shape, dtype=torch.float32)
            vs = [zeros if v is None else v for v in vs]
            if pipe.trims and base.numel():
                thr = global_thr or [kernels.kth_largest_abs([v], kernels.kept_count(v.numel(), pipe.density))
                                     for v in vs]
                vs = [kernels.trim(v, th) for v, th in zip(vs, thr)]
            vs = kernels.disjoint_parts(vs, kernels.elect_sign(vs))
        out = kernels.combine_tensor(base, [(lam, v) for lam, v in zip(pipe.coefficients, vs) if v is not None])
        out = out.to(base.dtype)
        kernels.require_finite_result(key, out, pipe.label)
        return out

    return merge_key


def _global_thresholds(pretrained: StateDict, experts: Mapping[str, Expert], mergeable: list[str], density: float,
                       taus) -> list[Tensor]:
    """Each task's exact k-th largest |tau| over the whole (dense) task vector, k = density * all mergeable values.

    The zeros of keys an adapter does not touch are the smallest magnitudes: when k reaches into them the
    threshold is 0, else it is the k-th largest over the materialised updates (two radix-selection passes,
    one key at a time)."""
    tasks = list(experts)
    n = sum(pretrained[k].numel() for k in mergeable)
    k = kernels.kept_count(n, density) if n else 1
    sels: list[kernels.KthLargestAbs | None] = []
    for t in tasks:
        m = sum(pretrained[key].numel() for key in _support(pretrained, experts[t], mergeable))
        sels.append(kernels.KthLargestAbs(k) if k <= m else None)
    support = sorted({key for t in tasks for key in _support(pretrained, experts[t], mergeable)},
                     key=mergeable.index)
    def feed(step: str, key: str) -> None:  # one key's updates at a time, freed on return
        for sel, v in zip(sels, taus(key)):
            if sel is not None and v is not None:
                getattr(sel, step)(v)

    for step in ("add_coarse", "add_fine"):
        for key in support:
            feed(step, key)
        if step == "add_coarse":
            for sel in sels:
                if sel is not None:
                    sel.end_coarse()
    return [sel.value() if sel is not None else torch.tensor(0.0) for sel in sels]


def dense_task_vector(pretrained: StateDict, expert: LoraTaskVector) -> TaskVector:
    """The expert's whole task vector materialised: s B A on adapted weights, zeros on every other mergeable key
    (what :func:`mergelab.plan` works on; memory: one full model)."""
    return TaskVector({k: expert[k] if k in expert.modules else torch.zeros(t.shape, dtype=torch.float32)
                       for k, t in pretrained.items() if is_mergeable(t)})


def task_vectors_of(pretrained: StateDict, experts: Mapping[str, Expert], *, factored: bool = True
                    ) -> dict[str, LoraTaskVector | TaskVector]:
    """Each expert's task vector, after :func:`check_experts`: a full expert's theta_t - theta_0; a LoRA expert's
    :class:`LoraTaskVector` as it is (``factored``: AdaMerging and SyMerge mix its factors) or materialised whole
    by :func:`dense_task_vector` (``factored=False``: AdaMerging++'s TIES trim counts the zeros of the weights an
    adapter does not touch, as on the dense task vector)."""
    check_experts(pretrained, experts)
    return {t: (e if factored else dense_task_vector(pretrained, e)) if is_lora(e) else TaskVector.between(pretrained, e)
            for t, e in experts.items()}


# ---------------------------------------------------------------- PEFT adapter output

DEFAULT_SVD_TOL = 1e-2


def check_tolerance(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise InputError(f"--svd-tol (the relative error of the truncated SVD) must be a number in [0, 1), got {tol!r}")
    return float(tol)


def svd_factors(updates: Mapping[str, Tensor], experts: Mapping[str, LoraTaskVector], tol: float = DEFAULT_SVD_TOL
                ) -> tuple[dict[str, LoraModule], dict[str, Any]]:
    """Each merged update as a LoRA module of scaling 1: its truncated SVD (Eckart-Young: the best rank-r
    approximation in the Frobenius norm), of the smallest rank r with ``||U - U_r||_F <= tol ||U||_F``.

    ``updates``: key -> dense update in the weight's layout (:func:`merged_updates`); ``experts``: the input
    adapters (each module's layout and name). For an update ``M`` [out, in] (its transpose for Conv1D and
    embedding layouts) with singular values sigma_i, ``||M - M_r||_F^2 = sum_{i > r} sigma_i^2``; the SVD runs in
    float64 and B = U_r sqrt(Sigma_r), A = sqrt(Sigma_r) V_r^T in float32. An update that is exactly zero (TIES
    trimmed it away) gets no module.

    Returns ``(factors, report)``: ``report["modules"][name]`` has the key, rank, the full rank min(out, in) and
    the relative error measured on the float32 factors (``||M - B A||_F / ||M||_F``); ``report["error"]`` is
    the relative error over all adapted weights together, ``report["values"]`` the factors' size against the
    dense updates'.
    """
    tol = check_tolerance(tol)
    if not experts:
        raise InputError("no adapters given")
    first = next(iter(experts.values()))
    rename = _name_rule(next(iter(first.modules.values())))
    factors: dict[str, LoraModule] = {}
    modules: dict[str, dict[str, Any]] = {}
    err2 = norm2 = 0.0
    n_factored = n_dense = 0
    for key, upd in updates.items():
        like = next(e.modules[key] for e in experts.values() if key in e.modules)
        mat = (upd.T if like.transposed else upd).to(torch.float64)
        name = rename(key)
        norm = float(mat.norm())
        n_dense += mat.numel()
        if norm == 0.0:
            modules[name] = {"key": key, "rank": 0, "full_rank": min(mat.shape), "error": 0.0}
            continue
        u, sig, vh = torch.linalg.svd(mat, full_matrices=False)
        tail = sig.flip(0).square().cumsum(0).flip(0).sqrt() / norm  # tail[i] = ||M - M_i|| / ||M||
        ok = (torch.cat([tail[1:], tail.new_zeros(1)]) <= tol).nonzero()
        r = int(ok[0]) + 1 if len(ok) else len(sig)
        root = sig[:r].sqrt()
        B = (u[:, :r] * root).to(torch.float32).contiguous()
        A = (root[:, None] * vh[:r]).to(torch.float32).contiguous()
        err = float((mat - B.double() @ A.double()).norm()) / norm
        factors[key] = LoraModule(key, name, B, A, 1.0, like.fan_in_fan_out, like.embedding)
        modules[name] = {"key": key, "rank": r, "full_rank": min(mat.shape), "error": err}
        err2 += (err * norm) ** 2
        norm2 += norm ** 2
        n_factored += B.numel() + A.numel()
    report = {
        "method": "truncated SVD of each merged update", "tolerance": tol,
        "error": (err2 / norm2) ** 0.5 if norm2 else 0.0,
        "max_module_error": max((m["error"] for m in modules.values()), default=0.0),
        "ranks": [min((m["rank"] for m in modules.values()), default=0), max((m["rank"] for m in modules.values()), default=0)],
        "values": {"factors": n_factored, "dense_updates": n_dense},
        "modules": modules,
    }
    return factors, report


def adapter_factors(method: str, pretrained: StateDict, experts: Mapping[str, LoraTaskVector], *,
                    tol: float = DEFAULT_SVD_TOL, **params: Any) -> tuple[dict[str, LoraModule], dict[str, Any]]:
    """A static merge of LoRA adapters as LoRA factors for a PEFT adapter folder (:func:`save_adapter`), and a report.

    Task Arithmetic and averaging stay exact (:func:`merged_factors`: ranks concatenated, error 0). TIES and DARE
    act on the true updates s B A, whose merge is not low-rank: each weight's merged update is replaced by its
    truncated SVD at relative error ``tol`` (:func:`svd_factors`), and the report says the error reached."""
    tol = check_tolerance(tol)
    if method in FACTORED_METHODS:
        check_params(method, params)
        check_experts(pretrained, experts)
        factors = merged_factors(method, experts, **params)
        return factors, {"method": "exact (ranks concatenated)", "tolerance": tol, "error": 0.0,
                         "max_module_error": 0.0,
                         "ranks": [min(m.rank for m in factors.values()), max(m.rank for m in factors.values())]}
    return svd_factors(merged_updates(method, pretrained, experts, **params), experts, tol)



def adapter_config(factors: Mapping[str, LoraModule], like: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An ``adapter_config.json`` for ``factors`` (scaling 1 everywhere: alpha = rank per module).

    The most common rank is ``r`` = ``lora_alpha``; other modules get ``rank_pattern`` and ``alpha_pattern``
    entries under their full (regex-escaped) names. ``like``: an input adapter's config, for
    ``base_model_name_or_path``, ``task_type`` and ``fan_in_fan_out``.
    """
    import re
    from collections import Counter

    like = dict(like or {})
    ranks = Counter(m.rank for m in factors.values())
    r = max(ranks, key=lambda x: (ranks[x], x)) if ranks else 1
    other = {re.escape(m.name): m.rank for m in factors.values() if m.rank != r}
    fans = {m.fan_in_fan_out for m in factors.values() if not m.embedding}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": like.get("base_model_name_or_path"),
        "task_type": like.get("task_type"),
        "target_modules": sorted(m.name for m in factors.values()),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fans == {True},
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def save_adapter(factors: Mapping[str, LoraModule], out: str | os.PathLike[str], *,
                 like: Mapping[str, Any] | None = None, inputs: Iterable[str | os.PathLike[str]] = (),
                 metadata: Mapping[str, str] | None = None, report: Mapping[str, Any] | None = None) -> Path:
    """Write ``factors`` as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), atomically.

    ``PeftModel.from_pretrained(base, out).merge_and_unload()`` is then W0 + B A per module: the full merge.
    ``report`` (:func:`adapter_factors`'): written beside them as ``merge_report.json`` (PEFT ignores it).
    """
    if not factors:
        raise InputError("the merged update is zero on every weight: there is no adapter to write")
    from safetensors.torch import save_file

    names: dict[str, str] = {}
    for key, m in factors.items():
        if m.name in names and names[m.name] != key:
            raise InputError(f"module name {m.name!r} stands for two weights ({names[m.name]!r}, {key!r})")
        names[m.name] = key
    fans = {m.fan_in_fan_out for m in factors.values() if not m.embedding}
    if len(fans) > 1:
        raise InputError("the merged modules mix fan_in_fan_out layouts; one adapter config cannot describe them")
    out_p = check_output_path(out, list(inputs))
    cfg = adapter_config(factors, like)
    tensors = {}
    for m in factors.values():
        a, b = ("lora_embedding_A", "lora_embedding_B") if m.embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{m.name}.{a}"] = m.A.contiguous()
        tensors[f"{PEFT_PREFIX}{m.name}.{b}"] = m.B.contiguous()

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=dict(metadata or {"format": "pt"}))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if report is not None:
            (tmp / "merge_report.json").write_text(json.dumps(report, indent=1) + "\n")

    return atomic_write_dir(out_p, fill)


__all__ = ["DEFAULT_SVD_TOL", "FACTORED_METHODS", "adapter_config", "adapter_factors", "has_weightwise_path", "merged_updates", "svd_factors", "check_experts", "dense_task_vector", "is_factored", "is_lora", "load_experts",
           "merge", "merged_factors", "save_adapter", "task_vectors_of"]
