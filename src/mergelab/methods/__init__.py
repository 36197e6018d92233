"""Every merging method, registered by name in one registry: static, dynamic and adaptive.

>>> from mergelab import methods
>>> methods.available("static")
['average', 'dare', 'task_arithmetic', 'ties']
>>> methods.get("se_prototype").kind, methods.get("se_prototype").needs
('dynamic', 'calibration')
"""

from mergelab.methods import average, dare, task_arithmetic, ties  # noqa: F401  (registers the static methods)
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


def __getattr__(name: str):
    """``methods.adaptive`` and ``methods.dynamic`` are imported when first used (or when the registry is
    asked about a method it does not hold yet, :func:`mergelab.methods.registry.load_all`), so that a static
    merge (``mergelab merge``) does not pay for importing them."""
    if name in ("adaptive", "dynamic"):
        import importlib

        return importlib.import_module(f"mergelab.methods.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATA_NEEDS", "KINDS", "MergePlan", "MethodInfo", "MethodOutput", "PoolView", "available", "get", "get_static",
    "merge", "plan", "pool_experts", "register", "register_method", "slice_form", "unregister",
    "trim", "elect_sign", "disjoint_split", "drop",
]
