"""The task-vector core: arithmetic, dtype handling, compatibility errors."""

import pytest
import torch

from mergelab import IncompatibleModelsError, InputError, TaskVector, check_compatible, combine, task_vectors


def _sd(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=g).to(dtype),
        "layer.bias": torch.randn(4, generator=g).to(dtype),
        "position_ids": torch.arange(5),
        "flag": torch.tensor([True, False]),
    }


def test_task_vector_is_difference_and_skips_non_floating():
    pre, ex = _sd(0), _sd(1)
    tv = TaskVector.between(pre, ex)
    assert set(tv) == {"layer.weight", "layer.bias"}
    torch.testing.assert_close(tv["layer.weight"], ex["layer.weight"] - pre["layer.weight"])


def test_task_vector_arithmetic():
    pre, a, b = _sd(0), _sd(1), _sd(2)
    ta, tb = TaskVector.between(pre, a), TaskVector.between(pre, b)
    s = ta + tb
    torch.testing.assert_close(s["layer.bias"], a["layer.bias"] + b["layer.bias"] - 2 * pre["layer.bias"])
    torch.testing.assert_close((ta - tb)["layer.weight"], a["layer.weight"] - b["layer.weight"])
    torch.testing.assert_close((0.5 * ta)["layer.weight"], 0.5 * (a["layer.weight"] - pre["layer.weight"]))
    torch.testing.assert_close((-ta)["layer.bias"], pre["layer.bias"] - a["layer.bias"])
    with pytest.raises(InputError, match="different keys"):
        ta + TaskVector({"x": torch.zeros(1)})


def test_combine_carries_non_floating_and_keeps_dtype():
    pre = _sd(0, torch.bfloat16)
    ex = _sd(1, torch.bfloat16)
    ex["position_ids"] = torch.arange(5) * 7  # must be ignored: carried from pretrained
    merged = combine(pre, task_vectors(pre, {"a": ex}), {"a": 0.5})
    assert merged["layer.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["position_ids"], pre["position_ids"])
    assert torch.equal(merged["flag"], pre["flag"])
    # computed in float32, rounded once at the end
    expected = (pre["layer.weight"].float() + 0.5 * (ex["layer.weight"].float() - pre["layer.weight"].float())).to(torch.bfloat16)
    assert torch.equal(merged["layer.weight"], expected)


def test_combine_does_not_alias_inputs():
    pre = _sd(0)
    merged = combine(pre, {"a": TaskVector({})}, {"a": 1.0})
    merged["layer.weight"].add_(1.0)
    assert not torch.equal(merged["layer.weight"], pre["layer.weight"])


def test_combine_gradients_flow_to_coefficients():
    pre, ex = _sd(0), _sd(1)
    lam = torch.tensor(0.3, requires_grad=True)
    merged = combine(pre, task_vectors(pre, {"a": ex}), {"a": lam})
    merged["layer.weight"].sum().backward()
    expected = (ex["layer.weight"] - pre["layer.weight"]).sum()
    torch.testing.assert_close(lam.grad, expected)


def test_missing_keys_error_names_expert_and_keys():
    pre = _sd(0)
    ex = _sd(1)
    del ex["layer.bias"]
    with pytest.raises(IncompatibleModelsError, match=r"expert 'b'.*missing keys 'layer.bias'"):
        check_compatible(pre, {"a": _sd(2), "b": ex})


def test_extra_keys_listed_with_count():
    pre = _sd(0)
    ex = _sd(1)
    for i in range(8):
        ex[f"head.{i}"] = torch.zeros(1)
    with pytest.raises(IncompatibleModelsError) as info:
        check_compatible(pre, {"a": ex})
    msg = str(info.value)
    assert "extra keys 'head.0'" in msg and "and 3 more (8 in all)" in msg


def test_shape_mismatch_names_key_and_shapes():
    pre = _sd(0)
    ex = _sd(1)
    ex["layer.weight"] = torch.zeros(4, 5)
    with pytest.raises(IncompatibleModelsError, match=r"expert 'a', key 'layer.weight': shape \(4, 5\) differs .* \(4, 3\)"):
        check_compatible(pre, {"a": ex})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_refused(bad):
    pre = _sd(0)
    ex = _sd(1)
    ex["layer.bias"][2] = bad
    with pytest.raises(IncompatibleModelsError, match=r"expert 'a', key 'layer.bias': 1 non-finite"):
        check_compatible(pre, {"a": ex})


def test_dtype_kind_mismatch_refused():
    pre = _sd(0)
    ex = _sd(1)
    ex["position_ids"] = ex["position_ids"].float()
    with pytest.raises(IncompatibleModelsError, match="key 'position_ids'"):
        check_compatible(pre, {"a": ex})


def test_no_experts_refused():
    with pytest.raises(InputError, match="at least one expert"):
        check_compatible(_sd(0), {})
