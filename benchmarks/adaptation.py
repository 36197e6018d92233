"""Cost of test-time adaptation on a named benchmark: seconds per step and total, against a naive loop.

SyMerge's expert pseudo-labels depend only on the (fixed) adaptation texts, so mergelab computes them
once, before the loop, and tokenizes every text once. The naive loop re-tokenizes each batch and
re-runs the task's expert on it at every step. Both loops see the same batches (same seed) and reach
the same coefficients (tests/test_adaptive.py checks this); only the time differs. Layer-wise
AdaMerging's step (the merged parameters built once per step for all tasks) is timed too.

    .venv/bin/python benchmarks/adaptation.py --benchmark text5 --steps 20 --out runs/adaptation.json

Uses the cached experts (``mergelab bench`` trains them on a miss). Writes JSON atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="text5")
    ap.add_argument("--steps", type=int, default=20, help="timed optimiser steps per variant (SyMerge: 1 task each)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, thread pools)")
    ap.add_argument("--adamerging-steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cache", default=None, help="expert cache (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    ap.add_argument("--out", default="runs/adaptation.json")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.adamerging_steps < 1:
        ap.error("--steps and --adamerging-steps must be positive, --warmup non-negative")

    import torch

    from mergelab.core.io import atomic_write_text
    from mergelab.core.statedict import task_vectors
    from mergelab.experiment.runner import load_context
    from mergelab.methods.adaptive import adamerging, symerge
    from mergelab.methods.adaptive.adamerging import DEFAULT_ADAMERGING_STEPS
    from mergelab.methods.adaptive.symerge import DEFAULT_SYMERGE_STEPS
    from mergelab.pools.benchmarks import get_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_benchmark(args.benchmark)
    ctx = load_context(spec, cache_dir=args.cache, progress=False)
    splits, family, pre, bodies, heads = ctx.splits, ctx.family, ctx.pretrained, ctx.experts, ctx.heads
    texts = {t: list(s["test"].texts) for t, s in splits.items()}  # texts only
    vectors = task_vectors(pre, bodies)
    n = args.warmup + args.steps

    def per_step(fn, **kw):
        """Seconds per step after ``warmup`` steps: the difference of two runs (n and warmup steps)."""
        full, _ = fn(steps_override=n, **kw)
        if args.warmup:
            warm, _ = fn(steps_override=args.warmup, **kw)
            return (full.seconds - warm.seconds) / args.steps, full, warm
        return full.seconds / args.steps, full, None

    def run_sy(steps_override, **kw):
        t0 = time.perf_counter()
        res = symerge(family, pre, vectors, heads, texts, experts=bodies, steps=steps_override, progress=False, **kw)
        return res, time.perf_counter() - t0

    def run_ada(steps_override, **kw):
        t0 = time.perf_counter()
        res = adamerging(family, pre, vectors, heads, texts, granularity="layer", steps=steps_override,
                         progress=False, **kw)
        return res, time.perf_counter() - t0

    load0 = os.getloadavg()[0]
    cached_step, cached, _ = per_step(run_sy)
    naive_step, naive, _ = per_step(run_sy, cache_pseudo_labels=False, cache_tokens=False)
    n_ada = args.adamerging_steps
    ada_full, _ = run_ada(n_ada + 1)
    ada_warm, _ = run_ada(1)
    ada_step = (ada_full.seconds - ada_warm.seconds) / n_ada
    same = bool(torch.allclose(cached.coefficients.raw, naive.coefficients.raw, atol=1e-4))

    sy_default = DEFAULT_SYMERGE_STEPS
    out = {
        "benchmark": spec.name,
        "tasks": list(texts),
        "adaptation_texts": {t: len(v) for t, v in texts.items()},
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "symerge": {
            "cached": {"seconds_per_step": round(cached_step, 4), "setup_seconds": round(cached.setup_seconds, 2)},
            "naive": {"seconds_per_step": round(naive_step, 4), "setup_seconds": round(naive.setup_seconds, 2)},
            "per_step_speedup": round(naive_step / cached_step, 3),
            "default_steps": sy_default,
            "default_total_seconds": {
                "cached": round(cached.setup_seconds + sy_default * cached_step, 1),
                "naive": round(naive.setup_seconds + sy_default * naive_step, 1),
            },
            "same_coefficients": same,
        },
        "adamerging_layerwise": {
            "seconds_per_step": round(ada_step, 4),
            "setup_seconds": round(ada_full.setup_seconds, 2),
            "default_steps": DEFAULT_ADAMERGING_STEPS,
            "default_total_seconds": round(ada_full.setup_seconds + DEFAULT_ADAMERGING_STEPS * ada_step, 1),
            "batch_per_task": 16,
        },
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0],
            "loadavg_1min_before": round(load0, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
        },
        "command": "python benchmarks/adaptation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    sy = out["symerge"]
    out["symerge"]["default_total_speedup"] = round(
        sy["default_total_seconds"]["naive"] / sy["default_total_seconds"]["cached"], 3)
    atomic_write_text(Path(args.out), json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
