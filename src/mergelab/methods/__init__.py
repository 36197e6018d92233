"""Every merging method, registered by name in one registry: static, dynamic and adaptive.

>>> from mergelab import methods
>>> methods.available("static")
['average', 'dare', 'task_arithmetic', 'ties']
>>> methods.get("se_prototype").kind, methods.get("se_prototype").needs
('dynamic', 'calibration')
"""

from mergelab.methods import adaptive, average, dare, dynamic, task_arithmetic, ties  # noqa: F401  (registers the static methods)  # noqa: F401  (register the adaptive and dynamic methods)
from mergelab.methods.registry import (
    DATA_NEEDS,
    KINDS,
    MergePlan,
    MethodInfo,
    MethodOutput,
    PoolView,
    available,
    get,
    get_static,
    merge,
    plan,
    pool_experts,
    register,
    register_method,
    slice_form,
    unregister,
)
from mergelab.methods.transforms import disjoint_split, drop, elect_sign, trim

__all__ = [
    "DATA_NEEDS", "KINDS", "MergePlan", "MethodInfo", "MethodOutput", "PoolView", "available", "get", "get_static",
    "merge", "plan", "pool_experts", "register", "register_method", "slice_form", "unregister",
    "trim", "elect_sign", "disjoint_split", "drop",
]
