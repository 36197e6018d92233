"""DARE: Drop And REscale, then Task Arithmetic or TIES.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024, Eq. 2: each entry of a task vector is dropped with probability p and the
survivors are rescaled by 1 / (1 - p), which preserves the expectation; the processed vectors are
then merged with Task Arithmetic or TIES-Merging (Sec. 4.3).
"""

from __future__ import annotations

from collections.abc import Mapping

from mergelab.core.errors import ParameterError
from mergelab.core.kernels import Drop, SliceForm
from mergelab.methods.registry import MergePlan, per_task_values, register
from mergelab.methods.ties import ties_parts, ties_steps
from mergelab.methods.transforms import drop


def dare_form(plan: MergePlan) -> SliceForm:
    """Drop and rescale per slice, then Task Arithmetic's sum or TIES' steps."""
    p = plan.params
    steps = (Drop(p["drop_rate"], p["seed"]),)
    if p["combine"] == "ties":
        steps += ties_steps(p["density"], p["scope"])
    return SliceForm(plan.coefficients, steps)


@register("dare", stream=dare_form)
def dare(
    vectors,
    drop_rate: float = 0.9,
    seed: int = 0,
    combine: str = "task_arithmetic",
    scaling: float | Mapping[str, float] | None = None,
    density: float | None = None,
    scope: str = "global",
) -> MergePlan:
    """DARE: drop entries with probability ``drop_rate``, rescale survivors, then ``combine``.

    ``combine``: "task_arithmetic" (``scaling`` default 0.3) or "ties" (``scaling`` default 1.0,
    ``density`` default 0.2, ``scope`` as in TIES; density=1.0 skips trimming and keeps only the
    sign election, which is mergekit's ``dare_ties``).
    """
    if combine not in ("task_arithmetic", "ties"):
        raise ParameterError('combine', f"parameter 'combine' must be 'task_arithmetic' or 'ties', got {combine!r}")
    tasks = list(vectors)
    if combine == "task_arithmetic" and density is not None:
        raise ParameterError('density', "parameter 'density' applies only with combine='ties'")
    if scaling is None:
        scaling = 0.3 if combine == "task_arithmetic" else 1.0
    coeffs = per_task_values("scaling", scaling, tasks)
    dropped = drop(vectors, drop_rate, seed)
    params = {"drop_rate": drop_rate, "seed": seed, "combine": combine, "scaling": scaling}
    if combine == "ties":
        density = 0.2 if density is None else density
        dropped = ties_parts(dropped, density, scope)
        params.update(density=density, scope=scope)
    return MergePlan(f"dare_{combine}", dropped, coeffs, params)
