"""SE-Merging's router: from probe representations to per-sample merging coefficients.

SE-Merging (Chen et al., "SE-Merging: A Self-Enhanced Approach for Dynamic Model Merging", arXiv
2506.18135) identifies a sample's task from where the merged model's representation of it sits
relative to the experts' representations, then rescales the merging coefficients so that task's
vector dominates. The paper leaves the normalisation, the temperature and the total coefficient mass
unpublished; mergelab implements the following, with each choice a parameter.

For a sample x, with pooled representations at probe layer l of the statically merged model m(x), of
each expert e_t(x) and (for the relative rules) of the pretrained model p(x):

    score s_t(x), smaller = more likely task t, by ``normalisation``:
        "raw"       s_t = ||m - e_t||                     (the paper's nearest-expert rule)
        "relative"  s_t = ||m - e_t|| - ||p - e_t||       (how much nearer the merge moved x to e_t)
        "ratio"     s_t = ||m - e_t|| / ||p - e_t||
        "prototype" s_t = ||m - mu_t||, mu_t the mean of m over a small calibration set of task t
                    (no expert pass at all: the fast path)                                       (3)

    standardise across tasks:  z_t = (s_t - mean_s s_s) / (std_s s_s + 1e-8)
    routing weights:           w_t = softmax_t(-z_t / temperature)                               (4)
    coefficients:              lambda_t(x) = M * w_t lambda_t / sum_s w_s lambda_s,
                               M = mass * sum_s lambda_s                                         (5)

lambda_t are the base method's static coefficients (0.3 for Task Arithmetic). ``mass`` is the total
coefficient mass relative to the static merge's: with ``mass = 1`` uniform weights give back the
static merge exactly; as the temperature goes to 0 all of M goes to the identified task, and
``M = 1`` (``mass = 1 / sum_s lambda_s``) then reproduces that task's expert (Task Arithmetic vectors).
Being relative, one ``mass`` means the same for Task Arithmetic (sum 0.3 T) and TIES (sum T * scaling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mergelab.core.errors import InputError, ParameterError

NORMALISATIONS = ("raw", "relative", "ratio", "prototype")
NEEDS_PRETRAINED = ("relative", "ratio")


@dataclass(frozen=True)
class RouterConfig:
    """SE-Merging's free parameters. Defaults were chosen on the text5 *validation* splits (docs/methods.md)."""

    layer: int = 1
    normalisation: str = "prototype"
    temperature: float = 1.0
    mass: float = 0.5  # total coefficient mass / the static merge's (1.0: uniform weights = static merge)

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ParameterError('layer', f"parameter 'layer' (probe layer) must be a non-negative integer, got {self.layer!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ParameterError('normalisation', f"parameter 'normalisation' must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        _positive("temperature", self.temperature)
        _positive("mass", self.mass)

    def to_dict(self) -> dict:
        return asdict(self)


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ParameterError(name, f"parameter {name!r} must be a positive finite number, got {value!r}")
    return float(value)


def _dist(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).norm(dim=-1)


def scores(
    normalisation: str,
    merged: Tensor,
    experts: Tensor | None = None,
    pretrained: Tensor | None = None,
    prototypes: Tensor | None = None,
) -> Tensor:
    """Equation (3): ``[B, T]`` scores, smaller = more likely. ``experts`` is ``[T, B, H]``; ``prototypes`` ``[T, H]``."""
    if normalisation == "prototype":
        if prototypes is None:
            raise InputError("normalisation 'prototype' needs prototypes (calibrate the router first)")
        return torch.cdist(merged.float(), prototypes.float())
    if normalisation not in NORMALISATIONS:
        raise InputError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if experts is None:
        raise InputError(f"normalisation {normalisation!r} needs the experts' representations")
    d = _dist(merged.unsqueeze(0).float(), experts.float()).T  # [B, T]
    if normalisation == "raw":
        return d
    if pretrained is None:
        raise InputError(f"normalisation {normalisation!r} needs the pretrained model's representation")
    d0 = _dist(pretrained.unsqueeze(0).float(), experts.float()).T
    if normalisation == "relative":
        return d - d0
    return d / d0.clamp_min(1e-12)


def routing_weights(s: Tensor, temperature: float) -> Tensor:
    """Equation (4): standardise the scores across tasks, then ``softmax(-z / temperature)``."""
    _positive("temperature", temperature)
    if s.shape[-1] == 1:
        return torch.ones_like(s)
    if s.numel() == 0:  # no sample (an empty batch): nothing to standardise
        return torch.empty_like(s)
    z = (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True, unbiased=False) + 1e-8)
    return torch.softmax(-z / temperature, dim=-1)


def rescale(weights: Tensor, base: Sequence[float] | Tensor, mass: float = 1.0) -> Tensor:
    """Equation (5): ``lambda_t(x) = mass * sum(lambda) * w_t lambda_t / sum_s w_s lambda_s``; ``[B, T]``."""
    lam = torch.as_tensor(base, dtype=weights.dtype, device=weights.device)
    if lam.ndim != 1 or lam.numel() != weights.shape[-1]:
        raise InputError(f"need one base coefficient per task ({weights.shape[-1]}), got shape {tuple(lam.shape)}")
    total = _positive("mass", mass) * float(lam.sum())
    wl = weights * lam
    return total * wl / wl.sum(-1, keepdim=True).clamp_min(1e-12)


def coefficients(config: RouterConfig, base: Sequence[float] | Tensor, **reps: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Scores, weights and per-sample coefficients for one batch: equations (3) to (5)."""
    s = scores(config.normalisation, **reps)
    w = routing_weights(s, config.temperature)
    return s, w, rescale(w, base, config.mass)


def coefficient_codebook(coefficients: Tensor, chosen: Tensor, n_codes: int, fallback: Tensor,
                         iters: int = 100) -> Tensor:
    """``[K, T]`` coefficient vectors that stand for the per-sample ones ``[N, T]`` of calibration samples.

    Vector quantisation with k-means (Lloyd), deterministic: the first T codes start at the mean
    coefficients of the samples routed to each task (``chosen``; ``fallback[t]`` when none is), the
    rest at the calibration vectors farthest from the codes so far (farthest-point seeding). Codes left
    without a calibration vector are dropped. The fast path runs each sample through the merge of its
    nearest code, so K merged models serve all samples.
    """
    x = coefficients.float()
    T = x.shape[1]
    codes = torch.stack([x[chosen == t].mean(0) if bool((chosen == t).any()) else fallback[t].float()
                         for t in range(T)])
    while len(codes) < n_codes:
        far = torch.cdist(x, codes).min(1).values
        if float(far.max()) <= 1e-7:  # every calibration vector is a code already
            break
        codes = torch.cat([codes, x[far.argmax()][None]])
    assign = None
    for _ in range(iters):
        new_assign = torch.cdist(x, codes).argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        codes = torch.stack([x[assign == k].mean(0) if bool((assign == k).any()) else codes[k]
                             for k in range(len(codes))])
    used = torch.cdist(x, codes).argmin(1).unique()  # a code no calibration vector is nearest to is dropped
    return codes[used]


def entropy(weights: Tensor) -> Tensor:
    """Entropy (nats) of each sample's routing weights."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1)
