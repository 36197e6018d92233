"""The ``mergelab`` command line.

Bad input (a missing file, a wrong key, a parameter out of range) prints one line naming the
culprit and exits with status 2, never with a traceback.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mergelab: merge fine-tuned experts of one pretrained model into a multi-task model.",
)
err_console = Console(stderr=True)
console = Console()


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def input_errors_exit_2(fn):
    """Turn mergelab's input errors (and unreadable files) into a clear message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            _fail(str(exc))

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"mergelab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """mergelab: static, dynamic (SE-Merging) and adaptive (AdaMerging, SyMerge) model merging."""


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["density=0.2", "scope=tensor"]`` -> ``{"density": 0.2, "scope": "tensor"}`` (values read as YAML)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--param {item!r}: expected KEY=VALUE, e.g. --param density=0.2")
        try:
            params[key] = yaml.safe_load(raw) if raw.strip() else None
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


@app.command()
@input_errors_exit_2
def merge(
    method: str = typer.Option(..., "--method", "-m", help="Merge method (see `mergelab methods`)."),
    pretrained: str = typer.Option(..., "--pretrained", "-p", help="Pretrained model: HF directory, .safetensors file or hub id."),
    expert: list[str] = typer.Option(..., "--expert", "-e", help="NAME=PATH of a fine-tuned expert; repeat per expert."),
    param: list[str] | None = typer.Option(None, "--param", help="KEY=VALUE method parameter (YAML value); repeatable."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically; never an input)."),
    stream: bool = typer.Option(False, "--stream", help="Merge slice by slice from safetensors files (memory: a few slices per model; docs/streaming.md)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="With --stream: bytes per output shard (5GB, 500MB, ...)."),
) -> None:
    """Merge experts into one model and save it as a Hugging Face directory.

    Example:

        mergelab merge --method ties --pretrained ./base --expert sst2=./ft/sst2 \\
            --expert mnli=./ft/mnli --param density=0.2 --param scaling=1.0 --out ./merged
    """
    from . import io, methods

    params = parse_params(param or [])
    specs = parse_experts(expert)
    methods.get(method)  # unknown method: fail before loading anything
    io.check_output_path(out, [pretrained, *specs.values()])
    t0 = time.perf_counter()
    if stream:
        from .streaming import stream_merge

        stream_merge(method, pretrained, specs, out, shard_size=shard_size, progress=True, **params)
        console.print(f"streamed {len(specs)} experts with [bold]{method}[/] {params or ''} in "
                      f"{time.perf_counter() - t0:.1f}s -> {out}", highlight=False)
        return
    pre_sd = io.load_state_dict(pretrained)
    expert_sds = {name: io.load_state_dict(path) for name, path in specs.items()}
    merged = methods.merge(method, pre_sd, expert_sds, **params)
    pre_path = io.resolve_model_path(pretrained)
    io.save_model(merged, out, like=pre_path if pre_path.is_dir() else None, inputs=[pretrained, *specs.values()])
    console.print(
        f"merged {len(specs)} experts with [bold]{method}[/] {params or ''} in {time.perf_counter() - t0:.1f}s -> {out}",
        highlight=False,
    )


@app.command()
@input_errors_exit_2
def bench(
    benchmark: str = typer.Option("text5", "--benchmark", "-b", help="Named benchmark (text5, reduced)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run directory (default runs/<benchmark>-<timestamp>)."),
    cache: Path | None = typer.Option(None, "--cache", help="Expert cache (default $MERGELAB_CACHE or ~/.cache/mergelab)."),
    row: list[str] | None = typer.Option(None, "--row", help="Only these method rows (repeatable)."),
    task: list[str] | None = typer.Option(None, "--task", help="NAME=PATH of your own task (CSV, JSONL or saved dataset); repeatable; replaces the benchmark's tasks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a benchmark end to end: data, experts (cached), every method; print the table.

    Writes results.json, results.md and accuracy.png into the run directory.

    Examples:

        mergelab bench --benchmark text5 --out runs/text5

        mergelab bench --task reviews=reviews.csv --task news=news.jsonl --out runs/mine
    """
    from .benchmarks.registry import get_benchmark, user_benchmark
    from .benchmarks.run import default_run_dir, run_benchmark
    from .report import rich_table

    spec = user_benchmark(parse_experts(task, what="--task"), base=get_benchmark(benchmark)) if task else get_benchmark(benchmark)
    out_dir = out or default_run_dir(spec.name)
    results = run_benchmark(spec, out_dir=out_dir, cache_dir=cache, rows=row, progress=not quiet,
                            console=Console(stderr=True, quiet=quiet))
    console.print(rich_table(results))
    console.print(f"results: {out_dir}/results.json, results.md, accuracy.png ({results['seconds_total']:.0f}s)",
                  highlight=False)


@app.command()
@input_errors_exit_2
def analyze(
    kind: str = typer.Argument(..., help="auto-adaptation | routing | probe-sweep | cost | se-select"),
    benchmark: str = typer.Option("text5", "--benchmark", "-b", help="Named benchmark whose experts to analyse."),
    out: Path = typer.Option(Path("runs/analysis"), "--out", "-o", help="Folder for the JSON and PNG files."),
    cache: Path | None = typer.Option(None, "--cache", help="Expert cache (default $MERGELAB_CACHE or ~/.cache/mergelab)."),
    layer: int | None = typer.Option(None, "--layer", help="SE-Merging probe layer (default: the router's)."),
    normalisation: str | None = typer.Option(None, "--normalisation", help="raw | relative | ratio | prototype."),
    temperature: float | None = typer.Option(None, "--temperature", help="Softmax temperature (> 0)."),
    mass: float | None = typer.Option(None, "--mass", help="Total coefficient mass relative to the static merge's (1.0 = same total)."),
    n_per_task: int = typer.Option(100, "--n-per-task", help="Validation samples per task to analyse."),
    layers: list[int] | None = typer.Option(None, "--layers", help="probe-sweep: layers to sweep (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """SE-Merging analyses on a benchmark's validation split: JSON and PNG plots.

    auto-adaptation / routing: per layer, the share of samples nearest to their own expert and the
    routing accuracy of each rule; distance matrix; routing confusion and weight entropy.
    probe-sweep: SE-Merging accuracy and cost per probe layer. cost: time per sample of the static
    model, SE-Merging reference / exact / fast and an ensemble. se-select: the default-choosing study.

    Example:

        mergelab analyze routing --benchmark text5 --out runs/analysis
    """
    from .analysis.run import KINDS, run_analysis
    from .benchmarks.registry import get_benchmark
    from .benchmarks.run import load_context
    from .dynamic import RouterConfig

    changes = {k: v for k, v in {"layer": layer, "normalisation": normalisation, "temperature": temperature,
                                 "mass": mass}.items() if v is not None}
    cfg = RouterConfig(**{**RouterConfig().to_dict(), **changes})
    if kind not in KINDS:
        raise InputError(f"unknown analysis {kind!r}; choose one of {', '.join(KINDS)}")
    ctx = load_context(get_benchmark(benchmark), cache_dir=cache, progress=not quiet,
                       console=Console(stderr=True, quiet=quiet))
    files = run_analysis(kind, ctx, out, config=cfg, n_per_task=n_per_task, layers=layers, progress=not quiet)
    for name, path in files.items():
        console.print(f"{name}: {path}", highlight=False)


from .adaptive.cli import adapt as _adapt  # noqa: E402  (test-time adaptive merging, issue 5)

app.command("adapt")(input_errors_exit_2(_adapt))


@app.command("methods")
def list_methods() -> None:
    """List the merge methods and their parameters."""
    from . import methods

    table = Table(title="mergelab merge methods")
    table.add_column("name", style="bold")
    table.add_column("parameters (defaults)")
    table.add_column("what it does")
    for name in methods.available():
        info = methods.get(name)
        table.add_row(name, ", ".join(f"{k}={v!r}" for k, v in info.params.items()), info.summary)
    console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
