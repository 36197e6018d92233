"""SE-Merging's routing rules as registered dynamic methods, and the per-sample features of a set of inputs.

One implementation (:class:`~mergelab.methods.dynamic.se_merging.SEMerging`), one registry entry per
routing rule, so that a results table never calls a rule the paper's when it is not (docs/methods.md):

- ``se_merging``: the paper's rule (Chen et al., arXiv 2506.18135, Sec. 4): the l2 distance between the
  merged model's probe representation and each expert's, normalised, softmax, coefficients rescaled
  around the base method's (router equations (3)-(5)). ``probes="live"`` (default): the experts'
  representations of the input itself, T partial forward passes; reads nothing beyond the input.
  ``probes="cached"``: a cache of each expert's mean representation of ``calibration_size`` inputs of
  its own task, built once; reads those calibration inputs, runs no expert pass at test time.
- ``se_relative``: mergelab's rule ``||m - e_t|| - ||p - e_t||`` (how much nearer the merge moved the input
  to expert t than the pretrained model is); reads nothing beyond the input (one more probe pass).
- ``se_ratio``: mergelab's rule ``||m - e_t|| / ||p - e_t||``.
- ``se_prototype``: mergelab's rule ``||m - mu_t||`` with mu_t the mean merged representation of a few
  calibration inputs of task t (inputs of *known task*); no expert pass. Its approximate paths (``mode``
  fast: quantized groups of merged models; single-pass: the static merge up to the probe layer; and
  prototype-exact) exist for this rule only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mergelab.core.batching import iter_batches, progress_bar
from mergelab.core.errors import ParameterError
from mergelab.methods.dynamic import router as R
from mergelab.methods.dynamic.se_merging import MODES, SEMerging
from mergelab.methods.registry import MethodOutput, plan, pool_experts, register_method

# modes that approximate the prototype rule (they route with prototypes, never with expert probes)
PROTOTYPE_MODES = ("fast", "single-pass", "prototype-exact")


class SEParams(BaseModel):
    """SE-Merging's parameters (the router's are :class:`~mergelab.methods.dynamic.router.RouterConfig`'s)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(default="task_arithmetic", description="the static method whose vectors and coefficients are rescaled")
    base_params: dict[str, Any] = Field(default_factory=lambda: {"scaling": 0.3}, description="the base method's parameters")
    layer: int = Field(default=R.RouterConfig.layer, description="probe layer")
    temperature: float = Field(default=R.RouterConfig.temperature, description="softmax temperature")
    gain: float = Field(default=R.RouterConfig.gain,
                        description="total coefficient mass / the base's mean coefficient (replaces 'mass')")
    scale: str = Field(default=R.RouterConfig.scale, description=f"distance normalisation: one of {R.SCALES}")
    probes: str = Field(default=R.RouterConfig.probes,
                        description=f"expert representations (expert rules): one of {R.PROBES}")
    mode: str = Field(default="exact", description=f"forward path: one of {MODES}")
    calibration_size: int = Field(default=32, ge=1,
                                  description="calibration inputs per task (prototype rule, fast paths, cached probes)")


@torch.no_grad()
def se_features(
    se: SEMerging,
    inputs: Mapping[str, Sequence[Any]],
    *,
    mode: str = "exact",
    batch_size: int = 64,
    progress: bool = False,
    label: str = "se_merging",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(features, routing summary)`` of ``inputs`` (task -> inputs, unlabeled) through the per-sample merge.

    ``features[task]``: pooled features ``[N, F]`` in input order. The routing summary: routing accuracy
    (share of a task's inputs whose largest weight is on that task, for tasks among the merged ones), per
    task, the confusion matrix and the mean weight entropy. Only which task an input comes from is read.
    """
    family = se.family
    T = len(se.tasks)
    conf = torch.zeros(T, T, dtype=torch.long)
    entropies = []
    feats_out: dict[str, Tensor] = {}
    bar = progress_bar(sum(len(s) for s in inputs.values()), f"{label} ({mode})", progress)
    for task, seq in inputs.items():
        keep: Tensor | None = None  # [N, feature size], allocated from the first batch's features
        for idx in iter_batches(seq, batch_size):
            feats, routing = se.features(family.tokenize([seq[i] for i in idx]), mode)
            if keep is None:
                keep = torch.empty(len(seq), feats.shape[-1])
            keep[torch.tensor(idx)] = feats.detach().float().cpu()
            if task in se.tasks:
                ti = se.tasks.index(task)
                for j in routing.chosen.tolist():
                    conf[ti, j] += 1
            entropies.append(R.entropy(routing.weights).cpu())
            if bar is not None:
                bar.update(len(idx))
        feats_out[task] = keep if keep is not None else torch.empty(0, 0)
    if bar is not None:
        bar.close()
    rows = conf.sum(1).clamp_min(1)
    routing_summary = {
        "routing_accuracy": float(conf.diag().sum() / conf.sum().clamp_min(1)),
        "routing_accuracy_per_task": {t: float(conf[i, i] / rows[i]) for i, t in enumerate(se.tasks)},
        "confusion": conf.tolist(),
        "mean_weight_entropy": float(torch.cat(entropies).mean()) if entropies else 0.0,
    }
    return feats_out, routing_summary


def run_se(pool, normalisation: str, **params: Any) -> MethodOutput:
    """Build SE-Merging with one routing rule on ``pool``'s experts and run ``pool.inputs()`` through it."""
    p = SEParams(**params)
    if p.mode not in MODES:
        raise ParameterError('mode', f"parameter 'mode' must be one of {MODES}, got {p.mode!r}")
    if normalisation != "prototype" and p.mode in PROTOTYPE_MODES:
        raise ParameterError('mode', f"parameter 'mode': {p.mode!r} approximates the prototype rule (se_prototype); "
                         f"this rule ({normalisation}) runs in 'exact', 'reference' or 'lowrank' mode")
    config = R.RouterConfig(layer=p.layer, normalisation=normalisation, temperature=p.temperature, gain=p.gain,
                            scale=p.scale, probes=p.probes)
    # LoRA experts (pool.adapters) stay factored in the plan: the per-sample forward mixes s_t B_t (A_t x);
    # the probes run each expert's own body
    se = SEMerging(pool.family, pool.pretrained, plan(p.base, pool.pretrained, pool_experts(pool), **p.base_params),
                   pool.bodies, config)
    if normalisation == "prototype":
        se.calibrate(pool.calibration(p.calibration_size))
    elif p.probes == "cached":
        se.cache_experts(pool.calibration(p.calibration_size))
    feats, routing = se_features(se, pool.inputs(), mode=p.mode, batch_size=pool.batch_size,
                                 progress=pool.progress, label=getattr(pool, "label", "se_merging"))
    resolved = p.model_dump()
    if normalisation == "prototype":
        resolved.pop("probes")
    elif p.probes == "live" and p.mode not in PROTOTYPE_MODES:
        resolved.pop("calibration_size")
    return MethodOutput(features=feats, params={**resolved, "normalisation": normalisation},
                        extra={"routing": routing}, result=se)


def _register(name: str, normalisation: str, needs: str, summary: str) -> None:
    def run(pool, **params: Any) -> MethodOutput:
        return run_se(pool, normalisation, **params)

    register_method(name, kind="dynamic", needs=needs, params=SEParams, summary=summary)(run)


_register("se_merging", "raw", "nothing",
          "SE-Merging (Chen et al. 2025) as published: per-sample coefficients from the l2 distances between the "
          "merged model's and each expert's probe representation; probes='live' (T partial passes, default) or "
          "'cached' (each expert's mean representation of a few calibration inputs of its task)")
_register("se_relative", "relative", "nothing",
          "mergelab's SE rule: distance to each expert relative to the pretrained model's (d(m,e)-d(p,e))")
_register("se_ratio", "ratio", "nothing",
          "mergelab's SE rule: distance to each expert over the pretrained model's (d(m,e)/d(p,e))")
_register("se_prototype", "prototype", "calibration",
          "mergelab's SE rule: distance to per-task prototypes of a few calibration inputs of known task; "
          "approximate paths (mode fast = quantized groups, single-pass, prototype-exact)")
