"""Static methods against independent references: formulas and TIES' three steps written out."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab import InputError, methods
from mergelab.methods import drop


def _models(seed, n_tasks, shapes):
    g = torch.Generator().manual_seed(seed)
    pre = {f"p{i}": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}
    pre["ids"] = torch.arange(3)
    experts = {}
    for t in range(n_tasks):
        experts[f"t{t}"] = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
                            for k, v in pre.items()}
    return pre, experts


def test_registry_lists_methods():
    assert {"average", "task_arithmetic", "ties", "dare"} <= set(methods.available())
    with pytest.raises(InputError, match="unknown merge method 'nope'"):
        mergelab.merge("nope", {}, {})


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_tasks=st.integers(1, 4), lam=st.floats(-2, 2, allow_nan=False))
def test_task_arithmetic_matches_formula(seed, n_tasks, lam):
    pre, experts = _models(seed, n_tasks, [(3, 4), (5,)])
    merged = mergelab.merge("task_arithmetic", pre, experts, scaling=lam)
    for k in ("p0", "p1"):
        expected = pre[k] + lam * sum(e[k] - pre[k] for e in experts.values())
        torch.testing.assert_close(merged[k], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged["ids"], pre["ids"])


def test_task_arithmetic_per_task_scaling():
    pre, experts = _models(0, 2, [(4,)])
    merged = mergelab.merge("task_arithmetic", pre, experts, scaling={"t0": 0.2, "t1": 0.7})
    expected = pre["p0"] + 0.2 * (experts["t0"]["p0"] - pre["p0"]) + 0.7 * (experts["t1"]["p0"] - pre["p0"])
    torch.testing.assert_close(merged["p0"], expected)
    with pytest.raises(InputError, match=r"'scaling'.*missing \['t1'\]"):
        mergelab.merge("task_arithmetic", pre, experts, scaling={"t0": 0.2})


def test_average_is_mean_of_weights_and_weighted():
    pre, experts = _models(1, 3, [(2, 2)])
    merged = mergelab.merge("average", pre, experts)
    torch.testing.assert_close(merged["p0"], sum(e["p0"] for e in experts.values()) / 3)
    merged = mergelab.merge("average", pre, experts, weights={"t0": 1, "t1": 0, "t2": 3})
    torch.testing.assert_close(merged["p0"], (experts["t0"]["p0"] + 3 * experts["t2"]["p0"]) / 4)
    with pytest.raises(InputError, match="weights"):
        mergelab.merge("average", pre, experts, weights=[1, 2])


def test_ties_hand_checked_case():
    # one tensor, 3 tasks, density 0.4 -> keep 2 of 5 per task
    pre = {"w": torch.zeros(5)}
    taus = {
        "a": [0.5, -0.1, 0.2, 0.0, -0.9],   # trimmed: [0.5, 0, 0, 0, -0.9]
        "b": [-0.4, 0.3, 0.05, 0.1, -0.2],  # trimmed: [-0.4, 0.3, 0, 0, 0]
        "c": [0.3, -0.6, -0.25, 0.0, 0.8],  # trimmed: [0, -0.6, 0, 0, 0.8]
    }
    experts = {t: {"w": torch.tensor(v)} for t, v in taus.items()}
    # summed trimmed: [0.1, -0.3, 0, 0, -0.1] -> signs [+, -, 0, 0, -]
    # agreeing values: idx0 {a: 0.5}, idx1 {c: -0.6}, idx4 {a: -0.9}
    for scope in ("global", "tensor"):  # one tensor: both scopes agree
        merged = mergelab.merge("ties", pre, experts, density=0.4, scaling=0.5, scope=scope)
        torch.testing.assert_close(merged["w"], 0.5 * torch.tensor([0.5, -0.6, 0.0, 0.0, -0.9]))


def test_ties_disjoint_mean_averages_agreeing_tasks_only():
    pre = {"w": torch.zeros(2)}
    experts = {"a": {"w": torch.tensor([0.6, 1.0])}, "b": {"w": torch.tensor([0.2, -0.4])}, "c": {"w": torch.tensor([-0.5, -0.4])}}
    merged = mergelab.merge("ties", pre, experts, density=1.0)
    # idx0: sum 0.3 > 0 -> mean(0.6, 0.2) = 0.4; idx1: sum 0.2 > 0 -> only a agrees -> 1.0
    torch.testing.assert_close(merged["w"], torch.tensor([0.4, 1.0]))


def test_ties_scope_global_vs_tensor_hand_case():
    pre = {"a": torch.zeros(2), "b": torch.zeros(2)}
    experts = {"t": {"a": torch.tensor([1.0, 0.9]), "b": torch.tensor([0.1, -0.2])}}
    g = mergelab.merge("ties", pre, experts, density=0.5, scope="global")
    t = mergelab.merge("ties", pre, experts, density=0.5, scope="tensor")
    torch.testing.assert_close(g["a"], torch.tensor([1.0, 0.9]))  # top 2 of 4 overall are both in a
    torch.testing.assert_close(g["b"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(t["a"], torch.tensor([1.0, 0.0]))  # top 1 of 2 in each tensor
    torch.testing.assert_close(t["b"], torch.tensor([0.0, -0.2]))


def _ties_reference(pre, experts, density, scope, lam):
    """TIES written out in numpy from the paper (Algorithm 1), independent of mergelab."""
    keys = [k for k in pre if pre[k].is_floating_point()]
    sizes = [pre[k].numel() for k in keys]
    taus = np.stack([np.concatenate([(e[k] - pre[k]).numpy().ravel() for k in keys]) for e in experts.values()])
    trimmed = np.zeros_like(taus)
    for t in range(taus.shape[0]):
        segments = [(0, taus.shape[1])] if scope == "global" else list(zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes)))
        for lo, hi in segments:
            seg = taus[t, lo:hi]
            k = max(1, int(density * seg.size))  # floor, as the TIES authors and mergekit
            thr = np.sort(np.abs(seg))[::-1][k - 1]
            trimmed[t, lo:hi] = np.where(np.abs(seg) >= thr, seg, 0.0)
    gamma = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == gamma) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    out, off = {}, 0
    for k, n in zip(keys, sizes):
        out[k] = pre[k] + lam * torch.from_numpy(merged[off:off + n].reshape(pre[k].shape)).float()
        off += n
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n_tasks=st.integers(1, 5), density=st.floats(0.05, 1.0),
       scope=st.sampled_from(["global", "tensor"]), lam=st.floats(0.1, 2.0))
def test_ties_matches_numpy_reference(seed, n_tasks, density, scope, lam):
    pre, experts = _models(seed, n_tasks, [(6, 5), (7,), (2, 3, 2)])
    merged = mergelab.merge("ties", pre, experts, density=density, scope=scope, scaling=lam)
    ref = _ties_reference(pre, experts, density, scope, lam)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)


def test_dare_preserves_mean_and_drops_expected_share():
    pre = {"w": torch.zeros(200_000)}
    tau = torch.linspace(0.5, 1.5, 200_000)
    out = drop({"a": mergelab.TaskVector({"w": tau})}, drop_rate=0.9, seed=3)["a"]["w"]
    zero_share = float((out == 0).float().mean())
    assert abs(zero_share - 0.9) < 0.005
    assert abs(float(out.mean()) - float(tau.mean())) < 0.03  # std of the estimate ~ 0.007
    survivors = out != 0
    torch.testing.assert_close(out[survivors], tau[survivors] * 10, rtol=1e-5, atol=1e-6)
    assert pre  # (pre is unused: drop works on task vectors)


def test_dare_same_seed_same_result_and_order_independent():
    pre, experts = _models(5, 3, [(20, 10), (30,)])
    a = mergelab.merge("dare", pre, experts, drop_rate=0.5, seed=7)
    b = mergelab.merge("dare", pre, dict(reversed(list(experts.items()))), drop_rate=0.5, seed=7)
    c = mergelab.merge("dare", pre, experts, drop_rate=0.5, seed=8)
    a2 = mergelab.merge("dare", pre, experts, drop_rate=0.5, seed=7)
    for k in ("p0", "p1"):
        assert torch.equal(a[k], a2[k])
        # the same masks whatever the order (the sum's float rounding may differ)
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    assert not torch.equal(a["p0"], c["p0"])
    vecs = mergelab.task_vectors(pre, experts)
    fwd = drop(vecs, 0.5, seed=7)
    rev = drop(dict(reversed(list(vecs.items()))), 0.5, seed=7)
    for t in vecs:
        for k in vecs[t]:
            assert torch.equal(fwd[t][k], rev[t][k])


def test_dare_then_task_arithmetic_and_ties_combine():
    pre, experts = _models(6, 2, [(10, 10)])
    dropped = drop(mergelab.task_vectors(pre, experts), drop_rate=0.3, seed=1)
    ta = mergelab.merge("dare", pre, experts, drop_rate=0.3, seed=1, scaling=0.4)
    torch.testing.assert_close(ta["p0"], pre["p0"] + 0.4 * sum(v["p0"] for v in dropped.values()))
    dropped_experts = {t: {"p0": pre["p0"] + v["p0"], "ids": pre["ids"]} for t, v in dropped.items()}
    ties_ref = mergelab.merge("ties", pre, dropped_experts, density=0.5, scaling=1.0)
    ties = mergelab.merge("dare", pre, experts, drop_rate=0.3, seed=1, combine="ties", density=0.5)
    torch.testing.assert_close(ties["p0"], ties_ref["p0"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method,params,name",
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"scope": "layer"}, "scope"),
        ("dare", {"drop_rate": 1.0}, "drop_rate"),
        ("dare", {"drop_rate": -0.1}, "drop_rate"),
        ("dare", {"combine": "mean"}, "combine"),
        ("dare", {"seed": 1.5}, "seed"),
        ("task_arithmetic", {"scaling": "a lot"}, "scaling"),
        ("task_arithmetic", {"scaling": float("nan")}, "scaling"),
        ("ties", {"lambda_": 1}, "lambda_"),
    ],
)
def test_bad_parameters_name_the_parameter(method, params, name):
    pre, experts = _models(0, 2, [(3,)])
    with pytest.raises(ValueError, match=name):
        mergelab.merge(method, pre, experts, **params)


def test_plan_exposes_per_task_vectors_for_reuse():
    pre, experts = _models(2, 3, [(4, 4)])
    plan = mergelab.plan("ties", pre, experts, density=0.5, scaling=0.8)
    assert plan.tasks == ["t0", "t1", "t2"]
    merged = mergelab.merge("ties", pre, experts, density=0.5, scaling=0.8)
    torch.testing.assert_close(plan.apply(pre)["p0"], merged["p0"])
    # the parts sum to the disjoint mean: uniform coefficients reproduce the static merge
    torch.testing.assert_close(pre["p0"] + 0.8 * sum(v["p0"] for v in plan.vectors.values()), merged["p0"])


def test_feature_cache_reuses_and_matches_a_fresh_evaluation(tmp_path) -> None:
    from transformers import BertModel

    from mergelab.pools.data.tasks import TextTask
    from mergelab.pools.evaluate import FeatureCache, evaluate_tasks, fingerprint
    from mergelab.pools.families.text import TextClassifierFamily
    from tests.tiny_models import tiny_bert_config, tiny_tokenizer

    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(tmp_path))
    tiny_tokenizer().save_pretrained(str(tmp_path))
    family = TextClassifierFamily(tmp_path, max_length=12)
    pre = family.pretrained_state()
    other = {k: v + 0.1 if v.is_floating_point() else v for k, v in pre.items()}
    texts = ["the movie was good", "bad film", "a vote on tax", "the team won", "music and art"]
    split = {"a": TextTask("a", texts, [0, 1, 0, 1, 1], label_names=["x", "y"])}
    heads = {"a": torch.nn.Linear(family.hidden_size, 2)}
    cache = FeatureCache()
    first = evaluate_tasks(family, pre, heads, split, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    again = evaluate_tasks(family, {k: v.clone() for k, v in pre.items()}, heads, split, cache=cache)  # equal content
    assert (cache.hits, cache.misses) == (1, 1) and again == first
    moved = evaluate_tasks(family, other, heads, split, cache=cache)  # other content: a new pass
    assert cache.misses == 2
    assert moved == evaluate_tasks(family, other, heads, split)  # the uncached path agrees
    assert first == evaluate_tasks(family, pre, heads, split)
    assert fingerprint(pre) != fingerprint(other) and fingerprint(None) == fingerprint(None)
