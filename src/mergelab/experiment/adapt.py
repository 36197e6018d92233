"""``mergelab adapt``: test-time adaptive merging on a named benchmark (its cached experts) or a pool config.

Registered in :mod:`mergelab.cli`; this module only imports typer at load time (torch and the
benchmark are imported when the command runs), so ``mergelab --help`` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from mergelab.core.errors import InputError

METHOD_NAMES = ("adamerging_taskwise", "adamerging_layerwise", "adamerging_plusplus", "adamerging_plusplus_taskwise",
                "symerge")  # the registry's adaptive methods


def adapt(
    method: str = typer.Option(..., "--method", "-m",
                               help="adamerging_taskwise, adamerging_layerwise, adamerging_plusplus, adamerging_plusplus_taskwise or symerge."),
    benchmark: str = typer.Option("text5", "--benchmark", "-b", help="Named benchmark whose cached experts to merge."),
    config: Path | None = typer.Option(None, "--config", "-c", help="A pool config (pool: + evaluation:) whose experts to merge instead; its held-out split is 'validation', the rest 'test'."),
    steps: int | None = typer.Option(None, "--steps", help="Optimiser steps (default: the method's, which fits 5 min on 2 cores)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: coefficients.json, coefficients.png, heads, result.json."),
    lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (default 1e-3 AdaMerging, 1e-2 SyMerge)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the batch order (same seed, same result)."),
    task_layer: str = typer.Option("head", "--task-layer", help="SyMerge: head, last_block or none."),
    loss: str = typer.Option("selflabel", "--loss", help="SyMerge: selflabel (expert pseudo-labels) or entropy."),
    no_clamp: bool = typer.Option(False, "--no-clamp", help="Do not clamp the coefficients to [0, 1]."),
    adapt_split: str = typer.Option("test", "--adapt-split", help="Whose texts to adapt on: test (test-time) or validation."),
    cache: Path | None = typer.Option(None, "--cache", help="Expert cache (default $MERGELAB_CACHE or ~/.cache/mergelab)."),
    save_models: bool = typer.Option(False, "--save-models", help="Also write one Hugging Face directory per task under OUT/models."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip evaluating the adapted model."),
    threads: int | None = typer.Option(None, "--threads", help="torch threads (on a machine shared with other jobs, 1 is often faster)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Learn merging coefficients (and, for SyMerge, one layer per task) on a benchmark's unlabeled texts.

    Example:

        mergelab adapt --benchmark text5 --method symerge --out runs/symerge
    """
    if method not in METHOD_NAMES:
        raise InputError(f"--method {method!r}: expected one of {', '.join(METHOD_NAMES)}")
    if steps is not None and steps < 0:
        raise InputError(f"--steps {steps}: expected a non-negative integer")
    if lr is not None and not lr > 0:
        raise InputError(f"--lr {lr}: expected a positive number")
    if adapt_split not in ("test", "validation"):
        raise InputError(f"--adapt-split {adapt_split!r}: expected test or validation")
    if method != "symerge" and (task_layer != "head" or loss != "selflabel"):
        raise InputError("--task-layer and --loss apply to --method symerge only")
    if task_layer not in ("head", "last_block", "none"):
        raise InputError(f"--task-layer {task_layer!r}: expected head, last_block or none")
    if loss not in ("selflabel", "entropy"):
        raise InputError(f"--loss {loss!r}: expected selflabel or entropy")
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: expected a positive integer")
    if config is not None and (benchmark != "text5" or cache is not None):
        raise InputError("--config names the pool; drop --benchmark and --cache")
    if config is not None:
        from mergelab.experiment.config import load_config

        load_config(config)  # a bad file is refused before the output folder is made
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    from mergelab.experiment.rundir import logged_run, start_command_run

    options = dict(method=method, benchmark=None if config is not None else benchmark, config=config, steps=steps, out=out, lr=lr, seed=seed, task_layer=task_layer,
                   loss=loss, clamp=not no_clamp, adapt_split=adapt_split, cache=cache, save_models=save_models,
                   evaluate=not no_eval, threads=threads)
    created = not out.exists()
    start_command_run(out, "adapt", options)
    logged_run(out, quiet, lambda log: run(**options, quiet=quiet, console=log), created=created)


def run(*, method: str, benchmark: str | None, config: Path | None = None, steps: int | None, out: Path, lr: float | None, seed: int, task_layer: str,
        loss: str, clamp: bool, adapt_split: str, cache: Path | None, save_models: bool, evaluate: bool,
        quiet: bool, threads: int | None = None, console=None) -> dict:
    import torch
    from rich.console import Console

    from mergelab.core.io import atomic_write_text
    from mergelab.experiment.adaptive_rows import adapt as run_adapt
    from mergelab.experiment.commands import pool_or_benchmark
    from mergelab.pools.data.tasks import LazyColumn
    from mergelab.pools.evaluate import evaluate_tasks, mean, normalized_average

    if threads:
        torch.set_num_threads(threads)
    console = console or Console(stderr=True, quiet=quiet)
    t0 = time.perf_counter()
    ctx = pool_or_benchmark(config, benchmark or "text5", cache, progress=not quiet, console=console)
    splits, family, pre, bodies, heads = ctx.splits, ctx.family, ctx.pretrained, ctx.experts, ctx.heads
    console.print(f"{ctx.name}: {len(bodies)} experts loaded ({time.perf_counter() - t0:.0f}s); adapting with "
                  f"[bold]{method}[/] on the {adapt_split} texts (labels are not read)", highlight=False)
    options: dict = {"clamp": clamp}
    if lr is not None:
        options["lr"] = lr
    if method == "symerge":
        options.update(task_layer=task_layer, loss=loss)
    texts = {t: s[adapt_split].inputs if isinstance(s[adapt_split].inputs, LazyColumn) else list(s[adapt_split].inputs)
             for t, s in splits.items()}
    result = run_adapt(method, family, pre, bodies, heads, texts, steps=steps, seed=seed, progress=not quiet,
                       adapters=ctx.adapters, **options)
    files = result.save(out)
    summary = {"benchmark": ctx.name, "adapt_split": adapt_split, **result.summary()}
    if evaluate:
        test = {t: s["test"] for t, s in splits.items()}
        expert_acc = evaluate_tasks(family, lambda t: bodies[t], heads, test, progress=not quiet, label="experts")
        per_task = evaluate_tasks(family, result.body_fn(), result.heads, test, progress=not quiet, label=method)
        summary.update(per_task=per_task, average=mean(list(per_task.values())),
                       normalized_average=normalized_average(per_task, expert_acc), expert_per_task=expert_acc)
        console.print(f"{method}: test average {100 * summary['average']:.1f} (normalised "
                      f"{100 * summary['normalized_average']:.1f}); "
                      + ", ".join(f"{t} {100 * a:.1f}" for t, a in per_task.items()), highlight=False)
    if save_models:
        result.save_models(out / "models", family)
    atomic_write_text(out / "result.json", json.dumps(summary, indent=1) + "\n")
    console.print(f"{result.steps} steps in {result.seconds:.0f}s ({result.seconds / max(1, result.steps):.2f} s/step, "
                  f"setup {result.setup_seconds:.0f}s) -> {files['json']}, {files['png']}", highlight=False)
    return summary
