"""Where a `mergelab bench` run spent its time, from its results.json: fine-tuning, searches, SE-Merging,
adaptation, test evaluations, and the rest (start-up, data, loading the experts).

Each row of results.json records its phases under ``timing`` (seconds): ``merge`` or
``merge_and_search`` (a static row: merging, and the scaling search on validation data), ``dynamic``
(SE-Merging: routing and the per-sample forward of the test inputs), ``adaptive`` (AdaMerging / SyMerge:
adaptation), ``evaluation`` (the test evaluation that follows). ``experts`` records each expert's
fine-tuning seconds and whether it came from the cache.

    python benchmarks/demo_profile.py runs/demo/results.json [--wall SECONDS]

``--wall``: the command's wall time (e.g. from ``time``), to show what lies outside ``seconds_total``
(the interpreter start and imports).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def profile(results: dict, wall: float | None = None) -> list[tuple[str, float]]:
    phases: dict[str, float] = defaultdict(float)
    setup = results.get("setup_seconds", {})
    trained = any(not e.get("cache_hit") for e in results.get("experts", {}).values())
    if "experts" in setup:
        phases["fine-tuning the experts" if trained else "reading the experts from the cache"] = setup["experts"]
    if "data_and_backbone" in setup:
        phases["data and backbone"] = setup["data_and_backbone"]
    for row in results["methods"].values():
        timing = row.get("timing") or {}
        if not timing:  # reference rows (individual, pretrained) are one evaluation each
            phases["test evaluation"] += row.get("seconds", 0.0)
            continue
        for key, seconds in timing.items():
            label = {"merge": "static merges", "merge_and_search": "static merges + validation searches",
                     "dynamic": "SE-Merging (routing + per-sample forward)", "adaptive": "adaptation",
                     "evaluation": "test evaluation"}.get(key, key)
            phases[label] += seconds
    total = float(results.get("seconds_total") or 0.0)
    rest = total - sum(phases.values())
    phases["the rest (features shared by rows, reports)"] = max(0.0, rest)
    if wall is not None:
        phases["interpreter start and imports (wall - seconds_total)"] = max(0.0, wall - total)
    return sorted(phases.items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--wall", type=float, default=None)
    args = ap.parse_args()
    with open(args.results, encoding="utf-8") as f:
        results = json.load(f)
    rows = profile(results, args.wall)
    total = sum(s for _, s in rows)
    print("| phase | seconds | share |\n|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.0f} | {100 * seconds / total:.0f}% |")
    print(f"| **total** | **{total:.0f}** | |")
    print("\n| row | seconds | phases |\n|---|---:|---|")
    for name, row in results["methods"].items():
        timing = ", ".join(f"{k} {v:.0f}" for k, v in (row.get("timing") or {}).items())
        print(f"| {name} | {row.get('seconds', 0):.0f} | {timing} |")
    experts = results.get("experts", {})
    if experts:
        print("\n| expert | cache | train seconds | steps |\n|---|---|---:|---:|")
        for task, e in experts.items():
            print(f"| {task} | {'hit' if e.get('cache_hit') else 'trained'} | {e.get('train_seconds', 0):.0f} | {e.get('steps', '')} |")


if __name__ == "__main__":
    main()
