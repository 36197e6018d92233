"""mergelab: merge task-specific fine-tuned models into one multi-task model, and measure it.

Static methods (weight averaging, Task Arithmetic, TIES, DARE) share one core: the task vectors
tau_t = theta_t - theta_0 and the combination theta_0 + sum_t lambda_t tau_t (see
:mod:`mergelab.core.statedict`).

>>> import mergelab
>>> merged = mergelab.merge("task_arithmetic", pretrained, {"sst2": sd1, "mnli": sd2}, scaling=0.3)  # doctest: +SKIP
"""

from mergelab import methods
from mergelab.core.errors import IncompatibleModelsError, InputError, MergelabError
from mergelab.core.io import load_state_dict, save_model
from mergelab.core.lora import LoraTaskVector, load_lora
from mergelab.core.statedict import TaskVector, check_compatible, combine, task_vectors
from mergelab.methods import MergePlan, merge, plan

__version__ = "0.1.0"

__all__ = [
    "methods", "merge", "plan", "MergePlan", "TaskVector", "task_vectors", "combine", "check_compatible",
    "load_state_dict", "save_model", "load_lora", "LoraTaskVector", "InputError", "IncompatibleModelsError", "MergelabError", "__version__",
]
