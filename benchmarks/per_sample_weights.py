"""Forming per-sample weights for one linear layer: fresh tensors against one reused buffer, measured in one run.

SE-Merging's exact path runs each sample through ``W_b = W_0 + sum_t C[b, t] tau_t`` (``core/functional.py``).
This times, for MiniLM's three linear shapes, the mix and the batched product ``x_b W_b^T`` written four ways:

- ``fresh``: ``W_0 + einsum(C, tau)``, two new ``[B, out, in]`` tensors (the code before the buffer);
- ``in_place``: one new tensor from ``einsum``, ``W_0`` added in place;
- ``split``: ``einsum`` only, ``x W_0^T`` as a separate static product;
- ``buffer``: ``core.functional._Scratch.mixed``, the code ``per_sample_mixing`` runs when no gradient is needed
  (``torch.mm(C, tau, out=buffer)`` into a buffer reused across calls, ``W_0`` added in place).

Median of ``--repeats`` interleaved rounds, in ms, and each variant's ratio to ``fresh``; all four agree to
float32 rounding (checked before timing).

    .venv/bin/python benchmarks/per_sample_weights.py [--batch 64] [--tokens 40] [--tasks 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mergelab.core.functional import _Scratch


def variants(w0: torch.Tensor, tau: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> dict:
    scratch = _Scratch()

    def fresh():
        w = w0.unsqueeze(0) + torch.einsum("bt,t...->b...", c, tau)
        return torch.bmm(x, w.transpose(1, 2))

    def in_place():
        w = torch.einsum("bt,t...->b...", c, tau)
        w += w0
        return torch.bmm(x, w.transpose(1, 2))

    def split():
        w = torch.einsum("bt,t...->b...", c, tau)
        return torch.bmm(x, w.transpose(1, 2)).add_(F.linear(x, w0))

    def buffer():
        return torch.bmm(x, scratch.mixed(w0, tau, c).transpose(1, 2))

    return {"fresh": fresh, "in_place": in_place, "split": split, "buffer": buffer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"batch {args.batch}, {args.tokens} tokens, T = {args.tasks}, {torch.get_num_threads()} threads")
    print("| out x in | fresh ms | in_place ms | split ms | buffer ms | buffer / fresh |")
    print("|---|---:|---:|---:|---:|---:|")
    for out_f, in_f in ((1536, 384), (384, 1536), (384, 384)):
        w0 = torch.randn(out_f, in_f, generator=g)
        tau = 0.05 * torch.randn(args.tasks, out_f, in_f, generator=g)
        c = torch.rand(args.batch, args.tasks, generator=g)
        x = torch.randn(args.batch, args.tokens, in_f, generator=g)
        fs = variants(w0, tau, c, x)
        ref = fs["fresh"]()
        for name, f in fs.items():
            torch.testing.assert_close(f(), ref, rtol=1e-4, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
        times: dict[str, list[float]] = {n: [] for n in fs}
        for _ in range(args.repeats):
            for name, f in fs.items():
                t0 = time.perf_counter()
                f()
                times[name].append(1000 * (time.perf_counter() - t0))
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"| {out_f} x {in_f} | {med['fresh']:.1f} | {med['in_place']:.1f} | {med['split']:.1f} | "
              f"{med['buffer']:.1f} | {med['buffer'] / med['fresh']:.2f} |")


if __name__ == "__main__":
    main()
