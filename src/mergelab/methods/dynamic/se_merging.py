"""SE-Merging: route each sample, then run it through the model merged with its own coefficients.

Chen et al., "SE-Merging: A Self-Enhanced Approach for Dynamic Model Merging", arXiv 2506.18135. The
router is :mod:`mergelab.methods.dynamic.router` (equations (3)-(5)); the per-sample merge is equation (2) of
:mod:`mergelab.core.functional`. One class serves every base method: it takes a
:class:`~mergelab.methods.MergePlan` (Task Arithmetic, TIES, DARE vectors and their coefficients) and
the experts' full bodies (the probes run the real experts, whatever the plan did to their vectors).

Forward modes, all behind :meth:`SEMerging.features`:

- ``"reference"``: per sample, materialise theta_b with ``combine`` and run it alone (the oracle);
- ``"exact"``: the same numbers for the whole batch through :func:`~mergelab.core.functional.per_sample_mixing`;
- ``"fast"`` (quantized groups): a static probe pass up to the probe layer routes each sample against
  calibrated per-task prototypes of the merged representation (no expert pass) and gives it its
  coefficients by equations (3)-(5); each sample then runs through the merged model of the code nearest
  to those coefficients, one of K codes of :meth:`SEMerging.group_coefficients` (a k-means codebook of the
  calibration texts' coefficients; the K merged bodies built once and cached). No per-sample mixing, two
  passes (the probe pass to the probe layer, then the group's merged model): about ``1 + layer / n_layers``
  static passes. Differs from the exact path in the rule (prototypes) and in rounding each sample's
  coefficients to the nearest code. (Not the single-pass mode below.)
- ``"single-pass"``: one pass. Layers up to the probe layer run the static merge; a hook at the probe
  layer routes against the prototypes and sets the coefficients the per-sample layers above it use.
- ``"prototype-exact"``: prototype routing from a static probe pass, then the exact per-sample forward.
- ``"lowrank"``: the router's own rule, then equation (2) written around the static merge,
  ``theta_b = theta_static + sum_t (C[b, t] - lambda_t) tau_t``, with each linear weight's tau_t
  replaced by its rank-``lowrank_rank`` truncated SVD (:func:`~mergelab.core.functional.low_rank_factors`):
  exact for samples whose coefficients equal the base ones, and the per-sample part costs two thin
  products instead of a per-sample weight matrix. Biases, layer norms and embeddings stay exact.

LoRA experts: a plan of Task Arithmetic or averaging over :class:`~mergelab.core.lora.LoraTaskVector` experts keeps
their factors (:func:`mergelab.methods.plan`), and every mode above mixes them exactly in activation space,
``W_0 x + sum_t C[b, t] s_t B_t (A_t x)`` (:class:`~mergelab.core.functional.FactoredStack`; ``"lowrank"``
truncates only the dense task vectors). ``experts`` (the probes) are the experts' bodies, W_0 + s_t B_t A_t.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab.core.errors import InputError
from mergelab.core.functional import StackedVectors, low_rank_factors, per_sample_mixing, per_sample_reference
from mergelab.core.statedict import StateDict
from mergelab.methods.dynamic import router as R
from mergelab.methods.dynamic.router import RouterConfig
from mergelab.methods.registry import MergePlan

MODES = ("reference", "exact", "fast", "single-pass", "prototype-exact", "lowrank")
GROUP_RULES = ("quantized", "prototype")  # how the fast path picks its merged models (see group_coefficients)


@dataclass
class Routing:
    """One batch's routing: scores ``[B, T]``, weights ``[B, T]`` and coefficients ``[B, T]``."""

    scores: Tensor
    weights: Tensor
    coefficients: Tensor

    @property
    def chosen(self) -> Tensor:
        return self.weights.argmax(-1)


class SEMerging:
    """A dynamic merged body for any family (:mod:`mergelab.pools.families`).

    ``plan`` holds the base method's per-task vectors and static coefficients; ``experts`` maps each
    task to its expert's full body state dict (same tasks as the plan).
    """

    def __init__(
        self,
        family,
        pretrained: StateDict,
        plan: MergePlan,
        experts: Mapping[str, StateDict],
        config: RouterConfig | None = None,
        lowrank_rank: int = 32,
        groups_per_task: int = 2,
        groups: str = "quantized",
    ) -> None:
        if int(lowrank_rank) < 1:
            raise InputError(f"lowrank_rank must be at least 1, got {lowrank_rank}")
        if isinstance(groups_per_task, bool) or not isinstance(groups_per_task, int) or groups_per_task < 1:
            raise InputError(f"groups_per_task must be a positive integer, got {groups_per_task!r}")
        if groups not in GROUP_RULES:
            raise InputError(f"groups must be one of {GROUP_RULES}, got {groups!r}")
        self.lowrank_rank = int(lowrank_rank)
        self.groups_per_task = groups_per_task
        self.groups = groups
        self.family = family
        self.config = config or RouterConfig()
        family.check_layer(self.config.layer)
        if set(experts) != set(plan.vectors):
            raise InputError(f"experts {sorted(experts)} and plan tasks {sorted(plan.vectors)} differ")
        self.tasks = list(plan.vectors)
        self.pretrained = dict(pretrained)
        self.experts = {t: experts[t] for t in self.tasks}
        device = family.device
        self.stacked = StackedVectors.from_vectors(plan.vectors, device=device)
        self.base = torch.tensor([float(plan.coefficients[t]) for t in self.tasks], dtype=torch.float32)
        self.static = plan.apply(self.pretrained)
        self.prototypes: Tensor | None = None
        self.expert_cache: Tensor | None = None  # probes="cached": [T, H], see cache_experts
        self._group_cache: dict = {}  # the fast path's codebook ("codes"), its merged bodies ("models"), "key"
        self._upper_keys = {k for k in self.stacked.keys if family.layer_of_key(k) > self.config.layer}

    # ------------------------------------------------------------------ routing
    def representations(self, batch: Mapping[str, Tensor], config: RouterConfig | None = None) -> dict[str, Tensor | None]:
        """The tensors equation (3) needs for the rule of ``config`` (default: this router's), only those."""
        cfg = config or self.config
        layer = cfg.layer
        merged = self.family.probe(batch, self.static, [layer])[layer]
        if cfg.normalisation == "prototype":
            return {"merged": merged, "prototypes": self._need_prototypes(layer)}
        if cfg.probes == "cached":
            experts = self._need_expert_cache(layer)[:, None, :]  # [T, 1, H]: broadcast over the batch
        else:
            experts = torch.stack([self.family.probe(batch, self.experts[t], [layer])[layer] for t in self.tasks])
        pre = None
        if cfg.normalisation in R.NEEDS_PRETRAINED:
            pre = self.family.probe(batch, self.pretrained, [layer])[layer]
        return {"merged": merged, "experts": experts, "pretrained": pre}

    def route(self, batch: Mapping[str, Tensor], config: RouterConfig | None = None) -> Routing:
        """Equations (3)-(5) for a batch, with this router's config or another one."""
        cfg = config or self.config
        s, w, c = R.coefficients(cfg, self.base, **self.representations(batch, cfg))
        return Routing(s, w, c)

    def with_config(self, **changes) -> RouterConfig:
        return RouterConfig(**{**self.config.to_dict(), **changes})

    @torch.no_grad()
    def calibrate(self, texts_by_task: Mapping[str, Sequence[str]], batch_size: int = 64) -> Tensor:
        """Per-task prototypes: the mean merged representation at the probe layer over each task's texts.

        The texts are unlabeled (only which task they come from is used), e.g. a few validation inputs.
        """
        missing = [t for t in self.tasks if not texts_by_task.get(t)]
        if missing:
            raise InputError(f"calibration needs texts for every task; none for {missing}")
        layer = self.config.layer
        protos, reps = [], []
        for t in self.tasks:
            texts = list(texts_by_task[t])
            parts = []
            for start in range(0, len(texts), batch_size):
                batch = self.family.tokenize(texts[start : start + batch_size])
                parts.append(self.family.probe(batch, self.static, [layer])[layer].float())
            reps.append(torch.cat(parts))
            protos.append(reps[-1].mean(0))
        self.prototypes = torch.stack(protos)
        self._calibration = torch.cat(reps)  # the static merge's probe representations, for the codebook
        self._prototype_layer = layer
        self._group_cache.clear()  # the codebook and merged bodies of the old calibration
        return self.prototypes

    def _need_prototypes(self, layer: int | None = None) -> Tensor:
        if self.prototypes is None:
            raise InputError("the 'prototype' rule and the fast path need calibrate(texts_by_task) first")
        if layer is not None and layer != self._prototype_layer:
            raise InputError(f"prototypes were calibrated at layer {self._prototype_layer}, not {layer}")
        return self.prototypes

    @torch.no_grad()
    def cache_experts(self, texts_by_task: Mapping[str, Sequence], batch_size: int = 64) -> Tensor:
        """The expert-representation cache of ``probes="cached"``: ``[T, H]``, row t expert t's mean probe
        representation (at the probe layer) of task t's texts, computed once; no expert pass at test time.

        The texts are unlabeled inputs of known task (e.g. a few validation inputs per task)."""
        missing = [t for t in self.tasks if not texts_by_task.get(t)]
        if missing:
            raise InputError(f"the expert cache needs inputs for every task; none for {missing}")
        layer = self.config.layer
        means = []
        for t in self.tasks:
            texts = list(texts_by_task[t])
            parts = [self.family.probe(self.family.tokenize(texts[i : i + batch_size]), self.experts[t], [layer])[layer].float()
                     for i in range(0, len(texts), batch_size)]
            means.append(torch.cat(parts).mean(0))
        self.expert_cache = torch.stack(means)
        self._expert_cache_layer = layer
        return self.expert_cache

    def _need_expert_cache(self, layer: int) -> Tensor:
        if getattr(self, "expert_cache", None) is None:
            raise InputError("probes='cached' needs cache_experts(texts_by_task) first")
        if layer != self._expert_cache_layer:
            raise InputError(f"the expert cache was built at layer {self._expert_cache_layer}, not {layer}")
        return self.expert_cache

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def features(self, batch: Mapping[str, Tensor], mode: str = "exact", routing: Routing | None = None) -> tuple[Tensor, Routing]:
        """Pooled last-layer features ``[B, H]`` of the per-sample merged body, and the routing used."""
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "fast":
            return self._grouped(batch)
        if mode == "single-pass":
            return self._single_pass(batch)
        if routing is None:
            routing = self.route(batch, self.with_config(normalisation="prototype") if mode == "prototype-exact" else None)
        coeffs = routing.coefficients.to(self.family.device)
        if mode == "lowrank":
            return self.low_rank_features(batch, coeffs), routing
        if mode == "reference":
            def one(theta, b):
                single = {k: v[b : b + 1] for k, v in batch.items()}
                return self.family.features(single, theta)

            return per_sample_reference(one, self.pretrained, self.stacked, coeffs), routing
        return self.mixed_features(batch, coeffs), routing

    def mixed_features(self, batch: Mapping[str, Tensor], coeffs: Tensor) -> Tensor:
        """Features under equation (2) for given coefficients ``[B, T]`` (the exact batched path)."""
        with per_sample_mixing(self.family.body, self.pretrained, self.stacked, coeffs):
            return self.family.features(batch, self.pretrained)

    def low_rank_factors(self) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, float]]:
        """The rank-``lowrank_rank`` factors of the linear weights' task vectors and their relative errors
        (computed once per rank)."""
        cache = self.__dict__.setdefault("_factors", {})
        if self.lowrank_rank not in cache:
            cache[self.lowrank_rank] = low_rank_factors(self.stacked, self.family.body, self.lowrank_rank)
        return cache[self.lowrank_rank]

    def low_rank_features(self, batch: Mapping[str, Tensor], coeffs: Tensor) -> Tensor:
        """Features of the ``"lowrank"`` mode: the deviation ``C - lambda`` from the static merge mixed per
        sample through the low-rank factors."""
        factors, _ = self.low_rank_factors()
        delta = coeffs - self.base.to(coeffs.device)
        with per_sample_mixing(self.family.body, self.static, self.stacked, delta, factors=factors):
            return self.family.features(batch, self.static)

    def group_coefficients(self) -> Tensor:
        """``[K, T]``: the coefficient vectors of the fast path's K merged models (one per group of samples).

        ``groups="quantized"`` (default): a k-means codebook (:func:`~mergelab.methods.dynamic.router.coefficient_codebook`)
        of the per-sample coefficients that equations (3)-(5) give the calibration texts under the
        prototype rule, ``K = groups_per_task * T`` codes at most. Each sample then runs through the merge
        of the code nearest to its own coefficients: the exact path's coefficients, rounded to K values.
        ``groups="prototype"``: K = T; row t is what a sample sitting exactly on task t's prototype gets
        (scores ``||mu_t - mu_s||`` over the prototypes s, standardised, softmax, rescaled), and a sample
        goes to the row of its chosen task.
        """
        protos = self._need_prototypes()
        cfg = self.with_config(normalisation="prototype")
        key = (self.groups, self.groups_per_task, cfg.temperature, cfg.gain, cfg.scale)
        cache = self._group_cache
        if cache.get("key") != key:
            *_, codes = R.coefficients(cfg, self.base, merged=protos, prototypes=protos)  # at the prototypes
            if self.groups == "quantized":
                _, w, c = R.coefficients(cfg, self.base, merged=self._calibration, prototypes=protos)
                codes = R.coefficient_codebook(c, w.argmax(-1), self.groups_per_task * len(self.tasks), codes)
            cache.clear()
            cache.update(key=key, codes=codes, models={})
        return cache["codes"]

    def _group_params(self, k: int) -> dict[str, Tensor]:
        codes = self.group_coefficients()
        models = self._group_cache["models"]
        if k not in models:
            models[k] = self.stacked.merged(self.pretrained, codes[k])
        return models[k]

    def _grouped(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Routing]:
        """The fast path: prototype routing from a static probe pass, then each group of samples through one
        merged model of :meth:`group_coefficients` (cached): no per-sample mixing and no expert pass."""
        layer = self.config.layer
        merged = self.family.probe(batch, self.static, [layer])[layer]
        s, w, c = R.coefficients(self.with_config(normalisation="prototype"), self.base, merged=merged,
                                 prototypes=self._need_prototypes())
        codes = self.group_coefficients()
        group = torch.cdist(c, codes.to(c.device)).argmin(-1) if self.groups == "quantized" else w.argmax(-1)
        feats: Tensor | None = None
        for k in group.unique().tolist():
            idx = (group == k).nonzero().squeeze(1)
            sub = self.family.subset(batch, idx)  # the group's rows, without padding they do not need
            got = self.family.features(sub, self._group_params(k))
            if feats is None:
                feats = torch.empty(merged.shape[0], got.shape[1], device=got.device, dtype=got.dtype)
            feats[idx] = got.to(feats.dtype)
        return feats, Routing(s, w, codes.to(w.device)[group])

    def _single_pass(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Routing]:
        protos = self._need_prototypes()
        cfg, family, body = self.config, self.family, self.family.body
        state: dict[str, object] = {}

        def set_route(hidden: Tensor) -> None:
            s, w, c = R.coefficients(self.with_config(normalisation="prototype"), self.base,
                                     merged=family.pool_hidden(hidden, batch).float(), prototypes=protos)
            state["routing"] = Routing(s, w, c)

        def coeffs() -> Tensor:
            if "routing" not in state:
                raise RuntimeError("a per-sample layer ran before the probe layer routed the batch")
            return state["routing"].coefficients  # type: ignore[union-attr]

        handle = family.route_hook(cfg.layer, set_route)
        try:
            with per_sample_mixing(body, self.pretrained, self.stacked, coeffs, keys=self._upper_keys):
                feats = family.features(batch, self.static)
        finally:
            handle.remove()
        return feats, state["routing"]  # type: ignore[return-value]

