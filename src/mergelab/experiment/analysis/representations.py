"""Representation analyses of SE-Merging (Chen et al., arXiv 2506.18135, Sec. 3, "representation auto-adaptation").

All analyses start from :func:`collect_probes`: the pooled representation of every sample at every
probe layer, under the merged model, the pretrained model and each expert, computed once. From those,
without another forward pass:

- :func:`auto_adaptation`: per layer, the share of samples whose merged representation is nearest
  (l2) to their own task's expert, and the mean distance matrix (task of the sample x expert);
- :func:`routing_accuracy`: per layer and normalisation rule (equation (3) of
  :mod:`mergelab.methods.dynamic.router`), the share of samples routed to their own task, and the confusion
  matrix and weight entropy of one rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab.core.batching import progress_bar
from mergelab.core.errors import InputError
from mergelab.methods.dynamic import router as R


@dataclass
class Probes:
    """``reps[name]``: ``[n_layers + 1, N, H]`` for name in ``merged``, ``pretrained`` and each task;
    ``task_of[i]``: the index (in ``tasks``) of sample i's task."""

    tasks: list[str]
    reps: dict[str, Tensor]
    task_of: Tensor

    @property
    def n_layers(self) -> int:
        return self.reps["merged"].shape[0] - 1

    def subset(self, mask: Tensor) -> Probes:
        return Probes(self.tasks, {k: v[:, mask] for k, v in self.reps.items()}, self.task_of[mask])


@torch.no_grad()
def collect_probes(
    family,
    params: Mapping[str, Mapping[str, Tensor]],
    texts_by_task: Mapping[str, Sequence[str]],
    batch_size: int = 64,
    progress: bool = False,
) -> Probes:
    """Probe every layer of each model in ``params`` (must include ``merged``, ``pretrained`` and every
    task of ``texts_by_task``) on the texts of each task."""
    tasks = list(texts_by_task)
    need = ["merged", "pretrained", *tasks]
    missing = [n for n in need if n not in params]
    if missing:
        raise InputError(f"collect_probes needs parameters for {missing}")
    texts = [x for t in tasks for x in texts_by_task[t]]
    task_of = torch.tensor([i for i, t in enumerate(tasks) for _ in texts_by_task[t]])
    layers = list(range(family.n_layers + 1))
    out: dict[str, Tensor] = {}  # allocated from the first probe: a torch-module family learns its width there
    bar = progress_bar(len(texts) * len(need), "probing", progress)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batch = family.tokenize(chunk)
        for n in need:
            got = family.probe(batch, params[n], layers)
            if n not in out:
                out[n] = torch.empty(len(layers), len(texts), got[layers[0]].shape[-1])
            for layer in layers:
                out[n][layer, start : start + len(chunk)] = got[layer].cpu()
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    for n in need:  # no texts at all: empty probes (the width is unknown to a torch family, 0 is as good)
        out.setdefault(n, torch.empty(len(layers), 0, max(int(family.hidden_size), 0)))
    return Probes(tasks, out, task_of)


def _experts(p: Probes, layer: int) -> Tensor:
    return torch.stack([p.reps[t][layer] for t in p.tasks])  # [T, N, H]


def auto_adaptation(p: Probes) -> dict:
    """Per layer: share of samples nearest to their own expert, and mean distance matrices [task x expert]."""
    frac, matrices = [], []
    for layer in range(p.n_layers + 1):
        d = R.scores("raw", p.reps["merged"][layer], _experts(p, layer))  # [N, T]
        frac.append(float((d.argmin(-1) == p.task_of).float().mean()))
        matrices.append([[float(d[p.task_of == i, j].mean()) for j in range(len(p.tasks))]
                         for i in range(len(p.tasks))])
    return {"tasks": p.tasks, "nearest_own_expert": frac, "distance": matrices,
            "chance": 1.0 / len(p.tasks)}


def prototypes(p: Probes, layer: int) -> Tensor:
    """Per-task mean merged representation at ``layer``: ``[T, H]``."""
    m = p.reps["merged"][layer]
    return torch.stack([m[p.task_of == i].mean(0) for i in range(len(p.tasks))])


def route_scores(p: Probes, layer: int, normalisation: str, protos: Tensor | None = None) -> Tensor:
    return R.scores(normalisation, p.reps["merged"][layer], _experts(p, layer), p.reps["pretrained"][layer],
                    prototypes=protos)


def routing_accuracy(
    p: Probes,
    normalisations: Sequence[str] = R.NORMALISATIONS,
    calibration: Probes | None = None,
) -> dict[str, list[float]]:
    """``{rule: [accuracy at layer 0..n]}``; the prototype rule takes its prototypes from ``calibration``."""
    out: dict[str, list[float]] = {}
    for rule in normalisations:
        if rule == "prototype" and calibration is None:
            continue
        accs = []
        for layer in range(p.n_layers + 1):
            protos = prototypes(calibration, layer) if rule == "prototype" else None
            s = route_scores(p, layer, rule, protos)
            accs.append(float((s.argmin(-1) == p.task_of).float().mean()))
        out[rule] = accs
    return out


def routing_report(p: Probes, layer: int, normalisation: str, temperature: float,
                   calibration: Probes | None = None) -> dict:
    """Routing accuracy, confusion matrix (rows: true task, columns: chosen task) and weight entropy."""
    protos = prototypes(calibration, layer) if normalisation == "prototype" and calibration is not None else None
    w = R.routing_weights(route_scores(p, layer, normalisation, protos), temperature)
    chosen = w.argmax(-1)
    T = len(p.tasks)
    conf = torch.zeros(T, T, dtype=torch.long)
    for i, j in zip(p.task_of.tolist(), chosen.tolist()):
        conf[i, j] += 1
    ent = R.entropy(w)
    return {
        "tasks": p.tasks, "layer": layer, "normalisation": normalisation, "temperature": temperature,
        "accuracy": float((chosen == p.task_of).float().mean()),
        "per_task_accuracy": {t: float((chosen[p.task_of == i] == i).float().mean()) for i, t in enumerate(p.tasks)},
        "confusion": conf.tolist(),
        "mean_entropy": float(ent.mean()), "max_entropy": float(torch.log(torch.tensor(float(T)))),
        "mean_top_weight": float(w.max(-1).values.mean()),
    }
