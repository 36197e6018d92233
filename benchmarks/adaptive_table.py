"""The adaptive rows on a named benchmark, beside the experts and Task Arithmetic at 0.3.

    # the reported table: adapt on the test texts (labels unread), evaluate on the test labels
    .venv/bin/python benchmarks/adaptive_table.py --rows symerge adamerging_layerwise --out runs/adaptive-test.json
    # choosing hyperparameters: adapt on the validation texts, evaluate on the validation labels
    .venv/bin/python benchmarks/adaptive_table.py --split validation --rows symerge --set symerge.lr=0.001

``--set METHOD.KEY=VALUE`` passes a keyword argument to that method (``steps`` included), e.g.
``--set adamerging_layerwise.steps=50``. Results are merged into ``--out`` (a JSON file keyed by
split and row), written atomically, so several short runs build one table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    from mergelab.experiment.adaptive_rows import ADAPTIVE_ROWS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="text5")
    ap.add_argument("--rows", nargs="*", default=list(ADAPTIVE_ROWS), help=f"any of {', '.join(ADAPTIVE_ROWS)}")
    ap.add_argument("--split", default="test", choices=("test", "validation"),
                    help="adapt on this split's texts and evaluate on its labels")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE")
    ap.add_argument("--baselines", action="store_true",
                    help="also evaluate the experts, Task Arithmetic 0.3 and TIES (scaling 1.0, density 0.2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix for the row names in the JSON (hyperparameter runs)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default="runs/adaptive.json")
    ap.add_argument("--save-dir", default=None, help="also save each adapted result (coefficients JSON + PNG, heads)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    steps: dict[str, int] = {}
    options: dict[str, dict] = {}
    for item in args.set:
        left, sep, raw = item.partition("=")
        method, dot, key = left.partition(".")
        if not sep or not dot:
            ap.error(f"--set {item!r}: expected METHOD.KEY=VALUE")
        value = yaml.safe_load(raw)
        if key == "steps":
            steps[method] = int(value)
        else:
            options.setdefault(method, {})[key] = value

    from mergelab.core.io import atomic_write_text
    from mergelab.experiment.adaptive_rows import adaptive_rows
    from mergelab.experiment.runner import load_context
    from mergelab.methods import merge
    from mergelab.pools.benchmarks import get_benchmark
    from mergelab.pools.evaluate import MethodResult, evaluate_tasks, mean, normalized_average

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    spec = get_benchmark(args.benchmark)
    ctx = load_context(spec, cache_dir=args.cache, progress=False)
    splits, family, pre, bodies, heads = ctx.splits, ctx.family, ctx.pretrained, ctx.experts, ctx.heads
    ev = {t: s[args.split] for t, s in splits.items()}
    path = Path(args.out)
    store = json.loads(path.read_text()) if path.is_file() else {}
    section = store.setdefault(args.split, {})
    expert_acc = section.get("individual", {}).get("per_task")
    if args.baselines or expert_acc is None:
        expert_acc = evaluate_tasks(family, lambda t: bodies[t], heads, ev, progress=not args.quiet, label="experts")
        section["individual"] = MethodResult(expert_acc, mean(list(expert_acc.values())), 1.0).to_json()
        ta = evaluate_tasks(family, merge("task_arithmetic", pre, bodies, scaling=0.3), heads, ev,
                            progress=not args.quiet, label="ta0.3")
        section["task_arithmetic_0.3"] = MethodResult(ta, mean(list(ta.values())),
                                                      normalized_average(ta, expert_acc)).to_json()
        ties = evaluate_tasks(family, merge("ties", pre, bodies, scaling=1.0, density=0.2), heads, ev,
                              progress=not args.quiet, label="ties1.0")
        section["ties_1.0"] = MethodResult(ties, mean(list(ties.values())),
                                           normalized_average(ties, expert_acc)).to_json()

    def on_row(name, res):
        section[name + args.tag] = {**res.to_json(), "options": options.get(name, {}), "seed": args.seed}
        store["updated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(path, json.dumps(store, indent=1) + "\n")
        print(f"{name + args.tag:<34} avg {100 * res.average:5.1f} norm {100 * res.normalized_average:5.1f}  "
              + " ".join(f"{t[:10]} {100 * a:5.1f}" for t, a in res.per_task.items())
              + f"  ({res.seconds:.0f}s; adapt {res.params.get('adapt_seconds', 0):.0f}s)", flush=True)

    adapted: dict = {}
    adaptive_rows(family, pre, bodies, heads, splits, expert_acc, rows=args.rows, steps=steps, options=options,
                  seed=args.seed, adapt_split=args.split, eval_split=args.split, progress=not args.quiet,
                  on_row=on_row, adapted=adapted)
    if args.save_dir:
        for name, res in adapted.items():
            res.save(Path(args.save_dir) / f"{name}{args.tag}")
    store.setdefault("commands", []).append("python benchmarks/adaptive_table.py "
                                            + " ".join(argv if argv is not None else sys.argv[1:]))
    atomic_write_text(path, json.dumps(store, indent=1) + "\n")
    print(f"done in {time.perf_counter() - t0:.0f}s -> {path}")
    return store


if __name__ == "__main__":
    main()
