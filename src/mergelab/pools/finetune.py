"""Expert fine-tuning (full body plus a fresh linear head per task) and the on-disk expert cache.

Cache layout, under ``$MERGELAB_CACHE`` (default ``~/.cache/mergelab``)::

    experts/<task>-<key[:16]>/
        body.safetensors    the fine-tuned body's state dict
        head.safetensors    the head: keys ``weight`` [n_classes, hidden] and ``bias`` [n_classes]
        meta.json           key, recipe, task, backbone identity, train seconds, steps, final loss

``key`` is a SHA-256 over the recipe (every hyperparameter and the seed), the backbone's identity (its
tensors and config, pooling, max length) and the training data (task name, label names, texts and
labels). An entry is built in a temporary folder beside it (``.tmp-*``) and renamed into place when
complete, so an interrupted run never leaves a half-written entry; an entry whose files are missing,
unreadable or of the wrong key or shape is ignored and rebuilt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mergelab.core.errors import InputError
from mergelab.pools.data.tasks import TaskData
from mergelab.pools.families.text import TextClassifierFamily

CACHE_FORMAT = 1
_STALE_TMP_SECONDS = 24 * 3600


@dataclass(frozen=True)
class FinetuneRecipe:
    """How an expert is fine-tuned. Every field enters the cache key."""

    steps: int = 300
    batch_size: int = 16
    body_lr: float = 2e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    freeze_embeddings: bool = True
    dropout: bool = True  # train the body in train mode (dropout on)
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InputError(
                f"recipe: steps and batch_size must be positive (got {self.steps}, {self.batch_size})"
            )
        if self.body_lr < 0 or self.head_lr <= 0:
            raise InputError(
                f"recipe: learning rates must be positive (body {self.body_lr}, head {self.head_lr})"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise InputError(f"recipe: warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> FinetuneRecipe:
        return FinetuneRecipe(**{**self.to_dict(), **changes})


@dataclass
class Expert:
    """A fine-tuned expert: its body's state dict, its task's head, and how it was made."""

    task: str
    body_state: dict[str, Tensor]
    head: nn.Linear
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- cache key
def data_hash(task: TaskData) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([task.name, task.label_names]).encode())
    for text, label in zip(task.texts, task.labels, strict=True):
        h.update(f"{label}\x1f{len(text)}\x1f".encode())
        h.update(text.encode())
    return h.hexdigest()


def expert_key(family: TextClassifierFamily, train: TaskData, recipe: FinetuneRecipe) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "recipe": recipe.to_dict(),
        "backbone": family.identity(),
        "max_length": family.max_length,
        "pooling": family.pooling,
        "data": data_hash(train),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MERGELAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mergelab"


def expert_dir(family: TextClassifierFamily, train: TaskData, recipe: FinetuneRecipe, cache_dir=None) -> Path:
    key = expert_key(family, train, recipe)
    return cache_root(cache_dir) / "experts" / f"{_safe(train.name)}-{key[:16]}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "task"


# ---------------------------------------------------------------------------------------------- training
def _lr_lambda(recipe: FinetuneRecipe):
    warm = int(round(recipe.warmup_fraction * recipe.steps))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (recipe.steps - step) / max(1, recipe.steps - warm))

    return f


def train_expert(
    family: TextClassifierFamily,
    train: TaskData,
    recipe: FinetuneRecipe,
    progress: bool = True,
) -> Expert:
    """Fine-tune a copy of the pretrained body plus a fresh head on ``train``; no cache."""
    train.validate()
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    body = copy.deepcopy(family.body)
    body.load_state_dict(family.pretrained_state())
    body.train(recipe.dropout)
    head = family.new_head(train.n_classes, seed=recipe.seed)

    decay, no_decay = [], []
    for name, p in body.named_parameters():
        if recipe.freeze_embeddings and name.startswith("embeddings."):
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "lr": recipe.body_lr, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "lr": recipe.body_lr, "weight_decay": 0.0},
        {"params": list(head.parameters()), "lr": recipe.head_lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"] and g["lr"] > 0]
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe))
    labels = torch.tensor(train.labels, dtype=torch.long)
    n = len(train)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415

            bar = tqdm(total=recipe.steps, desc=f"fine-tune {train.name}", unit="step", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None

    perm = torch.randperm(n, generator=gen)
    pos = 0
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        if pos + recipe.batch_size > n and pos > 0:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + recipe.batch_size].tolist()
        pos += recipe.batch_size
        batch = family.tokenize([train.texts[i] for i in idx])
        states = body(**batch).last_hidden_state
        logits = head(family.pool(states, batch["attention_mask"]))
        loss = nn.functional.cross_entropy(logits, labels[idx].to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 5 == 0 or step == recipe.steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    body.eval()
    body_state = {k: v.detach().clone().contiguous() for k, v in body.state_dict().items()}
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    tail = losses[-max(1, min(20, len(losses))) :]
    meta = {
        "task": train.name,
        "label_names": list(train.label_names),
        "n_train": len(train),
        "recipe": recipe.to_dict(),
        "steps": recipe.steps,
        "train_seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / recipe.steps, 4),
        "final_loss": round(sum(tail) / len(tail), 5),
        "first_loss": round(losses[0], 5),
        "torch_threads": torch.get_num_threads(),
    }
    return Expert(train.name, body_state, head, meta)


# ---------------------------------------------------------------------------------------------- cache I/O
def _load_entry(path: Path, key: str, family: TextClassifierFamily, n_classes: int) -> Expert | None:
    """The expert stored at ``path`` if the entry is complete and matches; else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT or not meta.get("complete"):
            return None
        body_state = load_file(str(path / "body.safetensors"))
        head_state = load_file(str(path / "head.safetensors"))
        ref = family.pretrained_state()
        if set(body_state) != set(ref) or any(body_state[k].shape != ref[k].shape for k in ref):
            return None
        w, b = head_state["weight"], head_state["bias"]
        if tuple(w.shape) != (n_classes, family.hidden_size) or tuple(b.shape) != (n_classes,):
            return None
    except Exception:  # noqa: BLE001  (anything unreadable is a miss)
        return None
    head = nn.Linear(family.hidden_size, n_classes)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    head.requires_grad_(False)
    head.to(family.device)
    body_state = {k: v.to(family.device) for k, v in body_state.items()}
    meta["cache_hit"] = True
    meta["cache_path"] = str(path)
    return Expert(meta.get("task", path.name), body_state, head, meta)


def _clean_stale_tmp(parent: Path) -> None:
    now = time.time()
    for p in parent.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def save_expert(expert: Expert, path: Path, key: str) -> Path:
    """Write ``expert`` to ``path`` atomically (temporary folder beside it, then rename)."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=parent))
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in expert.body_state.items()},
            str(tmp / "body.safetensors"),
        )
        save_file(
            {
                "weight": expert.head.weight.detach().cpu().contiguous(),
                "bias": expert.head.bias.detach().cpu().contiguous(),
            },
            str(tmp / "head.safetensors"),
        )
        meta = {**expert.meta, "key": key, "format": CACHE_FORMAT, "complete": True, "created": time.time()}
        meta.pop("cache_hit", None)
        meta.pop("cache_path", None)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():  # an invalid entry: move it aside, then drop it
            trash = Path(tempfile.mkdtemp(prefix=f".tmp-trash-{path.name}-", dir=parent))
            os.rename(path, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same entry first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def get_or_train_expert(
    family: TextClassifierFamily,
    task_split: TaskData | Mapping[str, TaskData],
    recipe: FinetuneRecipe,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Expert:
    """The cached expert for (backbone, recipe, training data), training and storing it on a miss.

    ``task_split`` is the training :class:`TaskData` or a ``{"train": ..., ...}`` split dict.
    ``cache_dir=False``-like use: call :func:`train_expert` directly to skip the cache.
    """
    train = task_split["train"] if isinstance(task_split, Mapping) else task_split
    key = expert_key(family, train, recipe)
    path = cache_root(cache_dir) / "experts" / f"{_safe(train.name)}-{key[:16]}"
    hit = _load_entry(path, key, family, train.n_classes)
    if hit is not None:
        return hit
    if path.parent.exists():
        _clean_stale_tmp(path.parent)
    expert = train_expert(family, train, recipe, progress=progress)
    save_expert(expert, path, key)
    expert.meta.update(cache_hit=False, cache_path=str(path), key=key)
    return expert
