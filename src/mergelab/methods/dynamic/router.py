"""SE-Merging's router: from probe representations to per-sample merging coefficients.

SE-Merging (Chen et al., "SE-Merging: A Self-Enhanced Approach for Dynamic Model Merging", arXiv
2506.18135, Sec. 4) identifies a sample's task from where the merged model's representation of it sits
relative to the experts' representations, then rescales the merging coefficients so that task's vector
dominates. The paper leaves the normalisation, the temperature and the total coefficient mass
unpublished; mergelab implements the following, with each choice a parameter (docs/methods.md).

For a sample x, with pooled representations at probe layer l of the statically merged model m(x), of
each expert e_t(x) and (for the relative rules) of the pretrained model p(x):

    score s_t(x), smaller = more likely task t, by ``normalisation``:
        "raw"       s_t = ||m - e_t||                     (the paper's rule: l2 to each expert)
        "relative"  s_t = ||m - e_t|| - ||p - e_t||       (how much nearer the merge moved x to e_t)
        "ratio"     s_t = ||m - e_t|| / ||p - e_t||
        "prototype" s_t = ||m - mu_t||, mu_t the mean of m over a small calibration set of task t
                    (no expert pass at all: the fast path)                                       (3)
    ``probes="live"``: e_t(x) from T partial forward passes of the input (the paper's live probes);
    ``probes="cached"``: e_t(x) replaced by ebar_t, expert t's mean representation of a few inputs of
    task t, computed once (a cache of expert representations: no expert pass at test time).

    scale-free distances (``scale="mean"``, the default):
                               z_t = s_t / mean_s |s_s|
    routing weights:           w_t = softmax_t(-z_t / temperature)                               (4)
    coefficients:              lambda_t(x) = G * lbar * w_t lambda_t / sum_s w_s lambda_s,
                               lbar = mean_s lambda_s,  G = ``gain``                            (5)

Why these two definitions (issue 19): their meaning does not depend on the number of tasks T.

- Dividing by the mean magnitude makes z invariant to the scale of the representations (one
  temperature serves every layer and rule) and keeps the *differences* between distances: softmax is
  shift-invariant, so w_t = softmax(-(s_t - s_min) / (temperature * mean|s|)), and a task whose distance
  exceeds the nearest one by ``temperature`` times the mean distance gets e^-1 of its weight, for any
  T. The old standardisation (``scale="std"``, kept for comparison), z_t = (s_t - mean s) / std s, maps
  any two distances to z = -1, +1 when T = 2: the weights were then 0.88 / 0.12 (temperature 1) whatever
  the distances were.
- ``gain`` is the total coefficient mass in units of the base method's mean coefficient lbar (0.3 for
  Task Arithmetic), so when the router is certain of task t that task's coefficient is G * lbar: G = 1 /
  lbar reproduces expert t (Task Arithmetic vectors), G = T gives back the static merge for uniform
  weights. The old ``mass`` was relative to the *sum* of the static coefficients, M = mass * T * lbar:
  with T = 2 and mass 0.5 the identified task got at most 0.3, its static coefficient, so nothing was
  amplified. ``gain = mass * T`` converts an old setting.
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
SCALES = ("mean", "std")  # equation (4): scale-free distances (default) or the old standardisation
PROBES = ("live", "cached")  # expert representations: T partial passes per input, or a cache (equation (3))


@dataclass(frozen=True)
class RouterConfig:
    """SE-Merging's free parameters, all chosen on text5's *validation* splits (docs/methods.md): rule and layer
    by routing accuracy, temperature 0.1 and gain 1 / 0.3 by ``mergelab analyze se-defaults`` (the best mean
    accuracy over 2, 3 and 5 tasks). Gain 1 / 0.3 over Task Arithmetic 0.3 gives a task the router is
    certain of its expert's weights (coefficient 1)."""

    layer: int = 1
    normalisation: str = "prototype"
    temperature: float = 0.1
    gain: float = 1 / 0.3  # total coefficient mass / the base's mean coefficient (1 / lbar = the expert when certain)
    scale: str = "mean"
    probes: str = "live"

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ParameterError('layer', f"parameter 'layer' (probe layer) must be a non-negative integer, got {self.layer!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ParameterError('normalisation', f"parameter 'normalisation' must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        _positive("temperature", self.temperature)
        _positive("gain", self.gain)
        if self.scale not in SCALES:
            raise ParameterError('scale', f"parameter 'scale' must be one of {SCALES}, got {self.scale!r}")
        if self.probes not in PROBES:
            raise ParameterError('probes', f"parameter 'probes' must be one of {PROBES}, got {self.probes!r}")
        if self.probes == "cached" and self.normalisation == "prototype":
            raise ParameterError('probes', "parameter 'probes': the prototype rule runs no expert probe; "
                                 "'cached' applies to the expert rules (raw, relative, ratio)")

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
    """Equation (3): ``[B, T]`` scores, smaller = more likely. ``experts`` is ``[T, B, H]`` (live probes)
    or ``[T, 1, H]`` (cached: one representation per expert, broadcast over the batch); ``prototypes`` ``[T, H]``."""
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


def routing_weights(s: Tensor, temperature: float, scale: str = "mean") -> Tensor:
    """Equation (4): ``softmax(-z / temperature)`` with ``z = s / mean|s|`` (``scale="mean"``) or the old
    standardisation across tasks ``z = (s - mean s) / std s`` (``scale="std"``: z = -1, +1 for any two tasks)."""
    _positive("temperature", temperature)
    if scale not in SCALES:
        raise InputError(f"scale must be one of {SCALES}, got {scale!r}")
    if s.shape[-1] == 1:
        return torch.ones_like(s)
    if s.numel() == 0:  # no sample (an empty batch): nothing to normalise
        return torch.empty_like(s)
    if scale == "mean":
        z = s / (s.abs().mean(-1, keepdim=True) + 1e-12)
    else:
        z = (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True, unbiased=False) + 1e-8)
    return torch.softmax(-z / temperature, dim=-1)


def rescale(weights: Tensor, base: Sequence[float] | Tensor, gain: float | None = None) -> Tensor:
    """Equation (5): ``lambda_t(x) = gain * mean(lambda) * w_t lambda_t / sum_s w_s lambda_s``; ``[B, T]``.

    ``gain=None`` is T: uniform weights then give back the static coefficients."""
    lam = torch.as_tensor(base, dtype=weights.dtype, device=weights.device)
    if lam.ndim != 1 or lam.numel() != weights.shape[-1]:
        raise InputError(f"need one base coefficient per task ({weights.shape[-1]}), got shape {tuple(lam.shape)}")
    g = float(lam.numel()) if gain is None else _positive("gain", gain)
    total = g * float(lam.mean())
    wl = weights * lam
    return total * wl / wl.sum(-1, keepdim=True).clamp_min(1e-12)


def coefficients(config: RouterConfig, base: Sequence[float] | Tensor, **reps: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Scores, weights and per-sample coefficients for one batch: equations (3) to (5)."""
    s = scores(config.normalisation, **reps)
    w = routing_weights(s, config.temperature, config.scale)
    return s, w, rescale(w, base, config.gain)


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
