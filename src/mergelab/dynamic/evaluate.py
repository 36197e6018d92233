"""Per-task accuracy of SE-Merging, with the routing it made (the standard protocol: each task's head)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..data.tasks import TextTask
from ..families.text import iter_batches
from . import router as R
from .se_merging import SEMerging


@torch.no_grad()
def evaluate_se(
    se: SEMerging,
    heads: Mapping[str, nn.Module],
    splits: Mapping[str, TextTask],
    *,
    mode: str = "exact",
    batch_size: int = 64,
    progress: bool = False,
    label: str = "se_merging",
    features_out: dict[str, Tensor] | None = None,
) -> tuple[dict[str, float], dict]:
    """``(accuracy per task, routing summary)``; the routing summary has the routing accuracy per task
    (share of a task's samples whose largest weight is on that task, when the task is one of the
    merged ones), the confusion matrix and the mean weight entropy. ``features_out``, if given, receives
    each task's pooled features ``[N, H]`` in input order (to score other heads without a second pass)."""
    family = se.family
    acc: dict[str, float] = {}
    T = len(se.tasks)
    conf = torch.zeros(T, T, dtype=torch.long)
    entropies = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s) for s in splits.values()), desc=f"{label} ({mode})", unit="ex", leave=False)
    for task, split in splits.items():
        correct = 0
        keep: Tensor | None = None  # [N, feature size], allocated from the first batch's features
        for idx in iter_batches(split.texts, batch_size):
            batch = family.tokenize([split.texts[i] for i in idx])
            feats, routing = se.features(batch, mode)
            if features_out is not None:
                if keep is None:
                    keep = torch.empty(len(split), feats.shape[-1])
                keep[torch.tensor(idx)] = feats.detach().float().cpu()
            pred = heads[task](feats).argmax(-1).cpu()
            correct += int((pred == torch.tensor([split.labels[i] for i in idx])).sum())
            if task in se.tasks:
                ti = se.tasks.index(task)
                for j in routing.chosen.tolist():
                    conf[ti, j] += 1
            entropies.append(R.entropy(routing.weights).cpu())
            if bar is not None:
                bar.update(len(idx))
        acc[task] = correct / len(split)
        if keep is not None:
            features_out[task] = keep
    if bar is not None:
        bar.close()
    rows = conf.sum(1).clamp_min(1)
    routing = {
        "routing_accuracy": float(conf.diag().sum() / conf.sum().clamp_min(1)),
        "routing_accuracy_per_task": {t: float(conf[i, i] / rows[i]) for i, t in enumerate(se.tasks)},
        "confusion": conf.tolist(),
        "mean_weight_entropy": float(torch.cat(entropies).mean()) if entropies else 0.0,
    }
    return acc, routing
