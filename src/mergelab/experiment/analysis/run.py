"""The ``mergelab analyze`` analyses on a named benchmark: JSON and PNG into an output folder."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergelab.core.errors import InputError
from mergelab.core.io import atomic_write_text
from mergelab.experiment import plots
from mergelab.experiment.analysis.bias import DEFAULT_ROWS, bias_rows, representation_bias
from mergelab.experiment.analysis.se_study import (
    approximations_study,
    cost_study,
    defaults_study,
    fast_groups_study,
    grid_study,
    lowrank_study,
    probe_study,
    probe_sweep,
)
from mergelab.methods.dynamic import NORMALISATIONS, RouterConfig

KINDS = ("auto-adaptation", "routing", "probe-sweep", "cost", "se-select", "lowrank", "fast-groups", "approximations",
         "se-defaults", "representation-bias", "unseen")
# se-defaults: the temperature and gain grid (scale-free distances) and the task subsets it is chosen over
DEFAULTS_TEMPERATURES = (0.03, 0.1, 0.3, 1.0)
DEFAULTS_GAINS = (1.5, 2.5, 1 / 0.3)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def approximations_markdown(study: dict) -> str:
    """The table of :func:`approximations_study`: one line per path."""
    lines = ["| path | reference | average accuracy | agreement with reference | coefficient L1 | feature error |",
             "|---|---|---:|---:|---:|---:|"]
    for name, row in study["paths"].items():
        ref = row.get("against_reference")
        cells = [name, ref["reference"] if ref else "-", _pct(row["average"])]
        cells += ([_pct(ref["agreement"]), f"{ref['coefficient_l1']:.4f}", f"{ref['feature_error']:.4f}"]
                  if ref else ["-", "-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def defaults_markdown(study: dict) -> str:
    """The table of :func:`defaults_study`: one line per (temperature, gain), one column per task subset."""
    subsets = study["subsets"]
    head = [f"T = {len(s['tasks'])}" for s in subsets]
    lines = ["| temperature | gain | " + " | ".join(head) + " | mean |", "|---:|---:|" + "---:|" * (len(head) + 1)]
    for k, cell in enumerate(study["mean_over_subsets"]):
        vals = [_pct(s["grid"][k]["average"]) for s in subsets]
        lines.append(f"| {cell['temperature']:g} | {cell['gain']:.3g} | " + " | ".join(vals) + f" | {_pct(cell['average'])} |")
    old = [_pct(s["old_defaults"]["average"]) for s in subsets]
    lines.append("| old: standardised, 1.0 | mass 0.5 | " + " | ".join(old) + f" | {_pct(sum(s['old_defaults']['average'] for s in subsets) / len(subsets))} |")
    st = [_pct(s["static"]["average"]) for s in subsets]
    lines.append("| static Task Arithmetic 0.3 | | " + " | ".join(st) + f" | {_pct(sum(s['static']['average'] for s in subsets) / len(subsets))} |")
    return "\n".join(lines) + "\n"
# analyses that run rows on a named benchmark's pool twice (they need its spec, not a loaded pool)
BENCHMARK_KINDS = ("weak-expert",)


def _write(out: Path, name: str, data) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / name, json.dumps(data, indent=2) + "\n")


def run_analysis(kind: str, ctx, out: str | Path, *, config: RouterConfig | None = None, n_per_task: int = 100,
                 n_calib: int = 32, layers: Sequence[int] | None = None, temperatures: Sequence[float] | None = None,
                 gains: Sequence[float] | None = None, ranks: Sequence[int] = (4, 16, 64),
                 groups_per_task: Sequence[int] = (1, 2, 3, 4), rows: Sequence[str] = DEFAULT_ROWS,
                 unseen: Mapping[str, Sequence[str]] | None = None, keep: float = 0.95, fallback_score: str = "distance",
                 seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """Run one analysis on the validation split of ``ctx`` (a loaded :class:`~mergelab.pools.pool.ModelPool`);
    ``approximations`` and ``representation-bias`` read the *test* split (they measure, choose nothing;
    ``representation-bias`` reads the first ``n_per_task`` inputs of each task and measures ``rows``, SyMerge
    adapting on those inputs, the test-time protocol).

    ``unseen`` (the ``unseen`` analysis): out-of-pool texts per kind (default: ``n_per_task`` of each kind of
    :data:`~mergelab.pools.data.unseen.UNSEEN_SOURCES`, sampled with ``seed``); it also reads ``n_per_task``
    test inputs per task (:mod:`mergelab.experiment.analysis.unseen`)."""
    if kind not in KINDS:
        raise InputError(f"unknown analysis {kind!r}; choose one of {', '.join(KINDS)}")
    if n_per_task < 1 or n_calib < 1:
        raise InputError(f"n_per_task and n_calib must be positive, got {n_per_task} and {n_calib}")
    cfg = config or RouterConfig()
    ctx.family.check_layer(cfg.layer)
    defaults = kind == "se-defaults"
    temperatures = tuple(temperatures) if temperatures else (DEFAULTS_TEMPERATURES if defaults else (0.1, 0.3, 1.0, 3.0))
    gains = tuple(gains) if gains else (DEFAULTS_GAINS if defaults else (1.5, 2.5, 3.5))
    out = Path(out)
    files: dict[str, Path] = {}
    if kind in ("auto-adaptation", "routing"):
        study = probe_study(ctx, config=cfg, n_per_task=n_per_task, n_calib=n_calib, progress=progress)
        files["json"] = _write(out, "probe_study.json", study)
        files["auto_adaptation"] = plots.auto_adaptation_plot(study, out / "auto_adaptation.png", cfg.layer)
        files["routing"] = plots.routing_plot(study["routing"], out / "routing_confusion.png")
        files["routing_prototype"] = plots.routing_plot(study["routing_prototype"], out / "routing_confusion_prototype.png")
    elif kind == "se-select":
        # 1) rule and layer by routing accuracy (no forward beyond the probes), 2) temperature and gain by
        # SE-Merging accuracy, both on validation.
        study = probe_study(ctx, config=cfg, n_per_task=n_per_task, n_calib=n_calib, progress=progress)
        best_rule, best_layer, best_acc = None, None, -1.0
        for rule, accs in study["routing_accuracy"].items():
            for layer, acc in enumerate(accs):
                if layer >= 1 and acc > best_acc + 1e-9:  # layer 0 is the embeddings: no contextual signal
                    best_rule, best_layer, best_acc = rule, layer, acc
        grid = {}
        for rule in dict.fromkeys([best_rule, cfg.normalisation]):
            grid[rule] = grid_study(ctx, layer=best_layer if rule == best_rule else cfg.layer, normalisation=rule,
                                    temperatures=temperatures, gains=gains, n_per_task=n_per_task, n_calib=n_calib,
                                    progress=progress)
        result = {"routing_accuracy": study["routing_accuracy"], "best_rule": best_rule, "best_layer": best_layer,
                  "best_routing_accuracy": best_acc, "grid": grid, "split": "validation",
                  "n_per_task": n_per_task, "n_calib": n_calib}
        files["json"] = _write(out, "se_select.json", result)
        files["auto_adaptation"] = plots.auto_adaptation_plot(study, out / "auto_adaptation.png", best_layer)
    elif kind == "probe-sweep":
        layers = list(layers) if layers else list(range(1, ctx.family.n_layers + 1))
        for layer in layers:
            ctx.family.check_layer(layer)
        sweep = probe_sweep(ctx, layers=layers, config=cfg, n_per_task=n_per_task, n_calib=n_calib, progress=progress)
        files["json"] = _write(out, "probe_sweep.json", sweep)
        files["png"] = plots.probe_sweep_plot(sweep, out / "probe_sweep.png")
    elif kind == "lowrank":
        if any(int(r) < 1 for r in ranks):
            raise InputError(f"--ranks must be positive integers, got {list(ranks)}")
        study = lowrank_study(ctx, ranks=ranks, config=cfg, n_per_task=n_per_task, n_calib=n_calib, progress=progress)
        files["json"] = _write(out, "lowrank.json", study)
        files["png"] = plots.lowrank_plot(study, out / "lowrank.png")
    elif kind == "fast-groups":
        if not groups_per_task or any(isinstance(g, bool) or int(g) != g or g < 1 for g in groups_per_task):
            raise InputError(f"--groups-per-task must be positive integers, got {list(groups_per_task)}")
        study = fast_groups_study(ctx, groups_per_task=[int(g) for g in groups_per_task], config=cfg,
                                  n_per_task=n_per_task, n_calib=n_calib, progress=progress)
        files["json"] = _write(out, "fast_groups.json", study)
        files["png"] = plots.fast_groups_plot(study, out / "fast_groups.png")
    elif kind == "approximations":
        if any(int(r) < 1 for r in ranks):
            raise InputError(f"--ranks must be positive integers, got {list(ranks)}")
        study = approximations_study(ctx, ranks=ranks, config=cfg, n_per_task=n_per_task, n_calib=n_calib,
                                     progress=progress)
        files["json"] = _write(out, "approximations.json", study)
        out.mkdir(parents=True, exist_ok=True)
        files["markdown"] = atomic_write_text(out / "approximations.md", approximations_markdown(study))
    elif kind == "se-defaults":
        tasks = list(ctx.splits)
        subsets = [tasks[:k] for k in dict.fromkeys((2, 3, len(tasks))) if 2 <= k <= len(tasks)]
        if not subsets:
            raise InputError(f"se-defaults needs at least two tasks; the pool has {tasks}")
        study = defaults_study(ctx, subsets=subsets, temperatures=temperatures, gains=gains, layer=cfg.layer,
                               normalisation=cfg.normalisation, n_per_task=n_per_task, n_calib=n_calib,
                               progress=progress)
        files["json"] = _write(out, "se_defaults.json", study)
        out.mkdir(parents=True, exist_ok=True)
        files["markdown"] = atomic_write_text(out / "se_defaults.md", defaults_markdown(study))
    elif kind == "representation-bias":
        from mergelab.experiment.runner import RunPool

        chosen = bias_rows(rows)  # unknown rows are refused before any work
        splits = {t: {**s, "test": s["test"].subset(list(range(min(n_per_task, len(s["test"])))))}
                  for t, s in ctx.splits.items()}
        pool = RunPool(ctx.family, ctx.pretrained, dict(ctx.experts), dict(ctx.heads), splits, progress=progress,
                       input_split="test", adapters=dict(getattr(ctx, "adapters", None) or {}))
        study = representation_bias(pool, chosen, progress=progress)
        study.update(split="test", n_calib=n_calib)
        files["json"] = _write(out, "representation_bias.json", study)
        files["png"] = plots.bias_plot(study, out / "representation_bias.png")
    elif kind == "unseen":
        from mergelab.experiment.analysis.unseen import unseen_plot, unseen_study, unseen_table
        from mergelab.pools.data.unseen import UNSEEN_SOURCES, load_unseen

        if unseen is None:
            unseen = {k: list(load_unseen(k).sample(n_per_task, seed).texts) for k in UNSEEN_SOURCES}
        study = unseen_study(ctx, unseen, config=cfg, n_per_task=n_per_task, n_calib=n_calib, keep=keep,
                             fallback_score=fallback_score, seed=seed, progress=progress)
        files["json"] = _write(out, "unseen.json", study)
        out.mkdir(parents=True, exist_ok=True)
        files["table"] = atomic_write_text(out / "unseen.md", unseen_table(study))
        files["png"] = unseen_plot(study, out / "unseen.png")
    else:
        cost = cost_study(ctx, n_samples=max(5, n_per_task), config=cfg)
        files["json"] = _write(out, "cost.json", cost)
        files["png"] = plots.cost_plot(cost, out / "cost.png")
    return files


def run_weak_expert(spec, out: str | Path, *, task: str, steps: int, shuffle: float, seed: int | None = None,
                    cache_dir=None, progress: bool = True, console=None) -> dict[str, Path]:
    """The ``weak-expert`` analysis (:mod:`mergelab.experiment.analysis.weak`): JSON and Markdown table."""
    from mergelab.experiment.analysis.weak import weak_expert_study, weak_table

    study = weak_expert_study(spec, task, steps=steps, shuffle=shuffle, seed=seed, cache_dir=cache_dir,
                              progress=progress, console=console)
    out = Path(out)
    files = {"json": _write(out, "weak_expert.json", study)}
    files["table"] = atomic_write_text(out / "weak_expert.md", weak_table(study))
    return files


__all__ = ["BENCHMARK_KINDS", "KINDS", "NORMALISATIONS", "run_analysis", "run_weak_expert"]
