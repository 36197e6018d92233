"""Task Arithmetic: theta = theta_0 + sum_t lambda_t tau_t.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, Sec. 2 (task vectors) and Sec. 4
(addition of task vectors, one scaling coefficient chosen on validation data).
"""

from __future__ import annotations

from collections.abc import Mapping

from mergelab.core.kernels import SliceForm
from mergelab.methods.registry import MergePlan, per_task_values, register


def weighted_sum_form(plan: MergePlan) -> SliceForm:
    """theta_0 + sum_t lambda_t tau_t per tensor: no steps (Task Arithmetic, averaging)."""
    return SliceForm(plan.coefficients)


@register("task_arithmetic", stream=weighted_sum_form)
def task_arithmetic(vectors, scaling: float | Mapping[str, float] = 0.3) -> MergePlan:
    """Task Arithmetic: add the task vectors scaled by ``scaling`` to the pretrained model.

    ``scaling``: one number for all tasks (default 0.3) or a mapping task -> number.
    """
    tasks = list(vectors)
    coeffs = per_task_values("scaling", scaling, tasks)
    return MergePlan("task_arithmetic", dict(vectors), coeffs, {"scaling": scaling})
