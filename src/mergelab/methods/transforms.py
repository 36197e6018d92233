"""Reusable task-vector transforms: trim, elect, split, drop.

Each takes per-task vectors and returns per-task vectors, so that any kind of coefficient (static,
learned, per-sample) can be put on TIES- or DARE-processed vectors.

- :func:`trim` keeps the top-k% magnitudes of each task vector (TIES step 1, Yadav et al., NeurIPS
  2023, "TIES-Merging: Resolving Interference When Merging Models", Sec. 3, "Trim").
- :func:`elect_sign` picks per entry the sign with the larger total mass (TIES step 2, "Elect").
- :func:`disjoint_split` keeps in each task vector the entries that agree with the elected sign,
  divided by the number of agreeing tasks, so that the parts sum to the disjoint mean (TIES step 3,
  "Disjoint merge").
- :func:`drop` drops each entry with probability p and rescales survivors by 1/(1-p) (DARE, Yu et al.,
  ICML 2024, "Language Models are Super Mario", Eq. 2).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import InputError
from ..statedict import TaskVector

Vectors = Mapping[str, TaskVector]


def _kept_count(numel: int, density: float) -> int:
    return max(1, min(numel, int(round(density * numel))))


def _threshold(abs_values: Tensor, density: float) -> Tensor:
    """The k-th largest magnitude, k = round(density * n) (at least 1): entries >= it are kept."""
    n = abs_values.numel()
    k = _kept_count(n, density)
    # kthvalue is the k-th *smallest*; the k-th largest is the (n - k + 1)-th smallest.
    return torch.kthvalue(abs_values.reshape(-1), n - k + 1).values


def trim(vectors: Vectors, density: float, scope: str = "global") -> dict[str, TaskVector]:
    """Keep the ``density`` fraction of largest-magnitude entries of each task vector, zero the rest.

    ``scope="global"`` ranks the entries of the whole flattened task vector (the paper); ``"tensor"``
    ranks within each tensor separately (as mergekit does). Entries tied with the threshold are kept.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise InputError(f"parameter 'density' must be in (0, 1], got {density!r}")
    if scope not in ("global", "tensor"):
        raise InputError(f"parameter 'scope' must be 'global' or 'tensor', got {scope!r}")
    out: dict[str, TaskVector] = {}
    for task, vec in vectors.items():
        if density == 1.0:
            out[task] = TaskVector(dict(vec))
            continue
        if scope == "global":
            flat = torch.cat([v.reshape(-1).abs() for v in vec.values()])
            thr = _threshold(flat, density)
            del flat
            out[task] = TaskVector({k: torch.where(v.abs() >= thr, v, torch.zeros((), dtype=v.dtype)) for k, v in vec.items()})
        else:
            out[task] = TaskVector(
                {k: torch.where(v.abs() >= _threshold(v.abs(), density), v, torch.zeros((), dtype=v.dtype))
                 for k, v in vec.items()}
            )
    return out


def elect_sign(vectors: Vectors) -> dict[str, Tensor]:
    """Per entry, the sign of the sum over tasks (the sign with the larger total magnitude)."""
    tasks = list(vectors)
    if not tasks:
        raise InputError("elect_sign needs at least one task vector")
    keys = list(vectors[tasks[0]])
    return {k: torch.sign(sum(vectors[t][k] for t in tasks)) for k in keys}


def disjoint_split(vectors: Vectors, signs: Mapping[str, Tensor]) -> dict[str, TaskVector]:
    """Split the disjoint mean into per-task parts.

    part_t = tau_t * a_t / max(1, sum_s a_s), where a_t marks the nonzero entries of tau_t whose sign
    equals the elected sign. sum_t part_t is TIES' disjoint mean.
    """
    tasks = list(vectors)
    parts: dict[str, dict[str, Tensor]] = {t: {} for t in tasks}
    for key, sign in signs.items():
        agree = [(torch.sign(vectors[t][key]) == sign) & (vectors[t][key] != 0) for t in tasks]
        count = torch.clamp(sum(a.to(torch.float32) for a in agree), min=1.0)
        for t, a in zip(tasks, agree):
            parts[t][key] = torch.where(a, vectors[t][key], torch.zeros((), dtype=vectors[t][key].dtype)) / count
    return {t: TaskVector(p) for t, p in parts.items()}


def _stable_seed(seed: int, task: str, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{task}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def drop(vectors: Vectors, drop_rate: float, seed: int = 0) -> dict[str, TaskVector]:
    """DARE: drop each entry with probability ``drop_rate``, rescale the rest by 1 / (1 - drop_rate).

    The random mask of each (task, tensor) is drawn from a generator seeded by a hash of
    (seed, task name, key), so the result does not depend on the order tensors are processed in
    (streamed and in-memory merges agree) and the same seed always gives the same result.
    """
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not (0.0 <= drop_rate < 1.0) or math.isnan(drop_rate):
        raise InputError(f"parameter 'drop_rate' must be in [0, 1), got {drop_rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"parameter 'seed' must be an integer, got {seed!r}")
    if drop_rate == 0.0:
        return {t: TaskVector(dict(v)) for t, v in vectors.items()}
    keep_scale = 1.0 / (1.0 - drop_rate)
    out: dict[str, TaskVector] = {}
    for task, vec in vectors.items():
        dropped = {}
        for key, v in vec.items():
            gen = torch.Generator(device="cpu").manual_seed(_stable_seed(seed, task, key))
            keep = torch.rand(v.shape, generator=gen, dtype=torch.float32).to(v.device) >= drop_rate
            dropped[key] = torch.where(keep, v * keep_scale, torch.zeros((), dtype=v.dtype, device=v.device))
        out[task] = TaskVector(dropped)
    return out
