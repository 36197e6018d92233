"""Inference cost of SE-Merging against the static merged model, measured in one run.

Times per sample, interleaved over ``--repeats`` rounds (median): the static Task Arithmetic model,
SE-Merging's reference (a model materialised per sample), exact batched, single-pass, fast
(grouped) and low-rank paths, and running all T experts (what an ensemble costs). Prints the ratios to the
static model and writes JSON.

    .venv/bin/python benchmarks/dynamic_inference.py --benchmark text5 --out runs/dynamic_inference.json

Uses the benchmark's cached experts (fine-tunes them first if the cache is empty).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mergelab.core.io import atomic_write_text
from mergelab.experiment.analysis.se_study import cost_study
from mergelab.experiment.runner import load_context
from mergelab.methods.dynamic import RouterConfig
from mergelab.pools.benchmarks import get_benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="text5")
    ap.add_argument("--samples", type=int, default=320, help="validation texts timed (spread over the tasks)")
    ap.add_argument("--reference-samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/dynamic_inference.json"))
    args = ap.parse_args()

    console = Console(stderr=True)
    ctx = load_context(get_benchmark(args.benchmark), console=console)
    cost = cost_study(ctx, n_samples=args.samples, n_reference=args.reference_samples, batch_size=args.batch_size,
                      repeats=args.repeats, config=RouterConfig())
    table = Table(title=f"{args.benchmark}: inference cost per sample ({cost['threads']} threads)")
    for col in ("path", "ms / sample", "x static"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for name, sec in cost["seconds_per_sample"].items():
        table.add_row(name, f"{1000 * sec:.2f}", f"{cost['ratio_to_static'][name]:.2f}")
    Console().print(table)
    Console().print(f"exact batched path: {cost['exact_speedup_over_reference']:.1f}x faster than the reference")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"benchmark": args.benchmark, **cost}, indent=2) + "\n")
    Console().print(f"written {args.out}")


if __name__ == "__main__":
    main()
