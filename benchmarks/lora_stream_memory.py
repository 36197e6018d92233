"""Peak memory of `mergelab merge` with LoRA adapters: streamed (the default) against in memory (issue 16).

    .venv/bin/python benchmarks/lora_stream_memory.py --out runs/lora_stream_memory.json

A base of ``--weights`` float32 weights of ``--dim`` x ``--dim`` (random, made here, 2 shards) and two adapters of
rank ``--rank`` on every weight; each merge runs in its own process through the CLI's merge function
(``merge_flags``), which reports the growth of its peak RSS over the RSS after the imports (``/proc/self/clear_refs``
resets the peak) and the seconds. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def make_inputs(root: Path, weights: int, dim: int, rank: int) -> tuple[str, dict[str, str]]:
    import torch

    from mergelab.core.lora import LoraModule
    from mergelab.methods.lora import save_adapter
    from mergelab.methods.streaming.files import ShardedWriter

    g = torch.Generator().manual_seed(0)
    pre = {f"layer{i}.weight": torch.randn(dim, dim, generator=g) for i in range(weights)}
    keys = list(pre)
    (root / "pre").mkdir()
    # two shards (and their index), written by the streamed merge's own shard writer
    writer = ShardedWriter(root / "pre", [(k, t.dtype, tuple(t.shape)) for k, t in pre.items()],
                           shard_size=-(-weights // 2) * dim * dim * 4)
    for k, t in pre.items():
        writer.begin(k)
        writer.write(t)
    writer.close()

    adapters = {name: str(save_adapter({k: LoraModule(k, k[:-7], torch.randn(dim, rank, generator=g) * 0.01,
                                                      torch.randn(rank, dim, generator=g) / dim ** 0.5, 1.0)
                                        for k in keys}, root / name)) for name in ("a", "b")}
    return str(root / "pre"), adapters


def _peak_rss_growth(fn) -> tuple[float, float]:
    """(peak RSS growth in MB while ``fn`` runs, seconds): the peak is reset to the current RSS first."""
    import time

    def field(name: str) -> int:
        with open("/proc/self/status") as fh:
            return 1024 * next(int(line.split()[1]) for line in fh if line.startswith(name))

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    start_rss, t0 = field("VmRSS:"), time.perf_counter()
    fn()
    return (field("VmHWM:") - start_rss) / 2**20, time.perf_counter() - t0


def _child(spec: str) -> None:
    """One merge in this (fresh) process; prints its measurement as JSON."""
    import torch

    from mergelab.experiment.commands import merge_flags

    job = json.loads(spec)
    torch.empty(1).add_(1)  # torch's arenas before the baseline
    growth, seconds = _peak_rss_growth(lambda: merge_flags(job["method"], job["base"], job["adapters"], job["params"],
                                                           Path(job["out"]), stream=job["stream"], progress=False))
    print(json.dumps({"rss_growth_mb": growth, "seconds": seconds}))


def measure(base: str, adapters: dict[str, str], method: str, params: dict, stream: bool, out: Path) -> dict:
    spec = json.dumps({"method": method, "base": base, "adapters": adapters, "params": params, "stream": stream,
                       "out": str(out)})
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=int, default=8)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default="runs/lora_stream_memory.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child)
        return {}
    from mergelab.core.io import atomic_write_text

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapters = make_inputs(root, args.weights, args.dim, args.rank)
        for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.2})):
            for stream in (True, False):
                got = measure(base, adapters, method, params, stream, root / f"out-{method}-{stream}")
                rows.append({"method": method, "path": "streamed" if stream else "in memory", **got})
                print(f"{method:16s} {rows[-1]['path']:10s} RSS growth {got['rss_growth_mb']:7.1f} MB  "
                      f"{got['seconds']:.2f} s", flush=True)
    result = {"base_mb": args.weights * args.dim * args.dim * 4 / 2**20, "rank": args.rank, "adapters": 2,
              "rows": rows}
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
