"""LoRA experts for a named benchmark: a PEFT LoRA adapter on the body's linears plus a fresh linear head per task,
cached beside the full experts (:mod:`mergelab.pools.finetune`).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, Eq. 3) trains, for each targeted
weight W0 [out, in], only B [out, r] and A [r, in] of h = W0 x + (alpha / r) B A x; the pretrained weights stay
frozen. Here the adapter is made and trained with PEFT (``get_peft_model``) on the body (``AutoModel``), the head
(one ``nn.Linear`` per task, as for the full experts) is trained in full beside it, and the adapter is saved with
PEFT's ``save_pretrained``: mergelab then reads it back as a factored task vector
(:func:`mergelab.core.lora.load_lora`), the form every method merges.

Cache layout, under ``$MERGELAB_CACHE`` (default ``~/.cache/mergelab``)::

    experts-lora/<task>-<key[:16]>/
        adapter/adapter_config.json, adapter/adapter_model.safetensors    the adapter, as PEFT saves it
        head.safetensors    the head: ``weight`` [n_classes, hidden] and ``bias`` [n_classes]
        meta.json           key, recipe, LoRA recipe, task, train seconds, steps, losses

``key`` is a SHA-256 over the full experts' key (:func:`mergelab.pools.finetune.expert_key`: recipe, backbone
identity, training data) and the :class:`LoraRecipe`. An entry is written in a temporary folder beside it and
renamed into place (:func:`mergelab.core.atomic.atomic_write_dir`); an entry that is incomplete, unreadable or of
another key is ignored and rebuilt.

The training loop mirrors :func:`mergelab.pools.finetune.train_expert` (same batches from the same seed, same
AdamW groups and schedule, gradient clipping, dropout on), with the LoRA factors in the body's group.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mergelab.core.atomic import atomic_write_dir, exclusive_lock
from mergelab.core.errors import InputError
from mergelab.core.lora import LoraTaskVector, load_lora, merged_state_dict
from mergelab.pools.data.tasks import TaskData
from mergelab.pools.families.text import TextClassifierFamily
from mergelab.pools.finetune import Expert, FinetuneRecipe, _safe, cache_root, expert_key, fit, load_head

LORA_CACHE_FORMAT = 1
# the attention query/key/value/output and the MLP intermediate/output linears of every block of a BERT body
# (BertModel, MiniLM): PEFT matches a string target_modules as a regular expression on the whole module name
BERT_BODY_LINEARS = (r"(.*\.)?layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                     r"|intermediate\.dense|output\.dense)")


@dataclass(frozen=True)
class LoraRecipe:
    """The adapter: rank, alpha (scaling alpha / rank, or alpha / sqrt(rank) with ``use_rslora``), dropout on the
    adapter's input, and the targeted modules (a regular expression on the module's full name). Every field enters
    the cache key; the optimiser settings are the benchmark's :class:`~mergelab.pools.finetune.FinetuneRecipe`
    (``body_lr`` is the LoRA factors' learning rate)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str = BERT_BODY_LINEARS
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"LoRA recipe: field 'rank' must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise InputError(f"LoRA recipe: field 'alpha' must be a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"LoRA recipe: field 'dropout' must be in [0, 1), got {self.dropout!r}")
        try:
            re.compile(self.target_modules)
        except re.error as exc:
            raise InputError(f"LoRA recipe: field 'target_modules' is not a regular expression ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoraExpert(Expert):
    """A LoRA expert: :class:`~mergelab.pools.finetune.Expert` (``body_state`` = W0 + s B A, for the expert's own
    forward passes) and its ``adapter``, the factored task vector the methods merge."""

    adapter: LoraTaskVector | None = None


def lora_expert_key(family: TextClassifierFamily, train: TaskData, recipe: FinetuneRecipe, lora: LoraRecipe) -> str:
    payload = {"format": LORA_CACHE_FORMAT, "expert": expert_key(family, train, recipe), "lora": lora.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def lora_expert_dir(family: TextClassifierFamily, train: TaskData, recipe: FinetuneRecipe, lora: LoraRecipe,
                    cache_dir=None) -> Path:
    key = lora_expert_key(family, train, recipe, lora)
    return cache_root(cache_dir) / "experts-lora" / f"{_safe(train.name)}-{key[:16]}"


def _peft():
    try:
        import peft  # noqa: PLC0415
    except ImportError:
        raise InputError("LoRA experts are trained with PEFT: pip install 'mergelab[lora]' (peft)") from None
    return peft


def train_lora_expert(family: TextClassifierFamily, train: TaskData, recipe: FinetuneRecipe, lora: LoraRecipe,
                      progress: bool = True) -> tuple[Any, nn.Linear, dict[str, Any]]:
    """Train a LoRA adapter on a copy of the pretrained body plus a fresh head on ``train``; no cache.

    Returns ``(peft_model, head, meta)``; save the adapter with ``peft_model.save_pretrained``."""
    peft = _peft()
    train.validate()
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    body = copy.deepcopy(family.body)
    body.load_state_dict(family.pretrained_state())
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, use_rslora=lora.use_rslora, bias="none")
    model = peft.get_peft_model(body, config)
    adapted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    if not adapted:
        raise InputError(f"LoRA recipe: field 'target_modules' {lora.target_modules!r} matches no module of the body")
    model.train(recipe.dropout)
    head = family.new_head(train.n_classes, seed=recipe.seed)
    factors = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": factors, "lr": recipe.body_lr, "weight_decay": recipe.weight_decay},
        {"params": list(head.parameters()), "lr": recipe.head_lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"] and g["lr"] > 0]
    losses, seconds = fit(model, head, groups, family, train, recipe, gen, progress=progress,
                          desc=f"LoRA fine-tune {train.name}")
    model.eval()
    head.eval().requires_grad_(False)
    tail = losses[-max(1, min(20, len(losses))):]
    meta = {
        "task": train.name, "label_names": list(train.label_names), "n_train": len(train),
        "recipe": recipe.to_dict(), "lora": lora.to_dict(), "adapted_modules": len(adapted),
        "trainable_values": sum(p.numel() for p in factors), "steps": recipe.steps,
        "train_seconds": round(seconds, 3), "seconds_per_step": round(seconds / recipe.steps, 4),
        "final_loss": round(sum(tail) / len(tail), 5), "first_loss": round(losses[0], 5),
        "torch_threads": torch.get_num_threads(),
    }
    return model, head, meta


def _load_entry(path: Path, key: str, family: TextClassifierFamily, n_classes: int) -> LoraExpert | None:
    """The LoRA expert stored at ``path`` if the entry is complete and of ``key``; else None (a miss)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("key") != key or meta.get("format") != LORA_CACHE_FORMAT or not meta.get("complete"):
            return None
        pre = family.pretrained_state()
        adapter = load_lora(path / "adapter", pre)
        head = load_head(path, family, n_classes)
    except Exception:  # noqa: BLE001  (anything unreadable is a miss)
        return None
    if head is None:
        return None
    body = {k: v.to(family.device) for k, v in merged_state_dict(pre, adapter).items()}
    meta.update(cache_hit=True, cache_path=str(path))
    return LoraExpert(meta.get("task", path.name), body, head, meta, adapter)


def get_or_train_lora_expert(
    family: TextClassifierFamily,
    task_split: TaskData | Mapping[str, TaskData],
    recipe: FinetuneRecipe,
    lora: LoraRecipe,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> LoraExpert:
    """The cached LoRA expert for (backbone, recipe, LoRA recipe, training data), training and storing it on a miss."""
    train = task_split["train"] if isinstance(task_split, Mapping) else task_split
    key = lora_expert_key(family, train, recipe, lora)
    path = lora_expert_dir(family, train, recipe, lora, cache_dir)
    hit = _load_entry(path, key, family, train.n_classes)
    if hit is not None:
        return hit
    with exclusive_lock(path):
        return _train_and_store(family, train, recipe, lora, key, path, progress)


def _train_and_store(family: TextClassifierFamily, train: TaskData, recipe: FinetuneRecipe, lora: LoraRecipe,
                     key: str, path: Path, progress: bool) -> LoraExpert:
    hit = _load_entry(path, key, family, train.n_classes)  # another process trained it while we waited
    if hit is not None:
        return hit
    model, head, meta = train_lora_expert(family, train, recipe, lora, progress=progress)

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp / "adapter"))
        save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
                  str(tmp / "head.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": key, "format": LORA_CACHE_FORMAT, "complete": True,
                                                   "created": time.time()}, indent=2, sort_keys=True))

    atomic_write_dir(path, fill)
    got = _load_entry(path, key, family, train.n_classes)  # what later runs will read: the saved adapter
    if got is None:
        raise InputError(f"{path}: the LoRA expert just written cannot be read back")
    got.meta.update(cache_hit=False)
    return got


__all__ = ["BERT_BODY_LINEARS", "LoraExpert", "LoraRecipe", "get_or_train_lora_expert", "lora_expert_dir",
           "lora_expert_key", "train_lora_expert"]
