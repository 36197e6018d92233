"""What running a sweep's trials as Ray tasks costs against running them in this process (docs/cluster.md).

Builds a tiny pool (a 2-layer BERT of width 32, three experts, three 60-example CSV tasks) in a temporary
folder and runs the same sweep of N Task Arithmetic trials (each a merge and an evaluation on test, about
30 ms of work) four ways, with the driver's tables written as usual and no plots:

- ``inline``: every trial in this process (``mergelab sweep --executor inline``);
- ``ray x1``: a local Ray with 1 CPU, so trials run one at a time as in-process, each a Ray task;
- ``ray x2``: a local Ray with 2 CPUs, two workers.

Each is run cold (first sweep: the pool is loaded, Ray's workers start and import torch) and warm (a second
sweep with another seed into the same folder: N new trials, the pool already loaded in each process).
Per-trial overhead = (wall time of the warm sweep - the sum of the trials' own times) / N, with the
trials' own time from their records. It also times ``ray.init`` and a no-op task's round trip.

    .venv/bin/python benchmarks/sweep_overhead.py              # N = 40
    .venv/bin/python benchmarks/sweep_overhead.py --trials 80 --json runs/sweep_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny_models import VOCAB, save_tiny_bert  # noqa: E402

from mergelab.experiment.sweep import parse_sweep_config, run_sweep  # noqa: E402


def build_pool(root: Path) -> dict:
    from safetensors.torch import load_file, save_file

    pre = save_tiny_bert(root / "pre", seed=0)
    weights = load_file(str(pre / "model.safetensors"))
    words = VOCAB[5:]
    experts, tasks = {}, {}
    for k in range(3):
        g = torch.Generator().manual_seed(k + 1)
        d = root / f"e{k}"
        d.mkdir()
        save_file({n: w + 0.05 * torch.randn(w.shape, generator=g) if w.is_floating_point() else w
                   for n, w in weights.items()}, str(d / "model.safetensors"))
        save_file({"weight": torch.randn(2, 32, generator=g), "bias": torch.zeros(2)}, str(d / "head.safetensors"))
        w = words[k * 8 : (k + 1) * 8]
        rows = ["text,label"] + [f"{w[i % 4]} {w[4 + (i * 3) % 4]} {w[(i * 5) % 8]},{i % 2}" for i in range(60)]
        (root / f"t{k}.csv").write_text("\n".join(rows) + "\n")
        experts[f"t{k}"] = str(d)
        tasks[f"t{k}"] = {"path": str(root / f"t{k}.csv")}
    return {"family": "text", "pretrained": str(pre), "device": "cpu", "max_length": 12, "experts": experts,
            "tasks": tasks}


def config(pool: dict, n: int, seed: int):
    return parse_sweep_config(json.dumps({
        "name": "overhead", "pool": pool, "evaluation": {"validation_per_task": 10},
        "methods": [{"label": "ta", "name": "task_arithmetic", "select": "none",
                     "params": {"scaling": {"low": 0.05, "high": 1.0, "num": n}}}],
        "seeds": [seed]}))


def timed_sweep(pool: dict, n: int, seed: int, out: Path, executor: str) -> dict:
    t0 = time.perf_counter()
    run = run_sweep(config(pool, n, seed), out, executor=executor, progress=False, plots=False)
    wall = time.perf_counter() - t0
    trials = [r for _, r in run.entries if r.get("kind") == "trial" and r["id"] in set(run.ran)]
    own = sum(r["seconds"] for r in trials)
    assert len(trials) == n and not run.failed, (len(trials), run.failed)
    return {"wall_s": round(wall, 3), "trial_s_sum": round(own, 3), "per_trial_ms": round(1000 * wall / n, 2),
            "overhead_per_trial_ms": round(1000 * (wall - own) / n, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import ray

    torch.set_num_threads(1)  # as a 1-CPU trial runs
    out: dict = {"trials": args.trials, "cpu_count": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = build_pool(root)
        out["inline"] = {"cold": timed_sweep(pool, args.trials, 0, root / "inline", "inline"),
                         "warm": timed_sweep(pool, args.trials, 1, root / "inline", "inline")}
        for cpus in (1, 2):
            t0 = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            init = time.perf_counter() - t0
            res = {"ray_init_s": round(init, 2),
                   "cold": timed_sweep(pool, args.trials, 0, root / f"ray{cpus}", "ray"),
                   "warm": timed_sweep(pool, args.trials, 1, root / f"ray{cpus}", "ray")}
            if cpus == 1:
                noop = ray.remote(lambda: None)
                ray.get(noop.remote())
                t0 = time.perf_counter()
                for _ in range(200):
                    ray.get(noop.remote())
                res["noop_round_trip_ms"] = round(1000 * (time.perf_counter() - t0) / 200, 2)
            ray.shutdown()
            out[f"ray_x{cpus}"] = res
    inl = out["inline"]["warm"]
    for key in ("ray_x1", "ray_x2"):
        warm = out[key]["warm"]
        out[key]["warm_wall_ratio_to_inline"] = round(warm["wall_s"] / inl["wall_s"], 2)
        out[key]["extra_ms_per_trial_vs_inline"] = round(warm["per_trial_ms"] - inl["per_trial_ms"], 2)
    print(f"{args.trials} trials of ~{1000 * inl['trial_s_sum'] / args.trials:.0f} ms each (in-process, warm), "
          f"{os.cpu_count()} cores")
    print(f"{'':8} {'cold wall s':>11} {'warm wall s':>11} {'ms/trial':>9} {'overhead ms/trial':>18} {'ratio':>6}")
    for key, label in (("inline", "inline"), ("ray_x1", "ray x1"), ("ray_x2", "ray x2")):
        r = out[key]
        ratio = r.get("warm_wall_ratio_to_inline", 1.0)
        print(f"{label:8} {r['cold']['wall_s']:11.2f} {r['warm']['wall_s']:11.2f} {r['warm']['per_trial_ms']:9.1f} "
              f"{r['warm']['overhead_per_trial_ms']:18.1f} {ratio:6.2f}")
    print(f"ray.init: {out['ray_x1']['ray_init_s']} s (1 CPU), {out['ray_x2']['ray_init_s']} s (2 CPUs); no-op task "
          f"round trip {out['ray_x1']['noop_round_trip_ms']} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
