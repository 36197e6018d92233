"""Property-based tests (hypothesis) of the merge core and of the pool-config loader.

State dicts are drawn with random shapes and values that are small integers times a scale, so that
zeros and magnitude ties (the edge cases of TIES' trim and sign election) come up often.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import mergelab
from mergelab.core.errors import InputError
from mergelab.pools.pool import PoolConfig

from .test_reliability import load_pool_yaml

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple), min_size=1, max_size=3)


@st.composite
def pools(draw, min_experts: int = 1, max_experts: int = 4):
    """(pretrained, {task: expert}) with floating tensors of random shapes and one integer buffer."""
    key_shapes = draw(shapes)
    n = draw(st.integers(min_experts, max_experts))
    seed = draw(st.integers(0, 2**31 - 1))
    levels = draw(st.integers(1, 5))  # how many distinct magnitudes: few levels, many ties
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    g = torch.Generator().manual_seed(seed)

    def tensor(shape):
        return torch.randint(-levels, levels + 1, shape, generator=g).to(torch.float32) * scale

    pre = {f"w{i}": tensor(s) for i, s in enumerate(key_shapes)}
    pre["ids"] = torch.arange(3)
    experts = {}
    for t in range(n):
        experts[f"t{t}"] = {k: (v + tensor(v.shape) if v.is_floating_point() else v.clone()) for k, v in pre.items()}
    return pre, experts


def taus(pre, experts):
    return {t: {k: e[k].double() - pre[k].double() for k in pre if pre[k].is_floating_point()} for t, e in experts.items()}


def assert_structure(merged, pre):
    assert merged.keys() == pre.keys()
    for k, v in pre.items():
        assert merged[k].shape == v.shape and merged[k].dtype == v.dtype
        if not v.is_floating_point():
            assert torch.equal(merged[k], v)


# ---------------------------------------------------------------------------------------------- Task Arithmetic
@SETTINGS
@given(pools(), st.floats(-2, 2, allow_nan=False), st.floats(-2, 2, allow_nan=False))
def test_task_arithmetic_is_linear(pool, s1, s2):
    pre, experts = pool
    tv = taus(pre, experts)
    m1 = mergelab.merge("task_arithmetic", pre, experts, scaling=s1)
    m12 = mergelab.merge("task_arithmetic", pre, experts, scaling=s1 + s2)
    m2 = mergelab.merge("task_arithmetic", pre, experts, scaling=s2)
    assert_structure(m1, pre)
    for k in tv["t0"]:
        expected = pre[k].double() + s1 * sum(tv[t][k] for t in tv)  # theta_0 + lambda sum_t tau_t, in float64
        torch.testing.assert_close(m1[k].double(), expected, rtol=1e-5, atol=1e-5 * (1 + expected.abs().max().item()))
        # (m(s1) - pre) + (m(s2) - pre) = m(s1 + s2) - pre
        torch.testing.assert_close((m1[k] - pre[k]) + (m2[k] - pre[k]), m12[k] - pre[k], rtol=1e-4,
                                   atol=1e-4 * (1 + m12[k].abs().max().item()))


@SETTINGS
@given(pools(min_experts=2), st.floats(0.1, 1.0))
def test_task_arithmetic_and_average_ignore_expert_order(pool, scaling):
    pre, experts = pool
    reversed_experts = dict(reversed(list(experts.items())))
    for method, params in (("task_arithmetic", {"scaling": scaling}), ("average", {})):
        a = mergelab.merge(method, pre, experts, **params)
        b = mergelab.merge(method, pre, reversed_experts, **params)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5 * (1 + a[k].abs().max().item()))


# ---------------------------------------------------------------------------------------------- averaging
@SETTINGS
@given(pools(max_experts=1), st.integers(1, 5), st.lists(st.floats(0.01, 10.0), min_size=5, max_size=5))
def test_averaging_identical_experts_returns_the_expert(pool, n, weights):
    pre, one = pool
    expert = one["t0"]
    experts = {f"copy{i}": expert for i in range(n)}
    for params in ({}, {"weights": weights[:n]}):
        merged = mergelab.merge("average", pre, experts, **params)
        assert_structure(merged, pre)
        for k, v in expert.items():
            if v.is_floating_point():
                torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-5 * (1 + v.abs().max().item()))


# ---------------------------------------------------------------------------------------------- TIES
@SETTINGS
@given(pools(), st.floats(0.01, 1.0), st.sampled_from(["global", "tensor"]), st.floats(0.1, 3.0))
def test_ties_invariants(pool, density, scope, scaling):
    pre, experts = pool
    tv = taus(pre, experts)
    merged = mergelab.merge("ties", pre, experts, density=density, scope=scope, scaling=scaling)
    assert_structure(merged, pre)
    for k in tv["t0"]:
        delta = merged[k].double() - pre[k].double()
        biggest = torch.stack([tv[t][k].abs() for t in tv]).max(0).values
        # a disjoint mean of kept values never exceeds the largest of them
        assert bool((delta.abs() <= scaling * biggest * (1 + 1e-5) + 1e-6).all())
        # only entries some expert changed can change
        assert bool((delta[biggest == 0] == 0).all())


@SETTINGS
@given(pools(), st.floats(0.1, 3.0))
def test_ties_full_density_follows_the_sign_of_the_sum(pool, scaling):
    """density = 1 trims nothing, so the elected sign is sign(sum_t tau_t) and every change follows it."""
    pre, experts = pool
    tv = taus(pre, experts)
    merged = mergelab.merge("ties", pre, experts, density=1.0, scaling=scaling)
    for k in tv["t0"]:
        delta = merged[k].double() - pre[k].double()
        total = sum(tv[t][k] for t in tv)
        mass = sum(tv[t][k].abs() for t in tv)
        # where the sum is zero in exact arithmetic (e.g. 3 - 2 - 1), float32 rounding picks the sign:
        # check only the entries whose sign is clear
        clear = total.abs() > 1e-4 * mass
        elected = torch.sign(total)
        assert bool((delta * elected >= -1e-6)[clear].all())
        assert bool((delta[mass == 0] == 0).all())


@SETTINGS
@given(pools(max_experts=1), st.floats(0.01, 1.0))
def test_ties_one_expert_keeps_its_top_entries_unchanged(pool, density):
    pre, one = pool
    tv = taus(pre, one)["t0"]
    merged = mergelab.merge("ties", pre, one, density=density, scaling=1.0, scope="global")
    flat_tau = torch.cat([v.reshape(-1) for v in tv.values()])
    flat_delta = torch.cat([(merged[k].double() - pre[k].double()).reshape(-1) for k in tv])
    kept = flat_delta != 0
    # kept entries are the expert's own values; each kept magnitude >= each dropped one (top-k)
    torch.testing.assert_close(flat_delta[kept], flat_tau[kept], rtol=1e-5, atol=1e-6)
    dropped = ~kept & (flat_tau != 0)
    if kept.any() and dropped.any():
        assert flat_tau[kept].abs().min() >= flat_tau[dropped].abs().max() - 1e-6
    n = flat_tau.numel()
    k_wanted = max(1, min(n, int(density * n)))  # floor, as the TIES authors and mergekit
    assert int(kept.sum()) >= min(k_wanted, int((flat_tau != 0).sum()))
    if density == 1.0:
        torch.testing.assert_close(flat_delta, flat_tau, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- DARE
@SETTINGS
@given(pools(), st.floats(0.0, 0.95), st.integers(0, 2**32), st.floats(0.1, 1.0))
def test_dare_entries_are_dropped_or_rescaled(pool, p, seed, scaling):
    pre, experts = pool
    plan = mergelab.methods.plan("dare", pre, experts, drop_rate=p, seed=seed, scaling=scaling)
    tv = mergelab.task_vectors(pre, experts)
    for t, vec in plan.vectors.items():
        for k, v in vec.items():
            rescaled = tv[t][k] * (1.0 / (1.0 - p))
            assert bool(((v == 0) | (v == rescaled)).all())
    merged = plan.apply(pre)
    assert_structure(merged, pre)
    # same seed, same result, whatever the order of the experts
    again = mergelab.methods.plan("dare", pre, dict(reversed(list(experts.items()))), drop_rate=p, seed=seed)
    assert all(torch.equal(again.vectors[t][k], plan.vectors[t][k]) for t in plan.vectors for k in plan.vectors[t])


@SETTINGS
@given(pools(), st.floats(-1.0, 1.0, allow_nan=False))
def test_dare_without_dropping_is_task_arithmetic(pool, scaling):
    pre, experts = pool
    a = mergelab.merge("dare", pre, experts, drop_rate=0.0, scaling=scaling)
    b = mergelab.merge("task_arithmetic", pre, experts, scaling=scaling)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- parameters
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5) | st.sampled_from(["global", "tensor", "ties", "task_arithmetic", "t0", "t1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["t0", "t1", "x"]), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["average", "task_arithmetic", "ties", "dare"]), st.data())
def test_any_parameters_give_a_merge_or_an_input_error(method, data):
    """Whatever the parameter values (strings, NaN, lists, nested maps...), a merge either succeeds with
    finite weights or raises InputError; never TypeError, KeyError or a silent NaN."""
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(3, 2, generator=g)}
    experts = {t: {"w": pre["w"] + torch.randn(3, 2, generator=g)} for t in ("t0", "t1")}
    names = list(mergelab.methods.get(method).params)
    params = data.draw(st.dictionaries(st.sampled_from([*names, "alpha"]), json_values, max_size=3))
    try:
        merged = mergelab.merge(method, pre, experts, **params)
    except InputError:
        return
    assert bool(torch.isfinite(merged["w"]).all()), params


# ---------------------------------------------------------------------------------------------- pool config
pool_keys = st.sampled_from(["family", "pretrained", "experts", "tasks", "path", "text_field", "label_field", "extra"])
pool_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.just("text"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(pool_keys | st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(pool_keys, pool_values, max_size=5))
def test_pool_config_random_dicts_validate_or_raise_validation_error(raw):
    try:
        cfg = PoolConfig.model_validate(raw)
    except ValidationError as exc:
        assert exc.errors()  # names at least one field
        return
    assert isinstance(cfg.pretrained, str) and cfg.experts and all(isinstance(v, str) for v in cfg.experts.values())
    assert set(raw) <= {"family", "pretrained", "experts", "tasks"}  # extra fields are refused


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60) | pool_values.map(lambda v: yaml.safe_dump({"pool": v})))
def test_pool_yaml_loader_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "run.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_pool_yaml(path)
    except (InputError, ValidationError):
        pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_scaling_nan_or_inf_is_refused(bad):
    pre = {"w": torch.zeros(2)}
    with pytest.raises(InputError, match="finite"):
        mergelab.merge("task_arithmetic", pre, {"a": {"w": torch.ones(2)}}, scaling=bad)
