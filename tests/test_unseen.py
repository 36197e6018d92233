"""Unseen inputs: AUROC and thresholds against hand-computed cases, the scores and the static fallback against
direct computation on a tiny pool, the out-of-pool loaders on small fixtures, the analyze command's errors."""

from __future__ import annotations

import bz2
import itertools
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.core.errors import InputError
from mergelab.experiment.analysis.run import run_analysis
from mergelab.experiment.analysis.se_study import se_model
from mergelab.experiment.analysis.unseen import (
    auroc,
    fit_threshold,
    input_scores,
    roc_curve,
    static_fallback,
    unseen_study,
)
from mergelab.methods.dynamic import RouterConfig
from mergelab.pools.data.tasks import TaskData
from mergelab.pools.data.unseen import load_guardian, load_hamlet, load_roget
from mergelab.pools.pool import ModelPool
from tests.tiny_models import VOCAB, tiny_bert_pool

WORDS = VOCAB[5:]


# ---------------------------------------------------------------------------------------------- AUROC, threshold
def test_auroc_hand_case_with_ties() -> None:
    # pairs (pos, neg): (3,2) 1, (3,1) 1, (2,2) 1/2, (2,1) 1, (2,2) 1/2, (2,1) 1 -> 5 / 6
    assert auroc([3, 2, 2], [2, 1]) == pytest.approx(5 / 6)
    assert auroc([4, 5], [1, 2, 3]) == 1.0
    assert auroc([1], [2, 3]) == 0.0
    assert auroc([7, 7], [7]) == 0.5


def test_auroc_equals_pair_count_and_roc_area() -> None:
    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 6, (23,), generator=g).tolist()  # few values: many ties
    neg = torch.randint(0, 5, (17,), generator=g).tolist()
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert auroc(pos, neg) == pytest.approx(pairs / (len(pos) * len(neg)))
    fpr, tpr = roc_curve(pos, neg)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    trapezoid = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert trapezoid == pytest.approx(pairs / (len(pos) * len(neg)))
    with pytest.raises(InputError, match="positives and negatives"):
        auroc([], [1.0])


def test_fit_threshold_keeps_the_asked_share() -> None:
    scores = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert fit_threshold(scores, 0.8) == 4.0  # 4 of 5 at or below 4: only 5 is flagged
    assert fit_threshold(scores, 0.7) == 4.0  # 3.5 of 5 rounds up to 4 kept
    assert fit_threshold(scores, 0.6) == 3.0
    assert fit_threshold(scores, 1.0) == 5.0  # nothing flagged
    for bad in (0, 1.5, True):
        with pytest.raises(InputError, match="keep"):
            fit_threshold(scores, bad)


def test_static_fallback_replaces_flagged_rows_only() -> None:
    c = torch.tensor([[0.6, 0.1, 0.05], [0.1, 0.5, 0.15], [0.2, 0.2, 0.35]])
    base = torch.tensor([0.3, 0.3, 0.3])
    out = static_fallback(c, torch.tensor([False, True, False]), base)
    assert torch.equal(out, torch.tensor([[0.6, 0.1, 0.05], [0.3, 0.3, 0.3], [0.2, 0.2, 0.35]]))
    with pytest.raises(InputError, match="one flag per sample"):
        static_fallback(c, torch.tensor([True]), base)


# ---------------------------------------------------------------------------------------------- tiny pool
@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> ModelPool:
    def splits_for(i: int, t: str) -> dict:
        texts = [" ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for j in range(4)) + f" {k}" for k in range(40)]
        task = TaskData(t, texts, [k % 2 for k in range(40)], label_names=["x", "y"])
        return {"train": task.subset(range(4)), "validation": task.subset(range(4, 30)), "test": task.subset(range(30, 40))}

    return tiny_bert_pool(tmp_path_factory.mktemp("tiny-bert-unseen"), splits_for)


UNSEEN = {"far": [" ".join(WORDS[-k - 1] for _ in range(6)) for k in range(5)], "near": ["[UNK] " * 3 + "x"] * 2}


def test_input_scores_match_direct_computation(ctx) -> None:
    se = se_model(ctx, config=RouterConfig(layer=1, normalisation="prototype", temperature=1.0, gain=1.5))
    se.calibrate({t: s["validation"].texts[:5] for t, s in ctx.splits.items()})
    texts = ctx.splits["t1"]["test"].texts[:4]
    batch = ctx.family.tokenize(texts)
    got = input_scores(se, batch)
    m = ctx.family.probe(batch, se.static, [1])[1]
    protos = torch.stack([ctx.family.probe(ctx.family.tokenize(s["validation"].texts[:5]), se.static, [1])[1].mean(0)
                          for s in ctx.splits.values()])
    d_proto = torch.stack([(m - protos[t]).norm(dim=-1) for t in range(3)], -1)
    assert torch.allclose(got["distance"], d_proto.min(-1).values, atol=1e-5)
    z = d_proto / d_proto.abs().mean(-1, keepdim=True)  # the router's scale-free distances (equation (4))
    w = torch.softmax(-z, -1)  # temperature 1
    assert torch.allclose(got["entropy"], -(w * w.log()).sum(-1), atol=1e-5)
    d_exp = torch.stack([(m - ctx.family.probe(batch, ctx.experts[t], [1])[1]).norm(dim=-1) for t in ("t0", "t1", "t2")], -1)
    mean = d_exp.mean(-1, keepdim=True)
    assert torch.allclose(got["spread"], ((d_exp - mean) ** 2).mean(-1).sqrt(), atol=1e-5)

    # the fallback's features: the static merge's on flagged rows, the routed merge's elsewhere
    flagged = torch.tensor([True, False, True, False])
    mixed = se.mixed_features(batch, static_fallback(got["coefficients"], flagged, se.base))
    static = ctx.family.features(batch, se.static)
    routed = se.mixed_features(batch, got["coefficients"])
    assert torch.allclose(mixed[flagged], static[flagged], atol=1e-5)
    assert torch.allclose(mixed[~flagged], routed[~flagged], atol=1e-5)
    assert not torch.allclose(routed[flagged], static[flagged], atol=1e-4)  # the fallback changed something


def test_unseen_study_on_tiny_pool(ctx) -> None:
    study = unseen_study(ctx, UNSEEN, config=RouterConfig(layer=1), n_per_task=10, n_calib=5, keep=0.8)
    assert study["n_validation"] == {"t0": 10, "t1": 10, "t2": 10} and study["n_test"]["t0"] == 10
    for s in ("entropy", "distance", "spread"):
        assert study["flagged_share"][s]["in_pool_validation"] <= 0.2 + 1e-9
        for kind in ("far", "near", "all"):
            assert 0.0 <= study["auroc"][s][kind] <= 1.0
        inside, far = study["scores"]["in_pool_test"][s], study["scores"]["far"][s]
        assert study["auroc"][s]["far"] == pytest.approx(auroc(far, inside))
    # accuracy with the distance fallback, recomputed here through the exact per-sample merge
    se = se_model(ctx, config=RouterConfig(layer=1))
    se.calibrate({t: s["validation"].texts[:5] for t, s in ctx.splits.items()})
    thr = study["thresholds"]["distance"]
    for t, s in ctx.splits.items():
        batch = ctx.family.tokenize(s["test"].texts)
        sc = input_scores(se, batch)
        c = static_fallback(sc["coefficients"], sc["distance"] > thr, se.base)
        pred = ctx.heads[t](se.mixed_features(batch, c)).argmax(-1)
        acc = float((pred == torch.tensor(s["test"].labels)).float().mean())
        assert study["accuracy"]["se+fallback(distance)"]["per_task"][t] == pytest.approx(acc)
    # the keep curve: its own keep's point is the study's; keeping every validation input flags none of them
    curve = study["keep_curve"]
    assert set(curve) == {"0.8", "0.9", "0.95", "0.98", "1"}
    for s in ("entropy", "distance", "spread"):
        assert curve["0.8"][s]["threshold"] == study["thresholds"][s]
        assert curve["0.8"][s]["accuracy"] == pytest.approx(study["accuracy"][f"se+fallback({s})"]["average"])
        assert curve["0.8"][s]["flagged"]["in_pool_test"] == pytest.approx(study["flagged_share"][s]["in_pool_test"])
        assert [curve[k][s]["threshold"] for k in ("0.8", "0.9", "0.95", "0.98", "1")] == sorted(
            curve[k][s]["threshold"] for k in ("0.8", "0.9", "0.95", "0.98", "1"))  # more kept, higher threshold
    # at keep 1 the threshold is the largest validation score: recomputed here from the validation inputs
    val_scores = torch.cat([input_scores(se, ctx.family.tokenize(s["validation"].texts[5:15]))["distance"]
                            for s in ctx.splits.values()])
    assert curve["1"]["distance"]["threshold"] == pytest.approx(float(val_scores.max()), rel=1e-5)
    h = study["handling"]["far"]
    routed = RouterConfig(layer=1).gain * 0.3  # the router's total: gain x the mean base coefficient
    assert h["mean_coefficient_mass"] == pytest.approx(routed, rel=1e-5)
    flagged = h["flagged_share"]  # the static merge's total: 3 x 0.3
    assert h["mean_coefficient_mass_with_fallback"] == pytest.approx(routed * (1 - flagged) + 0.9 * flagged, rel=1e-5)
    assert sum(h["routed_to"].values()) == pytest.approx(1.0)
    with pytest.raises(InputError, match="fallback score"):
        unseen_study(ctx, UNSEEN, fallback_score="nope")


def test_run_analysis_unseen_writes_table_json_png(ctx, tmp_path: Path) -> None:
    files = run_analysis("unseen", ctx, tmp_path, config=RouterConfig(layer=1), n_per_task=6, n_calib=4,
                         unseen=UNSEEN, progress=False)
    study = json.loads(files["json"].read_text())
    assert study["kinds"] == ["far", "near"]
    table = files["table"].read_text()
    assert "AUROC far" in table and "| distance |" in table and "| distance | 98% |" in table
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files["png"].stat().st_size > 5000


# ---------------------------------------------------------------------------------------------- loaders
HAMLET = """
The Tragedy of Hamlet, Prince of Denmark
ACT I

SCENE I. Elsinore. A platform before the castle.

BERNARDO
Who's there, I say, who is it?
FRANCISCO
Nay, answer me: stand,
and unfold yourself.
Re-enter Ghost

BERNARDO
Long live!
ACT II
SCENE I. A room.
KING CLAUDIUS
Though yet of Hamlet our dear brother's death
"""


def test_hamlet_loader_on_fixture(tmp_path: Path) -> None:
    p = tmp_path / "hamlet.txt"
    p.write_text(HAMLET)
    task = load_hamlet(p)
    assert task.texts == ["Who's there, I say, who is it?", "Nay, answer me: stand, and unfold yourself.",
                          "Though yet of Hamlet our dear brother's death"]  # stage direction and "Long live!" dropped
    assert task.labels == [0, 0, 1] and task.label_names == ["act I", "act II"]
    assert task.ids == ["hamlet-7", "hamlet-9", "hamlet-18"]
    (tmp_path / "empty.txt").write_text("nothing here\n")
    with pytest.raises(InputError, match="empty.txt: no speech"):
        load_hamlet(tmp_path / "empty.txt")


def test_guardian_and_roget_loaders_on_fixtures(tmp_path: Path) -> None:
    g = tmp_path / "g.csv.bz2"
    g.write_bytes(bz2.compress(b",Text,Date\n0,Sunak  tackles recovery,2020-07-18\n1,Sunak tackles recovery,2020-07-18\n"
                               b"2,\"Covid, Brexit and firms\",2020-07-17\n"))
    task = load_guardian(g)
    assert task.texts == ["Sunak tackles recovery", "Covid, Brexit and firms"] and task.ids == ["guardian-0", "guardian-2"]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="bad.csv: no 'Text' column"):
        load_guardian(tmp_path / "bad.csv")
    r = tmp_path / "roget.csv.bz2"
    r.write_bytes(bz2.compress(b"badness,BADNESS\nevil,BADNESS\n\"appetite,DESIRE\nwish,DESIRE\nmoral badness,BADNESS\n"))
    task = load_roget(r, words=2)
    assert task.texts == ["badness, evil", "appetite, wish"] and task.ids == ["roget-BADNESS", "roget-DESIRE"]
    (tmp_path / "r2.csv").write_text("nocomma\n")
    with pytest.raises(InputError, match=r"r2.csv:1: expected 'word,CATEGORY'"):
        load_roget(tmp_path / "r2.csv")


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args, message", [
    (["--keep", "1.5"], "keep"),
    (["--fallback-score", "vibes"], "--fallback-score 'vibes'"),
    (["--kind", "klingon"], "--kind 'klingon'"),
])
def test_analyze_unseen_bad_options_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["analyze", "unseen", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
