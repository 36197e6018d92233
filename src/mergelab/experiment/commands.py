"""What the ``mergelab`` commands do, so that :mod:`mergelab.cli` only parses options and calls these.

- :func:`merge_flags`: ``mergelab merge --method ... --pretrained ... --expert ...`` (one static merge,
  in memory or streamed);
- :func:`merge_config_run`: ``mergelab merge --config`` (a pool's static sweep, each merged model saved);
- :func:`bench_run`: ``mergelab bench`` on a named benchmark, on a user's task files, or on a pool
  config (``pool:`` + ``evaluation:``): every case through :func:`~mergelab.experiment.runner.run_pool`;
- :func:`sweep_command`: ``mergelab sweep CONFIG`` (studies over methods, parameters, task subsets and seeds,
  in this process or on Ray; :mod:`mergelab.experiment.sweep`);
- :func:`analyze_run`: ``mergelab analyze`` on a named benchmark or a pool config (:func:`pool_or_benchmark`,
  also ``mergelab adapt``'s pool); :func:`check_probe_layers`: probe layers against the backbone's depth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelab.core.errors import InputError

if TYPE_CHECKING:  # imported where used: a static merge's start-up does without pydantic's run models and pools
    from mergelab.experiment.config import RunConfig


def merge_flags(method: str, pretrained: str, experts: Mapping[str, str], params: Mapping[str, Any], out: Path, *,
                stream: bool | None = None, shard_size: str = "5GB", progress: bool = True,
                note: Callable[[str], None] | None = None, output_format: str = "model",
                svd_tol: float | None = None) -> str:
    """Merge ``experts`` into ``pretrained`` with static ``method`` and save it at ``out``; a one-line summary.

    ``stream``: None streams whenever every input is safetensors and the method has a per-tensor form, else
    merges in memory and calls ``note(why)``; True streams (an input it cannot read is an error naming the
    file); False loads whole models. An expert may be a PEFT LoRA adapter folder (``adapter_config.json``):
    streamed like the others (its update formed slice by slice from its factors), or merged in memory by
    :mod:`mergelab.methods.lora` (exact factored sums for Task Arithmetic and averaging). ``output_format``:
    ``"model"`` (a Hugging Face folder) or ``"adapter"`` (a PEFT adapter folder, adapters only: exact for Task
    Arithmetic and averaging, which stay low-rank; for TIES and DARE each merged update's truncated SVD at
    relative error ``svd_tol`` (default :data:`mergelab.methods.lora.DEFAULT_SVD_TOL`), reported in the summary
    and in the folder's ``merge_report.json``).
    """
    from mergelab import methods
    from mergelab.core import io
    from mergelab.core.lora import is_adapter_dir

    info = methods.get_static(method)  # unknown or not static: fail before loading anything
    if output_format not in ("model", "adapter"):
        raise InputError(f"--output-format must be 'model' or 'adapter', got {output_format!r}")
    io.check_output_path(out, [pretrained, *experts.values()])
    io.check_replaceable(out)  # before loading anything
    adapters = [name for name, path in experts.items() if is_adapter_dir(path)]
    if svd_tol is not None and output_format != "adapter":
        raise InputError("--svd-tol sets the error of an adapter output's truncated SVD: it needs --output-format adapter")
    if output_format == "adapter":
        from mergelab.methods.lora import DEFAULT_SVD_TOL, check_tolerance

        svd_tol = check_tolerance(DEFAULT_SVD_TOL if svd_tol is None else svd_tol)
        full = [name for name in experts if name not in adapters]
        if full:
            raise InputError(f"--output-format adapter: expert(s) {full} are not LoRA adapter folders (a full expert's "
                             "update covers every weight, biases and norms included); use --output-format model")
    if output_format == "adapter" and stream:
        raise InputError("--stream writes a full model; an adapter output (--output-format adapter) is built from "
                         "the adapters' factors in memory (drop --stream)")
    t0 = time.perf_counter()
    if stream is not False and output_format == "model":
        from mergelab.methods.streaming import stream_merge, streamable

        why_not = f"method {method!r} has no per-tensor form" if info.stream is None else streamable(pretrained, experts)
        if why_not is None or stream:  # --stream with an input it cannot read: its error names the file
            stream_merge(method, pretrained, dict(experts), out, shard_size=shard_size, progress=progress, **params)
            return (f"streamed {len(experts)} experts{f' ({len(adapters)} LoRA)' if adapters else ''} with "
                    f"[bold]{method}[/] {dict(params) or ''} in "
                    f"{time.perf_counter() - t0:.1f}s -> {out}")
        if note is not None:
            note(why_not)
    pre_sd = io.load_state_dict(pretrained)
    inputs = [pretrained, *experts.values()]
    if adapters:
        from mergelab.methods import lora

        expert_sds = lora.load_experts(pre_sd, experts)
        if output_format == "adapter":
            factors, report = lora.adapter_factors(method, pre_sd, expert_sds, tol=svd_tol, **params)
            lora.save_adapter(factors, out, like=expert_sds[adapters[0]].config, inputs=inputs, report=report)
            lo, hi = report["ranks"]
            how = ("exact" if method in lora.FACTORED_METHODS else
                   f"truncated SVD at --svd-tol {svd_tol:g}: relative error {report['error']:.2e} over all adapted "
                   f"weights, at most {report['max_module_error']:.2e} per weight")
            return (f"merged {len(experts)} LoRA adapters with [bold]{method}[/] {dict(params) or ''} into an adapter "
                    f"of rank {lo}..{hi} ({how}) in {time.perf_counter() - t0:.1f}s -> {out}")
    else:
        expert_sds = {name: io.load_state_dict(path) for name, path in experts.items()}
    merged = methods.merge(method, pre_sd, expert_sds, **params)
    pre_path = io.resolve_model_path(pretrained)
    io.save_model(merged, out, like=pre_path if pre_path.is_dir() else None, inputs=inputs)
    return (f"merged {len(experts)} experts{f' ({len(adapters)} LoRA)' if adapters else ''} with [bold]{method}[/] "
            f"{dict(params) or ''} in {time.perf_counter() - t0:.1f}s -> {out}")


def merge_config_run(config: Path, out: Path | None, *, quiet: bool = False) -> tuple[dict[str, Any], Path, str]:
    """``merge --config``: every merge of the pool's sweep; ``(results, run_dir, files written)``."""
    from mergelab.experiment.config import load_config
    from mergelab.experiment.rundir import (
        default_run_dir,
        merge_markdown,
        resolve_device,
        run_merges,
        start_run,
    )

    cfg = load_config(config)
    if cfg.kind != "merge":
        raise InputError(f"{config}: has a 'benchmark' section; run it with mergelab bench --config {config}")
    if not cfg.methods:
        raise InputError(f"{config}: methods: none; a merge needs a 'methods' list (the 'evaluation' section is "
                         f"for mergelab bench --config {config})")
    run_dir = Path(out or cfg.outputs.run_dir or default_run_dir(config.stem))
    cfg = cfg.model_copy(update={"outputs": cfg.outputs.model_copy(update={"run_dir": str(run_dir)})})
    device = resolve_device(cfg.device)
    created = not run_dir.exists()
    start_run(run_dir, cfg, inputs=cfg.pool.inputs(), device=device)

    def body(log):
        results = run_merges(cfg, run_dir, console=log, progress=not quiet, name=config.stem)
        log.to_file(merge_markdown(results))
        return results

    return _logged_with_report(run_dir, cfg, quiet, body, created, f"{run_dir}/results.json, results.md")


def _logged_with_report(run_dir: Path, cfg: RunConfig, quiet: bool, body, created: bool,
                        files: str) -> tuple[dict[str, Any], Path, str]:
    """Run ``body`` logged into ``run_dir``, then the report if the config asks for it; ``(results, run_dir,
    the files written)``."""
    from mergelab.experiment.report_page import render_report
    from mergelab.experiment.rundir import logged_run

    results = logged_run(run_dir, quiet, body, created=created)
    if cfg.outputs.report:
        render_report(run_dir)
        files += ", report.html"
    return results, run_dir, files


def bench_config(config: Path | None, *, benchmark: str = "text5", cache: Path | None = None,
                 rows: Sequence[str] | None = None, tasks: Mapping[str, str] | None = None,
                 steps: Mapping[str, int] | None = None) -> RunConfig:
    """The run configuration of ``mergelab bench``: the file ``config``, else one made of the options."""
    from mergelab.experiment.config import BenchmarkConfig, RunConfig, benchmark_rows, load_config

    if config is not None:
        return load_config(config)
    known = benchmark_rows()
    for r in rows or []:
        if r not in known:
            raise InputError(f"--row {r!r}: unknown row; expected one of {', '.join(known)}")
    return RunConfig(benchmark=BenchmarkConfig(name=benchmark, rows=list(rows) if rows else None,
                                               tasks=dict(tasks or {}), cache=str(cache) if cache else None,
                                               steps=dict(steps or {})))


def bench_run(cfg: RunConfig, out: Path | None, *, name: str | None = None, quiet: bool = False,
              console=None) -> tuple[dict[str, Any], Path, str]:
    """``mergelab bench``: a named benchmark (``benchmark:``) or a pool (``pool:`` and ``evaluation:``) through
    the one runner; writes the run directory; ``(results, run_dir, files written)``."""
    from mergelab.experiment.report import rich_table
    from mergelab.experiment.rundir import benchmark_spec, start_run
    from mergelab.experiment.runner import default_run_dir

    if cfg.pool is not None:
        run_name = name or "pool"
        inputs = cfg.pool.inputs()
    else:
        spec = benchmark_spec(cfg)
        run_name = name or spec.name
        inputs = list(cfg.benchmark.tasks.values())
    out_dir = Path(out or cfg.outputs.run_dir or default_run_dir(run_name))
    if out_dir.exists() and not out_dir.is_dir():  # e.g. --out naming a --task file
        raise InputError(f"--out {out_dir}: exists and is not a folder; give a folder for the results")
    cfg = cfg.model_copy(update={"outputs": cfg.outputs.model_copy(update={"run_dir": str(out_dir)})})
    created = not out_dir.exists()
    start_run(out_dir, cfg, inputs=inputs)

    def body(log):
        if cfg.pool is not None:
            results = run_pool_config(cfg, out_dir, name=run_name, progress=not quiet, console=log)
        else:
            from mergelab.experiment.runner import run_benchmark

            results = run_benchmark(spec, out_dir=out_dir, cache_dir=cfg.benchmark.cache, rows=cfg.benchmark.rows,
                                    progress=not quiet, console=log)
        log.to_file(rich_table(results))
        return results

    return _logged_with_report(out_dir, cfg, quiet, body, created,
                               f"{out_dir}/results.json, results.md, accuracy.png")


def run_pool_config(cfg: RunConfig, out_dir: Path | None, *, name: str = "pool", progress: bool = True,
                    console=None) -> dict[str, Any]:
    """Load a config's pool, hold out each task's validation examples (``evaluation.validation_per_task``)
    and run the evaluation's rows on it (:func:`~mergelab.experiment.runner.run_pool`)."""
    from mergelab.experiment.rows import resolve
    from mergelab.experiment.runner import run_pool

    assert cfg.pool is not None
    ev = cfg.pool_evaluation()
    rows = resolve(ev.rows)  # unknown rows refused before any model is loaded
    t_start = time.perf_counter()
    pool = loaded_pool(cfg, name)
    return run_pool(pool, rows, out_dir=out_dir, lambdas=tuple(ev.lambdas), seed=cfg.seed, steps=ev.steps or None,
                    reference_params={"validation_per_task": ev.validation_per_task, "limit": ev.limit},
                    progress=progress, batch_size=ev.batch_size, console=console, t_start=t_start)


def loaded_pool(cfg: RunConfig, name: str = "pool"):
    """A config's pool, loaded (:func:`~mergelab.pools.pool.load_pool`), with each task's first
    ``evaluation.validation_per_task`` examples held out as its validation split and the rest (the first
    ``evaluation.limit``) as its test split (:meth:`~mergelab.pools.pool.ModelPool.hold_out`)."""
    import dataclasses

    from mergelab.pools.pool import load_pool

    if cfg.pool is None:
        raise InputError("the configuration has a 'benchmark' section, not a 'pool'")
    if not cfg.pool.tasks:
        raise InputError("pool.tasks: none; evaluating a pool needs each task's data (pool.tasks.NAME.path)")
    ev = cfg.pool_evaluation()
    pool = dataclasses.replace(load_pool(cfg.pool), name=name)
    pool.hold_out(ev.validation_per_task, ev.limit)
    return pool


def pool_or_benchmark(config: Path | None, benchmark: str, cache: Path | None, *, progress: bool = True,
                      console=None):
    """``adapt`` and ``analyze``: the pool of a pool config (``--config``), else the named benchmark's
    (experts fine-tuned or cached), both as a :class:`~mergelab.pools.pool.ModelPool`."""
    if config is not None:
        from mergelab.experiment.config import load_config

        cfg = load_config(config)
        if cfg.pool is None:
            raise InputError(f"{config}: has a 'benchmark' section; give its name with --benchmark instead")
        return loaded_pool(cfg, config.stem)
    from mergelab.experiment.runner import load_context
    from mergelab.pools.benchmarks import get_benchmark

    return load_context(get_benchmark(benchmark), cache_dir=cache, progress=progress, console=console)


def sweep_command(config: Path, out: Path | None, *, executor: str = "ray", address: str | None = None,
                  num_cpus: int | None = None, retry_failed: bool = False, quiet: bool = False, console=None):
    """``mergelab sweep``: load and check the sweep file, run (or resume) it into ``out`` (default
    ``runs/sweeps/<name>``), write its tables and plots and the report; returns the
    :class:`~mergelab.experiment.sweep.SweepRun`."""
    from mergelab.experiment.report_page import render_report
    from mergelab.experiment.sweep import load_sweep_config, run_sweep
    from mergelab.experiment.sweep.executor import EXECUTORS

    if executor not in EXECUTORS:
        raise InputError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if num_cpus is not None and num_cpus < 1:
        raise InputError(f"--num-cpus must be a positive integer, got {num_cpus}")
    if executor == "inline" and num_cpus is not None:
        raise InputError("--num-cpus sizes the local Ray; drop it with --executor inline")
    if address and num_cpus is not None:
        raise InputError("--num-cpus sizes a local Ray; a cluster joined with --address has its own")
    cfg = load_sweep_config(config)
    sweep_dir = Path(out) if out is not None else Path("runs") / "sweeps" / str(cfg.name)
    run = run_sweep(cfg, sweep_dir, executor=executor, address=address, num_cpus=num_cpus, retry_failed=retry_failed,
                    progress=not quiet, console=console)
    run.files.update({f"report_{k}": v for k, v in render_report(run.sweep_dir).items()})
    return run


ANALYSIS_CALIBRATION = 32  # calibration examples per task the analyses read first (run_analysis' n_calib)


def analyze_run(kind: str, out: Path, *, benchmark: str = "text5", config: Path | None = None,
                cache: Path | None = None, router: Mapping[str, Any] | None = None, n_per_task: int = 100,
                layers: Sequence[int] | None = None, ranks: Sequence[int] | None = None,
                groups_per_task: Sequence[int] | None = None, rows: Sequence[str] | None = None,
                keep: float = 0.95, fallback_score: str = "distance",
                unseen_kinds: Sequence[str] | None = None, weak_task: str = "bbc_topic", weak_steps: int = 50,
                shuffle: float = 0.3, weak_seed: int | None = None, quiet: bool = False) -> dict[str, Path]:
    """``mergelab analyze``: one SE-Merging analysis on a named benchmark's or a pool config's validation
    split; writes ``out`` (options.json, environment.json, run.log, the analysis' JSON and PNG files).
    ``unseen`` also reads test inputs and out-of-pool texts (``unseen_kinds``, default all of
    :data:`~mergelab.pools.data.unseen.UNSEEN_SOURCES`); ``keep`` and ``fallback_score`` set its static fallback.
    ``weak-expert`` runs a named benchmark's rows with ``weak_task``'s expert and with a weak one (``weak_steps``
    steps, ``shuffle`` of its training labels shuffled) on the test split."""
    from mergelab.experiment.analysis.run import BENCHMARK_KINDS, KINDS, run_analysis, run_weak_expert
    from mergelab.experiment.config import load_config
    from mergelab.experiment.rundir import logged_run, start_command_run
    from mergelab.methods.dynamic import RouterConfig
    from mergelab.pools.benchmarks import get_benchmark

    cfg = RouterConfig(**{**RouterConfig().to_dict(), **dict(router or {})})
    if kind not in KINDS + BENCHMARK_KINDS:
        raise InputError(f"unknown analysis {kind!r}; choose one of {', '.join(KINDS + BENCHMARK_KINDS)}")
    if kind in BENCHMARK_KINDS:
        from mergelab.experiment.analysis.weak import shuffle_labels
        from mergelab.pools.data.tasks import TaskData

        if config is not None:
            raise InputError(f"analysis {kind!r} runs a named benchmark (--benchmark), not a pool config")
        spec = get_benchmark(benchmark)
        if weak_task not in spec.task_names:
            raise InputError(f"--weak-task {weak_task!r}: not a task of {benchmark!r} ({', '.join(spec.task_names)})")
        if weak_steps < 1:
            raise InputError(f"--weak-steps must be a positive integer, got {weak_steps}")
        if weak_seed is not None and weak_seed < 0:
            raise InputError(f"--weak-seed must be a non-negative integer, got {weak_seed}")
        shuffle_labels(TaskData("check", ["x"], [0]), shuffle)
        created = not out.exists()
        start_command_run(out, "analyze", {"kind": kind, "benchmark": benchmark, "cache": cache, "weak_task": weak_task,
                                           "weak_steps": weak_steps, "shuffle": shuffle, "weak_seed": weak_seed})

        def weak_body(log):
            files = run_weak_expert(spec, out, task=weak_task, steps=weak_steps, shuffle=shuffle, seed=weak_seed,
                                    cache_dir=cache, progress=not quiet, console=log)
            for name, path in files.items():
                log.to_file(f"{name}: {path}")
            return files

        return logged_run(out, quiet, weak_body, created=created)
    if config is None:
        spec = get_benchmark(benchmark)
        check_probe_layers(spec, [cfg.layer, *(layers or [])])
    else:
        load_config(config)  # a bad file is refused before the run directory is made
    if ranks and any(r < 1 for r in ranks):
        raise InputError(f"--ranks must be positive integers, got {list(ranks)}")
    if groups_per_task and any(g < 1 for g in groups_per_task):
        raise InputError(f"--groups-per-task must be positive integers, got {list(groups_per_task)}")
    if rows and kind != "representation-bias":
        raise InputError("--row applies to the representation-bias analysis only")
    from mergelab.experiment.analysis.bias import DEFAULT_ROWS, bias_rows

    row_list = tuple(rows) if rows else DEFAULT_ROWS
    if kind == "representation-bias":
        bias_rows(row_list)  # an unknown row is refused before the run directory is made
    if kind == "unseen":
        from mergelab.experiment.analysis.unseen import SCORES, fit_threshold
        from mergelab.pools.data.unseen import UNSEEN_SOURCES

        fit_threshold([0.0], keep)  # a bad --keep is refused before the run directory is made
        if fallback_score not in SCORES:
            raise InputError(f"--fallback-score {fallback_score!r}: expected one of {', '.join(SCORES)}")
        bad = [k for k in unseen_kinds or [] if k not in UNSEEN_SOURCES]
        if bad:
            raise InputError(f"--kind {bad[0]!r}: not an out-of-pool kind; known: {', '.join(UNSEEN_SOURCES)}")
    group_list = tuple(groups_per_task) if groups_per_task else (1, 2, 3, 4)
    rank_list = tuple(ranks) if ranks else ((8, 32, 128) if kind == "approximations" else (4, 16, 64))
    created = not out.exists()
    start_command_run(out, "analyze", {
        "kind": kind, "benchmark": None if config is not None else benchmark, "config": config, "cache": cache,
        "router": cfg.to_dict(), "n_per_task": n_per_task, "layers": list(layers) if layers else None,
        "ranks": list(rank_list), "groups_per_task": list(group_list),
        **({"rows": list(row_list)} if kind == "representation-bias" else {}),
        **({"keep": keep, "fallback_score": fallback_score, "unseen_kinds": list(unseen_kinds or [])} if kind == "unseen" else {})})

    def body(log):
        pool = pool_or_benchmark(config, benchmark, cache, progress=not quiet, console=log)
        if config is not None:  # a pool's validation split is its held-out examples: calibration, then analysis
            short = {t: len(s["validation"]) for t, s in pool.splits.items() if len(s["validation"]) <= ANALYSIS_CALIBRATION}
            if short:
                raise InputError(f"{config}: evaluation.validation_per_task: the analyses read {ANALYSIS_CALIBRATION} "
                                 f"calibration examples, then up to --n-per-task more, from each task's held-out "
                                 f"examples; {short} hold too few (raise it above {ANALYSIS_CALIBRATION})")
        for layer in layers or []:
            pool.family.check_layer(layer)
        unseen = None
        if kind == "unseen" and unseen_kinds:
            from mergelab.pools.data.unseen import load_unseen

            unseen = {k: list(load_unseen(k).sample(n_per_task, 0).texts) for k in unseen_kinds}
        files = run_analysis(kind, pool, out, config=cfg, n_per_task=n_per_task, n_calib=ANALYSIS_CALIBRATION,
                             layers=layers, ranks=rank_list, groups_per_task=group_list, rows=row_list, unseen=unseen,
                             keep=keep, fallback_score=fallback_score, progress=not quiet)
        for name, path in files.items():
            log.to_file(f"{name}: {path}")
        return files

    return logged_run(out, quiet, body, created=created)


def check_probe_layers(spec, layers: Sequence[int]) -> None:
    """Refuse probe layers beyond the backbone's depth before any expert is trained or loaded."""
    import json

    config = spec.model_dir() / "config.json"
    depth = json.loads(config.read_text()).get("num_hidden_layers")
    for layer in layers:
        if isinstance(depth, int) and not 0 <= layer <= depth:
            raise InputError(f"probe layer {layer} is beyond the depth of {spec.backbone} ({depth} layers; "
                             f"0 = embeddings, {depth} = last layer)")


__all__ = ["analyze_run", "bench_config", "bench_run", "check_probe_layers", "loaded_pool", "merge_config_run",
           "merge_flags", "pool_or_benchmark", "run_pool_config"]
