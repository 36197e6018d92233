"""Evaluate merging methods on a pool YAML (configs/*.yaml): the paper setups, or your own pool.

    python benchmarks/run_pool.py configs/clip-vit-b32-8tasks.yaml --methods task_arithmetic,ties
    python benchmarks/run_pool.py configs/gpt2-glue-7tasks.yaml --device cuda --out results/gpt2.json

Rows: ``pretrained`` (pretrained body, each task's head), ``experts`` (each task's expert on its own
task), ``average``, ``task_arithmetic`` (lambda ``--lam``), ``ties`` (``--ties-scaling``, density 0.2),
``se_merging`` (SE-Merging over Task Arithmetic, exact per-sample forward, prototypes calibrated on the
first ``--calibration`` inputs of each task, which are then left out of every row's evaluation),
``adamerging`` (layer-wise, ``--steps``), ``symerge`` (``--steps``). Accuracy per task, the average, and
the normalised accuracy (merged / expert). Hub ids are fetched only when the config names them; offline
it stops with a clear message (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROWS = ("pretrained", "experts", "average", "task_arithmetic", "ties", "se_merging", "adamerging", "symerge")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--methods", default="pretrained,experts,task_arithmetic,ties",
                    help=f"comma-separated rows out of {', '.join(ROWS)}")
    ap.add_argument("--device", default=None, help="override the config's device (auto, cpu, cuda, cuda:N)")
    ap.add_argument("--dtype", default=None, help="override the config's dtype (float32, bfloat16, float16)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of each task only")
    ap.add_argument("--lam", type=float, default=0.3, help="Task Arithmetic coefficient")
    ap.add_argument("--ties-scaling", type=float, default=0.3, help="TIES coefficient of the disjoint mean")
    ap.add_argument("--steps", type=int, default=None, help="AdaMerging / SyMerge steps (default: theirs)")
    ap.add_argument("--calibration", type=int, default=32, help="SE-Merging prototype inputs per task")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args(argv)

    from mergelab.core.errors import InputError

    try:
        return _run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import yaml
    from rich.console import Console

    from mergelab.core.errors import InputError
    from mergelab.core.io import atomic_write_text
    from mergelab.experiment.report import rich_table
    from mergelab.methods import plan as make_plan
    from mergelab.pools.evaluate import evaluate_tasks, mean, normalized_average
    from mergelab.pools.pool import PoolConfig, load_pool

    rows = [r.strip() for r in args.methods.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise InputError(f"--methods: unknown row(s) {bad}; rows: {', '.join(ROWS)}")
    try:
        raw = yaml.safe_load(args.config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{args.config}: cannot read the config ({exc})") from exc
    raw = raw.get("pool", raw) if isinstance(raw, dict) else raw
    overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    try:
        cfg = PoolConfig.model_validate({**raw, **overrides}).resolve_relative(args.config.parent)
    except ValueError as exc:
        raise InputError(f"{args.config}: {exc}") from exc
    console = Console(stderr=True)
    console.print(f"loading pool {args.config} ({cfg.family}, {len(cfg.experts)} experts)")
    pool = load_pool(cfg)
    fam, pre, experts, heads = pool.family, pool.pretrained, pool.experts, pool.heads
    missing = [t for t in pool.tasks if t not in pool.data or t not in heads]
    if missing:
        raise InputError(f"task(s) {missing} have no data or no head: evaluation needs both")
    k = args.calibration if "se_merging" in rows else 0
    calib = {t: pool.data[t].inputs[:k] for t in pool.tasks}
    splits = {}
    for t in pool.tasks:
        d = pool.data[t]
        end = len(d) if args.limit is None else min(len(d), k + args.limit)
        splits[t] = type(d)(d.name, d.inputs[k:end], d.labels[k:end], d.label_names, d.source)
    results: dict[str, dict] = {}

    def record(name: str, per_task: dict[str, float], seconds: float, **extra) -> None:
        ref = per_task if name == "experts" else results.get("experts", {}).get("per_task")
        results[name] = {"per_task": per_task, "average": mean(list(per_task.values())),
                         "normalized_average": normalized_average(per_task, ref) if ref else None,
                         "seconds": round(seconds, 2), **extra}
        console.print(f"{name}: average {results[name]['average']:.4f} ({seconds:.1f} s)")

    def static(name: str, body) -> None:
        t0 = time.perf_counter()
        record(name, evaluate_tasks(fam, body, heads, splits, batch_size=args.batch_size, progress=True,
                                    label=name), time.perf_counter() - t0)

    if "experts" in rows or any(r in rows for r in ("se_merging", "adamerging", "symerge")):
        static("experts", lambda t: experts[t])
    if "pretrained" in rows:
        static("pretrained", pre)
    if "average" in rows:
        static("average", make_plan("average", pre, experts).apply(pre))
    ta = make_plan("task_arithmetic", pre, experts, scaling=args.lam)
    if "task_arithmetic" in rows:
        static("task_arithmetic", ta.apply(pre))
    if "ties" in rows:
        static("ties", make_plan("ties", pre, experts, scaling=args.ties_scaling, density=0.2).apply(pre))
    if "se_merging" in rows:
        from mergelab.experiment.se_evaluate import evaluate_se
        from mergelab.methods.dynamic import SEMerging

        t0 = time.perf_counter()
        se = SEMerging(fam, pre, ta, experts)
        se.calibrate(calib, batch_size=args.batch_size)
        acc, routing = evaluate_se(se, heads, splits, batch_size=args.batch_size, progress=True)
        record("se_merging", acc, time.perf_counter() - t0, routing_accuracy=routing["routing_accuracy"])
    adapt_inputs = {t: splits[t].inputs for t in pool.tasks}  # unlabeled: labels are never passed
    steps = {} if args.steps is None else {"steps": args.steps}
    if "adamerging" in rows:
        from mergelab.methods.adaptive import adamerging

        res = adamerging(fam, pre, ta.vectors, heads, adapt_inputs, **steps)
        static("adamerging", res.merged_state())
    if "symerge" in rows:
        from mergelab.methods.adaptive import symerge

        res = symerge(fam, pre, ta.vectors, heads, adapt_inputs, experts=experts, **steps)
        t0 = time.perf_counter()
        record("symerge", evaluate_tasks(fam, res.body, res.heads, splits, batch_size=args.batch_size),
               time.perf_counter() - t0 + res.seconds)
    report = {"benchmark": args.config.stem, "tasks": pool.tasks, "methods": results,
              "config": str(args.config), "n_eval": {t: len(s) for t, s in splits.items()}}
    Console().print(rich_table(report))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
