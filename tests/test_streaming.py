"""Streamed merges: equal to the in-memory merge for every static method, bounded memory, clear errors."""

import json
import subprocess
import sys
import textwrap
import threading

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
        k_keep = int(density * flat.numel())  # floor, as the TIES authors' code and mergekit
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
    r1 = runner.invoke(app, [*base, "--out", str(tmp_path / "mem"), "--in-memory"])
    r2 = runner.invoke(app, [*base, "--out", str(tmp_path / "str"), "--stream", "--shard-size", "2KB"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert "merged 3 experts" in r1.output and "streamed 3 experts" in r2.output
    assert len(list((tmp_path / "str").glob("*.safetensors"))) > 1
    a, b = io.load_state_dict(tmp_path / "mem"), io.load_state_dict(tmp_path / "str")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--stream", "--shard-size", "lots"])
    assert bad.exit_code == 2 and "shard size" in bad.output and "Traceback" not in bad.output


def test_cli_streams_by_default_and_says_why_not(sharded, tmp_path):
    """Safetensors inputs stream without --stream; a pickle checkpoint falls back to memory with the reason."""
    root, pre, experts = sharded
    runner = CliRunner()
    args = ["merge", "-m", "ties", "-p", str(pre), "--param", "density=0.3", "--shard-size", "2KB"]
    args += [a for t, p in experts.items() for a in ("-e", f"{t}={p}")]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "auto")])
    assert r.exit_code == 0 and "streamed 3 experts" in r.output and "in memory" not in r.output, r.output
    assert len(list((tmp_path / "auto").glob("*.safetensors"))) > 1  # the streamed writer's shards
    # one expert as a pickle checkpoint: merged in memory, saying which file and why
    pickled = tmp_path / "t0bin"
    pickled.mkdir()
    torch.save(io.load_state_dict(experts["t0"]), pickled / "pytorch_model.bin")
    mixed = [a if a != f"t0={experts['t0']}" else f"t0={pickled}" for a in args]
    r = runner.invoke(app, [*mixed, "-o", str(tmp_path / "mixed")])
    assert r.exit_code == 0, r.output
    assert "merging in memory: expert 't0'" in r.output and "pytorch_model.bin" in r.output and "pickle" in r.output
    a, b = io.load_state_dict(tmp_path / "auto"), io.load_state_dict(tmp_path / "mixed")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # --stream insists: the error names the file, exit 2
    r = runner.invoke(app, [*mixed, "-o", str(tmp_path / "forced"), "--stream"])
    assert r.exit_code == 2 and "pickle checkpoint" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- a method registered here streams too


def _clipped_sum(vectors, scaling: float = 0.5, clip: float = 0.05):
    """Task Arithmetic over task vectors clipped to [-clip, clip] (a method only this test defines)."""
    from mergelab.core.statedict import TaskVector
    from mergelab.methods.registry import MergePlan, check_number, per_task_values

    clip = check_number("clip", clip, low=0.0, low_open=True)
    clipped = {t: TaskVector({k: v.clamp(-clip, clip) for k, v in vec.items()}) for t, vec in vectors.items()}
    return MergePlan("clipped_sum", clipped, per_task_values("scaling", scaling, list(vectors)), {"clip": clip})


class _Clip:
    """The per-slice step of _clipped_sum, in place."""

    def __init__(self, clip):
        self.clip = clip

    def __call__(self, taus, ctx):
        return [v.clamp_(-self.clip, self.clip) for v in taus]


@pytest.fixture
def clipped_sum():
    from mergelab.core.kernels import Drop, SliceForm
    from mergelab.methods.registry import register, unregister

    register("clipped_sum", stream=lambda plan: SliceForm(plan.coefficients, (Drop(0.0), _Clip(plan.params["clip"]))))(
        _clipped_sum)
    register("clipped_sum_memory_only")(_clipped_sum)
    yield
    unregister("clipped_sum")
    unregister("clipped_sum_memory_only")


def test_a_newly_registered_static_method_streams(sharded, tmp_path, clipped_sum):
    root, pre_dir, experts = sharded
    pre = io.load_state_dict(pre_dir)
    exp = {t: io.load_state_dict(p) for t, p in experts.items()}
    got = io.load_state_dict(stream_merge("clipped_sum", pre_dir, experts, tmp_path / "o", chunk=10, threads=2, clip=0.04))
    # the in-memory merge, and the formula written out here
    mem = mergelab.merge("clipped_sum", pre, exp, clip=0.04)
    via_plan = mergelab.merge("clipped_sum_memory_only", pre, exp, clip=0.04)  # no form: the plan's path
    for k, v in pre.items():
        assert torch.equal(got[k], mem[k]), k
        if v.is_floating_point():
            ref = v.float() + sum(0.5 * (exp[t][k].float() - v.float()).clamp(-0.04, 0.04) for t in exp)
            torch.testing.assert_close(got[k].float(), ref.to(v.dtype).float(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(via_plan[k].float(), got[k].float(), rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got[k], v)
    with pytest.raises(InputError, match="'clip' must be in"):
        stream_merge("clipped_sum", pre_dir, experts, tmp_path / "bad", clip=-1.0)


def test_a_method_without_a_form_is_refused_by_stream_and_merged_in_memory_by_the_cli(sharded, tmp_path, clipped_sum):
    root, pre, experts = sharded
    with pytest.raises(InputError, match="'clipped_sum_memory_only' has no per-tensor form"):
        stream_merge("clipped_sum_memory_only", pre, experts, tmp_path / "o")
    args = ["merge", "-m", "clipped_sum_memory_only", "-p", str(pre)]
    args += [a for t, p in experts.items() for a in ("-e", f"{t}={p}")]
    args += ["-o", str(tmp_path / "cli")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "merging in memory: method 'clipped_sum_memory_only' has no per-tensor form" in r.output
    r = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "cli2"), "--stream"])
    assert r.exit_code == 2 and "no per-tensor form" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- TIES thresholds: sampled bands, exact


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("max_band", [1 << 22, 50])  # 50: the band overflows, the histogram's bin is read again
def test_sampled_selection_is_the_exact_kth_largest(kind, clustered, max_band):
    from mergelab.core import kernels

    g = torch.Generator().manual_seed(3)
    n = 200_000
    x = torch.randn(n, generator=g)
    if kind == "ties":
        x = torch.randint(-40, 41, (n,), generator=g).float() / 8  # few distinct magnitudes: many ties
    elif kind == "zeros":
        x[: n * 9 // 10] = 0.0  # most entries unchanged: the k-th largest is 0 for a high density
    for density in (0.01, 0.2, 0.5, 0.95):
        k = kernels.kept_count(n, density)
        want = x.abs().sort(descending=True).values[k - 1]
        sel = kernels.SampledKthLargestAbs(n, k, stride=37, max_band=max_band, clustered=clustered)
        for c in x.split(9_999):
            sel.add_sample(c)
        sel.end_sample()
        for c in x.split(9_999):
            sel.add_band(c)
        got = sel.value()
        if kind == "normal":  # a band of about 3,000 values: kept, or past max_band=50 read again in pass 3
            assert got is not None or sel.needs_fine
            assert sel.needs_fine == (max_band == 50)
        if sel.needs_fine:
            for c in x.split(9_999):
                sel.add_fine(c)
            got = sel.value()
        if got is None:  # the band missed: the caller runs the radix selection
            assert kind != "normal"
            got = kernels.kth_largest_abs([x], k)
        assert got.item() == want.item(), (kind, density)
    one = kernels.SampledKthLargestAbs(n, 5, stride=1)  # stride 1: every value kept, exact in one pass
    one.add_sample(x)
    one.end_sample()
    assert one.value().item() == x.abs().sort(descending=True).values[4].item()


@pytest.mark.parametrize("method,params", [c for c in CASES if c[0] in ("ties", "dare")])
@pytest.mark.parametrize("band", ["sampled", "overflow", "missed"])
def test_streamed_ties_with_sampled_thresholds_equals_in_memory(sharded, tmp_path, monkeypatch, method, params, band):
    """Tiny samples and tensor cache force the sampled bands (and, 'missed', the radix fallback) on the
    streamed side; the in-memory side selects exactly in one pass: the same merge."""
    from mergelab.core import kernels
    from mergelab.methods.streaming import engine

    root, pre, experts = sharded
    ref = mergelab.merge(method, io.load_state_dict(pre), {t: io.load_state_dict(p) for t, p in experts.items()}, **params)
    monkeypatch.setattr(engine, "SAMPLE", 40)
    monkeypatch.setattr(engine, "SAMPLE_CACHED", 40)
    monkeypatch.setattr(engine, "SAMPLE_SLICES", 2)
    monkeypatch.setattr(engine, "TAU_CACHE_BYTES", 4 * 4 * 600)  # caches the small tensors only
    if band == "overflow":
        monkeypatch.setattr(engine, "BAND_VALUES", 3)  # at most one band value per task: always a third pass
    if band == "missed":
        monkeypatch.setattr(kernels.SampledKthLargestAbs, "value", lambda self: None)
    got = io.load_state_dict(stream_merge(method, pre, experts, tmp_path / "o", chunk=64, threads=2, **params))
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3, "scope": "tensor"}),
                                           ("dare", {"drop_rate": 0.5, "seed": 2, "combine": "ties", "density": 0.4,
                                                     "scope": "tensor"})])
def test_per_tensor_ties_reads_a_tensor_once_when_its_inputs_fit_in_their_dtype(tmp_path, monkeypatch, method, params):
    """bfloat16 inputs whose float32 task vectors overflow the cache but whose own bytes fit it: each
    source's tensor is read from its file once (not once per threshold pass and again for the merge),
    and the merge is the in-memory one."""
    from mergelab.methods.streaming import engine, files

    pre = {k: v.to(torch.bfloat16) for k, v in _state(0).items() if v.is_floating_point()}
    experts = {f"t{i}": {k: (pre[k].float() + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i)))
                         .to(torch.bfloat16) for k, v in pre.items()} for i in range(3)}
    ref = mergelab.merge(method, pre, experts, **params)
    pre_dir = save_sharded(pre, tmp_path / "pre")
    paths = {t: save_sharded(sd, tmp_path / t) for t, sd in experts.items()}
    n = 40 * 25  # layer.1.weight: float32 task vectors + base 16,000 bytes, its four bfloat16 inputs 8,000
    monkeypatch.setattr(engine, "TAU_CACHE_BYTES", 10_000)
    monkeypatch.setattr(engine, "SAMPLE", 40)  # sampled bands: several passes over the tensor
    monkeypatch.setattr(engine, "SAMPLE_SLICES", 2)
    read = files.SafetensorsModel.read
    counts: dict = {}
    lock = threading.Lock()  # two worker threads read

    def counting(self, key, start, count, buffer):
        with lock:
            counts[(self.owner, key)] = counts.get((self.owner, key), 0) + count
        return read(self, key, start, count, buffer)

    monkeypatch.setattr(files.SafetensorsModel, "read", counting)
    got = io.load_state_dict(stream_merge(method, pre_dir, paths, tmp_path / "o", chunk=64, threads=2, **params))
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    layer1 = {owner: c for (owner, key), c in counts.items() if key == "layer.1.weight"}
    assert len(layer1) == 4 and set(layer1.values()) == {n}


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
    with pytest.raises(IncompatibleModelsError, match=r"expert 't2' \(.*t2\) does not match the pretrained model: missing keys 'layer.0.bias'"):
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
    with pytest.raises(InputError, match=rf"{shard.name}: cannot read weights \(key '.*': needs bytes up to \d+ but the file has \d+; the file is truncated"):
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
    with pytest.raises(IncompatibleModelsError, match=rf"expert 't2', key 'layer.1.weight' \(.*{shard.name}\): 1 non-finite value"):
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


def test_in_memory_merge_needs_the_inputs_plus_one_model(tmp_path):
    """mergelab.merge (TIES global, T = 3) on loaded state dicts of 64 MB each grows the RSS by about one
    model (the output), not by T float32 task vectors; measured in a child process as the test below."""
    mb = 1 << 20
    script = textwrap.dedent("""
        import torch, mergelab
        def status(field):
            return 1024 * next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
        g = torch.Generator().manual_seed(0)
        pre = {f"w{i}": torch.randn(2 * 1024 * 1024, generator=g) for i in range(8)}
        experts = {t: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in "abc"}
        torch.empty(1).add_(1)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = status("VmRSS:")
        merged = mergelab.merge("ties", pre, experts, density=0.2)
        print(status("VmHWM:") - before)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth = int(proc.stdout.strip().splitlines()[-1])
    print(f"RSS growth {growth / mb:.1f} MB")
    assert growth < 64 * mb + 48 * mb, f"in-memory merge grew RSS by {growth / mb:.0f} MB (one model is 64 MB)"


def test_streamed_lora_merge_of_a_base_larger_than_the_limit_stays_under_it(tmp_path):
    """A 128 MB base (8 weights of 2048 x 2048, float32, 2 shards) and two rank-8 adapters on every weight, TIES
    global on two worker threads: the merge's RSS growth stays under 64 MB (the base, one expert body or one whole
    update s B A per weight and adapter would each exceed it), and a weight equals W0 + the method on s B A."""
    from safetensors.torch import load_file

    from mergelab.core.lora import LoraModule
    from mergelab.methods.lora import save_adapter

    mb, n, r = 1 << 20, 2048, 8
    g = torch.Generator().manual_seed(0)
    pre = {f"layer{i}.weight": torch.randn(n, n, generator=g) for i in range(8)}
    base = save_sharded(pre, tmp_path / "pre", n_shards=2)
    adapters = {name: str(save_adapter({k: LoraModule(k, k[:-7], torch.randn(n, r, generator=g) * 0.01,
                                                      torch.randn(r, n, generator=g) / n ** 0.5, 1.0) for k in pre},
                                       tmp_path / name)) for name in ("a", "b")}
    del pre
    script = textwrap.dedent(f"""
        import torch
        from mergelab.methods.streaming import stream_merge
        def status(field):
            return 1024 * next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
        torch.empty(1).add_(1)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = status("VmRSS:")
        stream_merge("ties", {str(base)!r}, {adapters!r}, {str(tmp_path / "out")!r}, density=0.2, shard_size="40MB",
                     threads=2)
        print(status("VmHWM:") - before)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth = int(proc.stdout.strip().splitlines()[-1])
    print(f"RSS growth {growth / mb:.1f} MB")
    assert growth < 64 * mb, f"streamed LoRA merge grew RSS by {growth / mb:.0f} MB (limit 64 MB)"
    # against the in-memory LoRA merge (each weight's whole update s B A materialised, TIES global over all 8)
    from mergelab.core.io import load_state_dict
    from mergelab.core.lora import load_lora
    from mergelab.methods import lora

    w0 = load_state_dict(base)
    want = lora.merge("ties", w0, {t: load_lora(p, w0) for t, p in adapters.items()}, density=0.2)
    got = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(str(f)))
    for key in ("layer0.weight", "layer7.weight"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_merge_of_a_model_larger_than_the_limit_stays_under_it(tmp_path, dtype):
    """Three 128 MB models (T = 2) merged on two worker threads with a 64 MB limit on the merge's RSS growth, measured in a child
    process (the peak RSS, reset after the imports through /proc/self/clear_refs, against the RSS then); TIES global reads
    everything at least twice. In bfloat16 the task vectors take few distinct values: millions tie with the threshold."""
    mb = 1 << 20
    n_tensors = 8
    per = 4 * 1024 * 1024 * 4 // dtype.itemsize  # 8 tensors of 16 MB = 128 MB per model
    g = torch.Generator().manual_seed(0)
    pre = {f"w{i}": torch.randn(per, generator=g).to(dtype) for i in range(n_tensors)}
    paths = {}
    for name, scale in (("pre", 0.0), ("a", 0.01), ("b", 0.02)):
        sd = {k: (v.float() + scale * torch.randn(per, generator=g)).to(dtype) for k, v in pre.items()} if scale else pre
        paths[name] = save_sharded(sd, tmp_path / name, n_shards=2)
        del sd
    del pre
    model_bytes = n_tensors * per * dtype.itemsize
    from mergelab.methods.streaming.engine import BAND_VALUES

    # slices, plus (bfloat16: the band of tied values fills) TIES' band budget of BAND_VALUES float32 values
    limit = 64 * mb + (4 * BAND_VALUES if dtype == torch.bfloat16 else 0)
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
    assert 3 * model_bytes >= 3 * limit  # the inputs are far larger than the limit
    print(f"RSS growth {growth / mb:.1f} MB")
    assert growth < limit, f"streamed merge grew RSS by {growth / mb:.0f} MB (limit {limit / mb:.0f} MB)"
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 4
    with safe_open(str(tmp_path / "out" / "model-00001-of-00004.safetensors"), framework="pt") as fh:
        assert fh.get_tensor(next(iter(fh.keys()))).numel() == per
