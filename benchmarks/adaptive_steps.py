"""Accuracy against adaptation steps, one run per method (AdaMerging's official budget on text5's test sample).

    nice -n 5 .venv/bin/python benchmarks/adaptive_steps.py --threads 1 --methods adamerging_layerwise \
        --steps 500 --eval-at 10 50 100 200 500 --out runs/adaptive-steps.json

Each method runs ONCE through the registry (the pool's unlabeled test inputs, the method's own defaults unless
``--set KEY=VALUE``), keeping a snapshot after each step of ``--eval-at`` (``eval_at``,
:meth:`~mergelab.methods.adaptive.AdaptResult.at`); each snapshot is evaluated on the benchmark's test split as it
is taken (``RunPool.on_snapshot``) and written to ``--out`` at once (atomically, keyed by method), so a run stopped
early keeps its earlier checkpoints. ``seconds`` at a checkpoint is the optimisation time up to that step (setup
and evaluations excluded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="text5-demo")
    ap.add_argument("--methods", nargs="+", required=True, help="registered adaptive methods")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[50, 100, 200, 500])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a parameter of every method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default="runs/adaptive-steps.json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    options = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(raw)

    import torch

    from mergelab import methods
    from mergelab.core.io import atomic_write_text
    from mergelab.experiment.runner import RunPool, load_context
    from mergelab.pools.benchmarks import get_benchmark
    from mergelab.pools.evaluate import evaluate_tasks, mean, normalized_average

    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = load_context(get_benchmark(args.benchmark), cache_dir=args.cache, progress=False)
    test = {t: s["test"] for t, s in ctx.splits.items()}
    path = Path(args.out)
    store = json.loads(path.read_text()) if path.is_file() else {}
    experts = store.get("individual", {}).get("per_task")
    if experts is None:
        experts = evaluate_tasks(ctx.family, lambda t: ctx.experts[t], ctx.heads, test, progress=False, label="experts")
        store["individual"] = {"per_task": experts, "average": mean(list(experts.values()))}
    if "task_arithmetic_0.3" not in store:  # step 0 of AdaMerging and SyMerge (coefficients start at 0.3)
        ta = evaluate_tasks(ctx.family, methods.merge("task_arithmetic", ctx.pretrained, ctx.experts, scaling=0.3),
                            ctx.heads, test, progress=False, label="ta0.3")
        store["task_arithmetic_0.3"] = {"per_task": ta, "average": mean(list(ta.values())),
                                        "normalized_average": normalized_average(ta, experts)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for name in args.methods:
        info = methods.get(name)
        params = {**options, "steps": args.steps, "eval_at": sorted({s for s in args.eval_at if s <= args.steps} | {args.steps})}
        info.check(params)
        entry = store[name] = {"curve": [], "params": params, "seed": args.seed, "threads": torch.get_num_threads(),
                               "commit": commit, "loadavg_before": [round(x, 2) for x in os.getloadavg()]}

        def evaluate(snap, name=name, entry=entry):  # each snapshot as it is taken; written at once
            acc = evaluate_tasks(ctx.family, snap.body_fn(), snap.heads, test, progress=False, label=f"{name}@{snap.steps}")
            entry["curve"].append({"step": snap.steps, "seconds": round(snap.seconds, 1), "average": mean(list(acc.values())),
                                   "normalized_average": normalized_average(acc, experts), "per_task": acc,
                                   "loadavg": [round(x, 2) for x in os.getloadavg()]})
            atomic_write_text(path, json.dumps(store, indent=1) + "\n")
            print(f"{name:<30} step {snap.steps:>4}  avg {100 * entry['curve'][-1]['average']:5.1f}  "
                  f"({snap.seconds:.0f}s)", flush=True)

        pool = RunPool(ctx.family, ctx.pretrained, dict(ctx.experts), dict(ctx.heads), ctx.splits, seed=args.seed,
                       progress=not args.quiet, input_split="test", on_snapshot=evaluate)
        res = info.fn(pool, **params).result
        entry.update(setup_seconds=round(res.setup_seconds, 1), seconds_per_step=round(res.seconds / max(1, res.steps), 3),
                     loadavg_after=[round(x, 2) for x in os.getloadavg()],
                     finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        store.setdefault("commands", []).append("python benchmarks/adaptive_steps.py "
                                                + " ".join(argv if argv is not None else sys.argv[1:]))
        atomic_write_text(path, json.dumps(store, indent=1) + "\n")
    return store


if __name__ == "__main__":
    main()
