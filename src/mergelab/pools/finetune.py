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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mergelab.core.atomic import exclusive_lock
from mergelab.core.batching import input_length
from mergelab.core.errors import InputError
from mergelab.pools.data.tasks import TaskData
from mergelab.pools.families.text import TextClassifierFamily

CACHE_FORMAT = 2  # 2: one torch thread per expert, whatever the machine (bit-identical experts in parallel)
BATCHINGS = ("bucketed", "random")
BUCKET_BATCHES = 32  # batches per length-sorted bucket (see :func:`batch_schedule`)
MIN_PARALLEL_WORK = 5e8  # parameters x steps below which experts train in this process (tiny test models)
LENGTH_BIN = 16  # characters (about 4 tokens): lengths within a bin count as equal, so their order stays random
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
    # "bucketed": each batch holds texts of similar length (less padding, same number of examples per step;
    # see :func:`batch_schedule`); "random": uniformly random batches
    batching: str = "bucketed"

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
        if self.batching not in BATCHINGS:
            raise InputError(f"recipe: batching must be one of {BATCHINGS}, got {self.batching!r}")

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
def batch_schedule(lengths: Sequence[int], recipe: FinetuneRecipe, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless index batches of ``recipe.batch_size`` over ``len(lengths)`` examples, drawn with ``gen``.

    ``random``: a random permutation cut into batches; a new one when fewer than a batch remain.
    ``bucketed``: each epoch's random permutation is cut into buckets of :data:`BUCKET_BATCHES` batches,
    each bucket is sorted by length (``lengths``: characters, a proxy for tokens, in bins of
    :data:`LENGTH_BIN` whose members keep their random order) and cut into batches, and the epoch's
    batches are shuffled. The bins matter: sorted by exact length, texts that differ only in a short
    and a long label word ("bad" / "great") would fill batches of one label. Each batch then pads to a length near its texts' own (about
    30% fewer tokens per step on text5) while each step still sees a random batch of the task; the
    idea is the "bucket iterator" of length-grouped batching (e.g. Khomenko et al. 2016). The last
    incomplete batch of an epoch is dropped, as in ``random``.
    """
    n, bs = len(lengths), recipe.batch_size
    if recipe.batching == "random":
        perm, pos = torch.randperm(n, generator=gen), 0
        while True:
            if pos + bs > n and pos > 0:
                perm, pos = torch.randperm(n, generator=gen), 0
            yield perm[pos : pos + bs].tolist()
            pos += bs
    bucket = BUCKET_BATCHES * bs
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        ordered = [i for s in range(0, n, bucket) for i in sorted(perm[s : s + bucket], key=lambda i: lengths[i] // LENGTH_BIN)]
        batches = [ordered[s : s + bs] for s in range(0, max(1, n - bs + 1), bs)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[b]


def _lr_lambda(recipe: FinetuneRecipe):
    warm = int(round(recipe.warmup_fraction * recipe.steps))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (recipe.steps - step) / max(1, recipe.steps - warm))

    return f


def fit(model: nn.Module, head: nn.Module, groups: list[dict[str, Any]], family: TextClassifierFamily,
        train: TaskData, recipe: FinetuneRecipe, gen: torch.Generator, *, progress: bool = True,
        on_step: Callable[[], None] | None = None, desc: str = "fine-tune") -> tuple[list[float], float]:
    """The recipe's training loop, shared by full (:func:`train_expert`) and LoRA fine-tuning
    (:mod:`mergelab.pools.finetune_lora`): AdamW over ``groups``, warm-up then linear decay, the batches of
    :func:`batch_schedule` drawn with ``gen``, cross-entropy of ``head`` on the pooled features, gradient
    clipping. Returns ``(losses, seconds)``."""
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe))
    labels = torch.tensor(train.labels, dtype=torch.long)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415

            bar = tqdm(total=recipe.steps, desc=desc, unit="step", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    schedule = batch_schedule([input_length(t) for t in train.texts], recipe, gen)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        idx = next(schedule)
        batch = family.tokenize([train.texts[i] for i in idx])
        states = model(**batch).last_hidden_state
        logits = head(family.pool(states, batch["attention_mask"]))
        loss = nn.functional.cross_entropy(logits, labels[idx].to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step()
        if bar is not None:
            bar.update(1)
            if step % 5 == 0 or step == recipe.steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return losses, seconds


def train_expert(
    family: TextClassifierFamily,
    train: TaskData,
    recipe: FinetuneRecipe,
    progress: bool = True,
    on_step: Callable[[], None] | None = None,
) -> Expert:
    """Fine-tune a copy of the pretrained body plus a fresh head on ``train``; no cache.

    Runs on one torch thread (restored after): one-thread CPU kernels make an expert bit-identical
    whether it is trained alone or beside others (:func:`get_or_train_experts` trains one per core, which
    on 2 cores is about 1.4x the throughput of one expert at a time on both cores). ``on_step`` is called
    after each step (progress from a worker process).
    """
    train.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(family, train, recipe, progress, on_step)
    finally:
        torch.set_num_threads(threads)


def _train(family: TextClassifierFamily, train: TaskData, recipe: FinetuneRecipe, progress: bool,
           on_step: Callable[[], None] | None) -> Expert:
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
    losses, seconds = fit(body, head, groups, family, train, recipe, gen, progress=progress, on_step=on_step,
                          desc=f"fine-tune {train.name}")

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
def load_head(path: Path, family: TextClassifierFamily, n_classes: int) -> nn.Linear | None:
    """``path/head.safetensors`` as a frozen linear head on the family's device; None when its shape is not
    ``[n_classes, hidden]`` (a stale or foreign entry). Unreadable files raise."""
    state = load_file(str(path / "head.safetensors"))
    w, b = state["weight"], state["bias"]
    if tuple(w.shape) != (n_classes, family.hidden_size) or tuple(b.shape) != (n_classes,):
        return None
    head = nn.Linear(family.hidden_size, n_classes)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return head.requires_grad_(False).eval().to(family.device)


def _load_entry(path: Path, key: str, family: TextClassifierFamily, n_classes: int) -> Expert | None:
    """The expert stored at ``path`` if the entry is complete and matches; else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT or not meta.get("complete"):
            return None
        body_state = load_file(str(path / "body.safetensors"))
        ref = family.pretrained_state()
        if set(body_state) != set(ref) or any(body_state[k].shape != ref[k].shape for k in ref):
            return None
        head = load_head(path, family, n_classes)
    except Exception:  # noqa: BLE001  (anything unreadable is a miss)
        return None
    if head is None:
        return None
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


def _lookup(family: TextClassifierFamily, train: TaskData, recipe: FinetuneRecipe, cache_dir) -> tuple[str, Path, Expert | None]:
    key = expert_key(family, train, recipe)
    path = cache_root(cache_dir) / "experts" / f"{_safe(train.name)}-{key[:16]}"
    return key, path, _load_entry(path, key, family, train.n_classes)


def _train_and_store(family, train: TaskData, recipe: FinetuneRecipe, key: str, path: Path, progress: bool,
                     on_step: Callable[[], None] | None = None) -> Expert:
    with exclusive_lock(path):
        hit = _load_entry(path, key, family, train.n_classes)  # another process trained it while we waited
        if hit is not None:
            return hit
        _clean_stale_tmp(path.parent)
        expert = train_expert(family, train, recipe, progress=progress, on_step=on_step)
        save_expert(expert, path, key)
    expert.meta.update(cache_hit=False, cache_path=str(path), key=key)
    return expert


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
    key, path, hit = _lookup(family, train, recipe, cache_dir)
    return hit if hit is not None else _train_and_store(family, train, recipe, key, path, progress)


def default_workers() -> int:
    """Experts trained at once: ``$MERGELAB_TRAIN_WORKERS``, else the cores this process may use."""
    env = os.environ.get("MERGELAB_TRAIN_WORKERS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise InputError(f"MERGELAB_TRAIN_WORKERS must be a positive int, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (not Linux)
        return os.cpu_count() or 1


def get_or_train_experts(
    family: TextClassifierFamily,
    splits: Mapping[str, TaskData | Mapping[str, TaskData]],
    recipe: FinetuneRecipe,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Expert]:
    """:func:`get_or_train_expert` for each task of ``splits`` (same order), the misses trained ``workers``
    at a time (default :func:`default_workers`), each in its own process on one thread, longest first.

    The experts are the same as trained one after another (each trains on one thread either way). A GPU
    family, or a family that cannot be rebuilt in another process, trains them one after another.
    """
    trains = {t: (s["train"] if isinstance(s, Mapping) else s) for t, s in splits.items()}
    done: dict[str, Expert] = {}
    missing: dict[str, tuple[TaskData, str, Path]] = {}
    for t, train in trains.items():
        key, path, hit = _lookup(family, train, recipe, cache_dir)
        if hit is not None:
            done[t] = hit
        else:
            missing[t] = (train, key, path)
    if workers is None:  # a child interpreter costs seconds to start: worth it for real models only
        work = sum(p.numel() for p in family.body.parameters()) * recipe.steps
        workers = default_workers() if work >= MIN_PARALLEL_WORK else 1
    n = min(workers, len(missing))
    if n == 1 or (n > 1 and (family.device.type != "cpu" or not hasattr(family, "spawn_args"))):
        for t, (train, key, path) in missing.items():
            done[t] = _train_and_store(family, train, recipe, key, path, progress)
    elif n > 1:
        done.update(_train_in_processes(family, missing, recipe, n, progress))
    return {t: done[t] for t in trains}


def _expected_cost(train: TaskData, max_length: int) -> float:
    cap = 4 * max_length  # about 4 characters a token: longer texts are truncated
    return sum(min(input_length(x), cap) for x in train.texts) / max(1, len(train))


def _train_in_processes(family, missing: dict[str, tuple[TaskData, str, Path]], recipe: FinetuneRecipe,
                        workers: int, progress: bool) -> dict[str, Expert]:
    """Train each missing expert in a fresh interpreter (``python -m mergelab.pools.finetune_worker``),
    ``workers`` at a time, longest first; each stores its cache entry, which is then read back here.

    A child interpreter rather than :mod:`multiprocessing`: spawn re-imports the caller's main module,
    which breaks scripts without a ``__main__`` guard, and fork after torch started threads can hang.
    """
    import pickle  # noqa: PLC0415
    import selectors  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from mergelab.core.batching import progress_bar  # noqa: PLC0415

    order = sorted(missing, key=lambda t: -_expected_cost(missing[t][0], family.max_length))
    bar = progress_bar(recipe.steps * len(order), f"fine-tune {len(order)} experts, {workers} at a time",
                       progress, unit="step")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    jobs = Path(tempfile.mkdtemp(prefix=".tmp-jobs-", dir=_jobs_parent(missing)))
    running: dict[Any, tuple[str, subprocess.Popen]] = {}
    sel = selectors.DefaultSelector()
    out: dict[str, Expert] = {}
    queue = list(order)
    try:
        while queue or running:
            while queue and len(running) < workers:
                t = queue.pop(0)
                train, key, path = missing[t]
                job = jobs / f"{_safe(t)}.pkl"
                with open(job, "wb") as f:
                    pickle.dump({"spawn_args": family.spawn_args(), "train": train, "recipe": recipe,
                                 "key": key, "path": str(path)}, f)
                proc = subprocess.Popen([sys.executable, "-m", "mergelab.pools.finetune_worker", str(job)],
                                        stdout=subprocess.PIPE, stderr=open(jobs / f"{_safe(t)}.err", "wb"),
                                        env=env)
                assert proc.stdout is not None
                sel.register(proc.stdout, selectors.EVENT_READ)
                running[proc.stdout] = (t, proc)
            for ready, _ in sel.select(timeout=1.0):
                t, proc = running[ready.fileobj]
                chunk = ready.fileobj.read1(4096) if hasattr(ready.fileobj, "read1") else ready.fileobj.read(1)
                if chunk:
                    if bar is not None:
                        bar.update(chunk.count(b"."))
                    continue
                sel.unregister(ready.fileobj)
                del running[ready.fileobj]
                if proc.wait() != 0:
                    err = (jobs / f"{_safe(t)}.err").read_text(errors="replace").strip().splitlines()
                    raise RuntimeError(f"fine-tuning expert {t!r} failed (exit {proc.returncode}): "
                                       + " | ".join(err[-5:]))
                train, key, path = missing[t]
                expert = _load_entry(path, key, family, train.n_classes)
                if expert is None:
                    raise RuntimeError(f"expert {t!r}: the training process stored no readable entry at {path}")
                expert.meta.update(cache_hit=False)
                out[t] = expert
    finally:
        for _, proc in running.values():
            proc.kill()
            proc.wait()
        sel.close()
        shutil.rmtree(jobs, ignore_errors=True)
        if bar is not None:
            bar.close()
    return out


def _jobs_parent(missing: Mapping[str, tuple[TaskData, str, Path]]) -> Path:
    parent = next(iter(missing.values()))[2].parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent
