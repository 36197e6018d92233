"""Methods a sweep test registers through the sweep's ``plugins:`` (imported by the driver and by every Ray
worker, which cannot see methods registered inside a test)."""

from __future__ import annotations

from mergelab import methods
from mergelab.methods.registry import MergePlan, per_task_values


@methods.register("spy_test")
def spy_test(vectors, scaling: float = 0.3) -> MergePlan:
    """Task Arithmetic that also reports the tasks it was given (``saw``): a subset must be a real pool."""
    tasks = list(vectors)
    return MergePlan("spy_test", dict(vectors), per_task_values("scaling", scaling, tasks),
                     {"scaling": scaling, "saw": tasks})


@methods.register("explode_test")
def explode_test(vectors, scaling: float = 0.3) -> MergePlan:
    """Task Arithmetic that raises for scaling > 0.5 on real models (more than one tensor), so the config check,
    which plans on a one-tensor synthetic pool, lets it through and the trial fails."""
    tasks = list(vectors)
    if scaling > 0.5 and len(next(iter(vectors.values()))) > 1:  # a task vector is a mapping key -> tensor
        raise RuntimeError(f"explode_test refuses scaling {scaling}")
    return MergePlan("explode_test", dict(vectors), per_task_values("scaling", scaling, tasks), {"scaling": scaling})
