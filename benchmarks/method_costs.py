"""What each method needs and costs on text5 (issue 19): the README's cost table.

Each method row runs alone in its own ``mergelab bench --row ROW`` child process on the same benchmark, so
that the child's peak resident memory (``ru_maxrss`` from ``os.wait4``) is that row's, on top of what every
run holds (the data, the backbone, the experts and the two reference rows). Per row, from the child's
results.json and its exit status:

- **reads**: the data the row reads beyond the input it scores (the row's ``data``: nothing, unlabeled
  inputs of the evaluated tasks, calibration inputs of known task, labeled validation data);
- **adaptation s**: test-time adaptation (AdaMerging, SyMerge) or the static row's merge and validation
  search;
- **inference x static**: seconds to produce the row's test predictions per text, over Task Arithmetic
  0.3's test evaluation in the same run (the first row, the baseline). A dynamic row's time is its whole
  ``dynamic`` phase (the model's set-up, calibration where it reads it, routing and the per-sample forward),
  so the multiple includes that one-off set-up;
- **peak RSS**: the child's peak resident memory, and its difference from the baseline row's child.

    python benchmarks/method_costs.py [--benchmark text5-demo] [--row ROW ...] [--out runs/method_costs.json]

The experts must be in the cache already (run the benchmark once), or the first child fine-tunes them and its
time and memory are wrong. Prints a Markdown table; ``--out`` also keeps every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = "task_arithmetic_0.3"
ROWS = (BASELINE, "ties", "se_merging_task_arithmetic", "se_merging_task_arithmetic_cached",
        "se_prototype_task_arithmetic", "se_prototype_task_arithmetic_fast", "adamerging_taskwise",
        "adamerging_layerwise", "adamerging_plusplus", "symerge")


def run_row(benchmark: str, row: str, out: Path, cache: str | None) -> dict:
    """Run one row in a child ``mergelab bench``; its results, wall seconds and peak RSS (MB)."""
    cmd = [sys.executable, "-m", "mergelab.cli", "bench", "--benchmark", benchmark, "--row", row,
           "--out", str(out), "-q"]
    if cache:
        cmd += ["--cache", cache]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"row {row}: mergelab bench failed:\n{output[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    if any(not e.get("cache_hit") for e in results.get("experts", {}).values()):
        raise SystemExit(f"row {row}: the experts were not cached; run `mergelab bench --benchmark {benchmark}` first")
    return {"results": results, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def summarise(row: str, child: dict, n_test: int) -> dict:
    r = child["results"]["methods"][row]
    timing = r.get("timing") or {}
    setup = sum(v for k, v in timing.items() if k in ("merge", "merge_and_search", "adaptive"))
    infer = timing.get("dynamic", 0.0) + timing.get("evaluation", 0.0)
    return {"row": row, "method": r.get("method", row), "kind": r.get("kind"), "reads": r.get("data"),
            "average": r["average"], "adaptation_s": setup, "inference_s": infer,
            "inference_s_per_text": infer / n_test, "peak_rss_mb": child["peak_rss_mb"], "wall_s": child["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="text5-demo")
    ap.add_argument("--row", action="append", default=None, help=f"rows (default: {', '.join(ROWS)}); {BASELINE} always runs first")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [BASELINE, *[r for r in (args.row or ROWS) if r != BASELINE]]
    out = []
    with tempfile.TemporaryDirectory(prefix="method_costs_") as tmp:
        for i, row in enumerate(rows):
            print(f"[{i + 1}/{len(rows)}] {row}", file=sys.stderr, flush=True)
            child = run_row(args.benchmark, row, Path(tmp) / row, args.cache)
            n_test = sum(s["test"] for s in child["results"]["splits"].values())
            out.append(summarise(row, child, n_test))
    base = out[0]
    print("| row | kind | reads | average | adaptation s | inference x static | peak RSS MB | RSS over static MB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in out:
        r["inference_x_static"] = r["inference_s_per_text"] / base["inference_s_per_text"]
        r["rss_over_static_mb"] = r["peak_rss_mb"] - base["peak_rss_mb"]
        print(f"| {r['row']} | {r['kind']} | {r['reads']} | {100 * r['average']:.1f} | {r['adaptation_s']:.1f} | "
              f"{r['inference_x_static']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_over_static_mb']:+.0f} |")
    if args.out:
        from mergelab.core.atomic import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({"benchmark": args.benchmark, "baseline": BASELINE, "rows": out,
                                              "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
