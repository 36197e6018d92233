"""Representation bias per layer: how far a merged model's representation of a sample is from its own expert's.

SE-Merging (Chen et al., arXiv 2506.18135) argues that its per-sample rescaling reduces *representation bias*,
the gap between the merged model's and the expert's representations of the same input (the quantity studied
by Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024). For a sample x of task t and
a layer l, with r^l(x; theta) the pooled representation after block l (:meth:`Family.probe`; l = 0 is the
embeddings' output):

    bias_l(x) = || r^l(x; theta_merged) - r^l(x; theta_t) ||_2

averaged over task t's samples (and, in the summary, over tasks). The reference row ``pretrained`` is the same
distance for the pretrained body: ``bias / pretrained`` is the share of the pretrained model's gap that a merge
leaves.

The rows are table rows (:data:`mergelab.experiment.rows.TABLE`) run through the method registry by name, so
the analysis measures whatever parameters and defaults the rows have: a static row is one merged body; an
adaptive row (SyMerge) its adapted body for task t; a dynamic row (SE-Merging) is probed at every layer of the
per-sample merged model (equation (2) of :mod:`mergelab.core.functional`) with the coefficients its router
gives each sample; its last layer must equal the row's own features (checked: ``max_feature_error``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from mergelab import methods
from mergelab.core.batching import iter_batches, progress_bar
from mergelab.core.errors import InputError
from mergelab.core.functional import per_sample_mixing
from mergelab.experiment.rows import LAMBDAS, TABLE, Row

# the static merge (Task Arithmetic 0.3 and TIES at scaling 1.0: no validation search here), SE-Merging's
# rules over Task Arithmetic 0.3 (exact path), SyMerge
DEFAULT_ROWS = ("task_arithmetic_0.3", "ties", "se_merging_task_arithmetic", "se_prototype_task_arithmetic", "symerge")
TIES_SCALING = 1.0  # a searched TIES row (grid TIES_GRID) runs here at this scaling
TA_SCALING = 0.3  # a searched Task Arithmetic row (grid LAMBDAS) at this one


def bias_rows(names: Sequence[str] = DEFAULT_ROWS) -> list[Row]:
    """Table rows by name. A searched static row runs at a fixed scaling instead (TIES 1.0, Task Arithmetic 0.3), a
    row that reads another row's value (``@ties.scaling``) at TIES's 1.0; a row that only swaps heads is refused."""
    table = {r.name: r for r in TABLE}
    out = []
    for n in names:
        row = table.get(n) or (Row(n, n) if n in methods.available() else None)
        if row is None:
            raise InputError(f"representation bias: unknown row {n!r}; rows: {', '.join(table)}")
        if row.heads_from:
            raise InputError(f"representation bias: row {n!r} only changes heads; the body is another row's")
        if row.kind == "dynamic" and row.params.get("mode", "exact") != "exact":
            raise InputError(f"representation bias: row {n!r} runs mode {row.params['mode']!r}; "
                             "only the exact per-sample path is probed")
        if any(isinstance(v, str) and v.startswith("@") for v in _flat(row.params)):
            row = replace(row, params=_no_refs(row.params))
        if row.search:  # a searched scaling: the fixed value the searches start from (no validation search here)
            row = replace(row, params={**row.params, "scaling": TA_SCALING if row.search == LAMBDAS else TIES_SCALING})
        out.append(replace(row, search=None))
    return out


def _flat(params: Mapping[str, Any]):
    for v in params.values():
        yield from (_flat(v) if isinstance(v, Mapping) else (v,))


def _no_refs(params: Mapping[str, Any]) -> dict[str, Any]:
    """``"@ties.scaling"`` (the scaling TIES chose on validation) -> TIES's scaling here."""
    return {k: (_no_refs(v) if isinstance(v, Mapping) else TIES_SCALING if isinstance(v, str) and v.startswith("@")
                else v) for k, v in params.items()}


@torch.no_grad()
def mixed_probe(se, batch: Mapping[str, Tensor], layers: Sequence[int]) -> tuple[dict[int, Tensor], Tensor]:
    """A dynamic row's per-sample merged model probed at ``layers``: route the batch (SE-Merging's rule, its
    config), then run equation (2) with each sample's coefficients. Returns (layer -> ``[B, H]``, coefficients)."""
    coeffs = se.route(batch).coefficients.to(se.family.device)
    with per_sample_mixing(se.family.body, se.pretrained, se.stacked, coeffs):
        return se.family.probe(batch, se.pretrained, layers), coeffs


def representation_bias(pool, rows: Sequence[Row], *, batch_size: int = 64, progress: bool = False) -> dict:
    """Per row, task and layer: the mean l2 distance between the row's and task t's expert's representation
    of task t's inputs (``pool.inputs()``). ``pool``: a :class:`~mergelab.experiment.runner.RunPool`."""
    family = pool.family
    layers = list(range(family.n_layers + 1))
    inputs = pool.inputs()
    tasks = list(inputs)
    bodies: dict[str, Any] = {}  # row -> state dict, or task -> state dict, or a dynamic row's SEMerging
    dynamic_feats: dict[str, dict[str, Tensor]] = {}
    params_run: dict[str, dict] = {}
    for row in rows:
        info = methods.get(row.method)
        if info.kind == "static":
            bodies[row.name] = methods.merge(row.method, pool.pretrained, pool.bodies, **dict(row.params))
            params_run[row.name] = dict(row.params)
            continue
        out = info.fn(pool, **dict(row.params))
        params_run[row.name] = out.params
        if info.kind == "dynamic":
            if out.result is None or not hasattr(out.result, "route"):
                raise InputError(f"representation bias: dynamic row {row.name!r} gives no router to probe")
            bodies[row.name], dynamic_feats[row.name] = out.result, out.features
        else:
            bodies[row.name] = out.body
    names = ["pretrained", *(r.name for r in rows)]
    sums = {n: torch.zeros(len(tasks), len(layers), dtype=torch.float64) for n in names}
    feature_error = {r: 0.0 for r in dynamic_feats}
    bar = progress_bar(sum(len(v) for v in inputs.values()), "representation bias", progress)
    for ti, task in enumerate(tasks):
        seq = inputs[task]
        for idx in iter_batches(seq, batch_size):
            batch = family.tokenize([seq[i] for i in idx])
            ref = family.probe(batch, pool.bodies[task], layers)
            for n in names:
                if n in dynamic_feats:
                    got, _ = mixed_probe(bodies[n], batch, layers)
                    own = dynamic_feats[n][task][torch.tensor(idx)]
                    feature_error[n] = max(feature_error[n], float((got[layers[-1]].cpu() - own).abs().max()))
                else:
                    body = pool.pretrained if n == "pretrained" else bodies[n]
                    got = family.probe(batch, body(task) if callable(body) else body, layers)
                for li, layer in enumerate(layers):
                    sums[n][ti, li] += (got[layer] - ref[layer]).norm(dim=-1).double().sum().cpu()
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    counts = torch.tensor([len(inputs[t]) for t in tasks], dtype=torch.float64).clamp_min(1)[:, None]
    per_task = {n: (sums[n] / counts) for n in names}
    return {
        "tasks": tasks, "layers": layers, "rows": names, "n_per_task": {t: len(inputs[t]) for t in tasks},
        "distance": {n: {t: [round(float(v), 6) for v in per_task[n][ti]] for ti, t in enumerate(tasks)} for n in names},
        "mean": {n: [round(float(v), 6) for v in per_task[n].mean(0)] for n in names},
        "relative_to_pretrained": {n: [round(float(v), 6) for v in (per_task[n] / per_task["pretrained"].clamp_min(1e-12)
                                                                     ).mean(0)] for n in names},
        "params": params_run, "max_feature_error": feature_error,
    }
