"""Unseen inputs: how well do SE-Merging's own signals flag an input that belongs to no expert's task?

A dynamic merge always routes: an input of a kind no expert was trained on still gets per-sample
coefficients, rescaled toward whichever expert its representation happens to sit nearest. This module
scores every input three ways, at the router's probe layer l (all three "higher = more unusual", fixed
before looking at any out-of-pool data):

- ``entropy``: the entropy (nats) of the router's weights w(x) (equation (4) of
  :mod:`mergelab.methods.dynamic.router`): an input the router cannot place spreads its weights.
- ``distance``: ``min_t ||m(x) - mu_t||``, the l2 distance from the merged model's probe representation to
  the nearest calibration prototype (the ``se_prototype`` rule's mu_t, equation (3)).
- ``spread`` (disagreement between the experts): the standard deviation across the T experts of
  ``||m(x) - e_t(x)||``, the l2 distances between the merged model's and each expert's probe
  representation (the paper's raw distances, before the router standardises them away). Large: the
  experts pull the input apart, some far from the merge, some near.

How well a score separates out-of-pool inputs (positives) from the pool's own test inputs (negatives) is
its AUROC (:func:`auroc`, the Mann-Whitney statistic; 0.5 = chance, below 0.5 = the score ranks in-pool
inputs as the more unusual). The static fallback (:func:`static_fallback`) gives an input whose score
passes a threshold the static merge's coefficients instead of its routed ones; the threshold is a
quantile of the scores of in-pool *validation* inputs (:func:`fit_threshold`), so that a fraction ``keep``
of them stays on the dynamic path: no out-of-pool input and no test input chooses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergelab.core.batching import iter_batches, progress_bar
from mergelab.core.errors import InputError
from mergelab.methods.dynamic import RouterConfig, SEMerging
from mergelab.methods.dynamic import router as R

SCORES = ("entropy", "distance", "spread")
# the fallback's share of in-pool validation inputs kept on the dynamic path, tabled in every run (its own --keep too)
KEEP_CURVE = (0.8, 0.9, 0.95, 0.98, 1.0)


def auroc(positives: Sequence[float] | Tensor, negatives: Sequence[float] | Tensor) -> float:
    """Area under the ROC curve of "score > threshold flags a positive": the probability that a random
    positive scores above a random negative, ties counted one half (Mann-Whitney U / (n_pos n_neg),
    from mid-ranks of the pooled scores)."""
    pos = torch.as_tensor(positives, dtype=torch.float64).flatten()
    neg = torch.as_tensor(negatives, dtype=torch.float64).flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise InputError(f"AUROC needs positives and negatives, got {pos.numel()} and {neg.numel()}")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise InputError("AUROC: a score is not finite")
    allv = torch.cat([pos, neg])
    values, inverse, counts = torch.unique(allv, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    midrank = ends - (counts.double() - 1) / 2  # ranks from 1; tied values share their mean rank
    rank_sum = float(midrank[inverse[: pos.numel()]].sum())
    n_pos, n_neg = pos.numel(), neg.numel()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_curve(positives: Sequence[float] | Tensor, negatives: Sequence[float] | Tensor) -> tuple[list[float], list[float]]:
    """``(false positive rates, true positive rates)`` as the threshold falls through every distinct score."""
    pos = torch.as_tensor(positives, dtype=torch.float64).flatten()
    neg = torch.as_tensor(negatives, dtype=torch.float64).flatten()
    fpr, tpr = [0.0], [0.0]
    for t in torch.unique(torch.cat([pos, neg])).flip(0).tolist():
        fpr.append(float((neg >= t).double().mean()))
        tpr.append(float((pos >= t).double().mean()))
    return fpr, tpr


def fit_threshold(validation_scores: Sequence[float] | Tensor, keep: float) -> float:
    """The smallest in-pool validation score with at least ``keep`` of the scores at or below it: flagging
    ``score > threshold`` keeps at least that fraction of in-pool validation inputs on the dynamic path."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise InputError(f"keep (the share of in-pool validation inputs kept on the dynamic path) must be in (0, 1], got {keep!r}")
    s = torch.as_tensor(validation_scores, dtype=torch.float64).flatten().sort().values
    if s.numel() == 0:
        raise InputError("fit_threshold: no validation scores")
    k = max(1, math.ceil(keep * s.numel() - 1e-9))
    return float(s[k - 1])


def static_fallback(coefficients: Tensor, flagged: Tensor, base: Tensor) -> Tensor:
    """Per-sample coefficients ``[B, T]`` with each flagged row replaced by the static merge's ``base`` ``[T]``."""
    if flagged.shape != coefficients.shape[:1]:
        raise InputError(f"one flag per sample needed: {tuple(flagged.shape)} for {tuple(coefficients.shape)} coefficients")
    return torch.where(flagged.to(coefficients.device)[:, None], base.to(coefficients)[None, :], coefficients)


@torch.no_grad()
def input_scores(se: SEMerging, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The three scores (``[B]`` each) of one batch and the router's weights and coefficients ``[B, T]``.

    ``se`` must be calibrated (the ``distance`` score reads its prototypes)."""
    if se.prototypes is None:
        raise InputError("the unseen-input scores need a calibrated router (SEMerging.calibrate) for the prototypes")
    routing = se.route(batch)
    reps = se.representations(batch, se.with_config(normalisation="raw"))
    distance = R.scores("prototype", reps["merged"], prototypes=se.prototypes).min(-1).values
    spread = R.scores("raw", reps["merged"], reps["experts"]).std(-1, unbiased=False)
    return {"entropy": R.entropy(routing.weights).cpu(), "distance": distance.cpu(), "spread": spread.cpu(),
            "weights": routing.weights.cpu(), "coefficients": routing.coefficients.cpu()}


def _scored(ctx, se: SEMerging, texts: Sequence[str], batch_size: int, *, features: bool = False,
            bar=None) -> dict[str, Tensor]:
    """:func:`input_scores` over ``texts`` in order; with ``features``, also the static merge's and the routed
    per-sample merge's (exact path) pooled features."""
    parts: dict[str, list[Tensor]] = {}
    order: list[int] = []
    for idx in iter_batches(texts, batch_size):
        batch = ctx.family.tokenize([texts[i] for i in idx])
        got = input_scores(se, batch)
        if features:
            got["static"] = ctx.family.features(batch, se.static).float().cpu()
            got["dynamic"] = se.mixed_features(batch, got["coefficients"].to(ctx.family.device)).float().cpu()
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
        order.extend(idx)
        if bar is not None:
            bar.update(len(idx))
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {k: torch.cat(v)[inv] for k, v in parts.items()}


def _mean(x: Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


@torch.no_grad()
def unseen_study(ctx, unseen: Mapping[str, Sequence[str]], *, config: RouterConfig | None = None,
                 n_per_task: int = 100, n_calib: int = 32, keep: float = 0.95, fallback_score: str = "distance",
                 seed: int = 0, batch_size: int = 64, progress: bool = False) -> dict:
    """Scores, AUROCs and the static fallback on ``ctx`` (a loaded pool) for the out-of-pool texts ``unseen``
    (kind -> texts).

    SE-Merging over Task Arithmetic 0.3 with ``config``'s router (default: the ``se_prototype`` row's),
    calibrated on the first ``n_calib`` validation inputs of each task. Thresholds: on the next
    ``n_per_task`` validation inputs of each task. AUROCs and accuracies: on a stratified seeded sample of
    ``n_per_task`` test inputs per task (:meth:`TaskData.sample`), against every text of ``unseen``.
    """
    from mergelab.experiment.analysis.se_study import se_model

    if fallback_score not in SCORES:
        raise InputError(f"fallback score must be one of {', '.join(SCORES)}, got {fallback_score!r}")
    fit_threshold([0.0], keep)  # checks keep before any forward pass
    if not unseen or any(len(v) == 0 for v in unseen.values()):
        raise InputError(f"every out-of-pool kind needs texts; got {({k: len(v) for k, v in unseen.items()})}")
    cfg = config or RouterConfig()
    se = se_model(ctx, config=cfg)
    tasks = list(ctx.splits)
    se.calibrate({t: ctx.splits[t]["validation"].texts[:n_calib] for t in tasks})
    val = {t: list(ctx.splits[t]["validation"].texts[n_calib : n_calib + n_per_task]) for t in tasks}
    short = [t for t, v in val.items() if not v]
    if short:
        raise InputError(f"tasks {short} have no validation inputs beyond the {n_calib} calibration ones: no threshold")
    test = {t: ctx.splits[t]["test"].sample(n_per_task, seed) for t in tasks}
    total = sum(map(len, val.values())) + sum(map(len, test.values())) + sum(map(len, unseen.values()))
    bar = progress_bar(total, "unseen inputs", progress)
    val_s = {t: _scored(ctx, se, v, batch_size, bar=bar) for t, v in val.items()}
    test_s = {t: _scored(ctx, se, list(d.texts), batch_size, features=True, bar=bar) for t, d in test.items()}
    out_s = {k: _scored(ctx, se, list(v), batch_size, bar=bar) for k, v in unseen.items()}
    if bar is not None:
        bar.close()

    def pooled(groups: Mapping[str, Mapping[str, Tensor]], key: str) -> Tensor:
        return torch.cat([g[key] for g in groups.values()])

    # each score's threshold at every share kept that is tabled (the curve) and at --keep itself
    shares = sorted({*KEEP_CURVE, keep})
    fits = {(k, s): fit_threshold(pooled(val_s, s), k) for k in shares for s in SCORES}
    thresholds = {s: fits[(keep, s)] for s in SCORES}
    in_test = {s: pooled(test_s, s) for s in SCORES}
    aurocs = {s: {**{k: auroc(o[s], in_test[s]) for k, o in out_s.items()},
                  "all": auroc(pooled(out_s, s), in_test[s])} for s in SCORES}
    flagged_share = {s: {"in_pool_validation": _mean(pooled(val_s, s) > thresholds[s]),
                         "in_pool_test": _mean(in_test[s] > thresholds[s]),
                         **{k: _mean(o[s] > thresholds[s]) for k, o in out_s.items()}} for s in SCORES}

    # in-pool accuracy: static merge, SE-Merging, SE-Merging with each score's static fallback. A sample's
    # features depend only on its own coefficients, so the fallback's features are the static merge's on
    # flagged samples and the routed merge's elsewhere (tests/test_unseen.py checks this equality).
    def accuracy(pick) -> dict[str, float]:
        acc = {}
        for t, s in test_s.items():
            feats = pick(s)
            pred = ctx.heads[t](feats.to(ctx.family.device)).argmax(-1).cpu()
            acc[t] = _mean(pred == torch.tensor(test[t].labels))
        return {"average": sum(acc.values()) / len(acc), "per_task": acc}

    # the fallback at every tabled share: the scores and both sets of features are already computed, so each
    # point is a selection (flagged -> static features), no forward pass
    with_fallback = {(k, sc): accuracy(lambda s, sc=sc, thr=thr: torch.where((s[sc] > thr)[:, None], s["static"],
                                                                            s["dynamic"]))
                     for (k, sc), thr in fits.items()}
    acc = {"static": accuracy(lambda s: s["static"]), "se": accuracy(lambda s: s["dynamic"]),
           **{f"se+fallback({sc})": with_fallback[(keep, sc)] for sc in SCORES}}
    curve = {f"{k:g}": {sc: {"threshold": fits[(k, sc)],
                             "flagged": {"in_pool_test": _mean(in_test[sc] > fits[(k, sc)]),
                                         **{kind: _mean(o[sc] > fits[(k, sc)]) for kind, o in out_s.items()}},
                             "accuracy": with_fallback[(k, sc)]["average"]} for sc in SCORES}
             for k in shares}

    base = se.base.cpu()
    handling = {}
    for kind, group in {**{k: o for k, o in out_s.items()}, "in_pool_test": {
            key: pooled(test_s, key) for key in ("coefficients", fallback_score)}}.items():
        c = group["coefficients"]
        flagged = group[fallback_score] > thresholds[fallback_score]
        c_fb = static_fallback(c, flagged, base)
        chosen = c.argmax(-1)
        handling[kind] = {
            "n": int(c.shape[0]), "flagged_share": _mean(flagged),
            "routed_to": {t: _mean(chosen == i) for i, t in enumerate(se.tasks)},
            "mean_top_coefficient": _mean(c.max(-1).values), "mean_top_coefficient_with_fallback": _mean(c_fb.max(-1).values),
            "mean_coefficient_mass": _mean(c.sum(-1)), "mean_coefficient_mass_with_fallback": _mean(c_fb.sum(-1)),
        }
    return {
        "tasks": tasks, "kinds": list(unseen), "router": se.config.to_dict(), "base": {"method": "task_arithmetic", "scaling": 0.3},
        "static_coefficients": base.tolist(), "keep": keep, "fallback_score": fallback_score,
        "n_calib": n_calib, "n_validation": {t: len(v) for t, v in val.items()},
        "n_test": {t: len(d) for t, d in test.items()}, "n_unseen": {k: len(v) for k, v in unseen.items()},
        "seed": seed, "auroc": aurocs, "thresholds": thresholds, "flagged_share": flagged_share,
        "accuracy": acc, "handling": handling, "keep_curve": curve,
        "scores": {"in_pool_test": {s: in_test[s].tolist() for s in SCORES},
                   **{k: {s: o[s].tolist() for s in SCORES} for k, o in out_s.items()}},
    }


def unseen_table(study: Mapping) -> str:
    """The study's headline numbers as Markdown: AUROC per score and kind, the fallback's flagged shares and
    in-pool accuracy, and what the out-of-pool inputs receive."""
    kinds = list(study["kinds"])
    lines = ["| score | " + " | ".join(f"AUROC {k}" for k in kinds) + " | AUROC all | flagged in-pool test | "
             + " | ".join(f"flagged {k}" for k in kinds) + " | in-pool accuracy with fallback |",
             "|---|" + "---:|" * (2 * len(kinds) + 3)]
    for s in SCORES:
        a, f = study["auroc"][s], study["flagged_share"][s]
        lines.append(f"| {s} | " + " | ".join(f"{a[k]:.3f}" for k in kinds) + f" | {a['all']:.3f} | "
                     f"{100 * f['in_pool_test']:.1f}% | " + " | ".join(f"{100 * f[k]:.1f}%" for k in kinds)
                     + f" | {100 * study['accuracy'][f'se+fallback({s})']['average']:.1f} |")
    acc = study["accuracy"]
    lines += ["", f"In-pool test accuracy: static merge {100 * acc['static']['average']:.1f}, SE-Merging "
              f"{100 * acc['se']['average']:.1f}; fallback keeps {100 * study['keep']:.0f}% of in-pool validation inputs "
              f"on the dynamic path.", "",
              f"| inputs | flagged ({study['fallback_score']}) | mean top coefficient | with fallback | mean coefficient "
              f"mass | with fallback | most often routed to |", "|---|---:|---:|---:|---:|---:|---|"]
    for kind, h in study["handling"].items():
        top = max(h["routed_to"], key=h["routed_to"].get)
        lines.append(f"| {kind} | {100 * h['flagged_share']:.1f}% | {h['mean_top_coefficient']:.3f} | "
                     f"{h['mean_top_coefficient_with_fallback']:.3f} | {h['mean_coefficient_mass']:.3f} | "
                     f"{h['mean_coefficient_mass_with_fallback']:.3f} | {top} ({100 * h['routed_to'][top]:.0f}%) |")
    curve = study.get("keep_curve")
    if curve:
        lines += ["", "The fallback at other shares kept (in-pool validation inputs left on the dynamic path): "
                  "in-pool test accuracy with the fallback, and the share flagged of each kind.", "",
                  "| score | kept | in-pool accuracy | flagged in-pool test | " + " | ".join(f"flagged {k}" for k in kinds)
                  + " |", "|---|---:|---:|---:|" + "---:|" * len(kinds)]
        for sc in SCORES:
            for k, point in curve.items():
                p = point[sc]
                lines.append(f"| {sc} | {100 * float(k):.0f}% | {100 * p['accuracy']:.1f} | "
                             f"{100 * p['flagged']['in_pool_test']:.1f}% | "
                             + " | ".join(f"{100 * p['flagged'][kind]:.1f}%" for kind in kinds) + " |")
    return "\n".join(lines) + "\n"


def unseen_plot(study: Mapping, path) -> object:
    """Top: each score's ROC curve per out-of-pool kind (against the in-pool test inputs). Bottom: each
    score's histogram for the in-pool test inputs and each kind, with the fallback's threshold."""
    from mergelab.core.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, len(SCORES), figsize=(5 * len(SCORES), 8.4))
    inside = study["scores"]["in_pool_test"]
    colour = {kind: f"C{i + 1}" for i, kind in enumerate(study["kinds"])}  # the same colour in both rows; C0: in-pool
    for j, s in enumerate(SCORES):
        roc, hist = axes[0][j], axes[1][j]
        for kind in study["kinds"]:
            fpr, tpr = roc_curve(study["scores"][kind][s], inside[s])
            roc.plot(fpr, tpr, color=colour[kind], label=f"{kind} (AUROC {study['auroc'][s][kind]:.2f})")
        roc.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        roc.set_xlabel("in-pool test inputs flagged")
        roc.set_ylabel("out-of-pool inputs flagged")
        roc.set_title(f"{s}: ROC", fontsize=10)
        roc.legend(fontsize=8, loc="lower right")
        values = [v for g in study["scores"].values() for v in g[s]]
        lo, hi = min(values), max(values)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        hist.hist(inside[s], bins=bins, alpha=0.5, density=True, color="C0", label="in-pool test")
        for kind in study["kinds"]:
            hist.hist(study["scores"][kind][s], bins=bins, histtype="step", lw=1.4, density=True, color=colour[kind],
                      label=kind)
        hist.axvline(study["thresholds"][s], color="black", ls=":",
                     label=f"threshold ({100 * study['keep']:.0f}% of in-pool validation kept)")
        hist.set_xlabel(s)
        hist.set_ylabel("density")
        hist.legend(fontsize=7)
    fig.suptitle(f"unseen inputs: SE-Merging router {study['router']['normalisation']}, layer {study['router']['layer']}",
                 fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["KEEP_CURVE", "SCORES", "auroc", "fit_threshold", "input_scores", "roc_curve", "static_fallback", "unseen_plot",
           "unseen_study", "unseen_table"]
