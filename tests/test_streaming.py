"""Streamed merges: equal to the in-memory merge for every static method, bounded memory, clear errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import mergelab
from mergelab import InputError
from mergelab.cli import app
from mergelab.core import io
from mergelab.core.errors import IncompatibleModelsError
from mergelab.methods.streaming import parse_size, stream_merge

from .tiny_models import save_tiny_bert

SHAPES = {"emb.weight": (61, 9), "layer.0.weight": (13, 17), "layer.0.bias": (13,), "layer.1.weight": (40, 25),
          "norm.weight": (25,), "empty.weight": (0, 4), "position_ids": (1, 12)}


def _state(seed, base=None, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in SHAPES.items():
        if k == "position_ids":
            sd[k] = torch.arange(12).reshape(1, 12)
        elif base is None:
            sd[k] = torch.randn(s, generator=g)
        else:
            sd[k] = base[k] + scale * torch.randn(s, generator=g)
    sd["norm.weight"] = sd["norm.weight"].to(torch.bfloat16)  # a second dtype, kept in the output
    if base is not None:
        sd["layer.0.bias"][:3] = base["layer.0.bias"][:3]  # zero task-vector entries (TIES zero signs)
    return sd


def save_sharded(sd, directory, n_shards=3):
    """``sd`` as ``n_shards`` safetensors files plus a Hugging Face index."""
    directory.mkdir(parents=True)
    keys = list(sd)
    weight_map = {k: f"model-{i % n_shards + 1:05d}-of-{n_shards:05d}.safetensors" for i, k in enumerate(keys)}
    for name in sorted(set(weight_map.values())):
        save_file({k: sd[k].contiguous() for k in keys if weight_map[k] == name}, str(directory / name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture(autouse=True)
def _torch_threads(default_torch_threads):
    """stream_merge's default worker count is torch's thread count: these tests run it as users do."""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    pre = _state(0)
    experts = {f"t{i}": _state(10 + i, base=pre, scale=0.05 * (i + 1)) for i in range(3)}
    paths = {t: save_sharded(sd, root / t) for t, sd in experts.items()}
    return root, save_sharded(pre, root / "pre"), paths


CASES = [
    ("task_arithmetic", {"scaling": 0.4}),
    ("task_arithmetic", {"scaling": {"t0": 0.2, "t1": -0.5, "t2": 1.3}}),
    ("average", {}),
    ("average", {"weights": [1, 0, 3]}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.35, "scope": "tensor", "scaling": 0.7}),
    ("ties", {"density": 1.0}),
    ("dare", {"drop_rate": 0.6, "seed": 5}),
    ("dare", {"drop_rate": 0.6, "seed": 5, "combine": "ties", "density": 0.3}),
    ("dare", {"drop_rate": 0.6, "seed": 5, "combine": "ties", "density": 0.3, "scope": "tensor"}),
    ("dare", {"drop_rate": 0.9, "seed": 1, "combine": "ties", "density": 1.0}),
]


@pytest.mark.parametrize("method,params", CASES)
@pytest.mark.parametrize("chunk,threads", [(7, 3), (64, 1), (1 << 18, 2)])
def test_streamed_equals_in_memory(sharded, tmp_path, method, params, chunk, threads):
    root, pre, experts = sharded
    ref = mergelab.merge(method, io.load_state_dict(pre), {t: io.load_state_dict(p) for t, p in experts.items()}, **params)
    out = stream_merge(method, pre, experts, tmp_path / "out", shard_size=1500, chunk=chunk, threads=threads, **params)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    got = io.load_state_dict(out)
    assert list(got) and set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    # the shards are valid for the reference reader too
    with safe_open(str(out / files[0]), framework="pt") as fh:
        assert list(fh.keys())


def test_dare_same_seed_same_result_other_seed_differs(sharded, tmp_path):
    root, pre, experts = sharded
    a = io.load_state_dict(stream_merge("dare", pre, experts, tmp_path / "a", drop_rate=0.5, seed=1))
    b = io.load_state_dict(stream_merge("dare", pre, experts, tmp_path / "b", drop_rate=0.5, seed=1))
    c = io.load_state_dict(stream_merge("dare", pre, experts, tmp_path / "c", drop_rate=0.5, seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["emb.weight"], c["emb.weight"])


def test_global_ties_threshold_is_the_exact_kth_largest(sharded, tmp_path):
    """Independent reference: TIES written out with a sort over the concatenated task vector."""
    root, pre_dir, experts = sharded
    pre = io.load_state_dict(pre_dir)
    exp = {t: io.load_state_dict(p) for t, p in experts.items()}
    keys = [k for k in pre if pre[k].is_floating_point()]
    density = 0.25
    trimmed = {}
    for t, sd in exp.items():
        taus = {k: sd[k].float() - pre[k].float() for k in keys}
        flat = torch.cat([v.reshape(-1).abs() for v in taus.values()])
        k_keep = round(density * flat.numel())
        thr = flat.sort(descending=True).values[k_keep - 1]
        trimmed[t] = {k: v * (v.abs() >= thr) for k, v in taus.items()}
    got = io.load_state_dict(stream_merge("ties", pre_dir, experts, tmp_path / "o", density=density, chunk=10))
    for k in keys:
        stack = torch.stack([trimmed[t][k] for t in exp])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        mean = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(got[k].float(), (pre[k].float() + mean).to(pre[k].dtype).float(), rtol=1e-6, atol=1e-6)


def test_single_file_inputs_and_single_shard_output(tmp_path):
    pre = save_tiny_bert(tmp_path / "pre", seed=0)
    a = save_tiny_bert(tmp_path / "a", seed=1, perturb=0.02, base=pre)
    b = save_tiny_bert(tmp_path / "b", seed=2, perturb=0.02, base=pre)
    out = stream_merge("ties", pre / "model.safetensors", {"a": a, "b": b}, tmp_path / "m", density=0.3)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # a file input: no sidecars to copy
    ref = mergelab.merge("ties", io.load_state_dict(pre), {"a": io.load_state_dict(a), "b": io.load_state_dict(b)}, density=0.3)
    got = io.load_state_dict(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_cli_stream_equals_in_memory_cli(sharded, tmp_path):
    root, pre, experts = sharded
    runner = CliRunner()
    base = ["merge", "--method", "dare", "--pretrained", str(pre), "--param", "drop_rate=0.3", "--param", "combine=ties"]
    for t, p in experts.items():
        base += ["--expert", f"{t}={p}"]
    r1 = runner.invoke(app, [*base, "--out", str(tmp_path / "mem")])
    r2 = runner.invoke(app, [*base, "--out", str(tmp_path / "str"), "--stream", "--shard-size", "2KB"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert len(list((tmp_path / "str").glob("*.safetensors"))) > 1
    a, b = io.load_state_dict(tmp_path / "mem"), io.load_state_dict(tmp_path / "str")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--stream", "--shard-size", "lots"])
    assert bad.exit_code == 2 and "shard size" in bad.output and "Traceback" not in bad.output


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 << 30 and parse_size("1500") == 1500
    with pytest.raises(InputError):
        parse_size("-3MB")


# ---------------------------------------------------------------- errors name the file and the key


def _copy_models(sharded, tmp_path):
    import shutil

    root, pre, experts = sharded
    dst = tmp_path / "models"
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("out*"))
    return dst / "pre", {t: dst / t for t in experts}


def _shard_of(directory, key):
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_error_key_missing_from_its_shard(sharded, tmp_path):
    pre, experts = _copy_models(sharded, tmp_path)
    index = experts["t1"] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    wrong = next(s for s in set(data["weight_map"].values()) if s != data["weight_map"]["layer.1.weight"])
    data["weight_map"]["layer.1.weight"] = wrong
    index.write_text(json.dumps(data))
    with pytest.raises(InputError, match=rf"{wrong}: has no tensor 'layer.1.weight'"):
        stream_merge("task_arithmetic", pre, experts, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_error_expert_lacks_a_key(sharded, tmp_path):
    pre, experts = _copy_models(sharded, tmp_path)
    index = experts["t2"] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["layer.0.bias"]
    index.write_text(json.dumps(data))
    with pytest.raises(IncompatibleModelsError, match=r"expert 't2'.*missing key 'layer.0.bias'"):
        stream_merge("ties", pre, experts, tmp_path / "out")


def test_error_shape_mismatch_names_expert_key_and_file(sharded, tmp_path):
    pre, experts = _copy_models(sharded, tmp_path)
    shard = experts["t0"] / _shard_of(experts["t0"], "layer.0.weight")
    with safe_open(str(shard), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["layer.0.weight"] = torch.zeros(17, 13)
    save_file(tensors, str(shard))
    with pytest.raises(IncompatibleModelsError, match=rf"expert 't0', key 'layer.0.weight' \(.*{shard.name}\): shape \(17, 13\)"):
        stream_merge("task_arithmetic", pre, experts, tmp_path / "out")


def test_error_truncated_shard_names_file_and_key(sharded, tmp_path):
    pre, experts = _copy_models(sharded, tmp_path)
    shard = experts["t1"] / _shard_of(experts["t1"], "layer.1.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(InputError, match=rf"{shard.name}, key '.*': needs bytes up to \d+ but the file has \d+; the file is truncated"):
        stream_merge("ties", pre, experts, tmp_path / "out")


@pytest.mark.parametrize("payload", [b"\x05\x00", b"\xff" * 8 + b"{}", (12).to_bytes(8, "little") + b"not json at "])
def test_error_corrupt_file_names_it(sharded, tmp_path, payload):
    pre, experts = _copy_models(sharded, tmp_path)
    shard = experts["t0"] / _shard_of(experts["t0"], "emb.weight")
    shard.write_bytes(payload)
    with pytest.raises(InputError, match=rf"{shard.name}"):
        stream_merge("average", pre, experts, tmp_path / "out")
    result = CliRunner().invoke(app, ["merge", "-m", "average", "-p", str(pre), "-e", f"t0={experts['t0']}",
                                      "-o", str(tmp_path / "out"), "--stream"])
    assert result.exit_code == 2 and shard.name in result.output and "Traceback" not in result.output


def test_error_non_finite_names_key_and_file(sharded, tmp_path):
    pre, experts = _copy_models(sharded, tmp_path)
    shard = experts["t2"] / _shard_of(experts["t2"], "layer.1.weight")
    with safe_open(str(shard), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["layer.1.weight"][3, 4] = float("nan")
    save_file(tensors, str(shard))
    with pytest.raises(IncompatibleModelsError, match=rf"expert 't2', key 'layer.1.weight' \(.*{shard.name}\): non-finite"):
        stream_merge("dare", pre, experts, tmp_path / "out", drop_rate=0.5)
    assert not (tmp_path / "out").exists()


def test_error_unknown_parameter_and_non_safetensors(sharded, tmp_path):
    root, pre, experts = sharded
    with pytest.raises(InputError, match="has no parameter"):
        stream_merge("ties", pre, experts, tmp_path / "o", densty=0.2)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="streaming reads .safetensors"):
        stream_merge("ties", tmp_path / "w.bin", experts, tmp_path / "o")


# ---------------------------------------------------------------- bounded memory


def test_streamed_merge_of_a_model_larger_than_the_limit_stays_under_it(tmp_path):
    """Three 128 MB models (T = 2) merged on two worker threads with a 64 MB limit on the merge's RSS growth, measured in a child
    process (the peak RSS, reset after the imports through /proc/self/clear_refs, against the RSS then); TIES global reads everything three times."""
    mb = 1 << 20
    n_tensors, per = 8, 4 * 1024 * 1024  # 8 tensors of 4M float32 = 128 MB per model
    g = torch.Generator().manual_seed(0)
    pre = {f"w{i}": torch.randn(per, generator=g) for i in range(n_tensors)}
    paths = {}
    for name, scale in (("pre", 0.0), ("a", 0.01), ("b", 0.02)):
        sd = {k: v + scale * torch.randn(per, generator=g) for k, v in pre.items()} if scale else pre
        paths[name] = save_sharded(sd, tmp_path / name, n_shards=2)
        del sd
    del pre
    model_bytes = n_tensors * per * 4
    limit = 64 * mb
    script = textwrap.dedent(f"""
        import sys, torch
        from mergelab.methods.streaming import stream_merge
        def status(field):
            return 1024 * next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
        torch.empty(1).add_(1)  # torch's own arenas before the baseline
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = status("VmRSS:")
        stream_merge("ties", {str(paths["pre"])!r}, {{"a": {str(paths["a"])!r}, "b": {str(paths["b"])!r}}},
                     {str(tmp_path / "out")!r}, density=0.2, shard_size="40MB", threads=2)
        print(status("VmHWM:") - before)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth = int(proc.stdout.strip().splitlines()[-1])
    assert 3 * model_bytes >= 6 * limit  # the inputs are far larger than the limit
    print(f"RSS growth {growth / mb:.1f} MB")
    assert growth < limit, f"streamed merge grew RSS by {growth / mb:.0f} MB (limit {limit / mb:.0f} MB)"
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 4
    with safe_open(str(tmp_path / "out" / "model-00001-of-00004.safetensors"), framework="pt") as fh:
        assert fh.get_tensor(next(iter(fh.keys()))).numel() == per
