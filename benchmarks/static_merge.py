"""Static merges of a GPT-2-small-sized model: mergelab in memory, mergelab streamed, and mergekit.

Builds the checkpoints locally (no downloads): a pretrained model with GPT-2 small's tensors
(124M parameters, float32, random weights, one ``model.safetensors`` of ~500 MB) and T experts =
pretrained + Gaussian task vectors of std 1e-3 times each tensor's RMS. For each T (2, 4, 8) it times
Task Arithmetic, TIES (per-tensor top-k, as mergekit defines it, and mergelab's global top-k, the
paper's) and DARE-TIES as command-line runs, one subprocess each under ``/usr/bin/time`` for the peak
RSS, alternating the tools run by run, and reports medians and the ratio mergelab / mergekit. It also
measures the machine's copy, file-read and file-write bandwidth for the floor (bytes read and written
over bandwidth) and checks the outputs: streamed == in memory exactly, and mergekit's output against
mergelab's where the two define the method the same way.

mergekit is installed by this script into its own virtual environment (``--mergekit-venv``):
``torch==2.13.0`` first (the CPU wheel; a plain torch dependency would pull a multi-GB CUDA build),
then ``mergekit``. ``--no-mergekit`` skips it.

    python benchmarks/static_merge.py --T 2 4 8 --repeats 3 --out runs/static_merge.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
CACHE = Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))

# name -> (mergelab CLI params, mergekit method + per-model parameters + global parameters or None)
METHODS = {
    "task_arithmetic": (["--method", "task_arithmetic", "--param", "scaling=0.3"],
                        ("task_arithmetic", {"weight": 0.3}, {"normalize": False})),
    "ties": (["--method", "ties", "--param", "density=0.2", "--param", "scope=tensor", "--param", "scaling=1.0"],
             ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True})),
    "ties_global": (["--method", "ties", "--param", "density=0.2", "--param", "scope=global", "--param", "scaling=1.0"],
                    None),
    "dare_ties": (["--method", "dare", "--param", "drop_rate=0.9", "--param", "combine=ties", "--param", "density=1.0",
                   "--param", "scaling=1.0", "--param", "seed=0"],
                  ("dare_ties", {"weight": 1.0, "density": 0.1}, {"normalize": True})),
}
# how the two tools' outputs should agree
AGREEMENT = {
    "task_arithmetic": "same definition: should match to float32 rounding",
    "ties": "same definition except k = round(d n) here vs int(d n) there and tie/zero-sign handling; "
            "should match up to a few entries",
    "dare_ties": "different random masks (per-(task, tensor) generator here, torch.bernoulli there) and mergekit "
                 "rescales survivors to the task vector's L1 norm instead of 1/(1-p): not comparable entry by entry",
}


# ---------------------------------------------------------------- checkpoints


def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> dict[str, tuple[int, ...]]:
    """GPT-2's tensors, named as in the hub's ``model.safetensors`` (Conv1D weights are [in, out])."""
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d)}
    for i in range(n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def gpt2_config(n_layer: int, d: int, vocab: int, ctx: int) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": n_layer, "n_embd": d,
            "n_head": max(1, d // 64), "vocab_size": vocab, "n_positions": ctx, "n_ctx": ctx,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
            "bos_token_id": vocab - 1, "eos_token_id": vocab - 1, "torch_dtype": "float32"}


def build_models(root: Path, n_experts: int, shapes: dict, config: dict, tau_rel_std: float = 1e-3) -> tuple[Path, list[Path]]:
    """pretrained/ and expert_i/ directories (cached: an existing complete directory is reused)."""
    from safetensors.torch import save_file

    from mergelab.core.io import atomic_write_dir

    tag = json.dumps({"shapes": shapes, "config": config, "tau": tau_rel_std}, sort_keys=True)

    def make(path: Path, fn) -> Path:
        if (path / "model.safetensors").is_file() and (path / "spec.json").is_file() and (path / "spec.json").read_text() == tag:
            return path

        def fill(tmp: Path) -> None:
            save_file(fn(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            (tmp / "spec.json").write_text(tag)

        console.print(f"building {path}")
        return atomic_write_dir(path, fill)

    def pretrained() -> dict:
        g = torch.Generator().manual_seed(0)
        out = {}
        for k, s in shapes.items():
            if k.endswith("ln_1.weight") or k.endswith("ln_2.weight") or k == "ln_f.weight":
                out[k] = 1.0 + 0.02 * torch.randn(s, generator=g)
            else:
                out[k] = 0.02 * torch.randn(s, generator=g)
        return out

    pre_dir = make(root / "pretrained", pretrained)
    experts = []
    for i in range(n_experts):
        def expert(i=i) -> dict:
            from safetensors.torch import load_file

            base = load_file(str(pre_dir / "model.safetensors"))
            g = torch.Generator().manual_seed(1000 + i)
            for v in base.values():
                rms = float(v.pow(2).mean().sqrt())
                v.add_(torch.randn(v.shape, generator=g), alpha=tau_rel_std * rms)
            return base

        experts.append(make(root / f"expert_{i}", expert))
    return pre_dir, experts


# ---------------------------------------------------------------- mergekit


def ensure_mergekit(venv: Path) -> Path | None:
    """``mergekit-yaml`` from ``venv``, creating it (torch==2.13.0 CPU first, then mergekit) if needed."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.is_file():
        return exe
    console.print(f"installing mergekit into {venv} (torch==2.13.0 first, then mergekit)")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "mergekit"], check=True)
    except subprocess.CalledProcessError as exc:
        console.print(f"[red]mergekit could not be installed ({exc}); benchmarking mergelab only[/]")
        return None
    return exe if exe.is_file() else None


def mergekit_config(method: str, pre: Path, experts: list[Path]) -> str:
    import yaml

    mk_method, per_model, shared = METHODS[method][1]
    cfg = {
        "merge_method": mk_method,
        "base_model": str(pre),
        "models": [{"model": str(e), "parameters": dict(per_model)} for e in experts],
        "parameters": dict(shared),
        "dtype": "float32",
    }
    return yaml.safe_dump(cfg, sort_keys=False)


# ---------------------------------------------------------------- runs


def run_timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``cmd`` run under /usr/bin/time."""
    stats = Path(f"/tmp/static_merge_time_{os.getpid()}.txt")
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(stats), *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rss_kb = int(stats.read_text().strip().splitlines()[-1])
    stats.unlink(missing_ok=True)
    return wall, rss_kb / 1024


def mergelab_cmd(method: str, pre: Path, experts: list[Path], out: Path, stream: bool) -> list[str]:
    cmd = [sys.executable, "-m", "mergelab.cli", "merge", *METHODS[method][0], "--pretrained", str(pre), "--out", str(out)]
    for i, e in enumerate(experts):
        cmd += ["--expert", f"e{i}={e}"]
    return cmd + (["--stream"] if stream else [])


def mergekit_cmd(exe: Path, config: Path, out: Path) -> list[str]:
    return [str(exe), str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


# ---------------------------------------------------------------- agreement


def _tensors(directory: Path):
    from mergelab.methods.streaming.files import SafetensorsModel

    return SafetensorsModel(directory, str(directory))


def compare(a_dir: Path, b_dir: Path) -> dict:
    """Entry-by-entry comparison, one tensor at a time (keys matched with mergekit's 'transformer.' prefix dropped)."""
    a, b = _tensors(a_dir), _tensors(b_dir)
    bkeys = {k.removeprefix("transformer."): k for k in b.tensors}
    equal = True
    max_abs = 0.0
    n_diff = 0
    n = 0
    ref_scale = 0.0
    missing = [k for k in a.tensors if k not in bkeys]
    for k, info in a.tensors.items():
        if k not in bkeys:
            continue
        ta = a.read(k, 0, info.numel, torch.empty(info.nbytes, dtype=torch.uint8)).clone()
        ib = b.tensors[bkeys[k]]
        tb = b.read(bkeys[k], 0, ib.numel, torch.empty(ib.nbytes, dtype=torch.uint8)).clone().to(ta.dtype)
        equal &= bool(torch.equal(ta, tb))
        d = (ta.float() - tb.float()).abs()
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        n_diff += int((d > 1e-6 * (1 + ta.float().abs())).sum())
        n += d.numel()
        ref_scale = max(ref_scale, float(ta.float().abs().max()) if d.numel() else 0.0)
    a.close()
    b.close()
    return {"equal": equal, "max_abs_diff": max_abs, "entries_differing_beyond_1e-6_rel": n_diff, "entries": n,
            "keys_missing_in_second": missing[:5], "n_keys_missing": len(missing)}


# ---------------------------------------------------------------- bandwidth (the floor)


def bandwidth(sample_file: Path, tmp_dir: Path) -> dict:
    """Copy bandwidth of a big tensor, read bandwidth of a cached file, write bandwidth of a file (GB/s)."""
    x = torch.randn(64 * 1024 * 1024)
    y = torch.empty_like(x)
    y.copy_(x)
    best = min(_time(lambda: y.copy_(x)) for _ in range(5))
    copy = 2 * x.numel() * 4 / best / 1e9  # read + write
    size = sample_file.stat().st_size
    buf = bytearray(size)
    for _ in range(2):
        _read(sample_file, buf)
    read = size / min(_time(lambda: _read(sample_file, buf)) for _ in range(3)) / 1e9
    target = tmp_dir / ".bw_write_test"
    w = []
    for _ in range(3):
        w.append(_time(lambda: target.write_bytes(buf)))
        target.unlink()
    write = size / min(w) / 1e9
    return {"copy_GBps": round(copy, 2), "file_read_GBps": round(read, 2), "file_write_GBps": round(write, 2),
            "note": "copy: (read + write bytes) / time of a 256 MB tensor copy; file read: a cached 500 MB file "
                    "into a buffer; file write: 500 MB into the page cache (no fsync); best of a few"}


def _read(path: Path, buf: bytearray) -> None:
    with open(path, "rb", buffering=0) as fh:
        fh.readinto(buf)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[2, 4, 8], help="numbers of experts (default 2 4 8)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--modes", nargs="+", default=["memory", "stream", "mergekit"], choices=["memory", "stream", "mergekit"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", type=Path, default=CACHE / "static_merge_bench")
    ap.add_argument("--mergekit-venv", type=Path, default=CACHE / "mergekit-venv")
    ap.add_argument("--no-mergekit", action="store_true", help="benchmark mergelab only")
    ap.add_argument("--small", action="store_true", help="a 2-layer, 1k-vocab model: a smoke test of this script")
    ap.add_argument("--out", type=Path, default=Path("runs/static_merge.json"))
    args = ap.parse_args(argv)

    dims = dict(n_layer=2, d=128, vocab=1000, ctx=128) if args.small else dict(n_layer=12, d=768, vocab=50257, ctx=1024)
    shapes = gpt2_shapes(**dims)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    root = args.work_dir / ("small" if args.small else "gpt2")
    pre, experts = build_models(root, max(args.T), shapes, gpt2_config(**dims))
    modes = list(args.modes)
    mk = None
    if "mergekit" in modes:
        mk = None if args.no_mergekit else ensure_mergekit(args.mergekit_venv)
        if mk is None:
            modes.remove("mergekit")
    outs = args.work_dir / "outputs"
    outs.mkdir(parents=True, exist_ok=True)
    bw = bandwidth(pre / "model.safetensors", outs)
    console.print(f"bandwidth: {bw}")
    model_bytes = (pre / "model.safetensors").stat().st_size

    rows: list[dict] = []
    failures: list[dict] = []
    for T in args.T:
        for method in args.methods:
            ms = [m for m in modes if not (m == "mergekit" and METHODS[method][1] is None)]
            cfg_path = outs / f"mergekit_{method}_{T}.yml"
            if "mergekit" in ms:
                cfg_path.write_text(mergekit_config(method, pre, experts[:T]))
            times: dict[str, list[float]] = {m: [] for m in ms}
            rss: dict[str, list[float]] = {m: [] for m in ms}
            for r in range(args.repeats):
                order = ms[r % len(ms):] + ms[: r % len(ms)]  # alternate which tool goes first
                for mode in order:
                    out = outs / f"{mode}_{method}_{T}"
                    shutil.rmtree(out, ignore_errors=True)
                    if mode == "mergekit":
                        cmd = mergekit_cmd(mk, cfg_path, out)
                    else:
                        cmd = mergelab_cmd(method, pre, experts[:T], out, stream=mode == "stream")
                    try:
                        wall, peak = run_timed(cmd)
                    except RuntimeError as exc:  # e.g. killed for memory: record it, go on
                        failures.append({"T": T, "method": method, "mode": mode, "error": str(exc)[-1500:]})
                        console.print(f"[red]T={T} {method} {mode} failed[/]: {str(exc)[-300:]}")
                        continue
                    times[mode].append(wall)
                    rss[mode].append(peak)
                    console.print(f"T={T} {method:16s} {mode:9s} run {r + 1}: {wall:6.1f} s  {peak:7.0f} MB")
            ms = [m for m in ms if times[m]]
            row = {"T": T, "method": method, "params": METHODS[method][0],
                   "wall_s": {m: times[m] for m in ms}, "peak_rss_mb": {m: rss[m] for m in ms},
                   "median_wall_s": {m: statistics.median(times[m]) for m in ms},
                   "median_peak_rss_mb": {m: statistics.median(rss[m]) for m in ms}}
            floor = ((T + 1) * model_bytes / (bw["file_read_GBps"] * 1e9) + model_bytes / (bw["file_write_GBps"] * 1e9))
            row["floor_s"] = floor
            checks = {}
            if "memory" in ms and "stream" in ms and (outs / f"memory_{method}_{T}").is_dir():
                checks["stream_vs_memory"] = compare(outs / f"stream_{method}_{T}", outs / f"memory_{method}_{T}")
            if "mergekit" in ms and ("stream" in ms or "memory" in ms):
                ref = "stream" if "stream" in ms else "memory"
                checks[f"{ref}_vs_mergekit"] = compare(outs / f"{ref}_{method}_{T}", outs / f"mergekit_{method}_{T}")
                checks["expected"] = AGREEMENT[method]
                med = row["median_wall_s"]
                row["ratio_wall_vs_mergekit"] = {m: med[m] / med["mergekit"] for m in ms if m != "mergekit"}
                mr = row["median_peak_rss_mb"]
                row["ratio_rss_vs_mergekit"] = {m: mr[m] / mr["mergekit"] for m in ms if m != "mergekit"}
            row["agreement"] = checks
            rows.append(row)
            for m in ms:
                shutil.rmtree(outs / f"{m}_{method}_{T}", ignore_errors=True)
            _save(args, rows, bw, n_params, model_bytes, failures)
    result = _save(args, rows, bw, n_params, model_bytes, failures)
    Console().print(table(rows))
    return result


def _save(args, rows, bw, n_params, model_bytes, failures) -> dict:
    result = {
        "command": "python benchmarks/static_merge.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "note": "2 CPU cores shared with other jobs; warm page cache; runs alternate, medians reported"},
        "model": {"params": n_params, "bytes_per_model": model_bytes, "dtype": "float32"},
        "bandwidth": bw, "rows": rows, "failures": failures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from mergelab.core.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2))
    return result


def table(rows: list[dict]) -> Table:
    t = Table(title="static merges: median wall time (s) / peak RSS (MB)")
    for col in ("T", "method", "in memory", "streamed", "mergekit", "stream / mergekit", "floor"):
        t.add_column(col, justify="right")
    for r in rows:
        w, m = r["median_wall_s"], r["median_peak_rss_mb"]

        def cell(mode: str, w=w, m=m) -> str:
            return f"{w[mode]:.1f} / {m[mode]:.0f}" if mode in w else "-"

        ratio = r.get("ratio_wall_vs_mergekit", {}).get("stream")
        rr = r.get("ratio_rss_vs_mergekit", {}).get("stream")
        t.add_row(str(r["T"]), r["method"], cell("memory"), cell("stream"), cell("mergekit"),
                  f"{ratio:.2f} / {rr:.2f}" if ratio is not None else "-", f"{r['floor_s']:.1f}")
    return t


def markdown(paths: list[Path]) -> str:
    """The docs table from result files: median wall s / peak RSS MB per mode, ratios to mergekit."""
    lines = ["| T | method | in memory | streamed | mergekit | streamed / mergekit (time, RSS) | floor s | streamed / floor |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    rows = sorted((r for p in paths for r in json.loads(Path(p).read_text())["rows"]), key=lambda r: (r["T"], list(METHODS).index(r["method"])))
    for r in rows:
        w, m = r["median_wall_s"], r["median_peak_rss_mb"]
        cells = [f"{w[k]:.1f} s / {m[k]:,.0f} MB" if k in w else "-" for k in ("memory", "stream", "mergekit")]
        ratio = r.get("ratio_wall_vs_mergekit", {}).get("stream")
        rr = r.get("ratio_rss_vs_mergekit", {}).get("stream")
        rat = f"{ratio:.2f} / {rr:.2f}" if ratio is not None else "-"
        floor = f"{w['stream'] / r['floor_s']:.1f}x" if "stream" in w else "-"
        lines.append(f"| {r['T']} | {r['method']} | {' | '.join(cells)} | {rat} | {r['floor_s']:.1f} | {floor} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--markdown":
        print(markdown([Path(p) for p in sys.argv[2:]]))
    else:
        main()
