"""Static merging methods, one small module each, registered by name.

>>> from mergelab import methods
>>> methods.available()
['average', 'dare', 'task_arithmetic', 'ties']
"""

from . import average, dare, task_arithmetic, ties  # noqa: F401  (registers the methods)
from .registry import MergePlan, MethodInfo, available, get, merge, plan, register
from .transforms import disjoint_split, drop, elect_sign, trim

__all__ = [
    "MergePlan", "MethodInfo", "available", "get", "merge", "plan", "register",
    "trim", "elect_sign", "disjoint_split", "drop",
]
