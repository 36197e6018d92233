"""Weight averaging: theta = sum_t w_t theta_t / sum_t w_t.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022 (uniform soup); Matena & Raffel, "Merging Models with
Fisher-Weighted Averaging", NeurIPS 2022 (the isotropic, optionally weighted, baseline).
Written as task vectors: theta_0 + sum_t (w_t / sum_s w_s) tau_t.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mergelab.core.errors import ParameterError
from mergelab.methods.registry import MergePlan, check_number, register
from mergelab.methods.task_arithmetic import weighted_sum_form


@register("average", stream=weighted_sum_form)
def average(vectors, weights: Mapping[str, float] | Sequence[float] | None = None) -> MergePlan:
    """Weight averaging of the experts (uniform, or weighted by ``weights``).

    ``weights``: None (uniform), a mapping task -> weight, or a sequence in the experts' order.
    Weights must be non-negative with a positive sum.
    """
    tasks = list(vectors)
    if weights is None:
        w = dict.fromkeys(tasks, 1.0)
    elif isinstance(weights, Mapping):
        if set(weights) != set(tasks):
            raise ParameterError('weights', f"parameter 'weights' must name exactly the tasks {tasks}, got {sorted(weights)}")
        w = {t: check_number(f"weights[{t}]", weights[t], low=0.0) for t in tasks}
    elif isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ParameterError('weights', f"parameter 'weights' must be a mapping task -> weight or a list of weights, got {weights!r}")
    else:
        weights = list(weights)
        if len(weights) != len(tasks):
            raise ParameterError('weights', f"parameter 'weights' has {len(weights)} values for {len(tasks)} experts")
        w = {t: check_number(f"weights[{i}]", x, low=0.0) for i, (t, x) in enumerate(zip(tasks, weights))}
    total = sum(w.values())
    if total <= 0:
        raise ParameterError('weights', "parameter 'weights' must have a positive sum")
    return MergePlan("average", dict(vectors), {t: w[t] / total for t in tasks}, {"weights": w})
