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
    """PEFT starts B at zero (no update); give every lora_B seeded non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
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


def test_embedding_adapter_is_refused(bert, tmp_path):
    _, base_dir, base = bert
    ad = make_adapter(base_dir, tmp_path / "emb", 10, target_modules=["word_embeddings"])
    with pytest.raises(InputError, match="embedding adapters"):
        lora.load_lora(ad, base)


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
