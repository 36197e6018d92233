"""The SyMerge paper's pilot analysis on a named benchmark: cross-task accuracy matrix and merge quality.

M[i][j] = accuracy of task i's head on expert j's body (task i's test texts). Each row's off-diagonal
mean is compared, across tasks, with the accuracy of merged models taken from a results file written
by ``benchmarks/adaptive_table.py`` (Task Arithmetic 0.3 and any adaptive rows in it).

    .venv/bin/python benchmarks/cross_task.py --results runs/adaptive-test.json --out runs/cross_task
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="text5")
    ap.add_argument("--per-task", type=int, default=200, help="test texts per task (seeded subset)")
    ap.add_argument("--results", default=None, help="JSON from adaptive_table.py with merged rows to relate to")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default="runs/cross_task")
    args = ap.parse_args(argv)

    import torch

    from mergelab.core.io import atomic_write_text
    from mergelab.experiment.pilot import cross_task_matrix, plot_cross_task, relation
    from mergelab.experiment.runner import load_context
    from mergelab.pools.benchmarks import get_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_benchmark(args.benchmark)
    ctx = load_context(spec, cache_dir=args.cache, progress=False)
    splits, family = ctx.splits, ctx.family
    cross = cross_task_matrix(family, ctx.experts, ctx.heads, {t: s["test"] for t, s in splits.items()},
                              max_per_task=args.per_task)
    out: dict = {"benchmark": spec.name, "cross_task": cross.to_json(), "relations": {}}
    merged_rows: dict = {}
    expert_acc = None
    if args.results:
        section = json.loads(Path(args.results).read_text()).get("test", {})
        expert_acc = section.get("individual", {}).get("per_task")
        merged_rows = {k: v["per_task"] for k, v in section.items() if k != "individual" and "per_task" in v}
        for name, per_task in merged_rows.items():
            out["relations"][name] = relation(cross, per_task, expert_acc)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    first = "task_arithmetic_0.3" if "task_arithmetic_0.3" in merged_rows else next(iter(merged_rows), None)
    plot_cross_task(cross, folder / "cross_task.png", merged_rows.get(first) if first else None,
                    merged_label=first or "merged")
    atomic_write_text(folder / "cross_task.json", json.dumps(out, indent=1) + "\n")
    print(json.dumps({"matrix": cross.matrix, "cross_average": cross.cross_average(),
                      "pearson": {k: (v["pearson_cross_vs_merged"], v.get("pearson_cross_vs_normalized"))
                                  for k, v in out["relations"].items()}}, indent=1))
    return out


if __name__ == "__main__":
    main()
