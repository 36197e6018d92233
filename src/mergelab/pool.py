"""A model pool: the pretrained model, the task experts and (optionally) each task's data.

This is the ``pool`` section of a YAML configuration (see :mod:`mergelab.config` once it lands) and
the Python object the methods receive. Paths are local Hugging Face directories, ``.safetensors``
files, or hub ids (fetched only when a hub id is given and the hub is reachable; offline it fails
fast, see :func:`mergelab.io.resolve_model_path`).

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
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from . import io
from .errors import InputError


class TaskDataConfig(BaseModel):
    """Where a task's labelled (or unlabelled) examples come from."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="CSV/TSV, JSONL, or a saved Hugging Face dataset folder")
    text_field: str = "text"
    label_field: str = "label"


class PoolConfig(BaseModel):
    """The models to merge. ``experts`` maps a task name to its fine-tuned model."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["text"] = "text"
    pretrained: str = Field(description="HF directory, .safetensors file or hub id of the pretrained model")
    experts: dict[str, str] = Field(description="task name -> HF directory, .safetensors file or hub id")
    tasks: dict[str, TaskDataConfig] = Field(default_factory=dict)

    @field_validator("experts")
    @classmethod
    def _at_least_one(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("needs at least one expert (task name -> model path)")
        return v

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


def load_state_dicts(pool: PoolConfig) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """The pretrained state dict and each expert's, in the pool's task order."""
    pre = io.load_state_dict(pool.pretrained)
    experts = {}
    for name, spec in pool.experts.items():
        try:
            experts[name] = io.load_state_dict(spec)
        except InputError as exc:
            raise InputError(f"pool.experts.{name}: {exc}") from exc
    return pre, experts
