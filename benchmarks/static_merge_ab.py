"""A/B of one streamed merge between two checkouts of mergelab, in process (one worker thread unless ``--threads``).

Runs ``stream_merge`` on the GPT-2-shaped files that ``benchmarks/static_merge.py`` builds (its cache
directory), with the code under ``--baseline`` (another checkout's ``src``, e.g. a ``git worktree`` of
the commit before a change) and under this checkout's ``src``, alternating which goes first in each
round, each in a fresh interpreter. Reports wall and CPU seconds (``time.process_time``: less sensitive
to other jobs on a shared machine than wall time) and, per round, the ratios new / baseline. With
``--threads 2`` the wall ratio is the one to read: contention between the workers (the GIL held by
per-slice Python and numpy calls) shows in wall time, not in CPU time.

    git worktree add /tmp/mergelab-base <commit>
    python benchmarks/static_merge_ab.py --baseline /tmp/mergelab-base/src --methods dare ties --rounds 2
    python benchmarks/static_merge_ab.py --baseline /tmp/mergelab-base/src --threads 2 --rounds 3
    python benchmarks/static_merge_ab.py --baseline /tmp/mergelab-base/src --startup --rounds 3

``--startup`` instead measures what ``mergelab merge`` imports before it reads a byte: the CPU seconds
of importing the third-party packages (torch, numpy, pydantic, typer, yaml, rich) and then mergelab's
CLI, command and streaming modules, in a fresh interpreter per checkout and round.

``--cli`` runs the whole command instead, as users do (``python -m mergelab.cli -q merge ...`` with the
checkout's ``src`` first on ``PYTHONPATH``, two worker threads): wall time from outside, the merge's own
time as the command prints it, and their difference, the start-up and exit around the merge.

    python benchmarks/static_merge_ab.py --baseline /tmp/mergelab-base/src --cli --methods task_arithmetic --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))
HERE = Path(__file__).resolve().parent.parent / "src"

PARAMS = {
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.3}),
    "average": ("average", {}),
    "dare": ("dare", {"drop_rate": 0.9, "scaling": 0.3, "seed": 0}),
    "ties": ("ties", {"density": 0.2, "scope": "tensor"}),
    "ties_global": ("ties", {"density": 0.2, "scope": "global"}),
}

CHILD = r"""
import json, os, shutil, sys, time
src, method, params, root, T, out, threads = (sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4],
                                              int(sys.argv[5]), sys.argv[6], int(sys.argv[7]))
sys.path.insert(0, src)
import torch
torch.set_num_threads(threads)
from mergelab.methods.streaming import stream_merge
shutil.rmtree(out, ignore_errors=True)
t0, c0 = time.perf_counter(), time.process_time()
stream_merge(method, f"{root}/pretrained", {f"e{i}": f"{root}/expert_{i}" for i in range(T)}, out, threads=threads, **params)
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
shutil.rmtree(out, ignore_errors=True)
"""


STARTUP = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
t0 = time.process_time()
import numpy, pydantic, rich.console, rich.table, torch, typer, yaml
t1 = time.process_time()
import mergelab.cli, mergelab.experiment.commands, mergelab.methods.streaming
t2 = time.process_time()
print(json.dumps({"third_party_cpu_s": t1 - t0, "mergelab_cpu_s": t2 - t1,
                  "mergelab_modules": sorted(m for m in sys.modules if m.startswith("mergelab"))}))
"""


def cli_run(src: str, name: str, root: Path, T: int, out: Path) -> dict:
    """``mergelab -q merge`` of one method under checkout ``src``: wall, the printed merge time, the rest."""
    import re
    import shutil
    import time

    method, params = PARAMS[name]
    cmd = [sys.executable, "-m", "mergelab.cli", "-q", "merge", "--method", method, "--pretrained", f"{root}/pretrained",
           "--out", str(out), "--shard-size", "2GB"]
    for key, value in params.items():
        cmd += ["--param", f"{key}={value}"]
    for i in range(T):
        cmd += ["--expert", f"e{i}={root}/expert_{i}"]
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": src, "COLUMNS": "1000"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    merge = float(re.search(r" in ([0-9.]+)s ->", proc.stdout.replace("\n", " ")).group(1))
    return {"wall_s": wall, "merge_s": merge, "outside_merge_s": wall - merge}


def startup(src: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", STARTUP, src], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(src: str, name: str, root: Path, T: int, out: Path, threads: int = 1) -> dict:
    method, params = PARAMS[name]
    proc = subprocess.run([sys.executable, "-c", CHILD, src, method, json.dumps(params), str(root), str(T), str(out),
                           str(threads)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the other checkout's src directory")
    ap.add_argument("--methods", nargs="+", default=list(PARAMS), choices=list(PARAMS))
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="worker threads of each merge (default 1)")
    ap.add_argument("--root", type=Path, default=CACHE / "static_merge_bench" / "gpt2")
    ap.add_argument("--out", type=Path, default=Path("runs/static_merge_ab.json"))
    ap.add_argument("--startup", action="store_true", help="measure the imports of `mergelab merge` instead")
    ap.add_argument("--cli", action="store_true", help="time the whole `mergelab -q merge` command instead")
    args = ap.parse_args(argv)
    if args.startup:
        got: dict[str, list[dict]] = {"baseline": [], "new": []}
        for r in range(args.rounds):
            order = [("baseline", args.baseline), ("new", str(HERE))]
            for label, src in (order if r % 2 == 0 else order[::-1]):
                got[label].append({**startup(src), "load_average": os.getloadavg()[0]})
        result = {"command": "python benchmarks/static_merge_ab.py " + " ".join(sys.argv[1:]), "startup": got}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        for label, runs in got.items():
            third = ", ".join(f"{x['third_party_cpu_s']:.2f}" for x in runs)
            own = ", ".join(f"{x['mergelab_cpu_s']:.2f}" for x in runs)
            print(f"{label:8s} third-party {third} CPU s; mergelab {own} CPU s; "
                  f"{len(runs[0]['mergelab_modules'])} mergelab modules")
        return result
    if args.cli:
        return cli_ab(args)
    if not (args.root / "pretrained").is_dir():
        sys.exit(f"{args.root}: no models; run benchmarks/static_merge.py --T {args.T} first (it builds them)")
    rows = []
    for name in args.methods:
        runs = alternate(args, name, lambda src, label, name=name: run(src, name, args.root, args.T, args.out.parent / f"ab_{label}",
                                                            args.threads),
                         lambda got: f"wall {got['wall_s']:6.1f} s  cpu {got['cpu_s']:6.1f} s")
        ratios = [n["cpu_s"] / b["cpu_s"] for n, b in zip(runs["new"], runs["baseline"])]
        walls = [n["wall_s"] / b["wall_s"] for n, b in zip(runs["new"], runs["baseline"])]
        rows.append({"method": name, "runs": runs, "cpu_ratio_new_over_baseline": ratios,
                     "median_cpu_ratio": statistics.median(ratios), "wall_ratio_new_over_baseline": walls,
                     "median_wall_ratio": statistics.median(walls)})
    result = {"command": "python benchmarks/static_merge_ab.py " + " ".join(sys.argv[1:]), "T": args.T, "threads": args.threads,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for row in rows:
        print(f"{row['method']:16s} new / baseline: wall {row['median_wall_ratio']:.2f} "
              f"({', '.join(f'{x:.2f}' for x in row['wall_ratio_new_over_baseline'])}), "
              f"cpu {row['median_cpu_ratio']:.2f} ({', '.join(f'{x:.2f}' for x in row['cpu_ratio_new_over_baseline'])})")
    return result


def alternate(args: argparse.Namespace, name: str, measure, describe) -> dict[str, list[dict]]:
    """``measure(src, label)`` for the baseline and this checkout in every round, the baseline first in odd
    rounds; each result gets the load average and a line on stderr (``describe(result)``)."""
    runs: dict[str, list[dict]] = {"baseline": [], "new": []}
    for r in range(args.rounds):
        order = [("baseline", args.baseline), ("new", str(HERE))]
        for label, src in (order if r % 2 == 0 else order[::-1]):
            got = {**measure(src, label), "load_average": os.getloadavg()[0]}
            runs[label].append(got)
            print(f"{name:16s} {label:8s} round {r + 1}: {describe(got)}, load {got['load_average']:.1f}", file=sys.stderr)
    return runs


def cli_ab(args: argparse.Namespace) -> dict:
    rows = []
    for name in args.methods:
        runs = alternate(args, name, lambda src, label, name=name: cli_run(src, name, args.root, args.T,
                                                                args.out.parent / f"ab_cli_{label}"),
                         lambda got: f"wall {got['wall_s']:5.2f} s, merge {got['merge_s']:4.1f} s, "
                                     f"outside the merge {got['outside_merge_s']:5.2f} s")
        med = {label: {k: statistics.median(x[k] for x in xs) for k in ("wall_s", "merge_s", "outside_merge_s")}
               for label, xs in runs.items()}
        rows.append({"method": name, "runs": runs, "median": med})
        print(f"{name:16s} median wall {med['baseline']['wall_s']:.2f} -> {med['new']['wall_s']:.2f} s; outside the merge "
              f"{med['baseline']['outside_merge_s']:.2f} -> {med['new']['outside_merge_s']:.2f} s")
    result = {"command": "python benchmarks/static_merge_ab.py " + " ".join(sys.argv[1:]), "T": args.T, "cli": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
