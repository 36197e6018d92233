"""Named benchmarks, expert fine-tuning and the expert cache."""

from mergelab.pools.benchmarks import (
    BENCHMARKS,
    DEFAULT_BENCHMARK,
    BenchmarkSpec,
    TaskSpec,
    get_benchmark,
    register_benchmark,
    resolve_backbone,
)
from mergelab.pools.finetune import (
    Expert,
    FinetuneRecipe,
    cache_root,
    expert_key,
    get_or_train_expert,
    get_or_train_experts,
    train_expert,
)

__all__ = [
    "BENCHMARKS",
    "DEFAULT_BENCHMARK",
    "BenchmarkSpec",
    "Expert",
    "FinetuneRecipe",
    "TaskSpec",
    "cache_root",
    "expert_key",
    "get_benchmark",
    "get_or_train_expert",
    "get_or_train_experts",
    "register_benchmark",
    "resolve_backbone",
    "train_expert",
]
