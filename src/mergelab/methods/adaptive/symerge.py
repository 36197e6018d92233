"""SyMerge (Jung et al., "SyMerge: From Non-Interference to Synergistic Merging via Single-Layer
Adaptation", arXiv 2412.19098).

SyMerge learns, on unlabeled test inputs, the layer-wise merging coefficients of equation (1) *jointly*
with one task-specific layer per task (the classification head by default; ``task_layer="last_block"``
keeps the body's last block per task instead, initialised from each task's expert). The objective is
*expert-guided self-labeling*: the merged model is trained with cross-entropy against the hard labels
that task t's expert predicts on task t's inputs, on the samples where those labels are trustworthy:

    y_hat_e = argmax p_e(x),   c_e = max p_e(x)          (expert t, computed once, cached)
    y_hat_m = argmax p_m(x),   c_m = max p_m(x)          (merged model with its current task layer)
    keep(x) = [y_hat_m == y_hat_e]  or  [c_e >= c_m]
    L_t     = sum_{x in B_t} keep(x) CE(p_m(x), y_hat_e) / max(1, sum_x keep(x))

(the paper's method section, "expert-guided self-labeling"; the option ``loss="entropy"`` replaces L_t with
the mean prediction entropy, as in AdaMerging, for the ablation). Adam with lr 1e-2; each *epoch* visits
the tasks in a freshly shuffled order, one batch of 32 and one optimiser step per task. Coefficients
start at 0.3 and are clamped to [0, 1]; the pretrained coefficient is 1.

The experts' predictions on a fixed adaptation set never change, so they are computed once, before the
loop (:func:`expert_pseudo_labels`); ``cache_pseudo_labels=False`` recomputes them every step (the
naive loop that ``benchmarks/adaptation.py`` times against).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergelab.core.batching import input_length, progress_bar
from mergelab.core.errors import InputError
from mergelab.core.statedict import StateDict
from mergelab.methods.adaptive.adamerging import build_merged, check_steps, entropy
from mergelab.methods.adaptive.inputs import Cycler, TokenCache, check_texts, frozen_module
from mergelab.methods.adaptive.result import AdaptResult, check_eval_at, copy_heads, take_snapshot

TASK_LAYERS = ("head", "last_block", "none")
LOSSES = ("selflabel", "entropy")
# One step = one task's batch of 32. 150 steps (30 epochs over text5's 5 tasks) took 252 s on one thread
# of a 2-core machine shared with other jobs (docs/adaptive.md), inside the budget of 5 minutes on 2 cores.
DEFAULT_SYMERGE_STEPS = 150


@dataclass
class PseudoLabels:
    """An expert's hard labels and confidences (max softmax probability) on one task's inputs."""

    labels: Tensor  # long [N]
    confidence: Tensor  # float [N]

    @classmethod
    def from_logits(cls, logits: Tensor) -> PseudoLabels:
        """The argmax class and its softmax probability of each row of ``logits`` (on the CPU)."""
        conf, labels = torch.softmax(logits.detach().float(), -1).max(-1)
        return cls(labels.cpu(), conf.cpu())


def select_samples(merged_logits: Tensor, expert_labels: Tensor, expert_confidence: Tensor) -> Tensor:
    """SyMerge's sample selection: keep x if the merged model agrees with the expert, or if the expert
    is at least as confident (max softmax probability) as the merged model. Returns a bool mask ``[B]``.
    """
    probs = torch.softmax(merged_logits.detach().float(), dim=-1)
    conf, pred = probs.max(-1)
    return (pred == expert_labels) | (expert_confidence >= conf)


def selflabel_loss(merged_logits: Tensor, expert_labels: Tensor, expert_confidence: Tensor) -> tuple[Tensor, int]:
    """Cross-entropy against the expert's hard labels over the kept samples (mean over kept); and how many."""
    keep = select_samples(merged_logits, expert_labels, expert_confidence)
    n = int(keep.sum())
    if n == 0:
        return merged_logits.sum() * 0.0, 0
    ce = nn.functional.cross_entropy(merged_logits[keep].float(), expert_labels[keep], reduction="sum")
    return ce / n, n


@torch.no_grad()
def expert_pseudo_labels(
    family,
    experts: Mapping[str, StateDict],
    heads: Mapping[str, nn.Linear],
    texts: Mapping[str, Sequence[str]],
    batch_size: int = 64,
    caches: Mapping[str, TokenCache] | None = None,
) -> dict[str, PseudoLabels]:
    """Each task's expert (its body and head) on its own task's inputs, once: labels and confidences."""
    texts = check_texts(texts)
    out: dict[str, PseudoLabels] = {}
    for task, seq in texts.items():
        if task not in experts or task not in heads:
            raise InputError(f"no expert body or head for task {task!r}")
        cache = caches[task] if caches is not None else TokenCache(family, seq)
        order = torch.argsort(cache.lengths)
        labels = torch.empty(len(seq), dtype=torch.long)
        conf = torch.empty(len(seq))
        for start in range(0, len(seq), batch_size):
            idx = order[start:start + batch_size]
            got = PseudoLabels.from_logits(family.logits(cache.batch(idx), heads[task], experts[task]))
            labels[idx.cpu()] = got.labels
            conf[idx.cpu()] = got.confidence
        out[task] = PseudoLabels(labels, conf)
    return out


def last_block_keys(pretrained: StateDict) -> list[str]:
    """The keys of the body's last numbered block (``encoder.layer.<last>.`` for BERT)."""
    pat = re.compile(r"^(.*?\blayers?)\.(\d+)\.")
    found: dict[str, int] = {}
    for k, v in pretrained.items():
        m = pat.match(k)
        if m and torch.is_floating_point(v):
            found[m.group(1)] = max(found.get(m.group(1), -1), int(m.group(2)))
    if not found:
        raise InputError("task_layer='last_block': the body has no numbered blocks (keys like 'encoder.layer.N.')")
    prefix = max(found, key=lambda p: len([k for k in pretrained if k.startswith(p + ".")]))
    head = f"{prefix}.{found[prefix]}."
    return [k for k, v in pretrained.items() if k.startswith(head) and torch.is_floating_point(v)]


def symerge(
    family,
    pretrained: StateDict,
    vectors: Mapping[str, Mapping[str, Tensor]],
    heads: Mapping[str, nn.Linear],
    texts: Mapping[str, Sequence[str]],
    *,
    experts: Mapping[str, StateDict] | None = None,
    pseudo_labels: Mapping[str, PseudoLabels] | None = None,
    task_layer: str = "head",
    loss: str = "selflabel",
    steps: int = DEFAULT_SYMERGE_STEPS,
    lr: float = 1e-2,
    batch_size: int = 32,
    init: float = 0.3,
    clamp: bool = True,
    seed: int = 0,
    cache_pseudo_labels: bool = True,
    cache_tokens: bool = True,
    progress: bool = True,
    name: str = "symerge",
    eval_at: Sequence[int] = (),
    on_snapshot: Callable[[AdaptResult], None] | None = None,
) -> AdaptResult:
    """SyMerge on unlabeled ``texts`` (task -> texts): layer-wise coefficients + one layer per task.

    ``experts``: task -> expert body state dict (for the pseudo-labels, unless ``pseudo_labels`` is
    given, and to initialise ``task_layer="last_block"``). ``heads``: the experts' heads (the
    pseudo-labels use them as they are; the trained copies are returned in the result).
    ``steps``: optimiser steps, one task each (``steps / T`` epochs). Labels are never read.
    ``lr`` 1e-2 is the paper's value for a head; with ``task_layer="last_block"`` it diverged on text5
    (docs/adaptive.md): pass a much smaller lr for a block. ``eval_at``: steps after which to keep a snapshot
    of the coefficients, heads and task layers (:meth:`AdaptResult.at`); ``on_snapshot`` is called with each as
    it is taken.
    """
    check_steps(steps, lr, batch_size)
    eval_at = check_eval_at(eval_at, steps)
    if task_layer not in TASK_LAYERS:
        raise InputError(f"task_layer must be one of {TASK_LAYERS}, got {task_layer!r}")
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {LOSSES}, got {loss!r}")
    tasks = list(vectors)
    missing = [t for t in tasks if t not in heads]
    if missing:
        raise InputError(f"no head for task(s) {missing}; heads exist for {sorted(heads)}")
    needs_experts = task_layer == "last_block" or (loss == "selflabel" and (pseudo_labels is None or not cache_pseudo_labels))
    if needs_experts:
        if experts is None:
            raise InputError("experts (task -> expert body state dict) are needed for the pseudo-labels "
                             "or for task_layer='last_block'")
        lacking = [t for t in tasks if t not in experts]
        if lacking:
            raise InputError(f"no expert body for task(s) {lacking}")
    texts = check_texts(texts, tasks)
    with frozen_module(family.body):
        return _symerge(family, pretrained, vectors, heads, texts, tasks, experts, pseudo_labels, task_layer, loss,
                        steps, lr, batch_size, init, clamp, seed, cache_pseudo_labels, cache_tokens, progress, name, eval_at, on_snapshot)


def _symerge(family, pretrained, vectors, heads, texts, tasks, experts, pseudo_labels, task_layer, loss, steps, lr,
             batch_size, init, clamp, seed, cache_pseudo_labels, cache_tokens, progress, name, eval_at, on_snapshot) -> AdaptResult:
    t0 = time.perf_counter()
    kept_keys = last_block_keys(pretrained) if task_layer == "last_block" else []
    merged = build_merged(family, pretrained, vectors, "layer", init, clamp, texts, exclude=kept_keys)
    trained_heads = copy_heads(dict(heads), trainable=task_layer == "head")
    expert_heads = copy_heads(dict(heads), trainable=False)
    task_layers: dict[str, dict[str, Tensor]] = {}
    for t in tasks:
        if kept_keys:
            task_layers[t] = {k: experts[t][k].detach().to(family.device, torch.float32).clone().requires_grad_(True)
                              for k in kept_keys}
    caches = {t: TokenCache(family, texts[t]) for t in tasks} if cache_tokens else None
    if loss == "selflabel" and cache_pseudo_labels and pseudo_labels is None:
        pseudo_labels = expert_pseudo_labels(family, experts, expert_heads, texts,
                                             caches=caches)
    if loss == "selflabel" and cache_pseudo_labels:
        bad = [t for t in tasks if t not in pseudo_labels or len(pseudo_labels[t].labels) != len(texts[t])]
        if bad:
            raise InputError(f"pseudo_labels missing or of the wrong length for task(s) {bad}")
    gen = torch.Generator().manual_seed(seed)
    cyclers = {t: Cycler(len(texts[t]), batch_size, gen, [input_length(x) for x in texts[t]]) for t in tasks}
    setup = time.perf_counter() - t0

    trainable: list[Tensor] = [merged.coefficients.raw]
    if task_layer == "head":
        trainable += [p for t in tasks for p in trained_heads[t].parameters()]
    for layers in task_layers.values():
        trainable += list(layers.values())
    opt = torch.optim.Adam(trainable, lr=lr)
    losses: list[float] = []
    kept: list[float] = []
    snapshots: dict = {}
    paused = 0.0  # seconds spent in on_snapshot
    bar = progress_bar(steps, name, progress, unit="step")
    order: list[int] = []
    t1 = time.perf_counter()
    for step in range(steps):
        if step % len(tasks) == 0:  # a new epoch: the tasks in a fresh random order
            order = torch.randperm(len(tasks), generator=gen).tolist()
        task = tasks[order[step % len(tasks)]]
        idx = cyclers[task].next()
        if caches is not None:
            batch = caches[task].batch(idx)
        else:
            batch = family.tokenize([texts[task][i] for i in idx.tolist()])
        params = merged()
        if task in task_layers:
            params = {**params, **task_layers[task]}
        logits = trained_heads[task](family.features(batch, params))
        if loss == "entropy":
            value = entropy(logits).mean()
            n_kept = len(idx)
        else:
            if cache_pseudo_labels:
                y, c = pseudo_labels[task].labels[idx], pseudo_labels[task].confidence[idx]
            else:
                with torch.no_grad():
                    probs = torch.softmax(family.logits(batch, expert_heads[task], experts[task]).float(), -1)
                c, y = probs.max(-1)
            value, n_kept = selflabel_loss(logits, y.to(logits.device), c.to(logits.device))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
        kept.append(n_kept / len(idx))
        if step + 1 in eval_at:
            snapshots[step + 1] = take_snapshot(step + 1, merged, trained_heads, task_layers, time.perf_counter() - t1 - paused)
            if on_snapshot is not None:  # e.g. evaluate it now; its time is not adaptation time
                c0 = time.perf_counter()
                on_snapshot(AdaptResult(method=name, merged=merged, heads=trained_heads, losses=losses, steps=step + 1,
                                        snapshots={step + 1: snapshots[step + 1]}).at(step + 1))
                paused += time.perf_counter() - c0
        if bar is not None:
            bar.update(1)
            if step % 5 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}",
                                kept=f"{sum(kept[-10:]) / len(kept[-10:]):.2f}")
    seconds = time.perf_counter() - t1 - paused
    if bar is not None:
        bar.close()
    for h in trained_heads.values():
        h.requires_grad_(False)
    task_layers = {t: {k: v.detach() for k, v in layers.items()} for t, layers in task_layers.items()}
    return AdaptResult(
        method=name, merged=merged, heads=trained_heads, task_layers=task_layers, losses=losses, seconds=seconds,
        setup_seconds=setup, steps=steps, snapshots=snapshots,
        params={"task_layer": task_layer, "loss": loss, "lr": lr, "batch_size": batch_size, "init": init,
                "clamp": clamp, "seed": seed, "epochs": round(steps / len(tasks), 2),
                "cache_pseudo_labels": cache_pseudo_labels, "cache_tokens": cache_tokens,
                "kept_fraction": round(sum(kept) / len(kept), 4) if kept else None,
                "n_coefficients": merged.coefficients.raw.numel()},
    )
