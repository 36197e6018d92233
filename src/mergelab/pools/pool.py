"""A model pool: the pretrained model, the task experts and (optionally) each task's data.

This is the ``pool`` section of a YAML configuration (see :mod:`mergelab.experiment.config` once it lands) and
the Python object the methods receive. Paths are local Hugging Face directories, ``.safetensors``
files, or hub ids (fetched only when a hub id is given and the hub is reachable; offline it fails
fast, see :func:`mergelab.core.io.resolve_model_path`).

Example::

    pool:
      family: text
      pretrained: sentence-transformers/all-MiniLM-L6-v2
      experts:
        sentiment: ./experts/sentiment
        topic: ./experts/topic
      tasks:
        sentiment: {path: ./data/sentiment.csv}
        topic: {path: ./data/topic.jsonl}

Families (``family``), all loaded by :func:`load_pool` into one :class:`ModelPool`:

- ``text``: an encoder (``AutoModel``) with mean or CLS pooling; heads from ``head.safetensors`` files
  in the expert folders (the benchmark's expert cache format), when present;
- ``sequence-classification``: ``AutoModelForSequenceClassification`` experts (BERT, GPT-2, RoBERTa...),
  each expert's ``classifier``/``score`` module kept as its task's head
  (:mod:`mergelab.pools.families.seqcls`);
- ``clip-vision``: CLIP vision towers, zero-shot heads from each task's class names and prompt templates
  (:mod:`mergelab.pools.families.clip`);
- ``torch``: an ``nn.Module`` factory ``"pkg.module:function"`` and state dict files; ``head`` names
  the head module (its keys' prefix), kept per task (:mod:`mergelab.pools.families.torch_module`).

Task data (``tasks``, read by :func:`mergelab.pools.data.loaders.load_task_data`, the loaders of users' task
files too): CSV/TSV, JSONL, a folder saved with ``datasets``' ``save_to_disk``, an image
folder (one sub-folder per class), a ``.pt`` file of tensors, or a hub dataset id (online only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from mergelab.core import io, lora, yamlio
from mergelab.core.errors import InputError


class TaskDataConfig(BaseModel):
    """Where a task's labelled (or unlabelled) examples come from."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="CSV/TSV, JSONL, a saved Hugging Face dataset folder, an image folder, "
                                  "a .pt file, or a hub dataset id")
    text_field: str = "text"
    label_field: str = "label"
    text_pair_field: str | None = Field(None, description="second text of a pair (GLUE's MNLI, QNLI...)")
    image_field: str = "image"
    split: str | None = Field(None, description="dataset split (hub datasets and DatasetDict folders)")
    subset: str | None = Field(None, description="dataset configuration name, e.g. 'cola' for 'glue'")
    limit: int | None = Field(None, ge=1, description="use the first N examples only")
    class_names: list[str] | None = Field(None, description="CLIP: class names for the zero-shot head "
                                                            "(default: the dataset's label names)")
    templates: list[str] | None = Field(None, description="CLIP: prompt templates with '{}' (default: the "
                                                          "pool's templates)")


class PoolConfig(BaseModel):
    """The models to merge. ``experts`` maps a task name to its fine-tuned model."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["text", "sequence-classification", "clip-vision", "torch"] = "text"
    pretrained: str = Field(description="HF directory, .safetensors file or hub id of the pretrained model")
    experts: dict[str, str] = Field(description="task name -> HF directory, .safetensors file or hub id")
    tasks: dict[str, TaskDataConfig] = Field(default_factory=dict)
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute precision of the body; half precision for inference only")
    max_length: int | None = Field(None, ge=2, description="text families: tokens per input (64 / 128)")
    pooling: Literal["mean", "cls"] = Field("mean", description="family 'text': how token states are pooled")
    probe_pooling: str | None = Field(None, description="SE-Merging probe representation: mean, first, last")
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."],
                                 description="CLIP: default prompt templates")
    factory: str | None = Field(None, description="family 'torch': 'pkg.module:function' returning the nn.Module")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    head: str | None = Field(None, description="family 'torch': name of the head module (prefix of its keys)")
    layers: str | None = Field(None, description="family 'torch': name of the nn.ModuleList of blocks (probes)")

    @field_validator("experts")
    @classmethod
    def _at_least_one(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("needs at least one expert (task name -> model path)")
        return v

    @model_validator(mode="after")
    def _family_fields(self) -> PoolConfig:
        if self.family == "torch" and (not self.factory or not self.head):
            raise ValueError("family 'torch' needs 'factory' ('pkg.module:function') and 'head' (the head module)")
        if self.family != "torch" and (self.factory or self.head or self.layers):
            raise ValueError("'factory', 'head' and 'layers' are for family 'torch' only")
        return self

    def inputs(self) -> list[str]:
        """Every path this pool reads (an output must be none of them)."""
        return [self.pretrained, *self.experts.values(), *(t.path for t in self.tasks.values())]

    def resolve_relative(self, base: str | Path) -> PoolConfig:
        """Paths relative to ``base`` (the config file's folder) made absolute; hub ids left alone."""
        base = Path(base)

        def fix(spec: str) -> str:
            p = Path(spec).expanduser()
            if p.is_absolute() or p.exists() or not (base / p).exists():
                return spec
            return str(base / p)

        return self.model_copy(
            update={
                "pretrained": fix(self.pretrained),
                "experts": {k: fix(v) for k, v in self.experts.items()},
                "tasks": {k: t.model_copy(update={"path": fix(t.path)}) for k, t in self.tasks.items()},
            }
        )


def _adapter_expert(spec: str, pretrained: dict[str, Tensor]) -> dict[str, Tensor]:
    """A LoRA adapter folder as the expert's full state dict: W0 + s B A on each adapted weight (its
    ``merge_and_unload``; :mod:`mergelab.core.lora`). Memory: one model, like a fully fine-tuned expert."""
    return lora.merged_state_dict(pretrained, lora.load_lora(spec, pretrained))


def load_state_dicts(pool: PoolConfig, *, factored: bool = False
                     ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor] | lora.LoraTaskVector]]:
    """The pretrained state dict and each expert's, in the pool's task order.

    An expert may be a PEFT LoRA adapter folder over the pretrained model: it is materialised as W0 + s B A, or,
    with ``factored``, kept as its :class:`~mergelab.core.lora.LoraTaskVector` (what the static methods merge
    exactly, without holding the expert's body; docs/lora.md)."""
    pre = io.load_state_dict(pool.pretrained)
    experts: dict[str, dict[str, Tensor] | lora.LoraTaskVector] = {}
    for name, spec in pool.experts.items():
        try:
            if lora.is_adapter_dir(spec):
                experts[name] = lora.load_lora(spec, pre) if factored else _adapter_expert(spec, pre)
            else:
                experts[name] = io.load_state_dict(spec)
        except InputError as exc:
            raise InputError(f"pool.experts.{name}: {exc}") from exc
    return pre, experts


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class ModelPool:
    """A loaded pool, the one type every command runs on (``bench``, ``bench --config POOL.yaml``,
    ``adapt``, ``analyze``): the family (body module, tokenizer or processor), the pretrained body's state
    dict, each expert's body state dict, each task's head, and each task's splits
    (``{task: {"train"?, "validation", "test": TaskData}}``).

    A named benchmark (:func:`mergelab.experiment.runner.load_context`) fills ``splits`` with its seeded
    train / validation / test splits and ``expert_meta`` with each expert's fine-tuning record. A pool
    YAML (:func:`load_pool`) gives one data set per task (``data``); :meth:`hold_out` cuts it into a
    validation part and a test part. ``adapters``: task -> the LoRA adapter (factored task vector) of each expert
    that is one (a LoRA benchmark's experts, a ``text`` pool's adapter folders); its ``experts`` entry is then
    W0 + s B A, and the methods merge the factors.
    """

    family: Any
    pretrained: dict[str, Tensor]
    experts: dict[str, dict[str, Tensor]]
    heads: dict[str, nn.Module]
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = "pool"
    config: PoolConfig | None = None
    data: dict[str, Any] = field(default_factory=dict)
    expert_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    setup_seconds: dict[str, float] = field(default_factory=dict)  # wall time of loading it: data, experts
    adapters: dict[str, lora.LoraTaskVector] = field(default_factory=dict)  # the experts that are LoRA adapters

    @property
    def tasks(self) -> list[str]:
        return list(self.experts)

    def inputs(self, task: str) -> list[Any]:
        """Task ``task``'s unlabeled inputs (what test-time adaptation may read)."""
        if task not in self.data:
            raise InputError(f"no data for task {task!r}: add pool.tasks.{task}")
        return list(self.data[task].inputs)

    def restrict(self, tasks: list[str] | tuple[str, ...]) -> ModelPool:
        """The same pool on ``tasks`` only (in that order): their experts, heads, splits, data and expert
        records, nothing of the other tasks. The tensors are shared, not copied. A sweep's task subsets
        (``mergelab sweep``'s ``subsets``) are such pools, so every method sees only the subset's experts."""
        unknown = [t for t in tasks if t not in self.experts]
        if unknown or not tasks:
            raise InputError(f"task subset {list(tasks)}: the pool's tasks are {self.tasks}"
                             + (f"; unknown {unknown}" if unknown else "; a subset needs at least one task"))
        if len(set(tasks)) != len(tasks):
            raise InputError(f"task subset {list(tasks)} names a task twice")

        def only(d: dict) -> dict:
            return {t: d[t] for t in tasks if t in d}

        config = None if self.config is None else self.config.model_copy(
            update={"experts": only(self.config.experts), "tasks": only(self.config.tasks)})
        return ModelPool(family=self.family, pretrained=self.pretrained, experts=only(self.experts),
                         heads=only(self.heads), splits=only(self.splits), name=self.name, config=config,
                         data=only(self.data), expert_meta=only(self.expert_meta), adapters=only(self.adapters),
                         setup_seconds=dict(self.setup_seconds))

    def hold_out(self, validation_per_task: int, limit: int | None = None) -> dict[str, dict[str, Any]]:
        """Split each task's one data set: its first ``validation_per_task`` examples are the
        ``validation`` split (the labeled data a searched row reads, and the calibration inputs of
        ``se_prototype``), the rest (the first ``limit`` of them, if given) the ``test`` split that every
        row is evaluated on. The two never overlap. Sets and returns ``self.splits``."""
        missing = [t for t in self.tasks if t not in self.data]
        if missing:
            raise InputError(f"pool.tasks: task(s) {missing} have no data; evaluation needs each task's data "
                             "(add pool.tasks.NAME with a path)")
        splits = {}
        for t in self.tasks:
            d = self.data[t]
            n = len(d)
            if validation_per_task >= n:
                raise InputError(f"pool.tasks.{t}: {n} examples; holding out {validation_per_task} for validation "
                                 "leaves none to evaluate (lower bench.validation_per_task)")
            end = n if limit is None else min(n, validation_per_task + limit)
            splits[t] = {"validation": d.subset(range(validation_per_task)),
                         "test": d.subset(range(validation_per_task, end))}
        self.splits = splits
        return splits


def make_family(pool: PoolConfig):
    """The family object for ``pool.family``, built from ``pool.pretrained``."""
    from mergelab.pools.families.base import resolve_device, resolve_dtype  # noqa: PLC0415

    device, dtype = resolve_device(pool.device), resolve_dtype(pool.dtype)
    where = "pool.pretrained"
    try:
        if pool.family == "text":
            from mergelab.pools.families.text import TextClassifierFamily  # noqa: PLC0415

            if dtype != torch.float32:
                raise InputError("family 'text' runs in float32 only; use 'sequence-classification' for bf16/fp16")
            return TextClassifierFamily(io.resolve_model_path(pool.pretrained), max_length=pool.max_length or 64,
                                        pooling=pool.pooling, device=device)
        if pool.family == "sequence-classification":
            from mergelab.pools.families.seqcls import SequenceClassifierFamily  # noqa: PLC0415

            return SequenceClassifierFamily(pool.pretrained, max_length=pool.max_length or 128,
                                            probe_pooling=pool.probe_pooling or "mean", device=device, dtype=dtype)
        if pool.family == "clip-vision":
            from mergelab.pools.families.clip import CLIPVisionFamily  # noqa: PLC0415

            return CLIPVisionFamily(pool.pretrained, probe_pooling=pool.probe_pooling or "first", device=device,
                                    dtype=dtype)
        from mergelab.pools.families.torch_module import TorchModuleFamily  # noqa: PLC0415

        return TorchModuleFamily(pool.factory, pool.pretrained, pool.head, pool.layers,  # type: ignore[arg-type]
                                 pool.factory_kwargs, device=device, dtype=dtype)
    except InputError as exc:
        raise type(exc)(f"{where}: {exc}") from exc


def _text_head(spec: str, family) -> nn.Module | None:
    """Family 'text': the ``head.safetensors`` (weight, bias) next to an expert's weights, if any."""
    path = io.resolve_model_path(spec)
    f = path / "head.safetensors" if path.is_dir() else None
    if f is None or not f.is_file():
        return None
    from safetensors.torch import load_file  # noqa: PLC0415

    st = load_file(str(f))
    if set(st) != {"weight", "bias"} or st["weight"].ndim != 2:
        raise InputError(f"{f}: expected tensors 'weight' [classes, hidden] and 'bias' [classes]")
    head = nn.Linear(st["weight"].shape[1], st["weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(st["weight"])
        head.bias.copy_(st["bias"])
    return head.to(family.device).requires_grad_(False).eval()


def load_pool(pool: PoolConfig, *, data: bool = True) -> ModelPool:
    """Load the family, the pretrained and expert bodies, each task's head and (``data``) each task's data.

    Heads: the experts' own (``sequence-classification``, ``torch``, ``text`` with ``head.safetensors``),
    or zero-shot heads built from the class names and templates (``clip-vision``; class names default
    to the task data's label names).
    """
    from mergelab.pools.data.loaders import load_task_data  # noqa: PLC0415

    family = make_family(pool)
    pretrained = family.pretrained_state()
    experts: dict[str, dict[str, Tensor]] = {}
    heads: dict[str, nn.Module] = {}
    adapters: dict[str, lora.LoraTaskVector] = {}
    for name, spec in pool.experts.items():
        where = f"pool.experts.{name}"
        try:
            if pool.family == "text" and lora.is_adapter_dir(spec):
                adapters[name] = lora.load_lora(spec, pretrained)  # the factors the methods merge
                experts[name] = lora.merged_state_dict(pretrained, adapters[name])  # the expert's own body
                head = _text_head(spec, family)
            elif lora.is_adapter_dir(spec):
                raise InputError(f"{spec}: a LoRA adapter folder; family {pool.family!r} loads each expert's own "
                                 "head from its model, which an adapter does not hold (LoRA experts serve in family "
                                 "'text' pools and in merges; docs/lora.md)")
            elif pool.family == "text":
                experts[name] = family.body_state_from(io.load_state_dict(spec), f"{where}: {spec}")
                head = _text_head(spec, family)
            else:
                experts[name], head = family.load_expert(spec, where)
        except InputError as exc:
            msg = str(exc)
            raise type(exc)(msg if msg.startswith(where) else f"{where}: {msg}") from exc
        if head is not None:
            heads[name] = head
    kind = "image" if pool.family == "clip-vision" else "text"
    task_data = {}
    if data:
        for name, cfg in pool.tasks.items():
            task_data[name] = load_task_data(name, cfg, kind)
    if pool.family == "clip-vision":
        for name in pool.experts:
            cfg = pool.tasks.get(name)
            names = cfg.class_names if cfg is not None and cfg.class_names else None
            if names is None and name in task_data:  # dataset label names, 'annual_crop' read as 'annual crop'
                names = [n.replace("_", " ") for n in task_data[name].label_names]
            if names is None:
                raise InputError(f"pool.tasks.{name}: the zero-shot head needs class_names (or task data with "
                                 "label names)")
            templates = cfg.templates if cfg is not None and cfg.templates else pool.templates
            try:
                heads[name] = family.zero_shot_head(names, templates)
            except InputError as exc:
                raise InputError(f"pool.tasks.{name}: {exc}") from exc
        family.release_text_tower()
    return ModelPool(family=family, pretrained=pretrained, experts=experts, heads=heads,
                     splits={t: {"test": d} for t, d in task_data.items()}, config=pool, data=task_data,
                     adapters=adapters)


def load_pool_file(path: str | Path, *, data: bool = True) -> ModelPool:
    """Read a YAML file with a ``pool:`` section (or a bare pool mapping) and load it."""
    import yaml  # noqa: PLC0415
    from pydantic import ValidationError  # noqa: PLC0415

    p = Path(path)
    try:
        raw = yamlio.load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc})") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"{p}: not valid YAML ({exc})") from exc
    if isinstance(raw, dict) and "pool" in raw:
        raw = raw["pool"]
    if not isinstance(raw, dict):
        raise InputError(f"{p}: expected a mapping with a 'pool' section")
    try:
        cfg = PoolConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise InputError(f"{p}: pool.{loc}: {first['msg']}") from None
    return load_pool(cfg.resolve_relative(p.parent), data=data)
