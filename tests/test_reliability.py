"""The bad-input catalogue of docs/reliability.md: one test per case.

Each CLI case asserts that the error names the culprit (file, expert, key, field or parameter), that
the command exits with status 2 without a traceback, and that nothing was written (the output folder
is absent, no temporary folder is left beside it, and the inputs' bytes are unchanged). API cases
assert the :class:`~mergelab.core.errors.InputError` and its message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.core import io
from mergelab.core.errors import HubUnavailableError, IncompatibleModelsError, InputError
from mergelab.pools import finetune
from mergelab.pools.benchmarks import BENCHMARKS, BenchmarkSpec, TaskSpec
from mergelab.pools.pool import PoolConfig

from .tiny_models import VOCAB, save_tiny_pool, tiny_bert_config, tiny_tokenizer

runner = CliRunner()
WORDS = VOCAB[5:]


# ---------------------------------------------------------------------------------------------- helpers
def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), by relative name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent if path.is_file() else path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files}


def refused(args: list[str], *needles: str, out: Path | None = None, code: int = 2):
    """Run the CLI; assert exit ``code``, no traceback, every needle in the message, ``out`` not written."""
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich may wrap long lines
    for needle in needles:
        assert needle in text, (needle, result.output)
    if out is not None:
        assert not out.exists(), f"{out} was written"
        assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temporary folder was left"
    return result


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return save_tiny_pool(tmp_path_factory.mktemp("pool"))


def merge_args(pre, experts: dict[str, Path | str], out: Path, method: str = "task_arithmetic", *params: str):
    args = ["merge", "-m", method, "-p", str(pre), "-o", str(out)]
    for name, path in experts.items():
        args += ["-e", f"{name}={path}"]
    for p in params:
        args += ["--param", p]
    return args


def expert_file(pool, tmp_path: Path, edit, name: str = "x.safetensors") -> Path:
    """The pretrained weights, edited by ``edit(state_dict)``, saved as one .safetensors file."""
    _, pre, _, _ = pool
    sd = dict(load_file(str(pre / "model.safetensors")))
    edit(sd)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


# ---------------------------------------------------------------------------------------------- models
def test_expert_of_another_architecture(pool, tmp_path):
    from transformers import BertModel, DistilBertConfig, DistilBertModel

    _, pre, a, _ = pool
    deep = tmp_path / "deep"
    BertModel(tiny_bert_config(num_hidden_layers=3)).save_pretrained(str(deep))
    out = tmp_path / "o"
    refused(merge_args(pre, {"a": a, "deep": deep}, out), "expert 'deep'", "extra keys", "encoder.layer.2.",
            "same architecture", out=out)
    distil = tmp_path / "distil"
    DistilBertModel(DistilBertConfig(vocab_size=len(VOCAB), dim=32, n_layers=2, n_heads=2, hidden_dim=64)).save_pretrained(
        str(distil))
    refused(merge_args(pre, {"distil": distil}, out), "expert 'distil'", "missing keys", "extra keys", out=out)


def test_missing_and_extra_keys(pool, tmp_path):
    _, pre, a, _ = pool
    out = tmp_path / "o"
    missing = expert_file(pool, tmp_path, lambda sd: sd.pop("pooler.dense.bias"), "missing.safetensors")
    refused(merge_args(pre, {"m": missing}, out), "expert 'm'", "missing keys 'pooler.dense.bias'", "(1 in all)", out=out)
    extra = expert_file(pool, tmp_path, lambda sd: sd.update({"classifier.weight": torch.zeros(2, 32)}),
                        "extra.safetensors")
    refused(merge_args(pre, {"e": extra}, out), "expert 'e'", "extra keys 'classifier.weight'", out=out)


def test_shape_mismatch(pool, tmp_path):
    _, pre, _, _ = pool
    key = "encoder.layer.0.intermediate.dense.weight"  # [64, 32]
    bad = expert_file(pool, tmp_path, lambda sd: sd.update({key: sd[key].T.contiguous()}))
    out = tmp_path / "o"
    refused(merge_args(pre, {"t": bad}, out), "expert 't'", key, "shape (32, 64)", "(64, 32)", out=out)


def test_dtype_mix_half_expert_is_merged_in_float32(pool, tmp_path):
    """Decision: floating dtypes may differ (fp16/bf16 expert, fp32 pretrained): the task vector is computed in
    float32 and the result has the pretrained model's dtype."""
    _, pre, a, _ = pool
    a_sd = io.load_state_dict(a)
    half = tmp_path / "half.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in a_sd.items()}, str(half))
    out = tmp_path / "o"
    result = runner.invoke(app, merge_args(pre, {"h": half}, out, "task_arithmetic", "scaling=0.5"))
    assert result.exit_code == 0, result.output
    merged = io.load_state_dict(out)
    pre_sd = io.load_state_dict(pre)
    for k, p in pre_sd.items():
        if p.is_floating_point():
            assert merged[k].dtype == torch.float32
            expected = p + 0.5 * (a_sd[k].half().float() - p)  # the expert as stored (fp16), in float32
            torch.testing.assert_close(merged[k], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[k], p)


def test_dtype_mix_float_and_integer_is_refused(pool, tmp_path):
    _, pre, _, _ = pool
    key = "encoder.layer.1.output.dense.bias"
    bad = expert_file(pool, tmp_path, lambda sd: sd.update({key: sd[key].round().to(torch.int32)}))
    out = tmp_path / "o"
    refused(merge_args(pre, {"i": bad}, out), "expert 'i'", key, "torch.int32", "floating point", out=out)


@pytest.mark.parametrize("value,owner", [(float("nan"), "expert"), (float("inf"), "expert"), (float("-inf"), "pretrained")])
def test_non_finite_values(pool, tmp_path, value, owner):
    _, pre, a, _ = pool
    key = "encoder.layer.0.attention.self.query.weight"

    def poison(sd):
        sd[key] = sd[key].clone()
        sd[key][1, 2] = value

    bad = expert_file(pool, tmp_path, poison)
    out = tmp_path / "o"
    if owner == "expert":
        refused(merge_args(pre, {"n": bad}, out), "expert 'n'", key, "1 non-finite value(s)", out=out)
    else:
        refused(merge_args(bad, {"a": a}, out), "pretrained", key, "non-finite", out=out)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(pool, tmp_path, damage):
    _, pre, a, _ = pool
    bad = tmp_path / "bad.safetensors"
    data = (a / "model.safetensors").read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 3], "garbage": b"\x13\x37" * 500, "empty": b""}[damage])
    out = tmp_path / "o"
    refused(merge_args(pre, {"a": bad}, out), str(bad), "cannot read weights", out=out)


class NotWeights:
    """Any class of the user's: unpickling it could run code, so it is refused."""


def test_pickle_checkpoint_that_is_not_a_state_dict(pool, tmp_path):
    """A .bin holding something else, or an arbitrary pickled object (refused by torch.load(weights_only=True))."""
    _, pre, _, _ = pool
    out = tmp_path / "o"
    not_sd = tmp_path / "list.bin"
    torch.save([torch.zeros(2)], not_sd)
    refused(merge_args(pre, {"l": not_sd}, out), str(not_sd), "expected a state dict", out=out)
    obj = tmp_path / "object.bin"
    torch.save({"w": torch.zeros(2), "extra": NotWeights()}, obj)  # a class weights_only loading refuses
    refused(merge_args(pre, {"o": obj}, out), str(obj), "cannot read weights", out=out)


def test_truncated_shard_in_sharded_directory(pool, tmp_path):
    _, pre, a, _ = pool
    sd = io.load_state_dict(a)
    keys = sorted(sd)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, ks in halves.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(shard_dir / name))
    (shard_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    second = shard_dir / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes()[:-100])
    out = tmp_path / "o"
    refused(merge_args(pre, {"s": shard_dir}, out), "model-00002-of-00002.safetensors", "cannot read weights", out=out)


def test_path_that_does_not_exist(pool, tmp_path):
    _, pre, a, _ = pool
    out = tmp_path / "o"
    refused(merge_args(pre, {"a": a, "b": tmp_path / "nope" / "expert"}, out), str(tmp_path / "nope" / "expert"),
            "no such file or directory", out=out)
    refused(merge_args(tmp_path / "missing.safetensors", {"a": a}, out), "missing.safetensors", out=out)


def test_hub_id_offline(pool, tmp_path, monkeypatch):
    _, pre, a, _ = pool
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    refused(merge_args("someorg/some-model", {"a": a}, out), "someorg/some-model", "HF_HUB_OFFLINE", "local directory",
            out=out)
    refused(merge_args(pre, {"a": "someorg/expert-a"}, out), "someorg/expert-a", "hub is disabled", out=out)
    with pytest.raises(HubUnavailableError, match="someorg/some-model"):
        io.load_state_dict("someorg/some-model")


def test_hub_dataset_offline(monkeypatch):
    """A dataset hub id without internet: the loader's failure becomes HubUnavailableError naming the id.
    (``datasets`` is optional and not installed here: a stand-in module fails the way it does offline.)"""
    import sys
    import types

    from mergelab.pools.data.loaders import load_hf_task

    fake = types.ModuleType("datasets")

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'someorg/reviews' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    fake.load_from_disk = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(HubUnavailableError, match="someorg/reviews.*save_to_disk"):
        load_hf_task("someorg/reviews", split="train")


# ---------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "method,param,needle",
    [
        ("ties", "density=0", "'density' must be in (0, 1]"),
        ("ties", "density=1.5", "'density' must be in (0, 1]"),
        ("ties", "density=abc", "'density'"),
        ("ties", "density=.nan", "'density'"),
        ("dare", "drop_rate=1.0", "'drop_rate' must be in [0, 1)"),
        ("dare", "seed=0.5", "'seed' must be an integer"),
        ("task_arithmetic", "scaling=abc", "'scaling' must be a finite number, got 'abc'"),
        ("task_arithmetic", "scaling=.inf", "'scaling' must be a finite number"),
        ("task_arithmetic", "scaling={a: 0.3}", "per-task values must name exactly the tasks"),
        ("average", "weights=5", "'weights'"),
        ("average", "weights=[1, -1]", "'weights[1]'"),
        ("ties", "scope=layer", "'scope' must be 'global' or 'tensor'"),
        ("ties", "density=[0.2", "cannot read value"),
    ],
)
def test_parameters_out_of_range(pool, tmp_path, method, param, needle):
    _, pre, a, b = pool
    out = tmp_path / "o"
    refused(merge_args(pre, {"a": a, "b": b}, out, method, param), needle, out=out)


@pytest.mark.parametrize("stream", [False, True])
def test_scaling_that_overflows_float32_is_refused(pool, tmp_path, stream, default_torch_threads):
    """A finite but huge coefficient overflows the float32 sum: refused, naming the key, instead of writing Inf.
    (Torch's default thread count: the streamed merge's default worker count, as users run it.)"""
    _, pre, a, b = pool
    out = tmp_path / "o"
    args = merge_args(pre, {"a": a, "b": b}, out, "task_arithmetic", "scaling=1.0e39") + (["--stream"] if stream else [])
    refused(args, "produced non-finite values in key", "overflow of torch.float32", "'scaling': 1e+39", out=out)


def test_merge_that_overflows_a_float16_pretrained_model_is_refused(tmp_path):
    """The result is written in the pretrained model's dtype; float16 tops out at 65504."""
    pre = {"w": torch.full((2, 3), 100.0, dtype=torch.float16)}
    experts = {"t": {"w": torch.full((2, 3), 300.0, dtype=torch.float16)}}
    assert torch.isfinite(mergelab.merge("task_arithmetic", pre, experts, scaling=300.0)["w"]).all()  # 60100
    with pytest.raises(InputError, match=r"key 'w' \(overflow of torch.float16\)"):
        mergelab.merge("task_arithmetic", pre, experts, scaling=400.0)  # 80100


def test_router_parameters():
    from mergelab.methods.dynamic import RouterConfig
    from mergelab.methods.dynamic.router import rescale, routing_weights

    for field, value, needle in [("temperature", -1.0, "'temperature' must be a positive"),
                                 ("temperature", 0.0, "'temperature'"), ("gain", float("nan"), "'gain'"),
                                 ("scale", "max", "'scale'"), ("probes", "stored", "'probes'"),
                                 ("layer", -2, "'layer' (probe layer)"), ("layer", 1.5, "'layer'"),
                                 ("normalisation", "cosine", "'normalisation'")]:
        with pytest.raises(InputError) as err:
            RouterConfig(**{field: value})
        assert needle in str(err.value)
    with pytest.raises(InputError, match="'temperature'"):
        routing_weights(torch.zeros(2, 3), -0.5)
    with pytest.raises(InputError, match="'gain'"):
        rescale(torch.full((2, 3), 1 / 3), [0.3, 0.3, 0.3], gain=-1)


def test_probe_layer_beyond_the_depth(pool):
    from mergelab.methods.dynamic import RouterConfig, SEMerging
    from mergelab.pools.families.text import TextClassifierFamily

    _, pre, a, b = pool
    family = TextClassifierFamily(pre, max_length=16)
    pre_sd = family.pretrained_state()
    experts = {"a": io.load_state_dict(a), "b": io.load_state_dict(b)}
    plan = mergelab.methods.plan("task_arithmetic", pre_sd, experts)
    with pytest.raises(InputError, match=r"probe layer must be an integer in 0\.\.2 .* got 3"):
        SEMerging(family, pre_sd, plan, experts, RouterConfig(layer=3))


# ---------------------------------------------------------------------------------------------- tiny benchmark (CLI)
def _csv(path: Path, rows: list[tuple[str, object]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def _rows(k: int, n: int = 40) -> list[tuple[str, int]]:
    words = WORDS[k * 12 : (k + 1) * 12]
    return [(f"{words[i % 6]} {words[6 + (i * 7) % 6]} {words[(i * 5) % 12]}", i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """A benchmark named 'tiny-rel' on a tiny BERT (so `bench --task` runs in seconds)."""
    from transformers import BertModel

    d = tmp_path_factory.mktemp("tiny-rel")
    model = d / "model"
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(model))
    tiny_tokenizer().save_pretrained(str(model))
    t0 = _csv(d / "t0.csv", _rows(0))
    spec = BenchmarkSpec(
        name="tiny-rel", backbone=str(model), tasks=(TaskSpec("t0", 24, 8, 8, path=str(t0)),),
        recipe=finetune.FinetuneRecipe(steps=4, batch_size=8, body_lr=1e-3, head_lr=1e-2, warmup_fraction=0.0),
        max_length=12, lambdas=(0.3,), search_per_task=5,
    )  # fmt: skip
    BENCHMARKS[spec.name] = spec
    yield d, spec
    BENCHMARKS.pop(spec.name, None)


def bench_args(tasks: dict[str, Path], out: Path, cache: Path, *extra: str) -> list[str]:
    args = ["bench", "-b", "tiny-rel", "-q", "--out", str(out), "--cache", str(cache), *extra]
    for name, path in tasks.items():
        args += ["--task", f"{name}={path}"]
    return args


def test_empty_dataset(tiny_bench, tmp_path):
    d, _ = tiny_bench
    good = _csv(tmp_path / "good.csv", _rows(1))
    out, cache = tmp_path / "run", tmp_path / "cache"
    empty_csv = _csv(tmp_path / "empty.csv", [])
    refused(bench_args({"g": good, "e": empty_csv}, out, cache), str(empty_csv), "no examples", out=out)
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("\n\n")
    refused(bench_args({"g": good, "e": empty_jsonl}, out, cache), str(empty_jsonl), "no examples", out=out)
    assert not cache.exists()


def test_task_with_one_class(tiny_bench, tmp_path):
    good = _csv(tmp_path / "good.csv", _rows(1))
    one = _csv(tmp_path / "one.csv", [(t, "positive") for t, _ in _rows(2)])
    out, cache = tmp_path / "run", tmp_path / "cache"
    refused(bench_args({"g": good, "one": one}, out, cache), "task 'one'", "single class (positive)", out=out)
    assert not cache.exists()


def test_labels_outside_the_heads_range(pool, tiny_bench, tmp_path):
    from mergelab.pools.data.tasks import TextTask
    from mergelab.pools.evaluate import evaluate_tasks
    from mergelab.pools.families.text import TextClassifierFamily, accuracy

    d, spec = tiny_bench
    family = TextClassifierFamily(spec.backbone, max_length=12)
    head = family.new_head(2, seed=0)
    task = TextTask("three", [t for t, _ in _rows(0, 6)], [0, 1, 2, 0, 1, 2], label_names=["a", "b", "c"])
    with pytest.raises(InputError, match=r"task 'three': example 'three-2' has label 2, outside the head's classes 0\.\.1"):
        evaluate_tasks(family, None, {"three": head}, {"three": task})
    with pytest.raises(InputError, match=r"label 2 is outside the head's classes 0\.\.1"):
        accuracy(family, task.texts, task.labels, head)
    # a negative label in a user's file is refused where it is read (file and line named)
    neg = tmp_path / "neg.jsonl"
    neg.write_text("\n".join(json.dumps({"text": t, "label": -1 if i == 3 else y}) for i, (t, y) in enumerate(_rows(1))))
    out = tmp_path / "run"
    refused(bench_args({"n": neg}, out, tmp_path / "cache"), str(neg), "line 4", "'label'", "start at 0", out=out)


def test_text_that_tokenizes_to_nothing(tiny_bench, tmp_path):
    good = _csv(tmp_path / "good.csv", _rows(1))
    rows = _rows(2)
    rows[5] = ("\u200b\u200b", 1)  # zero-width spaces: not blank to Python, nothing to the tokenizer
    zw = _csv(tmp_path / "zw.csv", rows)
    out, cache = tmp_path / "run", tmp_path / "cache"
    refused(bench_args({"g": good, "zw": zw}, out, cache), "task 'zw'", str(zw), "example 'zw-6'",
            "tokenizes to nothing", out=out)
    assert not (cache / "experts").exists()  # refused before any expert was trained


def test_bench_out_equal_to_an_input(tiny_bench, tmp_path):
    good = _csv(tmp_path / "good.csv", _rows(1))
    before = digest(good)
    refused(bench_args({"g": good}, good, tmp_path / "cache"), f"--out {good}", "not a folder")
    assert digest(good) == before


def test_analyze_refuses_parameters_before_training(tiny_bench, tmp_path):
    """Negative temperature and a probe layer beyond the depth fail at once, not after fine-tuning experts."""
    out, cache = tmp_path / "an", tmp_path / "cache"
    base = ["analyze", "routing", "-b", "tiny-rel", "-q", "--out", str(out), "--cache", str(cache)]
    refused([*base, "--temperature", "-1"], "'temperature' must be a positive", out=out)
    refused([*base, "--layer", "3"], "probe layer 3 is beyond the depth", "(2 layers", out=out)
    refused(["analyze", "probe-sweep", *base[2:], "--layers", "1", "--layers", "7"], "probe layer 7", out=out)
    assert not cache.exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["bench", "-b", "tiny-rel", "--row", "ties_typo"], "--row 'ties_typo': unknown row"),
        (["bench", "-b", "nope"], "unknown benchmark 'nope'"),
        (["bench", "-b", "tiny-rel", "--task", "noequals"], "expected NAME=PATH"),
        (["analyze", "nope", "-b", "tiny-rel"], "unknown analysis 'nope'"),
        (["adapt", "-m", "adamerging_taskwise", "-b", "tiny-rel", "--steps", "-1"], "--steps -1"),
        (["adapt", "-m", "adamerging_taskwise", "-b", "tiny-rel", "--lr", "0"], "--lr 0.0"),
        (["adapt", "-m", "ties", "-b", "tiny-rel"], "--method 'ties'"),
        (["adapt", "-m", "symerge", "-b", "tiny-rel", "--loss", "mse"], "--loss 'mse'"),
    ],
)
def test_other_cli_options_refused_before_any_work(tiny_bench, tmp_path, args, needle):
    out, cache = tmp_path / "out", tmp_path / "cache"
    refused([*args, "-q", "--out", str(out), "--cache", str(cache)], needle, out=out)
    assert not cache.exists()


# ---------------------------------------------------------------------------------------------- YAML config
def load_pool_yaml(path: Path) -> PoolConfig:
    """The loader a YAML run config goes through (mergelab.experiment.config, issue 7, wraps the same two steps):
    PyYAML's safe_load, then PoolConfig's pydantic validation. Bad YAML becomes an InputError."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or "pool" not in data:
        raise InputError(f"{path}: expected a mapping with a 'pool' section")
    return PoolConfig.model_validate(data["pool"])


@pytest.mark.parametrize(
    "text,loc,needle",
    [
        ("pool:\n  pretrained: ./pre\n  experts: {a: ./a}\n  expertz: {b: ./b}\n", ("expertz",), "Extra inputs"),
        ("pool:\n  pretrained: ./pre\n  experts: 5\n", ("experts",), "valid dictionary"),
        ("pool:\n  pretrained: [1, 2]\n  experts: {a: ./a}\n", ("pretrained",), "valid string"),
        ("pool:\n  pretrained: ./pre\n  experts: {}\n", ("experts",), "at least one expert"),
        ("pool:\n  pretrained: ./pre\n  experts: {a: ./a}\n  tasks: {a: {path: x.csv, label_feild: y}}\n",
         ("tasks", "a", "label_feild"), "Extra inputs"),
        ("pool:\n  family: vision\n  pretrained: ./pre\n  experts: {a: ./a}\n", ("family",), "'text'"),
    ],
)
def test_yaml_unknown_fields_and_wrong_types(tmp_path, text, loc, needle):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError) as err:
        load_pool_yaml(path)
    errors = err.value.errors()
    assert any(e["loc"] == loc for e in errors), errors  # the culprit's field path
    assert needle in str(err.value)


def test_yaml_that_does_not_parse(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("pool:\n  pretrained: [./pre\n")
    with pytest.raises(InputError, match="run.yaml: not valid YAML"):
        load_pool_yaml(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(InputError, match="'pool' section"):
        load_pool_yaml(path)


# ---------------------------------------------------------------------------------------------- outputs vs inputs
def test_output_path_equal_to_an_input(pool, tmp_path):
    root, pre, a, b = pool
    ex_file = tmp_path / "ex.safetensors"
    ex_file.write_bytes((a / "model.safetensors").read_bytes())
    before = {p: digest(p) for p in (pre, a, ex_file)}
    refused(merge_args(pre, {"a": a}, a), "would overwrite the input", str(a))
    refused(merge_args(pre, {"a": ex_file}, ex_file), "would overwrite the input", str(ex_file))
    refused(merge_args(pre, {"a": a}, pre / "merged"), "would overwrite the input")  # inside an input
    refused(merge_args(pre, {"a": ex_file}, tmp_path), "would overwrite the input")  # containing an input
    assert not (pre / "merged").exists()
    assert before == {p: digest(p) for p in (pre, a, ex_file)}


# ---------------------------------------------------------------------------------------------- inputs never modified
def test_merge_never_modifies_inputs(pool, tmp_path):
    """Every method, through the CLI: the inputs' bytes (and modification times) are the same afterwards."""
    root, pre, a, b = pool
    ex_file = tmp_path / "b.safetensors"
    ex_file.write_bytes((b / "model.safetensors").read_bytes())
    watched = [pre, a, ex_file]
    before = {p: digest(p) for p in watched}
    mtimes = {f: f.stat().st_mtime_ns for p in watched for f in ([p] if p.is_file() else p.rglob("*"))}
    for method, params in [("average", []), ("task_arithmetic", ["scaling=0.4"]), ("ties", ["density=0.3"]),
                           ("dare", ["drop_rate=0.5", "combine=ties"])]:
        result = runner.invoke(app, merge_args(pre, {"a": a, "b": ex_file}, tmp_path / f"out-{method}", method, *params))
        assert result.exit_code == 0, result.output
    assert before == {p: digest(p) for p in watched}
    assert mtimes == {f: f.stat().st_mtime_ns for f in mtimes}


def test_bench_on_user_tasks_never_modifies_inputs(tiny_bench, tmp_path):
    d, spec = tiny_bench
    t1 = _csv(tmp_path / "t1.csv", _rows(1))
    t2 = tmp_path / "t2.jsonl"
    t2.write_text("\n".join(json.dumps({"text": t, "label": ["neg", "pos"][y]}) for t, y in _rows(2)) + "\n")
    watched = [t1, t2, Path(spec.backbone)]
    before = {p: digest(p) for p in watched}
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = runner.invoke(app, bench_args({"t1": t1, "t2": t2}, out, cache, "--row", "task_arithmetic_0.3"))
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]["task_arithmetic_0.3"]["per_task"]) == {"t1", "t2"}
    assert before == {p: digest(p) for p in watched}
    # a second run reads the expert cache and leaves it as it was
    cache_before = digest(cache)
    result = runner.invoke(app, bench_args({"t1": t1, "t2": t2}, tmp_path / "run2", cache, "--row", "task_arithmetic_0.3"))
    assert result.exit_code == 0, result.output
    assert digest(cache) == cache_before
    assert before == {p: digest(p) for p in watched}


def test_api_errors_are_input_errors():
    """Every case above derives from InputError (a ValueError), so user code can catch them in one place."""
    assert issubclass(IncompatibleModelsError, InputError) and issubclass(HubUnavailableError, InputError)
    assert issubclass(InputError, ValueError)


def test_output_folder_holding_other_files_is_not_replaced(pool, tmp_path):
    """Replacing a folder deletes its contents: only a previous model folder (or an empty one) may be replaced."""
    _, pre, a, _ = pool
    docs = tmp_path / "Documents"
    (docs / "sub").mkdir(parents=True)
    (docs / "notes.txt").write_text("mine")
    (docs / "config.json").write_text("{}")
    before = digest(docs)
    refused(merge_args(pre, {"a": a}, docs), f"output path {docs} holds 'notes.txt', 'sub'", "refusing to replace it")
    assert digest(docs) == before and (docs / "sub").is_dir()
    note = tmp_path / "note.txt"
    note.write_text("mine")
    refused(merge_args(pre, {"a": a}, note), "exists and is not a folder")
    assert note.read_text() == "mine"
    # a previous merge output and an empty folder are replaced
    for target in (tmp_path / "merged", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        for _ in range(2):
            result = runner.invoke(app, merge_args(pre, {"a": a}, target))
            assert result.exit_code == 0, result.output
