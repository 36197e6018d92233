"""AdaMerging and SyMerge as registered adaptive methods: one entry each, run on a pool's unlabeled inputs.

- ``adamerging_taskwise`` / ``adamerging_layerwise``: AdaMerging (Yang et al., ICLR 2024, Eq. 4-6), one
  coefficient per task / per task and parameter tensor, entropy minimisation on the test inputs.
- ``adamerging_plusplus`` / ``adamerging_plusplus_taskwise``: layer-wise / task-wise AdaMerging over
  TIES-trimmed, sign-elected vectors (AdaMerging++).
- ``symerge``: SyMerge (Jung et al., arXiv 2412.19098): layer-wise coefficients learned jointly with one
  task-specific layer per task against the experts' own pseudo-labels.

All read the evaluated tasks' inputs, never their labels (:mod:`.inputs`). ``eval_at`` keeps snapshots; a pool
with an ``on_snapshot`` attribute (the runner's ``RunPool``) gets each as it is taken. A pool's LoRA experts
(``pool.adapters``) enter as their factors (:class:`~mergelab.methods.adaptive.coefficients.MergedParams`); the
experts' own forward passes (SyMerge's pseudo-labels) run their bodies.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergelab.methods.adaptive.adamerging import DEFAULT_ADAMERGING_STEPS, adamerging, ties_vectors
from mergelab.methods.adaptive.result import AdaptResult
from mergelab.methods.adaptive.symerge import DEFAULT_SYMERGE_STEPS, PseudoLabels, symerge
from mergelab.methods.lora import task_vectors_of
from mergelab.methods.registry import MethodOutput, pool_experts, register_method


def _vectors(pool, factored: bool = True):
    """The pool's task vectors: a LoRA expert (``pool.adapters``) as its factors (``factored``) or materialised,
    a full expert as theta_t - theta_0."""
    return task_vectors_of(pool.pretrained, pool_experts(pool), factored=factored)


class AdaMergingParams(BaseModel):
    """AdaMerging's optimisation (Yang et al. 2024): Adam on the coefficients, a batch per task per step."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=DEFAULT_ADAMERGING_STEPS, ge=0, description="adaptation steps (the paper: 500)")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(default=16, ge=1, description="inputs per task per step (the authors' code: 32)")
    init: float = Field(default=0.3, description="initial coefficient")
    clamp: bool = Field(default=True, description="clamp coefficients to [0, 1]")
    eval_at: list[int] = Field(default_factory=list, description="steps after which to keep a snapshot "
                               "(AdaptResult.at: accuracy against steps from one run)")


class AdaMergingPlusPlusParams(AdaMergingParams):
    density: float = Field(default=0.2, gt=0, le=1, description="TIES trim density")


class SyMergeParams(AdaMergingParams):
    """SyMerge's (Jung et al. 2024): AdaMerging's fields with its defaults, and the task-specific layer."""

    steps: int = Field(default=DEFAULT_SYMERGE_STEPS, ge=0, description="adaptation steps")
    lr: float = Field(default=1e-2, gt=0, description="Adam learning rate (the task layer is trained too)")
    batch_size: int = Field(default=32, ge=1, description="inputs per task per step")
    task_layer: str = Field(default="head", description="the task-specific layer learned with the coefficients")
    loss: str = Field(default="selflabel", description="selflabel (the paper's) or entropy")


def _output(res: AdaptResult) -> MethodOutput:
    return MethodOutput(body=res.body_fn(), heads=res.heads, params=res.summary(), result=res)


def _adamerging(pool, name: str, granularity: str, vectors, params: dict[str, Any]) -> MethodOutput:
    res = adamerging(pool.family, pool.pretrained, vectors, pool.heads, pool.inputs(), granularity=granularity,
                     seed=pool.seed, progress=pool.progress, name=name, on_snapshot=getattr(pool, "on_snapshot", None),
                     **params)
    return _output(res)


@register_method("adamerging_taskwise", kind="adaptive", needs="unlabeled", params=AdaMergingParams,
                 summary="AdaMerging (Yang et al. 2024), task-wise: one coefficient per task, by entropy "
                         "minimisation on unlabeled test inputs")
def _taskwise(pool, **params: Any) -> MethodOutput:
    return _adamerging(pool, "adamerging_taskwise", "task", _vectors(pool), params)


@register_method("adamerging_layerwise", kind="adaptive", needs="unlabeled", params=AdaMergingParams,
                 summary="AdaMerging (Yang et al. 2024), layer-wise: one coefficient per task and tensor")
def _layerwise(pool, **params: Any) -> MethodOutput:
    return _adamerging(pool, "adamerging_layerwise", "layer", _vectors(pool), params)


def _plusplus(pool, name: str, granularity: str, params: dict[str, Any]) -> MethodOutput:
    params = dict(params)
    density = params.pop("density", 0.2)
    vectors = ties_vectors(_vectors(pool, factored=False), density)  # TIES acts on each weight's s B A
    return _adamerging(pool, name, granularity, vectors, params)


@register_method("adamerging_plusplus", kind="adaptive", needs="unlabeled", params=AdaMergingPlusPlusParams,
                 summary="AdaMerging++ (Yang et al. 2024), layer-wise: AdaMerging over TIES-trimmed, "
                         "sign-elected task vectors")
def _plusplus_layerwise(pool, **params: Any) -> MethodOutput:
    return _plusplus(pool, "adamerging_plusplus", "layer", params)


@register_method("adamerging_plusplus_taskwise", kind="adaptive", needs="unlabeled", params=AdaMergingPlusPlusParams,
                 summary="AdaMerging++ (Yang et al. 2024), task-wise: one coefficient per task over TIES-trimmed, "
                         "sign-elected task vectors")
def _plusplus_taskwise(pool, **params: Any) -> MethodOutput:
    return _plusplus(pool, "adamerging_plusplus_taskwise", "task", params)


@register_method("symerge", kind="adaptive", needs="unlabeled", params=SyMergeParams,
                 summary="SyMerge (Jung et al. 2024): layer-wise coefficients and one task-specific layer, "
                         "learned against the experts' pseudo-labels on unlabeled test inputs")
def _symerge(pool, **params: Any) -> MethodOutput:
    texts = pool.inputs()
    pseudo = None
    if params.get("loss", "selflabel") == "selflabel" and hasattr(pool, "expert_features"):
        # each expert's hard label and confidence on its own task's inputs: a forward the run may already hold
        pseudo = {t: PseudoLabels.from_logits(pool.heads[t](pool.expert_features(t))) for t in texts}
    res = symerge(pool.family, pool.pretrained, _vectors(pool), pool.heads, texts,
                  experts=pool.bodies, pseudo_labels=pseudo, seed=pool.seed, progress=pool.progress,
                  on_snapshot=getattr(pool, "on_snapshot", None), **params)
    return _output(res)
