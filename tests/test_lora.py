"""LoRA experts (issue 16): PEFT adapter folders read as factored task vectors and merged exactly.

References are written in the tests (W0 + sum_t lambda_t s_t B_t A_t with s = alpha/r, or alpha/sqrt(r)
for rsLoRA) or come from PEFT itself (``merge_and_unload``, ``PeftModel.from_pretrained``), never from
mergelab's own merge code.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from mergelab.core import lora
from mergelab.core.errors import IncompatibleModelsError, InputError
from mergelab.core.io import load_state_dict

from .tiny_models import tiny_bert_config

peft = pytest.importorskip("peft")


def _randomise_b(model, seed):
    """PEFT starts B at zero (no update; A for embeddings); give every lora_B and embedding factor seeded values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def make_adapter(base_dir, out, seed, model_cls=None, **config):
    """A LoRA adapter made with PEFT's get_peft_model over the model in ``base_dir``, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    model_cls = model_cls or BertModel
    torch.manual_seed(seed)
    config.setdefault("target_modules", ["query", "value"])
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    pm = get_peft_model(model_cls.from_pretrained(str(base_dir)), LoraConfig(**config))
    _randomise_b(pm, seed)
    pm.save_pretrained(str(out))
    return out


def peft_merged(base_dir, adapter_dir, model_cls=None):
    """PEFT's own full model: PeftModel.from_pretrained(...).merge_and_unload(), as a state dict."""
    from peft import PeftModel
    from transformers import BertModel

    model_cls = model_cls or BertModel
    pm = PeftModel.from_pretrained(model_cls.from_pretrained(str(base_dir)), str(adapter_dir))
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BertModel folder and its state dict."""
    from transformers import BertModel

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(root / "base"))
    return root, root / "base", load_state_dict(root / "base")


@pytest.fixture(scope="module")
def adapters(bert):
    """Two adapters over the tiny BERT: plain (r=4, alpha=8) and with rank/alpha patterns and other targets."""
    root, base_dir, _ = bert
    a = make_adapter(base_dir, root / "ad_a", 1)
    b = make_adapter(base_dir, root / "ad_b", 2, target_modules=["query", "key", "dense"], r=3, lora_alpha=5,
                     rank_pattern={"layer.1.attention.self.query": 2, "output.dense": 5},
                     alpha_pattern={"key": 7})
    return {"a": a, "b": b}


def _hand_update(adapter_dir, module, base_key_alpha_r):
    """s B A of one module read straight from the saved file, with s from the test's own numbers."""
    from safetensors.torch import load_file

    t = load_file(str(adapter_dir / "adapter_model.safetensors"))
    A = t[f"base_model.model.{module}.lora_A.weight"]
    B = t[f"base_model.model.{module}.lora_B.weight"]
    alpha, r, rs = base_key_alpha_r
    assert A.shape[0] == r
    return (alpha / (math.sqrt(r) if rs else r)) * (B @ A)


# ---------------------------------------------------------------- step 1: reading adapters


def test_single_adapter_equals_peft_merge_and_unload(bert, adapters):
    _, base_dir, base = bert
    for name, ad in adapters.items():
        vec = lora.load_lora(ad, base)
        ref = peft_merged(base_dir, ad)
        assert set(ref) == set(base)
        for key in base:
            got = base[key] + vec[key] if key in vec else base[key]
            torch.testing.assert_close(got, ref[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
        assert lora.is_adapter_dir(ad) and not lora.is_adapter_dir(base_dir)


def test_rank_and_alpha_patterns_give_the_hand_scaling(bert, adapters):
    _, _, base = bert
    vec = lora.load_lora(adapters["b"], base)
    # (alpha, r) per module from the config written in the fixture, PEFT's "first matching pattern" rule
    want = {
        "encoder.layer.0.attention.self.query": (5, 3),
        "encoder.layer.1.attention.self.query": (5, 2),   # rank_pattern
        "encoder.layer.0.attention.self.key": (7, 3),     # alpha_pattern
        "encoder.layer.1.attention.self.key": (7, 3),
        "encoder.layer.0.attention.output.dense": (5, 5),  # rank_pattern 'output.dense'
        "encoder.layer.0.output.dense": (5, 5),
        "encoder.layer.0.intermediate.dense": (5, 3),
    }
    for module, (alpha, r) in want.items():
        m = vec.modules[f"{module}.weight"]
        assert (m.rank, m.scaling) == (r, alpha / r), module
        torch.testing.assert_close(vec[f"{module}.weight"], _hand_update(adapters["b"], module, (alpha, r, False)),
                                   rtol=1e-6, atol=1e-7)
    assert "encoder.layer.0.attention.self.value.weight" not in vec  # not a target: zero task vector


def test_rslora_scaling_is_alpha_over_sqrt_r(bert, tmp_path):
    _, base_dir, base = bert
    ad = make_adapter(base_dir, tmp_path / "rs", 3, r=4, lora_alpha=6, use_rslora=True)
    vec = lora.load_lora(ad, base)
    key = "encoder.layer.0.attention.self.query.weight"
    assert vec.modules[key].scaling == pytest.approx(6 / 2.0)  # alpha / sqrt(4)
    torch.testing.assert_close(vec[key], _hand_update(ad, key[:-7], (6, 4, True)), rtol=1e-6, atol=1e-7)
    ref = peft_merged(base_dir, ad)
    torch.testing.assert_close(base[key] + vec[key], ref[key], rtol=0, atol=1e-6)
    # rsLoRA with a per-module rank: alpha / sqrt(r of that module)
    ad2 = make_adapter(base_dir, tmp_path / "rs2", 16, r=4, lora_alpha=6, use_rslora=True, rank_pattern={"value": 9})
    vec2 = lora.load_lora(ad2, base)
    vkey = "encoder.layer.1.attention.self.value.weight"
    assert vec2.modules[vkey].rank == 9 and vec2.modules[vkey].scaling == pytest.approx(6 / 3.0)
    ref2 = peft_merged(base_dir, ad2)
    torch.testing.assert_close(base[vkey] + vec2[vkey], ref2[vkey], rtol=0, atol=1e-6)


def test_gpt2_conv1d_fan_in_fan_out_equals_peft(tmp_path):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=50)).save_pretrained(
        str(tmp_path / "gpt2"))
    base = load_state_dict(tmp_path / "gpt2")
    ad = make_adapter(tmp_path / "gpt2", tmp_path / "ad", 4, model_cls=GPT2Model, target_modules=["c_attn", "c_fc"],
                      fan_in_fan_out=True)
    vec = lora.load_lora(ad, base)
    key = "h.0.attn.c_attn.weight"
    assert tuple(vec[key].shape) == tuple(base[key].shape) == (32, 96)  # Conv1D: [in, out]
    torch.testing.assert_close(vec[key], _hand_update(ad, "h.0.attn.c_attn", (8, 4, False)).T)
    ref = peft_merged(tmp_path / "gpt2", ad, GPT2Model)
    for k in base:
        torch.testing.assert_close(base[k] + vec[k] if k in vec else base[k], ref[k], rtol=0, atol=1e-6, msg=k)


def test_task_model_adapter_maps_to_body_and_to_task_model_keys(bert, tmp_path):
    """An adapter trained on BertForSequenceClassification (PEFT names 'bert.encoder...') merges into the bare
    body (keys 'encoder...') and into the task model (keys 'bert.encoder...'); a body adapter into the task model."""
    from transformers import BertForSequenceClassification

    _, base_dir, base = bert
    torch.manual_seed(5)
    BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=3).save_pretrained(str(tmp_path / "cls"))
    cls_sd = load_state_dict(tmp_path / "cls")
    ad = make_adapter(tmp_path / "cls", tmp_path / "ad", 6, model_cls=BertForSequenceClassification)
    on_body = lora.load_lora(ad, base)
    on_task = lora.load_lora(ad, cls_sd)
    key = "encoder.layer.1.attention.self.value.weight"
    assert on_body.modules[key].name == "bert." + key[:-7]
    torch.testing.assert_close(on_task["bert." + key], on_body[key], rtol=0, atol=0)
    ref = peft_merged(tmp_path / "cls", ad, BertForSequenceClassification)
    torch.testing.assert_close(cls_sd["bert." + key] + on_task["bert." + key], ref["bert." + key], rtol=0, atol=1e-6)
    body_ad = make_adapter(base_dir, tmp_path / "body_ad", 7)
    assert "bert." + key in lora.load_lora(body_ad, cls_sd)


def _edited(src, dst, **fields):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(fields)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("field,value", [("use_dora", True), ("bias", "lora_only"), ("modules_to_save", ["pooler"]),
                                         ("lora_bias", True), ("peft_type", "IA3")])
def test_unsupported_fields_are_refused_naming_adapter_and_field(bert, adapters, tmp_path, field, value):
    _, _, base = bert
    ad = _edited(adapters["a"], tmp_path / "bad", **{field: value})
    with pytest.raises(InputError, match=rf"{tmp_path / 'bad'}.*'{field}'"):
        lora.load_lora(ad, base)


def test_real_dora_and_bias_adapters_are_refused(bert, tmp_path):
    _, base_dir, base = bert
    dora = make_adapter(base_dir, tmp_path / "dora", 8, use_dora=True)
    with pytest.raises(InputError, match="'use_dora'"):
        lora.load_lora(dora, base)
    biased = make_adapter(base_dir, tmp_path / "bias", 9, bias="all")
    with pytest.raises(InputError, match="'bias'"):
        lora.load_lora(biased, base)


def test_embedding_adapter_equals_peft_and_round_trips_as_an_adapter(bert, adapters, tmp_path):
    """PEFT's Embedding LoRA: update (s B A)^T, [num_embeddings, dim]; merged with a Linear adapter and written back."""
    import mergelab
    from mergelab.methods import lora as mlora

    _, base_dir, base = bert
    ad = make_adapter(base_dir, tmp_path / "emb", 10, target_modules=["word_embeddings", "query"])
    vec = lora.load_lora(ad, base)
    key = "embeddings.word_embeddings.weight"
    assert vec.modules[key].embedding and tuple(vec[key].shape) == tuple(base[key].shape)
    ref = peft_merged(base_dir, ad)
    for k in base:
        torch.testing.assert_close(base[k] + vec[k] if k in vec else base[k], ref[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(ref[key], base[key])
    vecs = {"emb": vec, "a": lora.load_lora(adapters["a"], base)}
    out = mlora.save_adapter(mlora.merged_factors("task_arithmetic", vecs, scaling=0.5), tmp_path / "out",
                             like=vec.config)
    got = peft_merged(base_dir, out)
    full = mergelab.merge("task_arithmetic", base, vecs, scaling=0.5)
    tau_a = _peft_taus(bert, {"a": adapters["a"]})["a"]
    for k, w0 in base.items():
        want = w0 + 0.5 * (ref[k] - w0) + 0.5 * tau_a[k]
        torch.testing.assert_close(full[k], want, rtol=0, atol=2e-6, msg=k)
        torch.testing.assert_close(got[k], full[k], rtol=0, atol=1e-6, msg=k)


def test_convolution_adapter_is_refused(bert, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, base = bert
    bad = shutil.copytree(adapters["a"], tmp_path / "conv")
    t = load_file(str(bad / "adapter_model.safetensors"))
    name = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    t[name] = t[name].reshape(*t[name].shape, 1, 1)  # a Conv2d adapter's A: [r, in, 1, 1]
    save_file(t, str(bad / "adapter_model.safetensors"))
    with pytest.raises(InputError, match=r"conv.*module 'encoder\.layer\.0\.attention\.self\.query'.*convolution"):
        lora.load_lora(bad, base)


def test_wrong_base_is_refused_before_any_update(bert, adapters, tmp_path):
    from transformers import BertModel, GPT2Config, GPT2Model

    _, _, _ = bert
    BertModel(tiny_bert_config(hidden_size=16, intermediate_size=32)).save_pretrained(str(tmp_path / "small"))
    with pytest.raises(IncompatibleModelsError, match=r"ad_a.*module 'encoder\.layer\.0\.attention\.self\.query'.*"
                                                      r"\(16, 16\)"):
        lora.load_lora(adapters["a"], load_state_dict(tmp_path / "small"))
    GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=50)).save_pretrained(
        str(tmp_path / "gpt2"))
    with pytest.raises(IncompatibleModelsError, match=r"ad_a.*has no weight"):
        lora.load_lora(adapters["a"], load_state_dict(tmp_path / "gpt2"))


def test_rank_disagreeing_with_config_is_refused(bert, adapters, tmp_path):
    _, _, base = bert
    ad = _edited(adapters["a"], tmp_path / "bad_r", r=5)
    with pytest.raises(InputError, match=r"bad_r.*rank 4 but field r says 5"):
        lora.load_lora(ad, base)


# ---------------------------------------------------------------- step 2: static merges of LoRA experts


def _peft_taus(bert, adapters):
    """Each adapter's dense task vector as PEFT computes it: merge_and_unload() - W0 (an independent reference)."""
    _, base_dir, base = bert
    return {t: {k: v - base[k] for k, v in peft_merged(base_dir, ad).items()} for t, ad in adapters.items()}


@pytest.mark.parametrize("method,params,coeffs", [
    ("task_arithmetic", {"scaling": {"a": 0.7, "b": -0.4}}, {"a": 0.7, "b": -0.4}),
    ("average", {"weights": [1.0, 3.0]}, {"a": 0.25, "b": 0.75}),
])
def test_factored_merge_equals_the_dense_formula(bert, adapters, method, params, coeffs):
    """W0 + sum_t lambda_t s_t B_t A_t, the dense updates taken from PEFT's merge_and_unload of each adapter."""
    import mergelab
    from mergelab.methods import lora as mlora

    _, _, base = bert
    vecs = {t: lora.load_lora(p, base) for t, p in adapters.items()}
    assert mlora.is_factored(method, vecs)
    got = mergelab.merge(method, base, vecs, **params)
    taus = _peft_taus(bert, adapters)
    for key, w0 in base.items():
        want = w0 + sum(coeffs[t] * taus[t][key] for t in taus)
        torch.testing.assert_close(got[key], want, rtol=0, atol=2e-6, msg=key)
    # the factored product is the sum of the updates, with rank = sum of ranks where both adapt a weight
    factors = mlora.merged_factors(method, vecs, **params)
    key = "encoder.layer.1.attention.self.query.weight"
    assert factors[key].rank == 4 + 2 and factors[key].scaling == 1.0
    assert factors["encoder.layer.0.attention.self.value.weight"].rank == 4  # adapter a only


def test_adapter_folder_output_loads_in_peft_and_equals_the_full_merge(bert, adapters, tmp_path):
    from peft import PeftModel
    from transformers import BertModel

    import mergelab
    from mergelab.methods import lora as mlora

    _, base_dir, base = bert
    vecs = {t: lora.load_lora(p, base) for t, p in adapters.items()}
    params = {"scaling": {"a": 0.6, "b": 0.9}}
    full = mergelab.merge("task_arithmetic", base, vecs, **params)
    out = mlora.save_adapter(mlora.merged_factors("task_arithmetic", vecs, **params), tmp_path / "merged_ad",
                             like=vecs["a"].config, inputs=list(adapters.values()))
    cfg = json.loads((out / "adapter_config.json").read_text())
    # scaling 1 everywhere: alpha = rank for the default and every per-module pattern
    assert cfg["lora_alpha"] == cfg["r"] and cfg["rank_pattern"] == cfg["alpha_pattern"] != {}
    assert not cfg["use_rslora"]
    pm = PeftModel.from_pretrained(BertModel.from_pretrained(str(base_dir)), str(out)).eval()
    full_model = BertModel.from_pretrained(str(base_dir)).eval()
    full_model.load_state_dict(full)
    ids = torch.tensor([[2, 7, 9, 11, 13, 3], [2, 20, 5, 30, 3, 0]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    with torch.no_grad():
        y_adapter = pm(input_ids=ids, attention_mask=mask).last_hidden_state  # unmerged: W0 x + B A x
        y_full = full_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(y_adapter, y_full, rtol=1e-5, atol=1e-5)
    unloaded = pm.merge_and_unload().state_dict()
    for key in base:
        torch.testing.assert_close(unloaded[key], full[key], rtol=0, atol=1e-6, msg=key)
    # the same folder read back by mergelab is the same factored update
    again = lora.load_lora(out, base)
    for key in again:
        torch.testing.assert_close(base[key] + again[key], full[key], rtol=0, atol=1e-6)


def _dense_reference(method, base, vecs, **params):
    """The in-memory static method on the materialised dense task vectors (s B A, zeros elsewhere)."""
    from mergelab.core.statedict import TaskVector, is_mergeable
    from mergelab.methods import registry

    dense = {}
    for t, v in vecs.items():
        if isinstance(v, lora.LoraTaskVector):
            dense[t] = TaskVector({k: v[k] if k in v else torch.zeros(w.shape) for k, w in base.items()
                                   if is_mergeable(w)})
        else:
            dense[t] = TaskVector.between(base, v)
    return registry.get(method).fn(dense, **params).apply(base)


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.001}),  # k below the number of adapted values: a non-zero threshold
    ("ties", {"density": 0.2, "scope": "tensor"}),
    ("dare", {"drop_rate": 0.5, "seed": 3}),
    ("dare", {"drop_rate": 0.3, "combine": "ties", "density": 0.5}),
])
def test_ties_and_dare_on_lora_experts_equal_them_on_dense_updates(bert, adapters, method, params):
    import mergelab

    _, _, base = bert
    vecs = {t: lora.load_lora(p, base) for t, p in adapters.items()}
    got = mergelab.merge(method, base, vecs, **params)
    want = _dense_reference(method, base, vecs, **params)
    assert set(got) == set(want)
    changed = 0
    for key in base:
        assert torch.equal(got[key], want[key]), key
        changed += int(not torch.equal(got[key], base[key]))
    assert changed >= 4  # the adapted weights moved


def test_lora_and_full_experts_mix(bert, adapters, tmp_path):
    import mergelab

    from .tiny_models import save_tiny_bert

    root, base_dir, base = bert
    full = load_state_dict(save_tiny_bert(tmp_path / "full", seed=11, perturb=0.02, base=base_dir))
    vecs = {"a": lora.load_lora(adapters["a"], base), "full": full}
    got = mergelab.merge("task_arithmetic", base, vecs, scaling=0.5)
    tau_a = _peft_taus(bert, {"a": adapters["a"]})["a"]
    for key, w0 in base.items():
        want = w0 + 0.5 * tau_a[key] + 0.5 * (full[key] - w0)
        torch.testing.assert_close(got[key], want, rtol=0, atol=2e-6, msg=key)
    got_ties = mergelab.merge("ties", base, vecs, density=0.4)
    want_ties = _dense_reference("ties", base, vecs, density=0.4)
    assert all(torch.equal(got_ties[k], want_ties[k]) for k in base)
    # plan() materialises the adapter's whole task vector: the same merge
    planned = mergelab.plan("ties", base, vecs, density=0.4).apply(base)
    assert all(torch.equal(planned[k], want_ties[k]) for k in base)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"scaling": 0.5}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.2, "scope": "tensor"}),
    ("dare", {"drop_rate": 0.5, "seed": 3}),
])
def test_streamed_adapters_equal_the_dense_reference_without_forming_an_update(bert, adapters, tmp_path, monkeypatch,
                                                                              method, params):
    """A base on disk merged with two adapters (one with rank/alpha patterns), an embedding adapter (update
    (s B A)^T) and a full expert, streamed in slices of 100 values (cut mid-row: rows are 32 or 37 wide): equal
    to the method on the materialised dense task vectors, and no whole update s B A is ever formed."""
    from mergelab.methods.streaming import stream_merge

    from .tiny_models import save_tiny_bert

    root, base_dir, base = bert
    emb = make_adapter(base_dir, tmp_path / "emb", 10, target_modules=["word_embeddings", "query"])
    full_dir = save_tiny_bert(tmp_path / "full", seed=11, perturb=0.02, base=base_dir)
    experts = {**adapters, "emb": emb, "full": full_dir}
    vecs = {t: lora.load_lora(p, base) for t, p in experts.items() if t != "full"}
    vecs["full"] = load_state_dict(full_dir)
    want = _dense_reference(method, base, vecs, **params)
    monkeypatch.setattr(lora.LoraModule, "delta", lambda self: pytest.fail("a whole update s B A was formed"))
    stream_merge(method, base_dir, experts, tmp_path / "out", chunk=100, threads=2, **params)
    got = load_state_dict(tmp_path / "out")
    assert set(got) == set(base)
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(got["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])


def test_streamed_gpt2_conv1d_adapter_equals_peft(tmp_path):
    """fan_in_fan_out (GPT-2's Conv1D, weight [in, out]): the streamed slices of (s B A)^T equal PEFT's merge."""
    from transformers import GPT2Config, GPT2Model

    from mergelab.methods.streaming import stream_merge

    torch.manual_seed(0)
    GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=50)).save_pretrained(
        str(tmp_path / "gpt2"))
    ad = make_adapter(tmp_path / "gpt2", tmp_path / "ad", 4, model_cls=GPT2Model, target_modules=["c_attn", "c_fc"],
                      fan_in_fan_out=True)
    stream_merge("task_arithmetic", tmp_path / "gpt2", {"ad": ad}, tmp_path / "out", chunk=40, scaling=1.0)
    got, ref = load_state_dict(tmp_path / "out"), peft_merged(tmp_path / "gpt2", ad, GPT2Model)
    for k, w in got.items():
        torch.testing.assert_close(w, ref[k], rtol=0, atol=1e-6, msg=k)


# ---------------------------------------------------------------- the CLI and pools


def _cli(*args):
    from typer.testing import CliRunner

    from mergelab.cli import app

    return CliRunner().invoke(app, ["merge", *map(str, args)])


def test_cli_merges_adapter_folders_to_a_model_and_to_an_adapter(bert, adapters, tmp_path):
    import mergelab

    _, base_dir, base = bert
    common = ["--pretrained", base_dir, "--expert", f"a={adapters['a']}", "--expert", f"b={adapters['b']}", "-q"]
    res = _cli("--method", "ties", *common, "--param", "density=0.3", "--in-memory", "--out", tmp_path / "ties")
    assert res.exit_code == 0, res.output
    vecs = {t: lora.load_lora(p, base) for t, p in adapters.items()}
    want = mergelab.merge("ties", base, vecs, density=0.3)
    got = load_state_dict(tmp_path / "ties")
    assert all(torch.equal(got[k], want[k]) for k in base)
    assert (tmp_path / "ties" / "config.json").is_file()
    # the default streams (safetensors base): s B A formed by row slices, so equal up to float rounding
    res = _cli("--method", "ties", *common, "--param", "density=0.3", "--out", tmp_path / "ties_s")
    assert res.exit_code == 0 and "streamed 2 experts (2 LoRA)" in res.output, res.output
    streamed = load_state_dict(tmp_path / "ties_s")
    for key in base:
        torch.testing.assert_close(streamed[key], want[key], rtol=0, atol=1e-6, msg=key)

    res = _cli("--method", "task_arithmetic", *common, "--param", "scaling=0.5", "--output-format", "adapter",
               "--out", tmp_path / "ta_ad")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "ta_ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                     "merge_report.json"]
    assert json.loads((tmp_path / "ta_ad" / "merge_report.json").read_text())["error"] == 0.0  # exact
    full = mergelab.merge("task_arithmetic", base, vecs, scaling=0.5)
    unloaded = peft_merged(base_dir, tmp_path / "ta_ad")
    for key in base:
        torch.testing.assert_close(unloaded[key], full[key], rtol=0, atol=1e-6, msg=key)
    # writing over the previous adapter output is allowed (it is one of ours)
    res = _cli("--method", "average", *common, "--output-format", "adapter", "--out", tmp_path / "ta_ad")
    assert res.exit_code == 0, res.output


def test_cli_refuses_what_is_not_exact_with_exit_2(bert, adapters, tmp_path):
    _, base_dir, _ = bert
    common = ["--pretrained", base_dir, "--expert", f"a={adapters['a']}", "--expert", f"b={adapters['b']}"]
    res = _cli("--method", "ties", "--pretrained", base_dir, "--expert", f"a={adapters['a']}", "--expert",
               f"full={base_dir}", "--output-format", "adapter", "--out", tmp_path / "o1")
    assert res.exit_code == 2 and "--output-format adapter" in res.output and "['full']" in res.output
    res = _cli("--method", "ties", *common, "--output-format", "adapter", "--svd-tol", "1.5", "--out", tmp_path / "o1")
    assert res.exit_code == 2 and "--svd-tol" in res.output and "[0, 1)" in res.output
    res = _cli("--method", "ties", *common, "--svd-tol", "0.1", "--out", tmp_path / "o1")
    assert res.exit_code == 2 and "--svd-tol" in res.output and "--output-format adapter" in res.output
    res = _cli("--method", "task_arithmetic", *common, "--stream", "--output-format", "adapter", "--out", tmp_path / "o2")
    assert res.exit_code == 2 and "--stream" in res.output and "--output-format adapter" in res.output
    bad = _edited(adapters["a"], tmp_path / "dora", use_dora=True)
    res = _cli("--method", "task_arithmetic", "--pretrained", base_dir, "--expert", f"d={bad}", "--out", tmp_path / "o3")
    assert res.exit_code == 2 and "expert 'd'" in res.output and "'use_dora'" in res.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_pool_expert_may_be_an_adapter_folder(bert, adapters):
    from mergelab.pools.pool import PoolConfig, load_state_dicts

    _, base_dir, base = bert
    pre, experts = load_state_dicts(PoolConfig(pretrained=str(base_dir), experts={"a": str(adapters["a"])}))
    ref = peft_merged(base_dir, adapters["a"])
    for key in base:
        torch.testing.assert_close(experts["a"][key], ref[key], rtol=0, atol=1e-6, msg=key)


def test_text_pool_loads_an_adapter_expert_and_other_families_refuse_it(tmp_path):
    from mergelab.pools.pool import PoolConfig, load_pool

    from .tiny_models import save_tiny_bert

    base_dir = save_tiny_bert(tmp_path / "base", seed=0)
    ad = make_adapter(base_dir, tmp_path / "ad", 12)
    pool = load_pool(PoolConfig(family="text", pretrained=str(base_dir), experts={"a": str(ad)}), data=False)
    ref = peft_merged(base_dir, ad)
    for key, v in pool.experts["a"].items():
        torch.testing.assert_close(v, ref[key], rtol=0, atol=1e-6, msg=key)
    with pytest.raises(InputError, match=r"pool\.experts\.a: .*LoRA adapter folder; family 'sequence-classification'"):
        load_pool(PoolConfig(family="sequence-classification", pretrained=str(base_dir), experts={"a": str(ad)}),
                  data=False)


def test_gpt2_adapter_output_keeps_fan_in_fan_out_and_loads_in_peft(tmp_path):
    from transformers import GPT2Config, GPT2Model

    import mergelab
    from mergelab.methods import lora as mlora

    torch.manual_seed(0)
    GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=50)).save_pretrained(
        str(tmp_path / "gpt2"))
    base = load_state_dict(tmp_path / "gpt2")
    ads = {"x": make_adapter(tmp_path / "gpt2", tmp_path / "x", 13, model_cls=GPT2Model, target_modules=["c_attn"],
                             fan_in_fan_out=True),
           "y": make_adapter(tmp_path / "gpt2", tmp_path / "y", 14, model_cls=GPT2Model,
                             target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, r=2, lora_alpha=3)}
    vecs = {t: lora.load_lora(p, base) for t, p in ads.items()}
    out = mlora.save_adapter(mlora.merged_factors("average", vecs), tmp_path / "avg", like=vecs["x"].config)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    taus = {t: {k: v - base[k] for k, v in peft_merged(tmp_path / "gpt2", p, GPT2Model).items()} for t, p in ads.items()}
    got = peft_merged(tmp_path / "gpt2", out, GPT2Model)
    full = mergelab.merge("average", base, vecs)
    for key, w0 in base.items():
        want = w0 + 0.5 * taus["x"][key] + 0.5 * taus["y"][key]
        torch.testing.assert_close(got[key], want, rtol=0, atol=2e-6, msg=key)
        torch.testing.assert_close(full[key], want, rtol=0, atol=2e-6, msg=key)


def test_adapters_of_body_and_task_model_merge_into_one_adapter_named_like_the_first(bert, adapters, tmp_path):
    from transformers import BertForSequenceClassification

    import mergelab
    from mergelab.methods import lora as mlora

    _, base_dir, base = bert
    BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=2).save_pretrained(str(tmp_path / "cls"))
    task_ad = make_adapter(tmp_path / "cls", tmp_path / "task_ad", 15, model_cls=BertForSequenceClassification,
                           target_modules=["key", "value"])  # 'key' only here: named 'bert.encoder...' in this adapter
    vecs = {"a": lora.load_lora(adapters["a"], base), "c": lora.load_lora(task_ad, base)}
    factors = mlora.merged_factors("task_arithmetic", vecs, scaling=0.4)
    assert all(not m.name.startswith("bert.") for m in factors.values())
    out = mlora.save_adapter(factors, tmp_path / "out", like=vecs["a"].config)
    got = peft_merged(base_dir, out)
    full = mergelab.merge("task_arithmetic", base, vecs, scaling=0.4)
    for key in base:
        torch.testing.assert_close(got[key], full[key], rtol=0, atol=1e-6, msg=key)


def test_merge_config_pool_with_an_adapter_expert(bert, adapters, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mergelab.cli import app

    from .tiny_models import save_tiny_bert

    _, base_dir, base = bert
    full_dir = save_tiny_bert(tmp_path / "full", seed=21, perturb=0.02, base=base_dir)
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"pool:\n  pretrained: {base_dir}\n  experts: {{lo: {adapters['a']}, full: {full_dir}}}\n"
                   f"methods:\n  - name: task_arithmetic\n    params: {{scaling: 0.5}}\n"
                   f"outputs:\n  run_dir: {tmp_path / 'run'}\n  report: false\n")
    # the adapter stays factored (no expert body W0 + s B A is formed) and its statistics use s B A
    from mergelab.core import lora as core_lora

    monkeypatch.setattr(core_lora, "merged_state_dict", lambda *a, **k: pytest.fail("an adapter was materialised"))
    res = CliRunner().invoke(app, ["merge", "--config", str(cfg), "-q"])
    assert res.exit_code == 0, res.output
    saved = load_state_dict(tmp_path / "run" / "models" / "task_arithmetic_scaling=0.5")
    full = load_state_dict(full_dir)
    tau = _peft_taus(bert, {"lo": adapters["a"]})["lo"]
    for key, w0 in base.items():
        torch.testing.assert_close(saved[key], w0 + 0.5 * tau[key] + 0.5 * (full[key] - w0), rtol=0, atol=2e-6, msg=key)
    stats = json.loads((tmp_path / "run" / "results.json").read_text())["merges"]["task_arithmetic_scaling=0.5"]
    taus = {"lo": tau, "full": {k: full[k] - w0 for k, w0 in base.items()}}
    delta = {k: saved[k] - w0 for k, w0 in base.items() if w0.is_floating_point()}
    for t, tv in taus.items():  # <delta, tau_t> / ||tau_t||^2, written out over the dense task vectors
        dot = sum(float((delta[k] * tv[k]).sum()) for k in delta)
        assert stats["coefficient"][t] == pytest.approx(dot / sum(float((tv[k] ** 2).sum()) for k in delta), rel=1e-4)


def test_a_plan_only_method_merges_lora_experts_through_its_plan(bert, adapters, tmp_path):
    """A user's method registered without a per-tensor form still merges adapters (through its plan over the dense
    task vectors), in mergelab.merge and in merge --config, where adapters otherwise stay factored."""
    from typer.testing import CliRunner

    import mergelab
    from mergelab import methods
    from mergelab.cli import app
    from mergelab.methods.registry import MergePlan, register

    @register("lora_test_first_only")
    def first_only(vectors, scaling: float = 1.0):  # only the first task vector, scaled
        first = next(iter(vectors))
        return MergePlan("lora_test_first_only", dict(vectors), {t: (scaling if t == first else 0.0) for t in vectors},
                         {"scaling": scaling})

    try:
        _, base_dir, base = bert
        vecs = {t: lora.load_lora(p, base) for t, p in adapters.items()}
        got = mergelab.merge("lora_test_first_only", base, vecs, scaling=0.5)
        for key, w0 in base.items():
            want = w0 + 0.5 * vecs["a"][key] if key in vecs["a"] else w0
            torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6, msg=key)
        cfg = tmp_path / "sweep.yaml"
        cfg.write_text(f"pool:\n  pretrained: {base_dir}\n  experts: {{a: {adapters['a']}, b: {adapters['b']}}}\n"
                       f"methods:\n  - name: lora_test_first_only\n    params: {{scaling: 0.5}}\n"
                       f"outputs:\n  run_dir: {tmp_path / 'run'}\n  report: false\n")
        res = CliRunner().invoke(app, ["merge", "--config", str(cfg), "-q"])
        assert res.exit_code == 0, res.output
        saved = load_state_dict(next((tmp_path / "run" / "models").iterdir()))
        assert all(torch.allclose(saved[k], got[k], rtol=0, atol=1e-6) for k in base)
    finally:
        methods.unregister("lora_test_first_only")


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.01}), ("dare", {"drop_rate": 0.5})])
def test_dense_path_holds_one_weight_of_updates_at_a_time(bert, adapters, monkeypatch, method, params):
    """TIES and DARE on LoRA experts materialise s B A one weight at a time: at most T dense updates alive."""
    import weakref

    import mergelab

    _, _, base = bert
    vecs = {t: lora.load_lora(p, base) for t, p in adapters.items()}
    alive, peak, calls = [0], [0], [0]
    original = lora.LoraModule.delta

    def counted(self):
        d = original(self)
        calls[0] += 1
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(d, lambda: alive.__setitem__(0, alive[0] - 1))
        return d

    monkeypatch.setattr(lora.LoraModule, "delta", counted)
    mergelab.merge(method, base, vecs, **params)
    n_modules = sum(len(v) for v in vecs.values())
    assert peak[0] <= len(vecs)
    assert calls[0] == n_modules * (3 if method == "ties" else 1)  # TIES: two threshold passes + the merge pass


def test_mergelab_reads_adapters_without_importing_peft(bert, adapters):
    import subprocess
    import sys

    _, base_dir, _ = bert
    code = ("import sys, mergelab; from mergelab.core.io import load_state_dict; "
            f"v = mergelab.load_lora({str(adapters['b'])!r}, load_state_dict({str(base_dir)!r})); "
            "mergelab.merge('ties', load_state_dict(" + repr(str(base_dir)) + "), {'b': v}); "
            "assert 'peft' not in sys.modules, 'peft imported'; print(len(v))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "11"


# ---------------------------------------------------------------- TIES / DARE as an adapter: truncated SVD


@pytest.mark.parametrize("method,params,tol", [("ties", {"density": 0.3}, 0.01), ("dare", {"drop_rate": 0.5}, 0.05)])
def test_ties_dare_adapter_output_is_a_truncated_svd_within_the_reported_error(bert, adapters, tmp_path, method,
                                                                                params, tol):
    from peft import PeftModel
    from transformers import BertModel

    import mergelab
    from mergelab.methods import lora as mlora

    _, base_dir, base = bert
    vecs = {t: lora.load_lora(p, base) for t, p in adapters.items()}
    full = mergelab.merge(method, base, vecs, **params)  # the full merged model (tested against the dense method)
    factors, report = mlora.adapter_factors(method, base, vecs, tol=tol, **params)
    out = mlora.save_adapter(factors, tmp_path / "ad", like=vecs["a"].config, report=report)
    assert json.loads((out / "merge_report.json").read_text())["error"] == report["error"]
    unloaded = peft_merged(base_dir, out)
    num = den = 0.0
    cut = 0
    for name, m in report["modules"].items():
        key = m["key"]
        update = (full[key] - base[key]).double()
        mat = update.T if key.endswith("word_embeddings.weight") else update
        err = float((unloaded[key].double() - full[key].double()).norm() / update.norm())
        # PEFT's reload gives the reported error (float32 rounding of W0 + B A aside), within the tolerance
        assert err == pytest.approx(m["error"], abs=1e-5) and m["error"] <= tol + 1e-6, name
        # and the rank is the smallest that reaches it: the next lower rank's tail (by the test's own SVD) does not
        sig = torch.linalg.svdvals(mat)
        assert float(sig[m["rank"] - 1:].norm() / sig.norm()) > tol, name
        cut += m["rank"] < min(mat.shape)
        num += (err * float(update.norm())) ** 2
        den += float(update.norm()) ** 2
    assert cut and (num / den) ** 0.5 == pytest.approx(report["error"], abs=1e-5)  # the tolerance did cut ranks
    untouched = [k for k in base if not any(k in v.modules for v in vecs.values())]
    assert all(torch.equal(unloaded[k], base[k]) for k in untouched)
    # outputs: the adapter in PEFT (unmerged, W0 x + B A x) is the model of those weights (W0 + B A, PEFT's
    # merge_and_unload); against the full merged model it differs, relative to what the merge changes, by about the
    # weights' reported error (on these large random updates 1.0-1.7x it for tolerances 0.01-0.3: not a bound)
    pm = PeftModel.from_pretrained(BertModel.from_pretrained(str(base_dir)), str(out)).eval()
    models = {}
    for name, sd in (("full", full), ("approx", unloaded), ("base", base)):
        models[name] = BertModel.from_pretrained(str(base_dir)).eval()
        models[name].load_state_dict(sd)
    ids = torch.tensor([[2, 7, 9, 11, 13, 3], [2, 20, 5, 30, 3, 0]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    with torch.no_grad():
        y_ad = pm(input_ids=ids, attention_mask=mask).last_hidden_state
        y = {n: m(input_ids=ids, attention_mask=mask).last_hidden_state for n, m in models.items()}
    torch.testing.assert_close(y_ad, y["approx"], rtol=1e-5, atol=1e-5)
    assert float((y_ad - y["full"]).norm() / (y["full"] - y["base"]).norm()) <= 2 * report["error"]
    # a tolerance of 0 keeps every singular value: the adapter is the full merge
    factors0, report0 = mlora.adapter_factors(method, base, vecs, tol=0.0, **params)
    assert report0["error"] < 1e-6
    out0 = mlora.save_adapter(factors0, tmp_path / "ad0", like=vecs["a"].config)
    unloaded0 = peft_merged(base_dir, out0)
    for key in base:
        torch.testing.assert_close(unloaded0[key], full[key], rtol=0, atol=2e-6, msg=key)


def test_cli_writes_a_ties_adapter_and_reports_its_error(bert, adapters, tmp_path):
    _, base_dir, _ = bert
    res = _cli("--method", "ties", "--pretrained", base_dir, "--expert", f"a={adapters['a']}", "--expert",
               f"b={adapters['b']}", "--param", "density=0.3", "--output-format", "adapter", "--svd-tol", "0.1",
               "--out", tmp_path / "ties_ad", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ties_ad" / "merge_report.json").read_text())
    assert 0 < report["error"] <= 0.1 and f"{report['error']:.2e}" in res.output and "--svd-tol 0.1" in res.output
    assert lora.load_lora(tmp_path / "ties_ad", load_state_dict(base_dir)).modules  # a readable adapter
