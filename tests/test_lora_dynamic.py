"""LoRA experts in the dynamic and adaptive methods (issue 16): SE-Merging's per-sample forward over the factors
against per-sample merged models, AdaMerging/SyMerge over the factors against the materialised task vectors.

The adapters are made in the tests by PEFT; each reference is built from PEFT's own ``merge_and_unload`` (the
expert's full weights W0 + s B A), never from mergelab's factors: for sample b the full model
``W0 + sum_t C[b, t] (merge_and_unload_t - W0)`` is formed and the sample run through it alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.core import lora
from mergelab.core.errors import InputError
from mergelab.core.functional import StackedVectors, per_sample_mixing, run_with
from mergelab.methods import plan as make_plan
from mergelab.methods.dynamic import RouterConfig, SEMerging

from .test_lora import make_adapter, peft_merged
from .tiny_models import tiny_bert_config, tiny_tokenizer

peft = pytest.importorskip("peft")

TEXTS = [
    "the movie was good", "bad film", "the team will win the game", "tax vote in the election",
    "the stock market and the bank", "a great actor and music",
]
TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    """A tiny 3-layer BERT, three PEFT adapters over it (different targets, ranks, alpha patterns, rsLoRA, an
    embedding adapter), each expert's full body from PEFT's merge_and_unload."""
    from transformers import BertModel

    from mergelab.pools.families.text import TextClassifierFamily

    root: Path = tmp_path_factory.mktemp("lora-dyn")
    base_dir = root / "base"
    torch.manual_seed(0)
    BertModel(tiny_bert_config(num_hidden_layers=3)).save_pretrained(str(base_dir))
    tiny_tokenizer().save_pretrained(str(base_dir))
    dirs = {
        "a": make_adapter(base_dir, root / "a", 1, target_modules=["query", "value"], r=4, lora_alpha=8),
        "b": make_adapter(base_dir, root / "b", 2, target_modules=["query", "key", "dense"], r=3, lora_alpha=5,
                          rank_pattern={"output.dense": 5}, alpha_pattern={"key": 7}),
        "c": make_adapter(base_dir, root / "c", 3, target_modules=["value", "intermediate.dense", "word_embeddings"],
                          r=2, lora_alpha=4, use_rslora=True),
    }
    family = TextClassifierFamily(base_dir, max_length=12)
    pre = family.pretrained_state()
    adapters = {t: lora.load_lora(d, pre) for t, d in dirs.items()}
    bodies = {t: peft_merged(base_dir, d) for t, d in dirs.items()}  # PEFT's own W0 + s B A
    return family, pre, adapters, bodies


def _per_sample_models(family, pre, bodies, batch, coeffs, static=None) -> torch.Tensor:
    """The reference: for each sample, the full model W0 + sum_t C[b, t] (theta_t - W0), run on that sample alone.

    ``static = (keys, c)``: those weights take the coefficients ``c`` instead (the single pass's lower layers)."""
    outs = []
    for b in range(coeffs.shape[0]):
        theta = {}
        for k, w0 in pre.items():
            if not w0.is_floating_point():
                theta[k] = w0
                continue
            c = static[1] if static is not None and k in static[0] else coeffs[b]
            w = w0.double()
            for i, t in enumerate(bodies):
                w = w + float(c[i]) * (bodies[t][k].double() - w0.double())
            theta[k] = w.float()
        outs.append(family.features({k: v[b: b + 1] for k, v in batch.items()}, theta))
    return torch.cat(outs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_plan_keeps_adapters_factored_and_stacks_only_adapted_weights(pool) -> None:
    _, pre, adapters, _ = pool
    plan = make_plan("task_arithmetic", pre, adapters, scaling=0.3)
    assert all(plan.vectors[t] is adapters[t] for t in TASKS)  # no dense task vector formed
    stacked = StackedVectors.from_vectors(plan.vectors)
    adapted = set().union(*(set(a.modules) for a in adapters.values()))
    assert set(stacked.factors) == adapted and not stacked.tensors  # untouched weights: not mixed at all
    assert "embeddings.word_embeddings.weight" in stacked.factors
    # the factored rank of a weight is the sum of the ranks of the adapters that adapt it
    q0 = "encoder.layer.0.attention.self.query.weight"
    assert stacked.factors[q0].rank == 4 + 3
    # TIES is elementwise on s B A: its plan is dense
    assert set(make_plan("ties", pre, adapters, density=0.5).vectors["a"]) > set(adapters["a"].modules)


def test_per_sample_mixing_over_adapters_equals_per_sample_merged_models(pool) -> None:
    family, pre, adapters, bodies = pool
    stacked = StackedVectors.from_vectors(adapters)
    batch = family.tokenize(TEXTS)
    coeffs = torch.rand(len(TEXTS), len(TASKS), generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2
    with torch.no_grad(), per_sample_mixing(family.body, pre, stacked, coeffs):
        got = family.features(batch, pre)
    ref = _per_sample_models(family, pre, bodies, batch, coeffs)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert _rel(got, family.features(batch, pre)) > 1e-2  # the adapters do change the features


@pytest.mark.parametrize("rule", ["raw", "relative", "ratio", "prototype"])
def test_se_merging_over_adapters_equals_per_sample_merged_models(pool, rule) -> None:
    family, pre, adapters, bodies = pool
    cfg = RouterConfig(layer=1, normalisation=rule, temperature=0.5, gain=3.0)
    se = SEMerging(family, pre, make_plan("task_arithmetic", pre, adapters, scaling=0.3), bodies, cfg)
    assert not se.stacked.tensors  # every mixed weight is factored
    if rule == "prototype":
        se.calibrate({t: TEXTS[i::3] for i, t in enumerate(TASKS)})
    batch = family.tokenize(TEXTS)
    feats, routing = se.features(batch, "exact")
    ref = _per_sample_models(family, pre, bodies, batch, routing.coefficients)
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-5)
    # the same SE-Merging over the materialised experts (dense task vectors) routes and mixes alike
    dense = SEMerging(family, pre, make_plan("task_arithmetic", pre, bodies, scaling=0.3), bodies, cfg)
    if rule == "prototype":
        dense.calibrate({t: TEXTS[i::3] for i, t in enumerate(TASKS)})
    d_feats, d_routing = dense.features(batch, "exact")
    torch.testing.assert_close(routing.coefficients, d_routing.coefficients, rtol=0, atol=1e-5)
    torch.testing.assert_close(feats, d_feats, rtol=0, atol=1e-5)
    # lowrank mode around the static merge: exact on factored weights whatever the rank
    low, _ = se.features(batch, "lowrank", routing=routing)
    torch.testing.assert_close(low, ref, rtol=0, atol=1e-5)
    if rule == "prototype":  # the fast paths run on the factors too
        lower = {k for k in pre if family.layer_of_key(k) <= cfg.layer}
        for mode in ("prototype-exact", "fast", "single-pass"):
            got, r = se.features(batch, mode)
            # fast: each sample's group code; single pass: the static merge up to the probe layer
            static = (lower, torch.full((3,), 0.3)) if mode == "single-pass" else None
            torch.testing.assert_close(got, _per_sample_models(family, pre, bodies, batch, r.coefficients, static),
                                       rtol=0, atol=1e-5, msg=mode)


def test_mixed_pool_of_adapters_and_a_full_expert(pool) -> None:
    family, pre, adapters, bodies = pool
    g = torch.Generator().manual_seed(5)
    full = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in pre.items()}
    experts = {"a": adapters["a"], "b": adapters["b"], "c": full}
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    stacked = StackedVectors.from_vectors(plan.vectors)
    assert not stacked.factors  # a full expert has a task vector on every weight: dense everywhere
    batch = family.tokenize(TEXTS)
    coeffs = torch.rand(len(TEXTS), 3, generator=g)
    with torch.no_grad(), per_sample_mixing(family.body, pre, stacked, coeffs):
        got = family.features(batch, pre)
    ref = _per_sample_models(family, pre, {"a": bodies["a"], "b": bodies["b"], "c": full}, batch, coeffs)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # a full expert that leaves some weights alone (a partial state dict's task vector): factored there
    partial = {"a": adapters["a"], "b": adapters["b"],
               "c": {k: full[k] - pre[k] for k in pre if k.startswith("encoder.layer.2.")}}
    stacked = StackedVectors.from_vectors(partial)
    assert stacked.factors and stacked.tensors
    assert not any(k.startswith("encoder.layer.2.") for k in stacked.factors)


def test_gpt2_conv1d_adapters_mix_per_sample(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).save_pretrained(str(tmp_path / "g"))
    model = GPT2Model.from_pretrained(str(tmp_path / "g")).eval()
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapters, bodies = {}, {}
    for i, t in enumerate(TASKS[:2]):
        torch.manual_seed(i)
        pm = get_peft_model(GPT2Model.from_pretrained(str(tmp_path / "g")),
                            LoraConfig(target_modules=["c_attn", "c_fc"], r=2, lora_alpha=4, fan_in_fan_out=True))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape) * 0.3)
        pm.save_pretrained(str(tmp_path / t))
        adapters[t] = lora.load_lora(tmp_path / t, pre)
        bodies[t] = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    stacked = StackedVectors.from_vectors(adapters)
    assert all(f.transposed for f in stacked.factors.values())
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    coeffs = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), per_sample_mixing(model, pre, stacked, coeffs):
        got = run_with(model, pre, input_ids=ids).last_hidden_state
    for b in range(3):
        theta = {k: v + sum(float(coeffs[b, i]) * (bodies[t][k] - v) for i, t in enumerate(adapters))
                 if v.is_floating_point() else v for k, v in pre.items()}
        ref = run_with(model, theta, input_ids=ids[b: b + 1]).last_hidden_state
        torch.testing.assert_close(got[b: b + 1], ref, rtol=0, atol=1e-5)


def test_factors_on_a_layer_norm_are_refused(pool) -> None:
    family, pre, _, _ = pool
    key = "encoder.layer.0.attention.output.LayerNorm.weight"
    bad = lora.LoraTaskVector({key: lora.LoraModule(key, "x", torch.ones(32, 1), torch.ones(1, 1), 1.0)})
    stacked = StackedVectors.from_vectors({"a": bad})
    with pytest.raises(InputError, match="LayerNorm"), per_sample_mixing(family.body, pre, stacked, torch.ones(1, 1)):
        pass


# ---------------------------------------------------------------------------------------------- adaptive
def _heads(family, seed: int = 0) -> dict[str, torch.nn.Linear]:
    torch.manual_seed(seed)
    return {t: torch.nn.Linear(family.hidden_size, 3).requires_grad_(False) for t in TASKS}


@pytest.mark.parametrize("method", ["adamerging_layerwise", "adamerging_taskwise", "symerge"])
def test_coefficients_learned_over_adapters_equal_those_over_dense_task_vectors(pool, method) -> None:
    from mergelab.core.statedict import task_vectors
    from mergelab.methods.adaptive import adamerging, symerge

    family, pre, adapters, bodies = pool
    texts = {t: TEXTS[i:] + TEXTS[:i] for i, t in enumerate(TASKS)}
    heads = _heads(family)
    dense = task_vectors(pre, bodies)  # PEFT's merge_and_unload - W0, on every weight (zeros where not adapted)

    def run(vectors):
        if method == "symerge":
            return symerge(family, pre, vectors, heads, texts, experts=bodies, steps=6, batch_size=4, seed=3,
                           progress=False)
        gran = "layer" if method == "adamerging_layerwise" else "task"
        return adamerging(family, pre, vectors, heads, texts, granularity=gran, steps=4, batch_size=4, lr=1e-2,
                          seed=3, progress=False)

    got, ref = run(adapters), run(dense)
    assert got.merged._factors and not got.merged._stack  # no dense task vector held
    assert got.merged.keys == ref.merged.keys  # the adapted weights, and only those, get coefficients
    g, r = got.merged.coefficients.values().detach(), ref.merged.coefficients.values().detach()
    assert float((r - 0.3).abs().max()) > 1e-3  # the coefficients did move
    torch.testing.assert_close(g, r, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)
    merged_g, merged_r = got.merged.state_dict_merged(), ref.merged.state_dict_merged()
    for k in pre:
        torch.testing.assert_close(merged_g[k], merged_r[k], rtol=0, atol=1e-5, msg=k)
