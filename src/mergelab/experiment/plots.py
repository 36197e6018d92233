"""PNG plots of the SE-Merging analyses; each written atomically (:mod:`mergelab.core.figures`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mergelab.core.figures import heatmap, pyplot, save_figure


def auto_adaptation_plot(study: Mapping, path: str | Path, layer: int) -> Path:
    """Left: per layer, the nearest-own-expert share and each routing rule's accuracy, with chance.
    Right: mean distance (task of sample x expert) at ``layer``."""
    plt = pyplot()
    aa = study["auto_adaptation"]
    tasks = aa["tasks"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    layers = list(range(len(aa["nearest_own_expert"])))
    for rule, accs in study["routing_accuracy"].items():
        a1.plot(layers, [100 * a for a in accs], marker="o", label=f"routing: {rule}")
    a1.axhline(100 * aa["chance"], color="grey", ls="--", label="chance")
    a1.set_xlabel("probe layer (0 = embeddings)")
    a1.set_ylabel("samples routed to their own task (%)")
    a1.set_ylim(0, 100)
    a1.set_title("auto-adaptation: is the merged representation nearest its own expert?", fontsize=10)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    heatmap(a2, aa["distance"][layer], tasks, tasks, f"mean l2 distance merged-expert, layer {layer}\n"
             "(rows: task of the sample; columns: expert)")
    fig.tight_layout()
    return save_figure(fig, path)


def routing_plot(report: Mapping, path: str | Path) -> Path:
    plt = pyplot()
    tasks = report["tasks"]
    conf = report["confusion"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    heatmap(ax, conf, tasks, tasks, f"routing confusion ({report['normalisation']}, layer {report['layer']}): "
             f"accuracy {100 * report['accuracy']:.1f}%\nmean weight entropy {report['mean_entropy']:.2f} of "
             f"{report['max_entropy']:.2f} nats", fmt="{:.0f}")
    ax.set_xlabel("chosen task")
    ax.set_ylabel("true task")
    fig.tight_layout()
    return save_figure(fig, path)


def probe_sweep_plot(sweep: list[Mapping], path: str | Path, static_average: float | None = None) -> Path:
    plt = pyplot()
    layers = [r["layer"] for r in sweep]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in [m for m in ("exact", "fast", "fast_prototype_groups") if m in sweep[0]]:
        label = mode.replace("_", " ")
        a1.plot(layers, [100 * r[mode]["average"] for r in sweep], marker="o", label=f"SE-Merging {label}")
        a2.plot(layers, [1000 * r[mode]["seconds_per_sample"] for r in sweep], marker="o", label=label)
    if static_average is not None:
        a1.axhline(100 * static_average, color="grey", ls="--", label="Task Arithmetic 0.3")
    a1.set_xlabel("probe layer")
    a1.set_ylabel("average accuracy (%)")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.set_xlabel("probe layer")
    a2.set_ylabel("ms per sample")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle("probe layer sweep (validation)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def cost_plot(cost: Mapping, path: str | Path) -> Path:
    plt = pyplot()
    ratios = cost["ratio_to_static"]
    names = list(ratios)
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, [ratios[n] for n in names], color="tab:blue")
    for b, n in zip(bars, names):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{ratios[n]:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time per sample / static merged model")
    ax.set_title("inference cost relative to the static merged model (one run)", fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return save_figure(fig, path)


def fast_groups_plot(study: Mapping, path: str | Path) -> Path:
    """Accuracy and cost of each way the fast path picks its merged models, with the exact path and the
    static merge as horizontal references."""
    plt = pyplot()
    rows = study["fast"]
    names = [f"{r['name']}\n({r['n_models']} models)" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    a1.bar(names, [100 * r["average"] for r in rows], color="tab:blue")
    a1.axhline(100 * study["exact"]["average"], color="tab:green", ls="--", label="SE-Merging exact")
    a1.axhline(100 * study["static"]["average"], color="grey", ls=":", label="static merge")
    lo = min(100 * study["static"]["average"], *(100 * r["average"] for r in rows))
    a1.set_ylim(lo - 3, None)
    a2.bar(names, [r["ratio_to_static"] for r in rows], color="tab:orange")
    a2.axhline(study["exact"]["ratio_to_static"], color="tab:green", ls="--", label="exact")
    a2.axhline(1.0, color="grey", ls=":", label="static")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=7, rotation=15)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    a1.set_ylabel("average accuracy (%)")
    a2.set_ylabel("time per sample / static merged model")
    fig.suptitle(f"SE-Merging fast path: its merged models ({study['split']}, {study['n_per_task']} per task)",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def lowrank_plot(study: Mapping, path: str | Path) -> Path:
    """Accuracy and cost of the low-rank per-sample forward against rank, with the exact path and the
    static merge as horizontal references."""
    plt = pyplot()
    rows = study["lowrank"]
    ranks = [r["rank"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(ranks, [100 * r["average"] for r in rows], marker="o", label="SE-Merging lowrank")
    a1.axhline(100 * study["exact"]["average"], color="tab:green", ls="--", label="SE-Merging exact")
    a1.axhline(100 * study["static"]["average"], color="grey", ls=":", label="static merge")
    a2.plot(ranks, [r["ratio_to_static"] for r in rows], marker="o", label="lowrank")
    a2.axhline(study["exact"]["ratio_to_static"], color="tab:green", ls="--", label="exact")
    a2.axhline(1.0, color="grey", ls=":", label="static")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank of the task vectors")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a1.set_ylabel("average accuracy (%)")
    a2.set_ylabel("time per sample / static merged model")
    fig.suptitle(f"low-rank per-sample forward ({study['split']}, {study['n_per_task']} per task)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def bias_plot(study: Mapping, path: str | Path) -> Path:
    """Representation bias (:mod:`mergelab.experiment.analysis.bias`): per task and on average, the mean l2
    distance between each row's representation of a sample and its own expert's, against the layer."""
    plt = pyplot()
    tasks, layers = study["tasks"], study["layers"]
    panels = [*tasks, "average over tasks"]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for k, name in enumerate(panels):
        ax = axes[k // cols][k % cols]
        for row in study["rows"]:
            ys = study["mean"][row] if name == panels[-1] else study["distance"][row][name]
            ax.plot(layers, ys, marker="o", ms=3, label=row, ls="--" if row == "pretrained" else "-")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("mean l2 to own expert")
        ax.grid(alpha=0.3)
    for k in range(len(panels), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("representation bias: distance to the sample's own expert, per layer", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
