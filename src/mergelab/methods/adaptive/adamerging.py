"""AdaMerging and AdaMerging++ (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR 2024).

The merging coefficients (task-wise or layer-wise, :mod:`mergelab.methods.adaptive.coefficients`) are learned
on unlabeled test inputs by minimising the Shannon entropy of each task head's predictions on its own
task's inputs (the paper's surrogate objective, method section; section and equation numbers of
both papers are not given here because they could not be checked offline):

    min_lambda  sum_t  mean_{x in B_t}  H( softmax( h_t( f(x; theta(lambda)) ) ) ),
    H(p) = - sum_c p_c log p_c,

where B_t is a batch of task t's test inputs, h_t task t's (frozen) head and theta(lambda) equation
(1) with the pretrained coefficient fixed at 1. Adam, lr 1e-3, coefficients initialised at 0.3 and clamped to
[0, 1], 500 steps (the authors' code, main_layer_wise_adamerging.py). That code reads two shuffled batches of 16
per task per step, 32 inputs, and sums their mean entropies; ``batch_size=32`` reads the same number of inputs
(one mean over 32: the loss is halved, which Adam's update ignores). The default here is 16 inputs and 50 steps,
what fits 5 minutes on 2 CPU cores (docs/adaptive.md has the accuracy at the official 32 x 500). AdaMerging++ is the same over
TIES-processed task vectors (trimmed to the top 20% magnitudes, entries disagreeing with the elected
sign removed), see :func:`ties_vectors`.

One step: the merged parameters are built once (one ``tensordot`` per tensor), each task's batch runs
through the merged body with ``torch.func.functional_call``, the entropies are summed, one backward,
one Adam step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mergelab.core.batching import input_length, progress_bar
from mergelab.core.errors import InputError
from mergelab.core.statedict import StateDict, TaskVector
from mergelab.methods.adaptive.coefficients import MergedParams
from mergelab.methods.adaptive.inputs import Cycler, TokenCache, check_texts, frozen_module, keys_on_path
from mergelab.methods.adaptive.result import AdaptResult, check_eval_at, copy_heads, take_snapshot
from mergelab.methods.transforms import elect_sign, sign_agreeing, trim

# Default steps: one step is a forward and backward of 5 tasks x 16 texts; on text5 (MiniLM-L6) 50 steps
# took 196 s on one thread of a 2-core machine shared with other jobs (docs/adaptive.md), inside the
# budget of 5 minutes on 2 cores. The paper runs 500 steps; raise ``steps`` where time allows.
DEFAULT_ADAMERGING_STEPS = 50


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) per row, ``[B]`` (natural log)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def ties_vectors(vectors: Mapping[str, Mapping[str, Tensor]], density: float = 0.2, scope: str = "global"
                 ) -> dict[str, TaskVector]:
    """AdaMerging++'s per-task vectors: TIES trim (top ``density``) and sign election, *without* the
    disjoint mean's division by the number of agreeing tasks, so that coefficients keep Task
    Arithmetic's scale (init 0.3) and the learned lambda_t weighs each task's part.

    Yadav et al., TIES-Merging, NeurIPS 2023, Sec. 3 steps 1-2; Yang et al., AdaMerging (AdaMerging++).
    """
    trimmed = trim({t: TaskVector(dict(v)) for t, v in vectors.items()}, density, scope)
    return sign_agreeing(trimmed, elect_sign(trimmed))


def check_steps(steps: int, lr: float, batch_size: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be a non-negative integer, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise InputError(f"lr must be a positive number, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")


def build_merged(family, pretrained: StateDict, vectors, granularity: str, init: float, clamp: bool,
                 texts: Mapping[str, list[str]], exclude: Sequence[str] = ()) -> MergedParams:
    """MergedParams over the tensors that have a nonzero task vector and influence the features."""
    from mergelab.methods.adaptive.coefficients import nonzero_keys

    candidates = [k for k in nonzero_keys(pretrained, vectors) if k not in set(exclude)]
    # one input of each of two tasks, each alone: tasks may differ in input kind (texts, text pairs)
    probes = [[seq[0]] for seq in texts.values()][:2]
    sub = {k: pretrained[k] for k in candidates}
    on_path = set().union(*(keys_on_path(family, sub, p) for p in probes)) if candidates else set()
    keys = [k for k in candidates if k in on_path]
    if granularity == "layer" and not keys:
        raise InputError("no parameter tensor has a nonzero task vector on the path to the features: "
                         "the experts do not differ from the pretrained model")
    return MergedParams(pretrained, vectors, granularity, keys=keys, init=init, clamp=clamp, device=family.device)


def adamerging(
    family,
    pretrained: StateDict,
    vectors: Mapping[str, Mapping[str, Tensor]],
    heads: Mapping[str, nn.Linear],
    texts: Mapping[str, Sequence[str]],
    *,
    granularity: str = "layer",
    steps: int = DEFAULT_ADAMERGING_STEPS,
    lr: float = 1e-3,
    batch_size: int = 16,
    init: float = 0.3,
    clamp: bool = True,
    seed: int = 0,
    progress: bool = True,
    name: str | None = None,
    eval_at: Sequence[int] = (),
    on_snapshot: Callable[[AdaptResult], None] | None = None,
) -> AdaptResult:
    """Learn AdaMerging coefficients by entropy minimisation on unlabeled ``texts`` (task -> texts).

    ``vectors``: per-task vectors (plain task vectors, TIES- or DARE-processed; AdaMerging++ = over
    :func:`ties_vectors`). ``heads``: each task's classification head (kept frozen). Labels are never
    read: ``texts`` holds inputs only. Same ``seed`` (and thread count), same result. ``eval_at``: steps after
    which to keep a snapshot (:meth:`AdaptResult.at`), for accuracy against steps from one run; ``on_snapshot``
    is called with each snapshot's result as it is taken (its time is not counted as adaptation time).
    """
    check_steps(steps, lr, batch_size)
    eval_at = check_eval_at(eval_at, steps)
    tasks = list(vectors)
    missing = [t for t in tasks if t not in heads]
    if missing:
        raise InputError(f"no head for task(s) {missing}; heads exist for {sorted(heads)}")
    texts = check_texts(texts, tasks)
    name = name or f"adamerging_{granularity}wise"
    with frozen_module(family.body):
        return _adamerging(family, pretrained, vectors, heads, texts, tasks, granularity, steps, lr, batch_size,
                           init, clamp, seed, progress, name, eval_at, on_snapshot)


def _adamerging(family, pretrained, vectors, heads, texts, tasks, granularity, steps, lr, batch_size, init,
                clamp, seed, progress, name, eval_at, on_snapshot) -> AdaptResult:
    t0 = time.perf_counter()
    merged = build_merged(family, pretrained, vectors, granularity, init, clamp, texts)
    frozen = copy_heads(dict(heads), trainable=False)
    caches = {t: TokenCache(family, texts[t]) for t in tasks}
    gen = torch.Generator().manual_seed(seed)
    cyclers = {t: Cycler(len(texts[t]), batch_size, gen, [input_length(x) for x in texts[t]]) for t in tasks}
    setup = time.perf_counter() - t0

    opt = torch.optim.Adam([merged.coefficients.raw], lr=lr)
    losses: list[float] = []
    snapshots: dict = {}
    paused = 0.0  # seconds spent in on_snapshot
    bar = progress_bar(steps, name, progress, unit="step")
    t1 = time.perf_counter()
    for step in range(steps):
        params = merged()
        loss = torch.zeros(())
        for t in tasks:
            batch = caches[t].batch(cyclers[t].next())
            loss = loss + entropy(frozen[t](family.features(batch, params))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step + 1 in eval_at:
            snapshots[step + 1] = take_snapshot(step + 1, merged, frozen, {}, time.perf_counter() - t1 - paused)
            if on_snapshot is not None:  # e.g. evaluate it now; its time is not adaptation time
                c0 = time.perf_counter()
                on_snapshot(AdaptResult(method=name, merged=merged, heads=frozen, losses=losses, steps=step + 1,
                                        snapshots={step + 1: snapshots[step + 1]}).at(step + 1))
                paused += time.perf_counter() - c0
        if bar is not None:
            bar.update(1)
            if step % 5 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    seconds = time.perf_counter() - t1 - paused
    if bar is not None:
        bar.close()
    return AdaptResult(
        method=name, merged=merged, heads=frozen, losses=losses, seconds=seconds, setup_seconds=setup,
        steps=steps, snapshots=snapshots,
        params={"granularity": granularity, "lr": lr, "batch_size": batch_size, "init": init, "clamp": clamp,
                "seed": seed, "loss": "entropy", "n_coefficients": merged.coefficients.raw.numel()},
    )
