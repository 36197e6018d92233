"""SE-Merging: per-sample merged forward against materialised references, router formulas by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergelab.core.errors import InputError
from mergelab.core.functional import StackedVectors, per_sample_mixing, per_sample_reference, run_with
from mergelab.core.statedict import combine
from mergelab.methods import plan as make_plan
from mergelab.methods.dynamic import RouterConfig, SEMerging, entropy, rescale, routing_weights, scores
from mergelab.pools.families.text import TextClassifierFamily
from tests.tiny_models import tiny_bert_config, tiny_tokenizer

TEXTS = [
    "the movie was good", "bad film", "the team will win the game", "tax vote in the election",
    "the stock market and the bank", "a great actor and music", "the president gave a speech",
    "people of america want jobs",
]
TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from transformers import BertModel

    d: Path = tmp_path_factory.mktemp("tiny-bert3")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(num_hidden_layers=3)).save_pretrained(str(d))
    tiny_tokenizer().save_pretrained(str(d))
    family = TextClassifierFamily(d, max_length=16)
    pre = family.pretrained_state()
    g = torch.Generator().manual_seed(1)
    experts = {
        t: {k: (v + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in pre.items()}
        for t in TASKS
    }
    return family, pre, experts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm()).detach())


# ---------------------------------------------------------------------------------------------- core
def test_exact_batched_equals_reference_random_coefficients(setup) -> None:
    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    stacked = StackedVectors.from_vectors(plan.vectors)
    batch = family.tokenize(TEXTS)
    coeffs = torch.rand(len(TEXTS), len(TASKS), generator=torch.Generator().manual_seed(3)) * 1.5 - 0.2

    with torch.no_grad(), per_sample_mixing(family.body, pre, stacked, coeffs):
        fast = run_with(family.body, pre, **batch).last_hidden_state

    def one(theta, b):
        return run_with(family.body, theta, **{k: v[b : b + 1] for k, v in batch.items()}).last_hidden_state

    ref = per_sample_reference(one, pre, stacked, coeffs)
    assert fast.shape == ref.shape
    assert _rel(fast, ref) < 1e-5
    # and the patch is gone afterwards: the plain body runs the pretrained weights again
    plain = family.body(**batch).last_hidden_state
    assert _rel(plain, run_with(family.body, pre, **batch).last_hidden_state) < 1e-7


def test_reused_weight_buffer_gives_the_tracked_result_and_gradients(setup) -> None:
    """Without autograd the per-sample weights go through one reused buffer (every layer, two batch sizes in one
    block); with coefficients that need a gradient they are fresh tensors. Same outputs either way, and the
    gradient of the coefficients against central finite differences of the same function."""
    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    stacked = StackedVectors.from_vectors(plan.vectors)
    batch = family.tokenize(TEXTS)
    small = {k: v[:3] for k, v in batch.items()}
    coeffs = torch.rand(len(TEXTS), len(TASKS), generator=torch.Generator().manual_seed(5)) + 0.1
    current = {"c": coeffs}
    with torch.no_grad(), per_sample_mixing(family.body, pre, stacked, lambda: current["c"]):
        buffered = run_with(family.body, pre, **batch).last_hidden_state
        current["c"] = coeffs[:3]
        buffered_small = run_with(family.body, pre, **small).last_hidden_state  # a smaller batch reuses it
        current["c"] = coeffs
        again = run_with(family.body, pre, **batch).last_hidden_state
    torch.testing.assert_close(buffered_small, buffered[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, buffered, rtol=0, atol=0)

    leaf = coeffs.clone().requires_grad_(True)
    with per_sample_mixing(family.body, pre, stacked, leaf):
        tracked = run_with(family.body, pre, **batch).last_hidden_state
    torch.testing.assert_close(tracked.detach(), buffered, rtol=1e-5, atol=1e-5)
    tracked.pow(2).sum().backward()

    def loss(c: torch.Tensor) -> float:
        with torch.no_grad(), per_sample_mixing(family.body, pre, stacked, c):
            return float(run_with(family.body, pre, **batch).last_hidden_state.double().pow(2).sum())

    h, b, t = 1e-2, 2, 1
    up, down = coeffs.clone(), coeffs.clone()
    up[b, t] += h
    down[b, t] -= h
    numeric = (loss(up) - loss(down)) / (2 * h)
    assert abs(float(leaf.grad[b, t]) - numeric) <= 2e-2 * abs(numeric) + 1e-3


def test_same_coefficients_for_all_samples_is_the_static_merge(setup) -> None:
    family, pre, experts = setup
    plan = make_plan("ties", pre, experts, density=0.5, scaling=1.0)
    stacked = StackedVectors.from_vectors(plan.vectors)
    batch = family.tokenize(TEXTS)
    c = torch.tensor([0.7, 0.2, 1.1])
    with torch.no_grad(), per_sample_mixing(family.body, pre, stacked, c.expand(len(TEXTS), -1)):
        mixed = run_with(family.body, pre, **batch).last_hidden_state
    static = combine(pre, plan.vectors, dict(zip(TASKS, c.tolist())))
    assert _rel(mixed, run_with(family.body, static, **batch).last_hidden_state) < 1e-5


def test_per_sample_mixing_on_gpt2_conv1d() -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    vectors = {t: {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items() if v.is_floating_point()}
               for t in TASKS}
    stacked = StackedVectors.from_vectors(vectors)
    ids = torch.randint(0, 50, (4, 7), generator=g)
    coeffs = torch.rand(4, 3, generator=g)
    with torch.no_grad(), per_sample_mixing(model, pre, stacked, coeffs):
        out = run_with(model, pre, input_ids=ids).last_hidden_state
    ref = per_sample_reference(lambda th, b: run_with(model, th, input_ids=ids[b : b + 1]).last_hidden_state,
                               pre, stacked, coeffs)
    assert _rel(out, ref) < 1e-5


def test_unsupported_module_is_refused() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3))
    pre = {k: v.detach().clone() for k, v in conv.state_dict().items()}
    stacked = StackedVectors.from_vectors({"a": {k: torch.zeros_like(v) for k, v in pre.items()}})
    with pytest.raises(InputError, match="Conv3d.*0.weight"), per_sample_mixing(conv, pre, stacked, torch.ones(1, 1)):
        pass


# ---------------------------------------------------------------------------------------------- probes
def test_probe_matches_hidden_states_and_stops_early(setup) -> None:
    family, pre, _ = setup
    batch = family.tokenize(TEXTS)
    full = family.hidden_states(batch, pre)
    got = family.probe(batch, pre, [0, 2])
    assert set(got) == {0, 2}
    for layer in (0, 2):
        assert torch.allclose(got[layer], full[layer], atol=1e-6)
    calls = []
    h = family.layer_modules()[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        family.probe(batch, pre, [1])
    finally:
        h.remove()
    assert calls == []  # block 3 never ran
    with pytest.raises(InputError, match="probe layer must be an integer in 0..3"):
        family.probe(batch, pre, [4])


def test_layer_of_key(setup) -> None:
    family, pre, _ = setup
    assert family.layer_of_key("embeddings.word_embeddings.weight") == 0
    assert family.layer_of_key("encoder.layer.0.attention.self.query.weight") == 1
    assert family.layer_of_key("encoder.layer.2.output.dense.bias") == 3
    assert family.layer_of_key("pooler.dense.weight") == 4


# ---------------------------------------------------------------------------------------------- router
def test_scores_by_hand() -> None:
    merged = torch.tensor([[0.0, 0.0]])
    experts = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])  # [T=2, B=1, H=2]
    pre = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(scores("raw", merged, experts), torch.tensor([[5.0, 1.0]]))
    d0 = torch.tensor([[math.sqrt(9 + 9), math.sqrt(2)]])
    assert torch.allclose(scores("relative", merged, experts, pre), torch.tensor([[5.0, 1.0]]) - d0)
    assert torch.allclose(scores("ratio", merged, experts, pre), torch.tensor([[5.0, 1.0]]) / d0)
    protos = torch.tensor([[0.0, 2.0], [6.0, 8.0]])
    assert torch.allclose(scores("prototype", merged, prototypes=protos), torch.tensor([[2.0, 10.0]]))


def test_weights_and_rescaling_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0]])
    # default scale "mean": z = s / mean|s| = s / 2; softmax(-z / 0.5)
    e = torch.exp(-(s / 2.0) / 0.5)
    w = routing_weights(s, 0.5)
    assert torch.allclose(w, e / e.sum(), atol=1e-6)
    # scale "std" (the old standardisation): z = (s - 2) / std, std = sqrt(2/3)
    z = (s - 2.0) / math.sqrt(2.0 / 3.0)
    e = torch.exp(-z / 0.5)
    assert torch.allclose(routing_weights(s, 0.5, "std"), e / e.sum(), atol=1e-6)
    # rescale: G * mean(lam) * w_t lam_t / sum w lam, G = 1.5, mean(lam) = 0.4: total 0.6, by hand
    w = torch.tensor([[0.5, 0.3, 0.2]])
    c = rescale(w, [0.3, 0.3, 0.6], gain=1.5)
    denom = 0.5 * 0.3 + 0.3 * 0.3 + 0.2 * 0.6
    assert torch.allclose(c, torch.tensor([[0.6 * 0.15 / denom, 0.6 * 0.09 / denom, 0.6 * 0.12 / denom]]))
    # gain T (the default): uniform weights give back the static coefficients
    assert torch.allclose(rescale(torch.full((2, 3), 1 / 3), [0.3, 0.3, 0.6]), torch.tensor([[0.3, 0.3, 0.6]] * 2))
    assert torch.allclose(entropy(torch.tensor([[0.5, 0.5]])), torch.tensor([math.log(2)]))
    with pytest.raises(InputError, match="temperature"):
        routing_weights(s, -1.0)
    with pytest.raises(InputError, match="scale"):
        routing_weights(s, 1.0, "max")
    with pytest.raises(InputError, match="normalisation"):
        RouterConfig(normalisation="cosine")
    with pytest.raises(InputError, match="gain"):
        RouterConfig(gain=0)
    with pytest.raises(InputError, match="probes"):
        RouterConfig(probes="cached")  # the prototype rule (default) runs no expert probe


# two tasks (issue 19): distances written out, weights and coefficients by the formula, each case one the
# old defaults (standardisation across tasks, mass relative to the static total) get wrong
def test_two_task_weights_follow_the_distances() -> None:
    near, far = torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 1.2]])
    # z = s / mean(s): (0.5, 1.5) and (1/1.1, 1.2/1.1); w_0 = 1 / (1 + exp(-(z_1 - z_0) / tau)), tau = 0.5
    w_near = 1 / (1 + math.exp(-(1.5 - 0.5) / 0.5))
    w_far = 1 / (1 + math.exp(-((1.2 - 1.0) / 1.1) / 0.5))
    assert torch.allclose(routing_weights(near, 0.5), torch.tensor([[w_near, 1 - w_near]]), atol=1e-6)
    assert torch.allclose(routing_weights(far, 0.5), torch.tensor([[w_far, 1 - w_far]]), atol=1e-6)
    assert w_near > 0.85 and w_far < 0.6  # clear distances route confidently, near-ties do not
    # the old standardisation: z = (-1, +1) for any two distances, so both pairs get the same weights
    w_std = 1 / (1 + math.exp(-2 / 0.5))
    for s in (near, far):
        assert torch.allclose(routing_weights(s, 0.5, "std"), torch.tensor([[w_std, 1 - w_std]]), atol=1e-6)
    # equal distances: uniform weights under both
    assert torch.allclose(routing_weights(torch.tensor([[2.0, 2.0]]), 0.5), torch.tensor([[0.5, 0.5]]))
    # scale-free: the same weights when every distance is multiplied by 7
    assert torch.allclose(routing_weights(7 * near, 0.5), routing_weights(near, 0.5), atol=1e-6)


def test_two_task_coefficients_amplify_the_identified_task() -> None:
    w = torch.tensor([[0.9, 0.1]])
    # Task Arithmetic 0.3, gain 2.5: total 2.5 * 0.3 = 0.75, split as w (equal base coefficients)
    c = rescale(w, [0.3, 0.3], gain=2.5)
    assert torch.allclose(c, torch.tensor([[0.75 * 0.9, 0.75 * 0.1]]))
    assert float(c[0, 0]) > 0.3  # above the task's static coefficient: amplified
    # the same gain gives the identified task the same share of the same total with five tasks
    c5 = rescale(torch.tensor([[0.9, 0.025, 0.025, 0.025, 0.025]]), [0.3] * 5, gain=2.5)
    assert float(c5[0, 0]) == pytest.approx(0.75 * 0.9)
    # gain 1 / 0.3 and a certain router: the identified task's coefficient is 1 (its expert)
    assert torch.allclose(rescale(torch.tensor([[1.0, 0.0]]), [0.3, 0.3], gain=1 / 0.3), torch.tensor([[1.0, 0.0]]))
    # the old rule, M = mass * sum(lambda) = 0.5 * 0.6: even a certain router gave the task only 0.3
    old_total = 0.5 * (0.3 + 0.3)
    assert old_total * 1.0 == pytest.approx(0.3)
    assert torch.allclose(rescale(torch.tensor([[1.0, 0.0]]), [0.3, 0.3], gain=0.5 * 2), torch.tensor([[0.3, 0.0]]))


# ---------------------------------------------------------------------------------------------- SE-Merging
@pytest.mark.parametrize("normalisation", ["raw", "relative", "ratio"])
def test_routed_sample_reproduces_its_expert(setup, normalisation: str) -> None:
    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    se = SEMerging(family, pre, plan, experts, RouterConfig(layer=2, normalisation=normalisation,
                                                              temperature=1e-3, gain=1 / 0.3))
    batch = family.tokenize(TEXTS)
    feats, routing = se.features(batch, "exact")
    assert torch.all(routing.weights.max(-1).values > 0.999)
    for b, t in enumerate(routing.chosen.tolist()):
        single = {k: v[b : b + 1] for k, v in batch.items()}
        expert_out = family.features(single, experts[TASKS[t]])
        assert _rel(feats[b : b + 1], expert_out) < 1e-4


def test_se_merging_modes_agree_with_their_references(setup) -> None:
    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    se = SEMerging(family, pre, plan, experts, RouterConfig(layer=1, normalisation="relative", temperature=0.5, gain=3.0))
    batch = family.tokenize(TEXTS)
    exact, routing = se.features(batch, "exact")
    ref, _ = se.features(batch, "reference", routing=routing)
    assert _rel(exact, ref) < 1e-5
    assert torch.allclose(routing.coefficients.sum(-1), torch.full((len(TEXTS),), 0.9), atol=1e-5)  # gain 3 x 0.3

    # single pass: static merge up to the probe layer, prototype routing there, per-sample above it
    se.calibrate({"a": TEXTS[:3], "b": TEXTS[3:6], "c": TEXTS[6:]})
    fast, froute = se.features(batch, "single-pass")
    static = se.static
    for b in range(len(TEXTS)):
        per = combine(pre, plan.vectors, {t: float(froute.coefficients[b, i]) for i, t in enumerate(TASKS)})
        theta = {k: (per[k] if family.layer_of_key(k) > 1 else static[k]) for k in pre}
        single = {k: v[b : b + 1] for k, v in batch.items()}
        assert _rel(fast[b : b + 1], family.features(single, theta)) < 1e-5
    # the fast router's prototype scores are the distances of the static layer-1 representation
    m = family.probe(batch, static, [1])[1]
    assert torch.allclose(froute.scores, torch.cdist(m, se.prototypes), atol=1e-5)
    pe, proute = se.features(batch, "prototype-exact")
    assert torch.allclose(proute.coefficients, froute.coefficients, atol=1e-5)


def test_fast_grouped_path_against_per_sample_reference(setup) -> None:
    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    se = SEMerging(family, pre, plan, experts, RouterConfig(layer=2, temperature=0.3, gain=3.0), groups="prototype")
    protos = se.calibrate({"a": TEXTS[:2], "b": TEXTS[2:5], "c": TEXTS[5:]})
    batch = family.tokenize(TEXTS)
    feats, routing = se.features(batch, "fast")
    # groups="prototype": equations (3)-(5) for a sample sitting on each prototype, by hand
    d = torch.cdist(protos, protos)
    z = d / d.abs().mean(-1, keepdim=True)
    w = torch.softmax(-z / 0.3, -1)
    q = 3.0 * 0.3 * w * 0.3 / (w * 0.3).sum(-1, keepdim=True)  # gain 3 x mean coefficient 0.3
    assert torch.allclose(se.group_coefficients(), q, atol=1e-6)
    m = family.probe(batch, se.static, [2])[2]
    chosen = torch.cdist(m, protos).argmin(-1)
    assert torch.equal(routing.chosen, chosen)
    for b in range(len(TEXTS)):
        single = family.tokenize([TEXTS[b]])  # unpadded: the group path trims padding
        theta = combine(pre, plan.vectors, {t: float(q[chosen[b], i]) for i, t in enumerate(TASKS)})
        assert _rel(feats[b : b + 1], family.features(single, theta)) < 1e-5
        assert torch.allclose(routing.coefficients[b], q[chosen[b]])


def _calibration_coefficients(se, family, texts, temperature, gain):
    """Equations (3)-(5) under the prototype rule for each text, from the static merge's probe, by hand."""
    m = family.probe(family.tokenize(texts), se.static, [se.config.layer])[se.config.layer]
    d = torch.cdist(m, se.prototypes)
    z = d / d.abs().mean(-1, keepdim=True)
    w = torch.softmax(-z / temperature, -1)
    return gain * 0.3 * w * 0.3 / (w * 0.3).sum(-1, keepdim=True)


def test_coefficient_codebook_by_hand() -> None:
    from mergelab.methods.dynamic.router import coefficient_codebook

    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.5, 0.5]])
    chosen = torch.tensor([0, 0, 1, 1, 0])
    fallback = torch.zeros(2, 2)
    # two codes: the means per routed task, [0.8, 0.2] and [0.05, 0.95]; (0.5, 0.5) is nearer the first
    two = coefficient_codebook(x, chosen, 2, fallback)
    assert torch.allclose(two, torch.tensor([[0.8, 0.2], [0.05, 0.95]]))
    # three: (0.5, 0.5) is the farthest from those two and becomes a code; Lloyd then moves code 0 to
    # the mean of (1, 0) and (0.9, 0.1)
    three = coefficient_codebook(x, chosen, 3, fallback)
    assert torch.allclose(three, torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.5, 0.5]]))
    # no code beyond the distinct vectors; a task no sample was routed to starts at its fallback row
    assert len(coefficient_codebook(x, chosen, 50, fallback)) == 5
    one_task = coefficient_codebook(x[:2], torch.tensor([0, 0]), 2, torch.tensor([[0.0, 0.0], [0.2, 0.8]]))
    assert torch.allclose(one_task, torch.tensor([[0.95, 0.05]]))  # the fallback code drew no vector: dropped


def test_fast_quantized_groups(setup) -> None:
    """The default fast path: a k-means codebook of the calibration texts' own coefficients; each sample runs
    through the merge of the code nearest its coefficients."""
    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    calib = {"a": TEXTS[:3], "b": TEXTS[3:6], "c": TEXTS[6:]}
    se = SEMerging(family, pre, plan, experts, RouterConfig(layer=1, temperature=0.5, gain=2.4), groups_per_task=1)
    se.calibrate(calib)
    c = _calibration_coefficients(se, family, TEXTS, 0.5, 2.4)
    codes = se.group_coefficients()
    assert codes.shape == (3, 3)
    # Lloyd's fixed point: every code is the mean of the calibration vectors nearest to it
    near = torch.cdist(c, codes).argmin(1)
    for k in range(len(codes)):
        if (near == k).any():
            assert torch.allclose(codes[k], c[near == k].mean(0), atol=1e-5)
    batch = family.tokenize(TEXTS)
    feats, routing = se.features(batch, "fast")
    for b in range(len(TEXTS)):
        theta = combine(pre, plan.vectors, {t: float(codes[near[b], i]) for i, t in enumerate(TASKS)})
        assert _rel(feats[b : b + 1], family.features(family.tokenize([TEXTS[b]]), theta)) < 1e-5
        assert torch.allclose(routing.coefficients[b], codes[near[b]])
    # with as many codes as calibration texts the quantisation is lossless on them: the fast path equals the
    # exact per-sample forward under the same (prototype) routing
    se_all = SEMerging(family, pre, plan, experts, RouterConfig(layer=1, temperature=0.5, gain=2.4), groups_per_task=4)
    se_all.calibrate(calib)
    assert len(se_all.group_coefficients()) == len(TEXTS)
    fast, froute = se_all.features(batch, "fast")
    exact, eroute = se_all.features(batch, "prototype-exact")
    assert torch.allclose(froute.coefficients, eroute.coefficients, atol=1e-5)
    assert _rel(fast, exact) < 1e-5
    with pytest.raises(InputError, match="groups_per_task"):
        SEMerging(family, pre, plan, experts, groups_per_task=0)
    with pytest.raises(InputError, match="groups must be one of"):
        SEMerging(family, pre, plan, experts, groups="kmeans")


def test_fast_path_needs_calibration(setup) -> None:
    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts)
    se = SEMerging(family, pre, plan, experts, RouterConfig(layer=1))
    with pytest.raises(InputError, match="calibrate"):
        se.features(family.tokenize(TEXTS[:2]), "fast")
    with pytest.raises(InputError, match="probe layer must be an integer"):
        SEMerging(family, pre, plan, experts, RouterConfig(layer=7))


# ---------------------------------------------------------------------------------------------- low rank
def _truncate(mat: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation, written out: U_r diag(S_r) Vh_r."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def test_low_rank_factors_reconstruct_truncated_svd(setup) -> None:
    from mergelab.core.functional import low_rank_factors

    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    stacked = StackedVectors.from_vectors(plan.vectors)
    factors, error = low_rank_factors(stacked, family.body, 4)
    linear_keys = {f"{n}.weight" for n, m in family.body.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(factors) == linear_keys & set(stacked.tensors)  # embeddings and layer norms are not factored
    key = sorted(factors)[0]
    u, v = factors[key]
    for i, _t in enumerate(TASKS):
        approx = u[:, 4 * i : 4 * (i + 1)] @ v[4 * i : 4 * (i + 1)]
        assert _rel(approx, _truncate(stacked.tensors[key][i], 4)) < 1e-4
    full = stacked.tensors[key]
    err = float(torch.stack([full[i] - _truncate(full[i], 4) for i in range(len(TASKS))]).norm() / full.norm())
    assert error[key] == pytest.approx(err, rel=1e-3)
    assert 0 < error[key] < 1
    with pytest.raises(InputError, match="rank"):
        low_rank_factors(stacked, family.body, 0)


def test_lowrank_mode_full_rank_is_exact_and_low_rank_matches_truncated_reference(setup) -> None:
    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    cfg = RouterConfig(layer=1, normalisation="relative", temperature=0.5, gain=3.0)
    batch = family.tokenize(TEXTS)
    width = family.hidden_size * 4  # the largest matrix side: full rank
    se = SEMerging(family, pre, plan, experts, cfg, lowrank_rank=width)
    exact, routing = se.features(batch, "exact")
    full, froute = se.features(batch, "lowrank")
    assert torch.equal(froute.coefficients, routing.coefficients)
    assert _rel(full, exact) < 1e-5

    # rank 2: the reference builds theta_b = theta_static + sum_t (C_bt - 0.3) trunc_2(tau_t) on linear
    # weights (exact tau elsewhere) and runs each sample alone
    se2 = SEMerging(family, pre, plan, experts, cfg, lowrank_rank=2)
    low, _ = se2.features(batch, "lowrank", routing=routing)
    linear = {f"{n}.weight" for n, m in family.body.named_modules() if isinstance(m, torch.nn.Linear)}
    static = combine(pre, plan.vectors, dict.fromkeys(TASKS, 0.3))
    for b in range(len(TEXTS)):
        theta = dict(static)
        for k in plan.vectors[TASKS[0]]:
            for i, t in enumerate(TASKS):
                tau = plan.vectors[t][k]
                tau = _truncate(tau, 2) if k in linear else tau
                theta[k] = theta[k] + (float(routing.coefficients[b, i]) - 0.3) * tau
        single = {k: v[b : b + 1] for k, v in batch.items()}
        assert _rel(low[b : b + 1], family.features(single, theta)) < 1e-4
    assert _rel(low, exact) > 1e-4  # rank 2 is an approximation here, not the exact path
    with pytest.raises(InputError, match="lowrank_rank"):
        SEMerging(family, pre, plan, experts, cfg, lowrank_rank=0)


def test_cached_expert_probes_by_hand(setup) -> None:
    """probes="cached": each expert's mean probe representation of its own task's texts stands for e_t(x)."""
    family, pre, experts = setup
    plan = make_plan("task_arithmetic", pre, experts, scaling=0.3)
    cfg = RouterConfig(layer=1, normalisation="raw", temperature=0.5, gain=2.0, probes="cached")
    se = SEMerging(family, pre, plan, experts, cfg)
    batch = family.tokenize(TEXTS)
    with pytest.raises(InputError, match="cache_experts"):
        se.route(batch)
    calib = {"a": TEXTS[:3], "b": TEXTS[3:6], "c": TEXTS[6:]}
    se.cache_experts(calib)
    ebar = torch.stack([family.probe(family.tokenize(calib[t]), experts[t], [1])[1].mean(0) for t in TASKS])
    assert torch.allclose(se.expert_cache, ebar, atol=1e-6)
    m = family.probe(batch, se.static, [1])[1]
    d = torch.stack([(m - ebar[i]).norm(dim=-1) for i in range(3)], -1)  # [B, T], by hand
    w = torch.softmax(-(d / d.mean(-1, keepdim=True)) / 0.5, -1)
    routing = se.route(batch)
    assert torch.allclose(routing.scores, d, atol=1e-5)
    assert torch.allclose(routing.coefficients, 2.0 * 0.3 * w, atol=1e-5)  # equal base coefficients
    # live probes read each expert's representation of the input itself: other scores
    live = se.route(batch, se.with_config(probes="live"))
    e = torch.stack([family.probe(batch, experts[t], [1])[1] for t in TASKS])
    assert torch.allclose(live.scores, (m[None] - e).norm(dim=-1).T, atol=1e-5)
    assert not torch.allclose(live.scores, routing.scores, atol=1e-3)


def test_se_params_and_rows_say_which_probes_and_data() -> None:
    from mergelab import methods
    from mergelab.experiment.rows import resolve
    from mergelab.methods.dynamic import SEParams

    with pytest.raises(InputError, match=r"no parameter\(s\) \['mass'\].*'gain'"):  # mass was replaced by gain
        methods.get("se_merging").check({"mass": 0.5})
    assert SEParams().probes == "live" and SEParams().scale == "mean"
    rows = {r.name: r for r in resolve(["se_merging_task_arithmetic", "se_merging_task_arithmetic_cached",
                                        "se_prototype_task_arithmetic"])}
    assert rows["se_merging_task_arithmetic"].data() == "nothing"
    assert rows["se_merging_task_arithmetic_cached"].params["probes"] == "cached"
    assert rows["se_merging_task_arithmetic_cached"].data() == "calibration"
    assert rows["se_prototype_task_arithmetic"].data() == "calibration"
