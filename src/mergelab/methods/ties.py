"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, Sec. 3 and
Algorithm 1: (1) keep the top-k% magnitudes of each task vector, (2) elect per parameter the sign
gamma = sgn(sum_t trimmed tau_t), (3) average the trimmed values that agree with gamma
(disjoint mean), then theta = theta_0 + lambda * disjoint mean.
"""

from __future__ import annotations

from collections.abc import Mapping

from mergelab.core.kernels import ElectDisjoint, SliceForm, Trim
from mergelab.methods.registry import MergePlan, per_task_values, register
from mergelab.methods.transforms import disjoint_split, elect_sign, trim


def ties_parts(vectors, density: float = 0.2, scope: str = "global"):
    """TIES steps 1-3 as per-task parts whose sum is the disjoint mean."""
    trimmed = trim(vectors, density, scope)
    return disjoint_split(trimmed, elect_sign(trimmed))


def ties_steps(density: float, scope: str) -> tuple:
    """TIES steps 1-3 per tensor: trim (unless density is 1), elect, disjoint split."""
    return ((Trim(density, scope),) if density < 1.0 else ()) + (ElectDisjoint(),)


def ties_form(plan: MergePlan) -> SliceForm:
    return SliceForm(plan.coefficients, ties_steps(plan.params["density"], plan.params["scope"]))


@register("ties", stream=ties_form)
def ties(vectors, scaling: float | Mapping[str, float] = 1.0, density: float = 0.2, scope: str = "global") -> MergePlan:
    """TIES-Merging: trim to ``density``, elect signs, disjoint mean, scale by ``scaling``.

    ``scope``: "global" ranks magnitudes over the whole flattened task vector (the paper),
    "tensor" within each tensor.
    """
    tasks = list(vectors)
    coeffs = per_task_values("scaling", scaling, tasks)
    parts = ties_parts(vectors, density, scope)
    return MergePlan("ties", parts, coeffs, {"scaling": scaling, "density": density, "scope": scope})
