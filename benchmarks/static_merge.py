"""Static merges against the memory-bandwidth floor: the floor, mergelab streamed / in memory, mergekit.

Builds the checkpoints locally (no downloads): a pretrained model with random weights and T experts
= pretrained + Gaussian task vectors (std ``tau`` times each tensor's RMS). ``--model gpt2``: GPT-2
small's tensors (124M parameters, float32, one ``model.safetensors`` of ~500 MB, tau 1e-3);
``--model llama-1b`` / ``llama-250m``: Llama-shaped models in bfloat16 (1.24B / 0.25B parameters,
written shard by shard in 2 GB shards with an index, tau 2e-2: smaller bf16 deltas round to zero).

For each T it runs, one subprocess each under ``/usr/bin/time`` (wall time, peak RSS), in every
round and in rotating order:

- ``floor``: this script reading every input file once (``preadv`` into one 4 MB buffer) and writing
  one output of the pretrained model's size, fsync'ed like mergelab's atomic output: the I/O any
  merge must do, without computing anything (no torch import);
- ``stream``: ``mergelab merge`` (streams by default), ``memory``: ``mergelab merge --in-memory``;
- ``mergekit``: ``mergekit-yaml`` where it defines the same method.

Ratios to the floor are taken within each round (the same load), and their median is reported,
end to end and for the merge itself (the time ``mergelab merge`` prints, after its imports). The
outputs are checked: streamed == in memory exactly, and against mergekit where the two define the
method the same way. ``--profile`` instead profiles one streamed merge in process on one thread:
read, compute, write and the Python overhead per slice.

mergekit is installed by this script into its own virtual environment (``--mergekit-venv``):
``torch==2.13.0`` first (the CPU wheel; a plain torch dependency would pull a multi-GB CUDA build),
then ``mergekit``. ``--no-mergekit`` skips it.

    python benchmarks/static_merge.py --T 2 4 8 --repeats 3 --out runs/static_merge.json
    python benchmarks/static_merge.py --model llama-1b --T 8 --modes floor stream --methods task_arithmetic ties
    python benchmarks/static_merge.py --profile --T 8 --methods task_arithmetic ties ties_global
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
    "average": (["--method", "average"], ("linear", {"weight": 1.0}, {"normalize": True})),
    "dare": (["--method", "dare", "--param", "drop_rate=0.9", "--param", "scaling=0.3", "--param", "seed=0"], None),
    "dare_ties": (["--method", "dare", "--param", "drop_rate=0.9", "--param", "combine=ties", "--param", "density=1.0",
                   "--param", "scaling=1.0", "--param", "seed=0"],
                  ("dare_ties", {"weight": 1.0, "density": 0.1}, {"normalize": True})),
}
# how the two tools' outputs should agree
AGREEMENT = {
    "task_arithmetic": "same definition: should match to float32 rounding",
    "average": "same definition: should match to float32 rounding",
    "ties": "same definition (k = int(d n) entries per tensor) except ties at the threshold (all kept here, k kept "
            "there), the sign of a zero sum and the order of the disjoint mean's division: should match except where "
            "a task vector ties with its threshold (thousands of entries in float32 GPT-2 at T = 8; "
            "benchmarks/ties_threshold_ties.py counts them)",
    "dare_ties": "different random masks (per-(task, tensor) generator here, torch.bernoulli there) and mergekit "
                 "rescales survivors to the task vector's L1 norm instead of 1/(1-p): not comparable entry by entry",
}


# ---------------------------------------------------------------- checkpoints

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


def llama_shapes(n_layer: int, d: int, ffn: int, vocab: int, kv: int) -> dict[str, tuple[int, ...]]:
    """A Llama's tensors (``model.`` prefix as on the hub; tied embeddings, so no ``lm_head``)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d), p + "mlp.down_proj.weight": (d, ffn),
        })
    shapes["model.norm.weight"] = (d,)
    return shapes


MODELS = {
    # name: (shapes, config, dtype, tau relative std, shard size)
    "gpt2": (lambda: gpt2_shapes(), lambda: gpt2_config(12, 768, 50257, 1024), torch.float32, 1e-3, None),
    "small": (lambda: gpt2_shapes(2, 128, 1000, 128), lambda: gpt2_config(2, 128, 1000, 128), torch.float32, 1e-3, None),
    # Llama 3.2 1B's shapes: 16 layers, hidden 2048, MLP 8192, 128,256 tokens, 8 KV heads of 64
    "llama-1b": (lambda: llama_shapes(16, 2048, 8192, 128256, 512),
                 lambda: {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                          "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                          "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
                          "torch_dtype": "bfloat16"},
                 torch.bfloat16, 2e-2, 2 * 10**9),
    # a quarter of it: 16 layers, hidden 1024, MLP 4096, 32,000 tokens, 8 KV heads of 32
    "llama-250m": (lambda: llama_shapes(16, 1024, 4096, 32000, 256),
                   lambda: {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
                            "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 32,
                            "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": True,
                            "torch_dtype": "bfloat16"},
                   torch.bfloat16, 2e-2, 2 * 10**9),
}


def build_models(root: Path, n_experts: int, shapes: dict, config: dict, tau_rel_std: float = 1e-3,
                 dtype: torch.dtype = torch.float32, shard_size: int | None = None) -> tuple[Path, list[Path]]:
    """pretrained/ and expert_i/ directories (cached: an existing complete directory is reused).

    Written tensor by tensor (mergelab's ``ShardedWriter``), so building a 1B-parameter model needs
    memory for one tensor at a time, not the model.
    """
    from mergelab.core.atomic import atomic_write_dir
    from mergelab.methods.streaming.files import SafetensorsModel, ShardedWriter

    tag = json.dumps({"shapes": shapes, "config": config, "tau": tau_rel_std, "dtype": str(dtype),
                      "shard": shard_size}, sort_keys=True)

    def make(path: Path, tensor) -> Path:
        if (path / "spec.json").is_file() and (path / "spec.json").read_text() == tag:
            return path

        def fill(tmp: Path) -> None:
            writer = ShardedWriter(tmp, [(k, dtype, s) for k, s in shapes.items()], shard_size or 1 << 62)
            for k in shapes:
                writer.begin(k)
                writer.write(tensor(k))
            writer.close()
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            (tmp / "spec.json").write_text(tag)

        console.print(f"building {path}")
        return atomic_write_dir(path, fill)  # our own cache: a stale build is replaced

    def pretrained(k: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib_crc(k))
        if k.endswith("norm.weight") or k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            return (1.0 + 0.02 * torch.randn(shapes[k], generator=g)).to(dtype)
        return (0.02 * torch.randn(shapes[k], generator=g)).to(dtype)

    pre_dir = make(root / "pretrained", pretrained)
    base = SafetensorsModel(pre_dir, "pretrained")
    experts = []
    for i in range(n_experts):
        def expert(k: str, i: int = i) -> torch.Tensor:
            info = base.tensors[k]
            v = base.read(k, 0, info.numel, None).reshape(info.shape).float()
            g = torch.Generator().manual_seed(1000 * (i + 1) + zlib_crc(k))
            rms = float(v.pow(2).mean().sqrt())
            return v.add_(torch.randn(v.shape, generator=g), alpha=tau_rel_std * rms).to(dtype)

        experts.append(make(root / f"expert_{i}", expert))
    base.close()
    return pre_dir, experts


def zlib_crc(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


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




# ---------------------------------------------------------------- runs

# The floor: read every input file once into one buffer, write one output of the pretrained model's
# size and fsync it (mergelab's output is fsync'ed before its rename). Plain Python: no torch import.
FLOOR = r"""
import os, sys
out, size, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
buf = memoryview(bytearray(1 << 22))
for f in inputs:
    fd = os.open(f, os.O_RDONLY)
    at = 0
    while True:
        n = os.preadv(fd, [buf], at)
        if n <= 0:
            break
        at += n
    os.close(fd)
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
left = size
while left:
    left -= os.write(fd, buf[:min(left, len(buf))])
os.fsync(fd)
os.close(fd)
os.unlink(out)
"""


def weight_files(directory: Path) -> list[Path]:
    from mergelab.core.checkpoint import locate_weights

    return list(locate_weights(directory).files)


def floor_cmd(pre: Path, experts: list[Path], out: Path) -> list[str]:
    files = [f for d in (pre, *experts) for f in weight_files(d)]
    size = sum(f.stat().st_size for f in weight_files(pre))
    return [sys.executable, "-c", FLOOR, str(out), str(size), *map(str, files)]


def run_timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, float | None]:
    """(wall seconds, peak RSS in MB, the merge's own seconds as ``mergelab merge`` prints them) of ``cmd``."""
    stats = Path(f"/tmp/static_merge_time_{os.getpid()}.txt")
    t0 = time.perf_counter()
    env = {**os.environ, "COLUMNS": "1000", **(env or {})}  # one line per message
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(stats), *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rss_kb = int(stats.read_text().strip().splitlines()[-1])
    stats.unlink(missing_ok=True)
    m = re.search(r"experts with .* in ([0-9.]+)s ->", proc.stdout.replace("\n", " "))
    return wall, rss_kb / 1024, float(m.group(1)) if m else None


def mergelab_cmd(method: str, pre: Path, experts: list[Path], out: Path, stream: bool) -> list[str]:
    cmd = [sys.executable, "-m", "mergelab.cli", "-q", "merge", *METHODS[method][0], "--pretrained", str(pre),
           "--out", str(out), "--shard-size", "2GB"]
    for i, e in enumerate(experts):
        cmd += ["--expert", f"e{i}={e}"]
    return cmd + (["--stream"] if stream else ["--in-memory"])


# ---------------------------------------------------------------- profile


def profile(method: str, pre: Path, experts: list[Path], out: Path) -> dict:
    """One streamed merge in process, one worker thread: where the time goes.

    read: inside ``SafetensorsModel.read`` (``preadv`` from the page cache); write: inside the shard
    writer; thresholds: TIES' selection passes (their own reads included); compute: the rest of the
    merge; Python overhead per slice: a merge of two-element slices of the same tensors, whose
    arithmetic is negligible, per slice.
    """
    from mergelab.methods.registry import merge_label, slice_form
    from mergelab.methods.streaming import engine, files
    from mergelab.methods.streaming.merge import StreamInputs

    params = parse_cli_params(METHODS[method][0])
    name = METHODS[method][0][1]
    timers = {"read": 0.0, "write": 0.0, "thresholds": 0.0, "thresholds_read": 0.0}
    phase = {"now": ""}
    read0, write0 = files.SafetensorsModel.read, files.ShardedWriter.write
    sel0, cache0 = engine.SliceMerger._select, engine.SliceMerger._cache

    def timed(fn, what):
        def wrapper(*a, **k):
            t = time.perf_counter()
            outer = phase["now"]
            if what == "thresholds":
                phase["now"] = "thresholds"
            try:
                return fn(*a, **k)
            finally:
                phase["now"] = outer
                key = "thresholds_read" if what == "read" and outer == "thresholds" else what
                timers[key] += time.perf_counter() - t
        return wrapper

    files.SafetensorsModel.read = timed(read0, "read")
    files.ShardedWriter.write = timed(write0, "write")
    engine.SliceMerger._select = timed(sel0, "thresholds")
    engine.SliceMerger._cache = timed(cache0, "thresholds")
    torch.set_num_threads(1)
    inputs = StreamInputs(pre, {f"e{i}": e for i, e in enumerate(experts)})
    try:
        form = slice_form(name, inputs.tasks, params)
        merger = engine.SliceMerger(inputs.pre, inputs.experts, form, label=merge_label(name, params), threads=1)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        entries = [(k, i.dtype, i.shape) for k, i in inputs.pre.tensors.items()]
        writer = files.ShardedWriter(out, entries, 2 * 10**9)
        t0 = time.perf_counter()
        merger.run(writer)
        writer.close()
        total = time.perf_counter() - t0
        slices = sum(len(merger._slices(k)) for k, i in inputs.pre.tensors.items() if i.dtype.is_floating_point)
        # Python overhead: the same calls on two-element slices (one per tensor), repeated
        keys = [k for k, i in inputs.pre.tensors.items() if i.dtype.is_floating_point and i.numel >= 2]
        merger._set_thresholds(tuple(torch.tensor(0.0) for _ in inputs.tasks))
        for _ in range(2):
            t1 = time.perf_counter()
            for k in keys:
                merger._merge_slice(k, 0, 2)
            per_slice = (time.perf_counter() - t1) / len(keys)
    finally:
        files.SafetensorsModel.read, files.ShardedWriter.write = read0, write0
        engine.SliceMerger._select, engine.SliceMerger._cache = sel0, cache0
        inputs.close()
        shutil.rmtree(out, ignore_errors=True)
    merge_pass = total - timers["thresholds"]
    return {"method": method, "T": len(experts), "total_s": total,
            "thresholds_read_s": timers["thresholds_read"],
            "thresholds_compute_s": timers["thresholds"] - timers["thresholds_read"],
            "merge_read_s": timers["read"], "merge_write_s": timers["write"],
            "merge_compute_s": merge_pass - timers["read"] - timers["write"],
            "slices_per_pass": slices, "python_overhead_per_slice_us": per_slice * 1e6,
            "python_overhead_merge_pass_s": per_slice * slices,
            "note": "one thread, in process (no start-up); TIES thresholds: the selection passes (sample, count, "
                    "and for per-tensor TIES the cached tensors' single read); merge pass: read, compute, write; "
                    "Python overhead: the merge-pass calls on two-element slices, times the slices (part of compute)"}


def parse_cli_params(argv: list[str]) -> dict:
    import yaml

    out = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "--param":
            key, _, raw = value.partition("=")
            out[key] = yaml.safe_load(raw)
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", choices=list(MODELS))
    ap.add_argument("--T", type=int, nargs="+", default=[2, 4, 8], help="numbers of experts (default 2 4 8)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--modes", nargs="+", default=["floor", "stream", "memory", "mergekit"],
                    choices=["floor", "stream", "memory", "mergekit"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", type=Path, default=CACHE / "static_merge_bench")
    ap.add_argument("--mergekit-venv", type=Path, default=CACHE / "mergekit-venv")
    ap.add_argument("--no-mergekit", action="store_true", help="benchmark mergelab only")
    ap.add_argument("--small", action="store_true", help="same as --model small: a smoke test of this script")
    ap.add_argument("--profile", action="store_true", help="profile one streamed merge per method in process")
    ap.add_argument("--out", type=Path, default=Path("runs/static_merge.json"))
    args = ap.parse_args(argv)
    model = "small" if args.small else args.model

    shapes_fn, config_fn, dtype, tau, shard = MODELS[model]
    shapes = shapes_fn()
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    root = args.work_dir / model
    pre, experts = build_models(root, max(args.T), shapes, config_fn(), tau, dtype, shard)
    outs = args.work_dir / "outputs"
    outs.mkdir(parents=True, exist_ok=True)
    model_bytes = sum(f.stat().st_size for f in weight_files(pre))
    if args.profile:
        prof = [profile(m, pre, experts[:T], outs / "profile") for T in args.T for m in args.methods]
        for p in prof:
            console.print(p)
        return _save(args, [], {}, n_params, model_bytes, [], model, dtype, profile=prof)
    modes = list(args.modes)
    mk = None
    if "mergekit" in modes:
        mk = None if args.no_mergekit else ensure_mergekit(args.mergekit_venv)
        if mk is None:
            modes.remove("mergekit")

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
            own: dict[str, list[float]] = {m: [] for m in ms}
            ratios: dict[str, list[float]] = {m: [] for m in ms}
            own_ratios: dict[str, list[float]] = {m: [] for m in ms}
            for r in range(args.repeats):
                order = ms[r % len(ms):] + ms[: r % len(ms)]  # rotate which one goes first
                got: dict[str, tuple[float, float | None]] = {}
                for mode in order:
                    out = outs / f"{mode}_{method}_{T}"
                    shutil.rmtree(out, ignore_errors=True)
                    if mode == "mergekit":
                        cmd = mergekit_cmd(mk, cfg_path, out)
                    elif mode == "floor":
                        cmd = floor_cmd(pre, experts[:T], outs / "floor.bin")
                    else:
                        cmd = mergelab_cmd(method, pre, experts[:T], out, stream=mode == "stream")
                    try:
                        wall, peak, merge_s = run_timed(cmd)
                    except RuntimeError as exc:  # e.g. killed for memory: record it, go on
                        failures.append({"T": T, "method": method, "mode": mode, "error": str(exc)[-1500:]})
                        console.print(f"[red]T={T} {method} {mode} failed[/]: {str(exc)[-300:]}")
                        continue
                    times[mode].append(wall)
                    rss[mode].append(peak)
                    if merge_s is not None:
                        own[mode].append(merge_s)
                    got[mode] = (wall, merge_s)
                    console.print(f"T={T} {method:16s} {mode:9s} run {r + 1}: {wall:6.1f} s  {peak:7.0f} MB"
                                  + (f"  (merge {merge_s:.1f} s)" if merge_s is not None else ""))
                if "floor" in got:
                    fl = got["floor"][0]
                    for m, (w, own_s) in got.items():
                        ratios[m].append(w / fl)
                        if own_s is not None:
                            own_ratios[m].append(own_s / fl)
            ms = [m for m in ms if times[m]]
            row = {"T": T, "method": method, "params": METHODS[method][0],
                   "wall_s": {m: times[m] for m in ms}, "peak_rss_mb": {m: rss[m] for m in ms},
                   "merge_s": {m: own[m] for m in ms if own[m]},
                   "median_wall_s": {m: statistics.median(times[m]) for m in ms},
                   "median_peak_rss_mb": {m: statistics.median(rss[m]) for m in ms},
                   "x_floor": {m: statistics.median(ratios[m]) for m in ms if ratios[m]},
                   "merge_x_floor": {m: statistics.median(own_ratios[m]) for m in ms if own_ratios[m]}}
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
            _save(args, rows, {}, n_params, model_bytes, failures, model, dtype)
    result = _save(args, rows, {}, n_params, model_bytes, failures, model, dtype)
    Console().print(table(rows))
    return result


def _save(args, rows, bw, n_params, model_bytes, failures, model, dtype, profile=None) -> dict:
    result = {
        "command": "python benchmarks/static_merge.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg(),
                    "note": "2 CPU cores shared with other jobs; runs rotate within each round; ratios to the floor "
                            "are taken within a round, medians reported"},
        "model": {"name": model, "params": n_params, "bytes_per_model": model_bytes, "dtype": str(dtype)},
        "rows": rows, "failures": failures,
    }
    if profile is not None:
        result["profile"] = profile
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from mergelab.core.atomic import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2))
    return result


def _cells(r: dict) -> dict[str, str]:
    w, m, x, ox = r["median_wall_s"], r["median_peak_rss_mb"], r.get("x_floor", {}), r.get("merge_x_floor", {})
    out = {}
    for mode in ("floor", "stream", "memory", "mergekit"):
        if mode not in w:
            out[mode] = "-"
            continue
        cell = f"{w[mode]:.1f} s / {m[mode]:,.0f} MB"
        if mode != "floor" and mode in x:
            cell += f" / **{x[mode]:.1f}x**" + (f" ({ox[mode]:.1f}x)" if mode in ox else "")
        out[mode] = cell
    return out


def table(rows: list[dict]) -> Table:
    t = Table(title="static merges: median wall s / peak RSS MB / x floor (merge alone x floor)")
    for col in ("T", "method", "floor", "streamed", "in memory", "mergekit"):
        t.add_column(col, justify="right")
    for r in rows:
        c = _cells(r)
        t.add_row(str(r["T"]), r["method"], c["floor"], c["stream"], c["memory"], c["mergekit"])
    return t


def markdown(paths: list[Path]) -> str:
    """The docs table from result files: median wall s / peak RSS MB / median ratio to the floor per mode."""
    lines = ["| model | T | method | floor | streamed (default) | in memory | mergekit |",
             "|---|---:|---|---:|---:|---:|---:|"]
    rows = sorted(((json.loads(Path(p).read_text())["model"]["name"], r) for p in paths
                   for r in json.loads(Path(p).read_text())["rows"]),
                  key=lambda x: (x[0], x[1]["T"], list(METHODS).index(x[1]["method"])))
    for model, r in rows:
        c = _cells(r)
        lines.append(f"| {model} | {r['T']} | {r['method']} | {c['floor']} | {c['stream']} | {c['memory']} | {c['mergekit']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--markdown":
        print(markdown([Path(p) for p in sys.argv[2:]]))
    else:
        main()
