"""The SyMerge paper's pilot analysis: cross-task performance and how it relates to merge quality.

Jung et al. (arXiv 2412.19098, pilot study, "Rethinking cross-task performance") pair the classifier of
task i with the encoder of expert j and evaluate on task i: M[i][j] = acc_i(h_i o f(.; theta_j)). The
diagonal is each expert; the off-diagonal mean of row i, c_i = mean_{j != i} M[i][j], says how well
task i's head survives other tasks' fine-tuning. The paper finds that c correlates with merge quality
(r = 0.863 over pairs of 20 vision tasks). :func:`relation` reports, per task, c_i beside a merged
model's accuracy on task i, and their Pearson correlation across tasks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab.core.errors import InputError
from mergelab.core.figures import pyplot, save_figure
from mergelab.core.statedict import StateDict
from mergelab.pools.data.tasks import TaskData
from mergelab.pools.families.text import embed


@dataclass
class CrossTask:
    """``matrix[i][j]``: accuracy of task i's head on expert j's body, on task i's evaluation texts."""

    tasks: list[str]
    matrix: list[list[float]]
    n_per_task: dict[str, int]

    def cross_average(self) -> dict[str, float]:
        """c_i = mean over j != i of matrix[i][j] (needs at least two tasks)."""
        n = len(self.tasks)
        if n < 2:
            raise InputError("cross-task performance needs at least two tasks")
        return {t: sum(self.matrix[i][j] for j in range(n) if j != i) / (n - 1) for i, t in enumerate(self.tasks)}

    def to_json(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "matrix": self.matrix, "n_per_task": self.n_per_task,
                "cross_average": self.cross_average() if len(self.tasks) > 1 else None}


def _subset(task: TaskData, n: int | None, seed: int) -> tuple[list[str], torch.Tensor]:
    idx = list(range(len(task)))
    if n is not None and n < len(task):
        idx = torch.randperm(len(task), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    return [task.texts[i] for i in idx], torch.tensor([task.labels[i] for i in idx], dtype=torch.long)


@torch.no_grad()
def cross_task_matrix(
    family,
    expert_bodies: Mapping[str, StateDict],
    heads: Mapping[str, nn.Linear],
    eval_sets: Mapping[str, TaskData],
    *,
    max_per_task: int | None = 200,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> CrossTask:
    """M[i][j] for every pair: each body embeds every task's texts once (T bodies x sum of texts)."""
    tasks = list(expert_bodies)
    missing = [t for t in tasks if t not in heads or t not in eval_sets]
    if missing:
        raise InputError(f"no head or evaluation set for task(s) {missing}")
    data = {t: _subset(eval_sets[t], max_per_task, seed) for t in tasks}
    matrix = [[0.0] * len(tasks) for _ in tasks]
    for j, body_task in enumerate(tasks):
        for i, t in enumerate(tasks):
            texts, labels = data[t]
            feats = embed(family, texts, expert_bodies[body_task], batch_size, progress, f"body {body_task} on {t}")
            pred = heads[t](feats).argmax(-1).cpu()
            matrix[i][j] = float((pred == labels).float().mean())
    return CrossTask(tasks, matrix, {t: len(data[t][0]) for t in tasks})


def pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) != len(y) or len(x) < 3:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def relation(cross: CrossTask, merged_acc: Mapping[str, float], expert_acc: Mapping[str, float] | None = None
             ) -> dict[str, Any]:
    """Per task: cross-task average c_i and merged accuracy (and merged / expert); Pearson r across tasks."""
    c = cross.cross_average()
    tasks = [t for t in cross.tasks if t in merged_acc]
    merged = [merged_acc[t] for t in tasks]
    out: dict[str, Any] = {"per_task": {t: {"cross_average": c[t], "merged": merged_acc[t]} for t in tasks},
                           "pearson_cross_vs_merged": pearson([c[t] for t in tasks], merged)}
    if expert_acc is not None:
        norm = [merged_acc[t] / expert_acc[t] for t in tasks]
        for t, v in zip(tasks, norm):
            out["per_task"][t]["normalized"] = v
        out["pearson_cross_vs_normalized"] = pearson([c[t] for t in tasks], norm)
    return out


def plot_cross_task(cross: CrossTask, path: str | os.PathLike[str], merged_acc: Mapping[str, float] | None = None,
                    merged_label: str = "merged") -> Path:
    """Heatmap of M (rows: head / task evaluated, columns: body) and, with ``merged_acc``, a scatter of
    c_i against the merged accuracy of task i. PNG, written atomically."""
    plt = pyplot()
    n = len(cross.tasks)
    cols = 2 if merged_acc is not None else 1
    fig, axes = plt.subplots(1, cols, figsize=(5.5 * cols + 1, 4.8), squeeze=False)
    ax = axes[0][0]
    im = ax.imshow([[100 * v for v in row] for row in cross.matrix], cmap="magma", vmin=0, vmax=100)
    ax.set_xticks(range(n), cross.tasks, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), cross.tasks, fontsize=8)
    ax.set_xlabel("body of expert j")
    ax.set_ylabel("head and test data of task i")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * cross.matrix[i][j]:.0f}", ha="center", va="center",
                    color="white" if cross.matrix[i][j] < 0.6 else "black", fontsize=8)
    ax.set_title("cross-task accuracy (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if merged_acc is not None:
        rel = relation(cross, merged_acc)
        ax2 = axes[0][1]
        xs = [100 * rel["per_task"][t]["cross_average"] for t in rel["per_task"]]
        ys = [100 * rel["per_task"][t]["merged"] for t in rel["per_task"]]
        ax2.scatter(xs, ys)
        for t, x, y in zip(rel["per_task"], xs, ys):
            ax2.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        r = rel["pearson_cross_vs_merged"]
        ax2.set_xlabel("cross-task average c_i (%)")
        ax2.set_ylabel(f"{merged_label} accuracy on task i (%)")
        ax2.set_title(f"Pearson r = {r:.2f}" if r is not None else "Pearson r: n/a")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
