"""Where DARE's per-slice time goes: each step of a streamed DARE merge on one slice, one thread.

For one (task, slice) of ``--n`` entries (default 262,144, the engine's slice for DARE), times the
steps of ``mergelab.core.kernels.drop_`` and of the merge around it, each as the median of ``--reps``
calls, and a few alternatives to the masked multiply that were tried:

- ``pcg64_bytes``: ``PCG64.random_raw`` for n / 8 words (one byte per entry);
- ``compare_threshold``: byte >= the threshold's top byte (numpy);
- ``ties``: finding the entries whose byte equals the top byte (1 in 256) and hashing them (SplitMix64);
- ``keep_mask``: ``dare_keep_mask`` whole (the three above plus call overhead);
- ``masked_multiply_uint8``: ``tau.mul_(keep as uint8)``, what ``drop_`` does; ``..._bool``,
  ``masked_fill``, ``numpy_multiply``, ``numpy_copyto_where``: the alternatives;
- ``rescale``: ``tau.mul_(1 / (1 - p))``; ``drop_``: the whole drop;
- ``sub`` and ``add_alpha``: forming tau = e - p and adding lambda tau, which Task Arithmetic does too.

These repeat one call on the same warm data: lower bounds. ``in_sequence`` times the steps as the
engine runs them for one task and slice (sub, mask, masked multiply, rescale, add), on fresh inputs each
time (a new slice of expert values, a new slice position): what a merge pays.

    python benchmarks/dare_kernels.py --out runs/dare_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mergelab.core import kernels


def timed(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e6


def in_sequence(n: int, p: float, reps: int) -> dict[str, float]:
    """One task's DARE steps on one slice, as the engine runs them, each timed; fresh inputs every time."""
    pre, acc, tau = torch.randn(n), torch.zeros(n), torch.empty(n)
    experts = torch.randn(8, n)
    times: dict[str, list[float]] = {k: [] for k in ("sub", "keep_mask", "masked_multiply_uint8", "rescale",
                                                     "add_alpha", "total")}
    for r in range(reps + 1):
        e = experts[r % 8]
        e.normal_()  # new values: nothing of the last round stays warm
        start = 8 * 4096 * (r + 1)
        t0 = time.perf_counter()
        torch.sub(e, pre, out=tau)
        t1 = time.perf_counter()
        keep = kernels.dare_keep_mask(0, f"task{r % 8}", "key", p, start, n)
        t2 = time.perf_counter()
        tau.mul_(torch.from_numpy(keep.view(np.uint8)))
        t3 = time.perf_counter()
        tau.mul_(1.0 / (1.0 - p))
        t4 = time.perf_counter()
        acc.add_(tau, alpha=0.3)
        t5 = time.perf_counter()
        if r:  # the first round warms up
            for k, (a, b) in zip(times, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t0, t5))):
                times[k].append(b - a)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 18)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--drop-rate", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=Path("runs/dare_kernels.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n, p = args.n, args.drop_rate
    start = 8 * 4096  # a slice inside the tensor: the generator jumps ahead
    top, rest = kernels.dare_threshold(p)
    g = np.random.PCG64(0)
    u = g.random_raw(n // 8).view(np.uint8)
    keep = kernels.dare_keep_mask(0, "task", "key", p, start, n)
    drop = ~keep
    keep_u8 = torch.from_numpy(keep.view(np.uint8))
    keep_b, drop_b = torch.from_numpy(keep), torch.from_numpy(drop)
    e, pre, tau, acc = torch.randn(n), torch.randn(n), torch.randn(n), torch.randn(n)
    tau_np = tau.numpy()
    seed = kernels.dare_seed(0, "task", "key")

    def ties() -> None:
        tied = np.flatnonzero(u == np.uint8(top))
        kernels.splitmix64(seed ^ 0x5DA5E, tied + start)

    steps = {
        "pcg64_bytes": lambda: g.random_raw(n // 8),
        "compare_threshold": lambda: u >= np.uint8(top),
        "ties": ties,
        "keep_mask": lambda: kernels.dare_keep_mask(0, "task", "key", p, start, n),
        "masked_multiply_uint8": lambda: tau.mul_(keep_u8),
        "masked_multiply_bool": lambda: tau.mul_(keep_b),
        "masked_fill": lambda: tau.masked_fill_(drop_b, 0.0),
        "numpy_multiply": lambda: np.multiply(tau_np, keep, out=tau_np),
        "numpy_copyto_where": lambda: np.copyto(tau_np, 0, where=drop),
        "rescale": lambda: tau.mul_(1.0 / (1.0 - p)),
        "drop_": lambda: kernels.drop_(tau, p, 0, "task", "key", start),
        "sub": lambda: torch.sub(e, pre, out=tau),
        "add_alpha": lambda: acc.add_(tau, alpha=0.3),
    }
    us = {name: timed(fn, args.reps) for name, fn in steps.items()}
    seq = in_sequence(n, p, args.reps)
    result = {"command": "python benchmarks/dare_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "n": n, "drop_rate": p, "threads": 1, "median_us": us, "in_sequence_median_us": seq}
    for name, v in us.items():
        print(f"{name:24s} {v:8.1f} us")
    print("in sequence, fresh inputs: " + ", ".join(f"{k} {v:.1f}" for k, v in seq.items()) + " us")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
