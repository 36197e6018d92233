"""Test-time adaptive merging (AdaMerging, SyMerge) on a tiny 2-layer BERT (width 32) built from a config."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mergelab import methods  # noqa: E402
from mergelab.cli import app  # noqa: E402
from mergelab.core.errors import InputError  # noqa: E402
from mergelab.core.statedict import task_vectors  # noqa: E402
from mergelab.experiment import runner as rows_module  # noqa: E402  (the one runner evaluates every row)
from mergelab.experiment.adaptive_rows import adaptive_rows  # noqa: E402
from mergelab.experiment.pilot import cross_task_matrix, plot_cross_task, relation  # noqa: E402
from mergelab.methods.adaptive import (  # noqa: E402
    Coefficients,
    MergedParams,
    PseudoLabels,
    adamerging,
    check_texts,
    expert_pseudo_labels,
    select_samples,
    selflabel_loss,
    symerge,
    ties_vectors,
)
from mergelab.methods.adaptive.adamerging import build_merged  # noqa: E402
from mergelab.methods.adaptive.inputs import TokenCache  # noqa: E402
from mergelab.methods.adaptive.symerge import last_block_keys  # noqa: E402
from mergelab.pools.data.tasks import TextTask  # noqa: E402
from mergelab.pools.families.text import TextClassifierFamily, accuracy  # noqa: E402

from .tiny_models import VOCAB, tiny_bert_config  # noqa: E402

TASKS = ("senti", "news")
TEXTS = {
    "senti": [f"the {n} was {a}" for n in ("movie", "film", "plot", "story") for a in ("good", "bad", "great", "awful")],
    "news": [f"{a} {b} {c}" for a in ("the", "a") for b in ("team", "party", "bank", "market")
             for c in ("vote", "win", "tax", "goal")],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine's other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Pretrained tiny BERT, two experts (pretrained + seeded noise), a head per task (2 and 3 classes)."""
    from transformers import BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny") / "pre"
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(d))
    # a tokenizer built from the vocabulary dict (every test word is a token, none is [UNK])
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(d))
    family = TextClassifierFamily(d, max_length=16)
    ids = family.tokenize(TEXTS["senti"][:2])["input_ids"]
    assert not bool((ids[:, 1:-1] == VOCAB.index("[UNK]")).any())
    pre = family.pretrained_state()
    g = torch.Generator().manual_seed(1)
    experts = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                   for k, v in pre.items()} for t in TASKS}
    heads = {t: family.new_head(2 + i, seed=10 + i).eval() for i, t in enumerate(TASKS)}
    for h in heads.values():
        h.requires_grad_(False)
    return family, pre, experts, heads


def reference_merge(pre, experts, coef):
    """Independent formula: theta_0 + sum_t c_t (theta_t - theta_0), c_t a number or key -> number."""
    out = {}
    for k, v in pre.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        acc = v.double().clone()
        for t, sd in experts.items():
            c = coef[t][k] if isinstance(coef[t], dict) else coef[t]
            acc += c * (sd[k].double() - v.double())
        out[k] = acc
    return out


# ---------------------------------------------------------------------------------------------- merge
def test_taskwise_merge_equals_task_arithmetic(pool):
    family, pre, experts, _ = pool
    vec = task_vectors(pre, experts)
    mp = MergedParams(pre, vec, "task")
    c = {"senti": 0.17, "news": 0.62}
    mp.coefficients.set_values([c["senti"], c["news"]])
    merged = mp.state_dict_merged()
    ref = reference_merge(pre, experts, c)
    static = methods.merge("task_arithmetic", pre, experts, scaling=c)
    assert set(merged) == set(pre)
    for k in pre:
        assert torch.allclose(merged[k].double(), ref[k].double(), atol=1e-6), k
        assert torch.allclose(merged[k], static[k], atol=1e-6), k
    # the differentiable forward gives the same features as the static merge
    batch = family.tokenize(TEXTS["senti"][:4])
    assert torch.allclose(family.features(batch, mp()), family.features(batch, static), atol=1e-5)


def test_layerwise_merge_equals_reference_and_clamps(pool):
    _, pre, experts, _ = pool
    vec = task_vectors(pre, experts)
    mp = MergedParams(pre, vec, "layer")
    g = torch.Generator().manual_seed(3)
    values = torch.rand(len(TASKS), len(mp.keys), generator=g)
    mp.coefficients.set_values(values)
    coef = {t: {k: float(values[i, j]) for j, k in enumerate(mp.keys)} for i, t in enumerate(TASKS)}
    for t in TASKS:  # tensors without a coefficient keep the initial 0.3
        coef[t].update({k: 0.3 for k in pre if k not in mp.keys})
    merged, ref = mp.state_dict_merged(), reference_merge(pre, experts, coef)
    for k in pre:
        assert torch.allclose(merged[k].double(), ref[k].double(), atol=1e-6), k
    # clamping: raw 1.7 and -0.4 act as 1 and 0
    mp.coefficients.set_values(torch.full_like(values, 1.7))
    assert torch.allclose(mp()[mp.keys[0]], reference_merge(pre, experts, dict.fromkeys(TASKS, 1.0))[mp.keys[0]].float(),
                          atol=1e-5)
    mp.coefficients.set_values(torch.full_like(values, -0.4))
    assert torch.allclose(mp()[mp.keys[0]], pre[mp.keys[0]], atol=1e-6)
    unclamped = MergedParams(pre, vec, "layer", clamp=False)
    unclamped.coefficients.set_values(torch.full_like(values, -0.4))
    k0 = unclamped.keys[0]
    assert torch.allclose(unclamped()[k0], pre[k0] - 0.4 * (vec["senti"][k0] + vec["news"][k0]), atol=1e-5)


def test_merge_over_ties_and_dare_vectors(pool):
    _, pre, experts, _ = pool
    for name, params in (("ties", {"density": 0.3}), ("dare", {"drop_rate": 0.5, "seed": 1})):
        plan = methods.plan(name, pre, experts, **params)
        mp = MergedParams(pre, plan.vectors, "task")
        mp.coefficients.set_values([plan.coefficients[t] for t in TASKS])
        static = plan.apply(pre)
        merged = mp.state_dict_merged()
        for k in pre:
            assert torch.allclose(merged[k], static[k], atol=1e-6), (name, k)


# ---------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_every_coefficient_and_the_trained_layer(pool):
    family, pre, experts, heads = pool
    vec = task_vectors(pre, experts)
    mp = build_merged(family, pre, vec, "layer", 0.3, True, TEXTS)
    # every tensor on the path to the features gets a coefficient; the unused pooler does not
    assert not any(k.startswith("pooler.") for k in mp.keys)
    assert all(k in mp.keys for k in pre if k.startswith("encoder.") and pre[k].is_floating_point())
    head = torch.nn.Linear(32, 2)
    batch = family.tokenize(TEXTS["senti"])
    loss = selflabel_loss(head(family.features(batch, mp())), torch.zeros(16, dtype=torch.long), torch.ones(16))[0]
    loss.backward()
    grad = mp.coefficients.raw.grad
    assert grad is not None and grad.shape == (len(TASKS), len(mp.keys))
    assert bool((grad != 0).all()), f"{int((grad == 0).sum())} coefficient(s) got no gradient"
    assert head.weight.grad is not None and bool((head.weight.grad != 0).any())

    # through the optimiser: one SyMerge step moves every coefficient and the heads, not the callers' heads
    before = {t: h.weight.clone() for t, h in heads.items()}
    res = symerge(family, pre, vec, heads, TEXTS, experts=experts, steps=2, progress=False)
    assert bool((res.coefficients.raw.detach() != 0.3).all())
    for t in TASKS:
        assert not torch.equal(res.heads[t].weight, before[t])
        assert torch.equal(heads[t].weight, before[t])
    # task_layer="last_block": the kept block is trained per task, the coefficients skip it
    res = symerge(family, pre, vec, heads, TEXTS, experts=experts, steps=2, task_layer="last_block", progress=False)
    kept = last_block_keys(pre)
    assert kept and all(k.startswith("encoder.layer.1.") for k in kept)
    assert not set(kept) & set(res.merged.keys)
    for t in TASKS:  # the step that visited task t changed its block
        assert any(not torch.equal(res.task_layers[t][k], experts[t][k]) for k in kept)
        assert torch.equal(res.body(t)[kept[0]], res.task_layers[t][kept[0]])


# ---------------------------------------------------------------------------------------------- SyMerge loss
def test_symerge_sample_selection_on_a_hand_made_batch():
    # merged-model logits for 5 samples, 3 classes; softmax maxima written beside
    logits = torch.log(torch.tensor([
        [0.7, 0.2, 0.1],   # merged says 0 (conf .7)
        [0.7, 0.2, 0.1],   # merged says 0 (conf .7)
        [0.7, 0.2, 0.1],   # merged says 0 (conf .7)
        [0.1, 0.1, 0.8],   # merged says 2 (conf .8)
        [0.5, 0.4, 0.1],   # merged says 0 (conf .5)
    ]))
    expert_y = torch.tensor([0, 1, 1, 1, 2])
    expert_c = torch.tensor([0.3, 0.9, 0.6, 0.8, 0.0])
    expert_c[4] = logits.softmax(-1)[4].max()  # an exact tie with the merged model's confidence
    # agree -> keep; disagree & expert more confident -> keep; disagree & less -> drop; tie -> keep
    expected = torch.tensor([True, True, False, True, True])
    assert torch.equal(select_samples(logits, expert_y, expert_c), expected)
    loss, n = selflabel_loss(logits, expert_y, expert_c)
    probs = logits.softmax(-1)
    manual = -(torch.log(probs[0, 0]) + torch.log(probs[1, 1]) + torch.log(probs[3, 1]) + torch.log(probs[4, 2])) / 4
    assert n == 4 and torch.allclose(loss, manual, atol=1e-6)
    # nothing kept: zero loss that still carries a graph
    z, n0 = selflabel_loss(logits.requires_grad_(True), torch.tensor([1, 1, 1, 0, 1]), torch.zeros(5))
    assert n0 == 0 and float(z.detach()) == 0.0 and z.requires_grad


def test_pseudo_labels_are_the_experts_predictions(pool):
    family, pre, experts, heads = pool
    pl = expert_pseudo_labels(family, experts, heads, TEXTS)
    for t in TASKS:
        for i in (0, 5, 11):
            logits = family.logits(family.tokenize([TEXTS[t][i]]), heads[t], experts[t])[0]
            p = logits.softmax(-1)
            assert int(pl[t].labels[i]) == int(p.argmax())
            assert abs(float(pl[t].confidence[i]) - float(p.max())) < 1e-5


def test_token_cache_equals_batch_tokenization(pool):
    family = pool[0]
    texts = ["the movie", "a bank market vote tax win", "good"]
    cache = TokenCache(family, texts)
    ref = family.tokenize([texts[2], texts[1]])
    got = cache.batch([2, 1])
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_cached_pseudo_labels_give_the_same_result_as_the_naive_loop(pool):
    family, pre, experts, heads = pool
    vec = task_vectors(pre, experts)
    fast = symerge(family, pre, vec, heads, TEXTS, experts=experts, steps=4, progress=False)
    naive = symerge(family, pre, vec, heads, TEXTS, experts=experts, steps=4, progress=False,
                    cache_pseudo_labels=False, cache_tokens=False)
    assert torch.allclose(fast.coefficients.raw, naive.coefficients.raw, atol=1e-5)
    assert fast.losses == pytest.approx(naive.losses, abs=1e-4)


# ---------------------------------------------------------------------------------------------- labels
class LabelsRaise(TextTask):
    """A labeled task whose labels raise on access (after construction)."""

    reads = 0

    def __getattribute__(self, name):
        if name == "labels" and object.__getattribute__(self, "_armed"):
            type(self).reads += 1
            raise AssertionError("labels were read")
        return object.__getattribute__(self, name)

    def __init__(self, *a, **kw):
        object.__setattr__(self, "_armed", False)
        super().__init__(*a, **kw)
        object.__setattr__(self, "_armed", True)


def _guarded(task: str, texts: list[str], n_classes: int) -> LabelsRaise:
    return LabelsRaise(task, list(texts), [i % n_classes for i in range(len(texts))],
                       label_names=[str(i) for i in range(n_classes)])


def test_labels_are_never_read(pool, monkeypatch):
    family, pre, experts, heads = pool
    vec = task_vectors(pre, experts)
    guarded = {t: _guarded(t, TEXTS[t], 2 + i) for i, t in enumerate(TASKS)}
    with pytest.raises(AssertionError):
        _ = guarded["senti"].labels
    texts = {t: g.texts for t, g in guarded.items()}
    adamerging(family, pre, vec, heads, texts, granularity="task", steps=2, progress=False)
    symerge(family, pre, vec, heads, texts, experts=experts, steps=2, progress=False)
    # a labeled task object instead of its texts is refused, before anything runs
    with pytest.raises(InputError, match="texts only"):
        symerge(family, pre, vec, heads, guarded, experts=experts, steps=1, progress=False)
    with pytest.raises(InputError):
        check_texts({"senti": "one string"})

    # the benchmark rows: adaptation runs on the guarded test splits; labels open only for evaluation
    phase = {"eval": False}
    real = rows_module.evaluate_tasks

    def evaluate_opening_labels(*a, **kw):
        phase["eval"] = True
        for g in guarded.values():
            object.__setattr__(g, "_armed", False)
        return real(*a, **kw)

    monkeypatch.setattr(rows_module, "evaluate_tasks", evaluate_opening_labels)
    LabelsRaise.reads = 0
    splits = {t: {"test": g} for t, g in guarded.items()}
    out = adaptive_rows(family, pre, experts, heads, splits, dict.fromkeys(TASKS, 1.0),
                        rows=["adamerging_layerwise"], steps={"adamerging_layerwise": 2}, progress=False)
    assert LabelsRaise.reads == 0 and phase["eval"]
    assert set(out) == {"adamerging_layerwise"}


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_result(pool):
    family, pre, experts, heads = pool
    vec = task_vectors(pre, experts)
    runs = [symerge(family, pre, vec, heads, TEXTS, experts=experts, steps=4, seed=s, batch_size=4, progress=False)
            for s in (7, 7, 8)]
    assert torch.equal(runs[0].coefficients.raw, runs[1].coefficients.raw)
    assert all(torch.equal(runs[0].heads[t].weight, runs[1].heads[t].weight) for t in TASKS)
    assert runs[0].losses == runs[1].losses
    assert runs[0].losses != runs[2].losses  # another seed: other batches (Adam's first steps are ~lr*sign(g),
    # so the coefficients themselves may coincide after a few steps)
    a = [adamerging(family, pre, vec, heads, TEXTS, steps=3, seed=s, batch_size=4, progress=False) for s in (1, 1)]
    assert torch.equal(a[0].coefficients.raw, a[1].coefficients.raw)


def test_adamerging_reduces_entropy_and_plusplus_uses_ties_vectors(pool):
    family, pre, experts, heads = pool
    vec = task_vectors(pre, experts)
    res = adamerging(family, pre, vec, heads, TEXTS, steps=25, lr=5e-2, progress=False)
    assert sum(res.losses[-3:]) / 3 < res.losses[0]
    tv = ties_vectors(vec, density=0.2)
    for t in TASKS:
        kept = {k: tv[t][k] != 0 for k in tv[t]}
        total = sum(m.numel() for m in kept.values())
        share = sum(int(m.sum()) for m in kept.values()) / total
        assert 0 < share <= 0.2 + 1e-6  # trimmed (global top 20%), minus the sign conflicts
        for k, m in kept.items():  # survivors keep their value (no division by the agreeing count)
            assert torch.equal(tv[t][k][m], vec[t][k][m])
    # where both tasks keep an entry, they agree in sign (elected sign)
    k = "encoder.layer.1.output.dense.weight"
    both = (tv["senti"][k] != 0) & (tv["news"][k] != 0)
    assert bool((torch.sign(tv["senti"][k][both]) == torch.sign(tv["news"][k][both])).all())


def test_symerge_improves_agreement_with_the_experts(pool):
    family, pre, experts, heads = pool
    vec = task_vectors(pre, experts)
    pl = expert_pseudo_labels(family, experts, heads, TEXTS)
    res = symerge(family, pre, vec, heads, TEXTS, experts=experts, steps=30, batch_size=8, progress=False)

    @torch.no_grad()
    def ce_to_pseudo_labels(body, hds):  # the self-labeling objective over all texts, every sample
        total = 0.0
        for t in TASKS:
            logits = family.logits(family.tokenize(TEXTS[t]), hds[t], body(t))
            total += float(torch.nn.functional.cross_entropy(logits, pl[t].labels))
        return total / len(TASKS)

    static = methods.merge("task_arithmetic", pre, experts, scaling=0.3)
    assert ce_to_pseudo_labels(res.body, res.heads) < 0.8 * ce_to_pseudo_labels(lambda t: static, heads)


# ---------------------------------------------------------------------------------------------- I/O
def test_coefficients_save_load_heatmap_and_models(pool, tmp_path):
    family, pre, experts, heads = pool
    vec = task_vectors(pre, experts)
    res = symerge(family, pre, vec, heads, TEXTS, experts=experts, steps=2, progress=False)
    files = res.save(tmp_path / "out")
    loaded = Coefficients.load(files["json"])
    assert torch.equal(loaded.values(), res.coefficients.values().detach())
    assert loaded.keys == res.coefficients.keys and loaded.granularity == "layer"
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(files["json"].read_text())
    assert data["summary"]["steps"] == 2 and data["method"] == "symerge"
    # bad files: one clear error naming the field
    bad = dict(data)
    bad["values"] = [[0.1]]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="'values'"):
        Coefficients.load(tmp_path / "bad.json")
    del bad["tasks"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="'tasks'"):
        Coefficients.load(tmp_path / "bad.json")
    # one Hugging Face directory per task head: loads with transformers and reproduces the features
    from safetensors.torch import load_file
    from transformers import AutoModel

    dirs = res.save_models(tmp_path / "models", family)
    for t in TASKS:
        model = AutoModel.from_pretrained(str(dirs[t])).eval()
        batch = family.tokenize(TEXTS[t][:3])
        with torch.no_grad():
            feats = family.pool(model(**batch).last_hidden_state, batch["attention_mask"])
        assert torch.allclose(feats, family.features(batch, res.body(t)), atol=1e-5)
        head = load_file(str(dirs[t] / "head.safetensors"))
        assert torch.equal(head["weight"], res.heads[t].weight)


def test_cross_task_matrix_matches_direct_accuracy(pool, tmp_path):
    family, pre, experts, heads = pool
    sets = {t: TextTask(t, TEXTS[t], [i % (2 + j) for i in range(len(TEXTS[t]))], label_names=[str(c) for c in range(2 + j)])
            for j, t in enumerate(TASKS)}
    cross = cross_task_matrix(family, experts, heads, sets, max_per_task=None)
    for i, t in enumerate(TASKS):
        for j, b in enumerate(TASKS):
            direct = accuracy(family, sets[t].texts, sets[t].labels, heads[t], experts[b])
            assert cross.matrix[i][j] == pytest.approx(direct)
    assert cross.cross_average()["senti"] == pytest.approx(cross.matrix[0][1])
    rel = relation(cross, {"senti": 0.5, "news": 0.6})
    assert rel["pearson_cross_vs_merged"] is None  # two tasks: no correlation
    assert plot_cross_task(cross, tmp_path / "pilot.png", {"senti": 0.5, "news": 0.6}).is_file()


def test_adaptive_rows_names_and_transfer(pool):
    family, pre, experts, heads = pool
    splits = {t: {"test": TextTask(t, TEXTS[t], [i % (2 + j) for i in range(len(TEXTS[t]))],
                                   label_names=[str(c) for c in range(2 + j)])} for j, t in enumerate(TASKS)}
    kept = {}
    out = adaptive_rows(family, pre, experts, heads, splits, dict.fromkeys(TASKS, 0.5),
                        rows=["symerge", "task_arithmetic+symerge_heads", "ties+symerge_heads", "adamerging_taskwise"],
                        steps={"symerge": 2, "adamerging_taskwise": 1}, progress=False, adapted=kept)
    assert list(out) == ["symerge", "task_arithmetic+symerge_heads", "ties+symerge_heads", "adamerging_taskwise"]
    static = methods.merge("task_arithmetic", pre, experts, scaling=0.3)
    for t in TASKS:
        direct = accuracy(family, splits[t]["test"].texts, splits[t]["test"].labels, kept["symerge"].heads[t], static)
        assert out["task_arithmetic+symerge_heads"].per_task[t] == pytest.approx(direct)
    assert out["symerge"].normalized_average == pytest.approx(out["symerge"].average / 0.5)
    with pytest.raises(InputError, match="unknown adaptive row"):
        adaptive_rows(family, pre, experts, heads, splits, {}, rows=["nope"])


def test_bad_parameters_are_input_errors(pool):
    family, pre, experts, heads = pool
    vec = task_vectors(pre, experts)
    with pytest.raises(InputError, match="steps"):
        adamerging(family, pre, vec, heads, TEXTS, steps=-1)
    with pytest.raises(InputError, match="granularity"):
        adamerging(family, pre, vec, heads, TEXTS, granularity="block", steps=1)
    with pytest.raises(InputError, match="task_layer"):
        symerge(family, pre, vec, heads, TEXTS, experts=experts, task_layer="neck")
    with pytest.raises(InputError, match="experts"):
        symerge(family, pre, vec, heads, TEXTS)
    with pytest.raises(InputError, match="no adaptation texts"):
        symerge(family, pre, vec, heads, {"senti": TEXTS["senti"]}, experts=experts)
    pl = {t: PseudoLabels(torch.zeros(3, dtype=torch.long), torch.ones(3)) for t in TASKS}
    with pytest.raises(InputError, match="wrong length"):
        symerge(family, pre, vec, heads, TEXTS, pseudo_labels=pl, steps=1, progress=False)


runner = CliRunner()


@pytest.mark.parametrize("args,needle", [
    (["--method", "adamerging", "--out", "x"], "--method"),
    (["--method", "symerge", "--steps", "-2", "--out", "x"], "--steps"),
    (["--method", "symerge", "--benchmark", "nope", "--out", "x"], "unknown benchmark"),
    (["--method", "adamerging_layerwise", "--task-layer", "last_block", "--out", "x"], "symerge only"),
    (["--method", "symerge", "--lr", "0", "--out", "x"], "--lr"),
])
def test_cli_adapt_bad_input_exits_2(args, needle, tmp_path):
    result = runner.invoke(app, ["adapt", *[a if a != "x" else str(tmp_path / "o") for a in args]])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------- by hand
def _entropy_objective(family, params, heads, texts, pairing) -> float:
    """sum over tasks of the mean prediction entropy -sum_c p_c log p_c, task t's inputs through head pairing[t]."""
    total = 0.0
    with torch.no_grad():
        for t, seq in texts.items():
            p = torch.softmax(heads[pairing[t]](family.features(family.tokenize(list(seq)), params)).double(), -1)
            total += float((-(p * p.log()).sum(-1)).mean())
    return total


def test_adamerging_first_loss_is_the_entropy_objective_by_hand(pool):
    """AdaMerging's first step (all coefficients at their init 0.3, a batch = every input) minimises the
    entropy objective written out here; pairing a task with another task's head gives another value."""
    family, pre, experts, heads = pool
    texts = {"senti": TEXTS["senti"][:8], "news": TEXTS["news"][:8]}
    res = adamerging(family, pre, task_vectors(pre, experts), heads, texts, granularity="task", steps=1,
                     batch_size=8, init=0.3, progress=False)
    merged = reference_merge(pre, experts, dict.fromkeys(TASKS, 0.3))
    merged = {k: v.float() if v.is_floating_point() else v for k, v in merged.items()}
    own = _entropy_objective(family, merged, heads, texts, {"senti": "senti", "news": "news"})
    assert res.losses[0] == pytest.approx(own, rel=1e-5)
    # heads of a 2-class and a 3-class task: a swapped pairing gives a different objective
    swapped = _entropy_objective(family, merged, heads, {"senti": texts["senti"]}, {"senti": "news"}) + \
        _entropy_objective(family, merged, heads, {"news": texts["news"]}, {"news": "senti"})
    assert abs(swapped - own) > 1e-3 and res.losses[0] != pytest.approx(swapped, rel=1e-5)


def test_pearson_by_hand():
    from mergelab.experiment.pilot import pearson

    # x = 1, 2, 3; y = 2, 4, 7: mean 2 and 13/3; sxy = 5, sxx = 2, syy = 38/3 -> r = 5 / sqrt(76/3)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(76 / 3))
    assert pearson([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2], [1, 2]) is None and pearson([1, 1, 1], [1, 2, 3]) is None


# ---------------------------------------------------------------------------------------------- eval_at snapshots
@pytest.mark.parametrize("method", ["adamerging", "symerge"])
def test_snapshot_at_a_step_equals_a_run_of_that_many_steps(pool, method):
    """One run with eval_at=[2, 3] gives at(2) what a 2-step run with the same seed gives (coefficients, heads)."""
    family, pre, experts, heads = pool
    vec = task_vectors(pre, experts)
    kw = dict(batch_size=4, seed=3, progress=False)
    fn = adamerging if method == "adamerging" else (lambda *a, **k: symerge(*a, experts=experts, **k))
    seen = []
    long = fn(family, pre, vec, heads, TEXTS, steps=4, lr=5e-2, eval_at=[3, 2], on_snapshot=seen.append, **kw)
    short = fn(family, pre, vec, heads, TEXTS, steps=2, lr=5e-2, **kw)
    assert sorted(long.snapshots) == [2, 3]
    snap = long.at(2)
    assert torch.equal(snap.coefficients.values(), short.coefficients.values())
    assert not torch.equal(snap.coefficients.values(), long.coefficients.values())  # it moved after step 2
    assert snap.losses == short.losses and snap.steps == 2 and snap.seconds <= long.seconds
    for t in TASKS:
        assert torch.equal(snap.heads[t].weight, short.heads[t].weight)
        state, ref = snap.body(t), short.body(t)
        assert all(torch.equal(state[k], ref[k]) for k in ref)
    assert [r.steps for r in seen] == [2, 3]  # on_snapshot: each snapshot as it is taken
    assert torch.equal(seen[0].coefficients.values(), short.coefficients.values())
    assert torch.equal(seen[0].merged_state()["encoder.layer.0.output.dense.weight"],
                       short.merged_state()["encoder.layer.0.output.dense.weight"])
    assert long.at(4) is long  # the last step is the result itself
    with pytest.raises(InputError, match="no snapshot at step 1"):
        long.at(1)
    with pytest.raises(InputError, match="eval_at"):
        fn(family, pre, vec, heads, TEXTS, steps=2, eval_at=[5], **kw)


@pytest.mark.parametrize("method,granularity", [("adamerging_plusplus_taskwise", "task"),
                                                ("adamerging_plusplus", "layer")])
def test_plusplus_rows_are_adamerging_over_ties_vectors(pool, method, granularity):
    """AdaMerging++ (both granularities) through the registry = AdaMerging over TIES-trimmed, sign-elected vectors."""
    from mergelab.experiment.adaptive_rows import adapt

    family, pre, experts, heads = pool
    got = adapt(method, family, pre, experts, heads, TEXTS, steps=2, seed=5, progress=False, batch_size=4, lr=5e-2)
    want = adamerging(family, pre, ties_vectors(task_vectors(pre, experts), density=0.2), heads, TEXTS,
                      granularity=granularity, steps=2, seed=5, progress=False, batch_size=4, lr=5e-2)
    plain = adamerging(family, pre, task_vectors(pre, experts), heads, TEXTS, granularity=granularity, steps=2,
                       seed=5, progress=False, batch_size=4, lr=5e-2)
    assert got.method == method and got.coefficients.granularity == granularity
    assert torch.equal(got.coefficients.values(), want.coefficients.values())
    assert got.losses == want.losses and got.losses[0] != pytest.approx(plain.losses[0])  # other vectors
    state, ref = got.merged_state(), want.merged_state()
    assert all(torch.equal(state[k], ref[k]) for k in ref)


def test_registry_rows_hand_snapshots_to_the_runners_pool(pool):
    from mergelab.experiment.runner import RunPool

    family, pre, experts, heads = pool
    splits = {t: {"test": TextTask(t, TEXTS[t], [0] * len(TEXTS[t]), label_names=["0", "1", "2"])} for t in TASKS}
    seen = []
    rp = RunPool(family, pre, experts, heads, splits, progress=False, on_snapshot=seen.append)
    out = methods.get("symerge").fn(rp, steps=2, eval_at=[1], batch_size=4)
    assert [r.steps for r in seen] == [1] and sorted(out.result.snapshots) == [1]
    assert torch.equal(seen[0].coefficients.values(), out.result.at(1).coefficients.values())
