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

import math
from collections.abc import Mapping

from torch import Tensor

from mergelab.core import kernels
from mergelab.core.errors import InputError, ParameterError
from mergelab.core.statedict import TaskVector

Vectors = Mapping[str, TaskVector]


def trim(vectors: Vectors, density: float, scope: str = "global") -> dict[str, TaskVector]:
    """Keep the ``density`` fraction of largest-magnitude entries of each task vector, zero the rest.

    ``scope="global"`` ranks the entries of the whole flattened task vector (the paper); ``"tensor"``
    ranks within each tensor separately (as mergekit does). Entries tied with the threshold are kept.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ParameterError('density', f"parameter 'density' must be in (0, 1], got {density!r}")
    if scope not in ("global", "tensor"):
        raise ParameterError('scope', f"parameter 'scope' must be 'global' or 'tensor', got {scope!r}")
    out: dict[str, TaskVector] = {}
    for task, vec in vectors.items():
        if density == 1.0:
            out[task] = TaskVector(dict(vec))
            continue
        if scope == "global":
            n = sum(v.numel() for v in vec.values())
            if n == 0:
                out[task] = TaskVector(dict(vec))
                continue
            thr = kernels.kth_largest_abs(list(vec.values()), kernels.kept_count(n, density))
            out[task] = TaskVector({k: kernels.trim(v, thr) for k, v in vec.items()})
        else:
            out[task] = TaskVector(
                {k: kernels.trim(v, kernels.kth_largest_abs([v], kernels.kept_count(v.numel(), density)))
                 if v.numel() else v.clone() for k, v in vec.items()}
            )
    return out


def elect_sign(vectors: Vectors) -> dict[str, Tensor]:
    """Per entry, the sign of the sum over tasks (the sign with the larger total magnitude)."""
    tasks = list(vectors)
    if not tasks:
        raise InputError("elect_sign needs at least one task vector")
    keys = list(vectors[tasks[0]])
    return {k: kernels.elect_sign([vectors[t][k] for t in tasks]) for k in keys}


def sign_agreeing(vectors: Vectors, signs: Mapping[str, Tensor]) -> dict[str, TaskVector]:
    """Each task vector with the entries that disagree with the elected sign set to 0 (no division by the
    number of agreeing tasks, unlike :func:`disjoint_split`)."""
    return {t: TaskVector({k: kernels.agreeing(v[k], signs[k]) for k in v}) for t, v in vectors.items()}


def disjoint_split(vectors: Vectors, signs: Mapping[str, Tensor]) -> dict[str, TaskVector]:
    """Split the disjoint mean into per-task parts.

    part_t = tau_t * a_t / max(1, sum_s a_s), where a_t marks the nonzero entries of tau_t whose sign
    equals the elected sign. sum_t part_t is TIES' disjoint mean.
    """
    tasks = list(vectors)
    parts: dict[str, dict[str, Tensor]] = {t: {} for t in tasks}
    for key, sign in signs.items():
        for t, part in zip(tasks, kernels.disjoint_parts([vectors[t][key] for t in tasks], sign)):
            parts[t][key] = part
    return {t: TaskVector(p) for t, p in parts.items()}


def check_drop_params(drop_rate: float, seed: int) -> None:
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not (0.0 <= drop_rate < 1.0) or math.isnan(drop_rate):
        raise ParameterError('drop_rate', f"parameter 'drop_rate' must be in [0, 1), got {drop_rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParameterError('seed', f"parameter 'seed' must be an integer, got {seed!r}")


def drop(vectors: Vectors, drop_rate: float, seed: int = 0) -> dict[str, TaskVector]:
    """DARE: drop each entry with probability ``drop_rate``, rescale the rest by 1 / (1 - drop_rate).

    The random mask of each (task, tensor) is drawn from a generator seeded by a hash of
    (seed, task name, key), so the result does not depend on the order tensors are processed in
    (streamed and in-memory merges agree) and the same seed always gives the same result.
    """
    check_drop_params(drop_rate, seed)
    if drop_rate == 0.0:
        return {t: TaskVector(dict(v)) for t, v in vectors.items()}
    return {
        task: TaskVector({key: kernels.drop(v, drop_rate, seed, task, key) for key, v in vec.items()})
        for task, vec in vectors.items()
    }
