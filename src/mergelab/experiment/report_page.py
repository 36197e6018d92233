"""``mergelab report RUN_DIR``: one page (Markdown and self-contained HTML) for a run directory.

It reads what ``bench`` (``results.json`` with accuracies), ``merge --config`` (``results.json`` with
merges), ``adapt`` (``result.json``), ``analyze`` (JSON and PNG files) and ``sweep`` (``results.json`` of the
studies on all tasks, ``sweep.json`` with every study and the task-count table) leave in a folder, and writes

- ``report.md``: the tables, with the images referenced by relative paths;
- ``report.html``: the same page with every image embedded (base64), readable without the folder;
- ``report_accuracy.png``: one horizontal bar panel per task (plus the average and the normalised
  average), one bar per method, for runs with accuracies; ``report_routing.png`` (the routing
  confusion of each SE-Merging row) and ``report_coefficients.png`` (the adaptive rows' mean learned
  coefficient per task) when the results hold them.

Every PNG found in the folder (not under ``models/``) is shown with a caption; the known analysis
plots (auto-adaptation distances, routing confusion, probe sweep, cost, learned coefficients) come first.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergelab.core.errors import InputError
from mergelab.core.io import atomic_write_text
from mergelab.experiment.report import STDERR_NOTE, accuracy_table

# file name -> caption, in the order the report shows them
KNOWN_PLOTS: dict[str, str] = {
    "report_accuracy.png": "Test accuracy per task and method (dashed line: the task's own expert).",
    "report_routing.png": "SE-Merging routing on the test split: share (%) of each task's samples routed to each "
                          "task (rows: true task, columns: chosen task), one panel per SE-Merging row.",
    "report_coefficients.png": "Mean learned merging coefficient per task of the adaptive rows (AdaMerging, SyMerge).",
    "merge_coefficients.png": "Coefficient of each task vector in each merge, and the cosine between the merge's "
                              "change of the weights and each task vector.",
    "auto_adaptation.png": "Representation auto-adaptation: per probe layer, how often each routing rule picks "
                           "the sample's own task; right, the mean distance between the merged model's and each "
                           "expert's representation.",
    "routing_confusion.png": "SE-Merging routing confusion (rows: true task, columns: chosen task).",
    "routing_confusion_prototype.png": "Routing confusion of the prototype rule.",
    "probe_sweep.png": "SE-Merging accuracy and cost per probe layer (validation).",
    "cost.png": "Inference cost relative to the static merged model.",
    "coefficients.png": "Learned merging coefficients of test-time adaptation (task x tensor).",
    "task_count.png": "Sweep: normalised test accuracy against the number of tasks merged, per method (mean over the "
                      "subsets of each size, band: one standard deviation, dots: each subset).",
    "search_history.png": "Sweep: validation accuracy of each trial of each search on all tasks, and the best so far.",
}
SKIP_DIRS = {"models", "heads"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def accuracy_results(run_dir: Path) -> dict[str, Any] | None:
    """Bench-style results (``tasks`` and ``methods`` with ``per_task``) from results.json or an adapt result.json."""
    if (run_dir / "results.json").is_file():
        res = _read_json(run_dir / "results.json")
        if isinstance(res, dict) and isinstance(res.get("methods"), dict) and "tasks" in res:
            return res
    if (run_dir / "result.json").is_file():  # mergelab adapt
        res = _read_json(run_dir / "result.json")
        if isinstance(res, dict) and isinstance(res.get("per_task"), dict):
            tasks = list(res["per_task"])
            methods: dict[str, Any] = {}
            if isinstance(res.get("expert_per_task"), dict):
                exp = res["expert_per_task"]
                methods["individual"] = {"per_task": exp, "average": sum(exp.values()) / len(exp),
                                         "normalized_average": 1.0}
            methods[res.get("method", "adapted")] = {"per_task": res["per_task"], "average": res.get("average"),
                                                     "normalized_average": res.get("normalized_average"),
                                                     "seconds": res.get("seconds", 0)}
            return {"benchmark": res.get("benchmark", run_dir.name), "tasks": tasks, "methods": methods}
    return None


_KIND_COLOURS = (("individual", "#7f7f7f"), ("pretrained", "#c7c7c7"), ("+symerge_heads", "#9467bd"),
                 ("se_merging", "#ff7f0e"), ("adamerging", "#2ca02c"), ("symerge", "#2ca02c"))


def _colour(name: str) -> str:
    for key, colour in _KIND_COLOURS:
        if key in name:
            return colour
    return "#1f77b4"  # static merges


def accuracy_panels(results: Mapping[str, Any], path: str | Path) -> Path:
    """One horizontal bar panel per task, plus average and normalised average; one bar per method."""
    from mergelab.core.figures import pyplot, save_figure

    plt = pyplot()
    names = list(results["methods"])
    rows = results["methods"]
    panels = [(t, [rows[n]["per_task"].get(t) for n in names]) for t in results["tasks"]]
    panels.append(("average", [rows[n].get("average") for n in names]))
    if any(rows[n].get("normalized_average") is not None for n in names):
        panels.append(("normalised average (merged / expert)", [rows[n].get("normalized_average") for n in names]))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    label_w = 0.075 * max(len(n) for n in names)
    fig, axes = plt.subplots(nrows, ncols, figsize=(label_w + 3.6 * ncols, 0.6 + nrows * (0.8 + 0.24 * len(names))),
                             sharey=True, squeeze=False)
    ref = rows.get("individual")
    for k, (title, vals) in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        ys = range(len(names))
        shown = [100 * v if v is not None else 0.0 for v in vals]
        ax.barh(ys, shown, color=[_colour(n) for n in names], height=0.75)
        for y, v in zip(ys, vals):
            if v is not None:
                ax.text(100 * v + 1, y, f"{100 * v:.1f}", va="center", fontsize=7)
        if ref is not None and title in results["tasks"] and ref["per_task"].get(title) is not None:
            ax.axvline(100 * ref["per_task"][title], color="black", ls="--", lw=0.7, zorder=0)
        elif ref is not None and title == "average" and ref.get("average") is not None:
            ax.axvline(100 * ref["average"], color="black", ls="--", lw=0.7, zorder=0)
        top = max([100.0] + [s + 12 for s in shown])
        ax.set_xlim(0, top)
        ax.set_title(title, fontsize=10)
        if k % ncols == 0:
            ax.set_yticks(list(ys), names, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("%", fontsize=8)
    axes[0][0].invert_yaxis()  # shared by every panel: the first method on top
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    from matplotlib.patches import Patch

    kinds = [("reference (experts; pretrained lighter)", "#7f7f7f"), ("static", "#1f77b4"), ("dynamic (SE-Merging)", "#ff7f0e"),
             ("adaptive", "#2ca02c"), ("static or dynamic + SyMerge heads", "#9467bd")]
    used = {_colour(n) for n in names} | {"#7f7f7f"}
    fig.legend(handles=[Patch(color=c, label=k) for k, c in kinds if c in used], loc="lower center",
               ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"{results.get('benchmark', '')}: test accuracy (%) per task and method", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    return save_figure(fig, path)


def routing_panels(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Row-normalised routing confusion (%) of each row with a ``routing.confusion`` (SE-Merging rows)."""
    from mergelab.core.figures import heatmap, pyplot, save_figure

    rows = {n: r["routing"] for n, r in results["methods"].items()
            if isinstance(r.get("routing"), dict) and r["routing"].get("confusion")}
    if not rows:
        return None
    plt = pyplot()
    tasks = list(results["tasks"])
    n = len(rows)
    ncols = min(2, n)
    nrows = -(-n // ncols)
    side = 2.2 + 0.75 * len(tasks)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * (side + 1.2), nrows * side), squeeze=False)
    for k, (name, routing) in enumerate(rows.items()):
        conf = [[100 * c / max(1, sum(row)) for c in row] for row in routing["confusion"]]
        title = f"{name}\nrouting accuracy {100 * routing.get('routing_accuracy', float('nan')):.1f}%"
        ax = axes[k // ncols][k % ncols]
        heatmap(ax, conf, tasks, tasks, title, fmt="{:.0f}")
        ax.set_xlabel("chosen task", fontsize=8)
        ax.set_ylabel("true task", fontsize=8)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def coefficient_panel(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Heatmap (adaptive row x task) of the mean learned coefficient, from each row's ``params.coefficient_mean``."""
    from mergelab.core.figures import heatmap, pyplot, save_figure

    rows = {n: r["params"]["coefficient_mean"] for n, r in results["methods"].items()
            if isinstance(r.get("params"), dict) and isinstance(r["params"].get("coefficient_mean"), dict)}
    if not rows:
        return None
    plt = pyplot()
    tasks = list(results["tasks"])
    fig, ax = plt.subplots(figsize=(2.5 + 0.08 * max(len(n) for n in rows) + 1.0 * len(tasks), 1.6 + 0.5 * len(rows)))
    heatmap(ax, [[rows[n].get(t, float("nan")) for t in tasks] for n in rows], list(rows), tasks,
             "mean learned coefficient per task (over layers / tensors)")
    ax.set_aspect("auto")
    fig.tight_layout()
    return save_figure(fig, path)


def _numeric(rows: list[list[str]], j: int) -> bool:
    def num(c: str) -> bool:
        try:
            float(c.split(" ±")[0])
            return True
        except ValueError:
            return c == "-"

    return j > 0 and all(num(r[j]) for r in rows)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    right = [_numeric(rows, j) for j in range(len(header))]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"{'num' if right[j] else 'txt'}\">{html.escape(c)}</td>"
                                    for j, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---:" if _numeric(rows, j) else "---" for j in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def find_plots(run_dir: Path) -> list[Path]:
    """PNG files under ``run_dir`` (three levels deep, not in models/ or hidden), known plots first."""
    found = []
    for p in sorted(run_dir.rglob("*.png")):
        rel = p.relative_to(run_dir)
        if len(rel.parts) > 3 or any(part.startswith(".") or part in SKIP_DIRS for part in rel.parts):
            continue
        found.append(p)
    order = list(KNOWN_PLOTS)
    return sorted(found, key=lambda p: (order.index(p.name) if p.name in order else len(order), str(p)))


def render_report(run_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` (and ``report_accuracy.png`` when there are accuracies)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise InputError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder; expected a run directory")
    sections: list[tuple[str, str, str]] = []  # (title, markdown, html)
    acc = accuracy_results(run_dir)
    merges = None
    if (run_dir / "results.json").is_file():
        res = _read_json(run_dir / "results.json")
        merges = res if isinstance(res, dict) and isinstance(res.get("merges"), dict) else None
    files: dict[str, Path] = {}
    title = run_dir.resolve().name
    if acc is not None:
        title = str(acc.get("benchmark") or title)
        tasks = list(acc["tasks"])
        header, rows = accuracy_table(acc)
        note = ("Test accuracy (%) per task; *normalised* is the mean over tasks of merged / expert accuracy "
                "(the `individual` row); " + STDERR_NOTE)
        sections.append(("Accuracy", note + "\n\n" + _md_table(header, rows),
                         f"<p>{html.escape(note.replace('*', ''))}</p>" + _html_table(header, rows)))
        params = [[n, ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items()) or "-"]
                  for n, r in acc["methods"].items()]
        if any(p[1] != "-" for p in params):
            sections.append(("Parameters", _md_table(["method", "parameters"], params),
                             _html_table(["method", "parameters"], params)))
        files["accuracy_png"] = accuracy_panels(acc, run_dir / "report_accuracy.png")
        routed = [[n, _pct(r["routing"].get("routing_accuracy")),
                   *[_pct((r["routing"].get("routing_accuracy_per_task") or {}).get(t)) for t in tasks],
                   f"{r['routing'].get('mean_weight_entropy', float('nan')):.2f}"]
                  for n, r in acc["methods"].items() if isinstance(r.get("routing"), dict)]
        if routed:
            header = ["method", "routing accuracy", *tasks, "mean weight entropy (nats)"]
            note = "Share (%) of test samples whose largest SE-Merging weight goes to their own task."
            sections.append(("Routing", note + "\n\n" + _md_table(header, routed),
                             f"<p>{html.escape(note)}</p>" + _html_table(header, routed)))
            files["routing_png"] = routing_panels(acc, run_dir / "report_routing.png")
        coef = coefficient_panel(acc, run_dir / "report_coefficients.png")
        if coef is not None:
            files["coefficients_png"] = coef
    if (run_dir / "sweep.json").is_file():  # mergelab sweep: the task-count and studies tables
        from mergelab.experiment.sweep.report import sweep_sections

        for name, header, rows in sweep_sections(run_dir):
            sections.append((name, _md_table(header, rows), _html_table(header, rows)))
    if merges is not None:
        from mergelab.experiment.rundir import merge_plot

        title = str(merges.get("name") or title)

        tasks = list(merges["tasks"])
        header = ["merge", "method", "params", *[f"coef {t}" for t in tasks], "norm of delta", "seconds", "model"]
        rows = [[label, m["method"], ", ".join(f"{k}={v}" for k, v in m["params"].items()) or "-",
                 *[f"{m['coefficient'][t]:.3f}" for t in tasks], f"{m['delta_norm']:.3g}", f"{m['seconds']:.2f}",
                 m.get("model_dir") or "-"] for label, m in merges["merges"].items()]
        note = ("Each merge's weights are theta_0 + delta. *coef t* = <delta, tau_t> / ||tau_t||^2 is how much of "
                "task t's vector the merge holds (Task Arithmetic with orthogonal task vectors: its lambda).")
        sections.append(("Merges", note + "\n\n" + _md_table(header, rows),
                         f"<p>{html.escape(note.replace('*', ''))}</p>" + _html_table(header, rows)))
        if merges["merges"] and not (run_dir / "merge_coefficients.png").is_file():
            merge_plot(merges, run_dir / "merge_coefficients.png")
    plots = [p for p in find_plots(run_dir) if not (acc is not None and p.name == "accuracy.png" and p.parent == run_dir)]
    if acc is None and merges is None and not plots:
        raise InputError(f"{run_dir}: no results.json, result.json or PNG plots; expected a folder written by "
                         "mergelab bench, merge --config, adapt or analyze")
    if plots:
        md, ht = [], []
        for p in plots:
            rel = p.relative_to(run_dir).as_posix()
            cap = KNOWN_PLOTS.get(p.name, p.stem.replace("_", " "))
            md.append(f"![{cap}]({rel})\n\n*{rel}*: {cap}")
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            ht.append(f"<figure><img alt=\"{html.escape(rel)}\" src=\"data:image/png;base64,{data}\">"
                      f"<figcaption><code>{html.escape(rel)}</code>: {html.escape(cap)}</figcaption></figure>")
        sections.append(("Plots", "\n\n".join(md), "".join(ht)))
    env = None
    if (run_dir / "environment.json").is_file():
        env = _read_json(run_dir / "environment.json")
    elif acc is not None and isinstance(acc.get("environment"), dict):
        env = acc["environment"]
    if isinstance(env, dict):
        rows = [[str(k), str(v)] for k, v in env.items()]
        sections.append(("Environment", _md_table(["", "value"], rows), _html_table(["", "value"], rows)))
    if (run_dir / "config.yaml").is_file():
        text = (run_dir / "config.yaml").read_text(encoding="utf-8")
        sections.append(("Configuration", f"```yaml\n{text.rstrip()}\n```", f"<pre>{html.escape(text)}</pre>"))
    elif (run_dir / "options.json").is_file():  # adapt / analyze: the command and its options
        text = json.dumps(_read_json(run_dir / "options.json"), indent=2)
        sections.append(("Command and options", f"```json\n{text}\n```", f"<pre>{html.escape(text)}</pre>"))
    md = f"# {title}\n\nRun directory: `{run_dir}`\n\n" + "\n\n".join(f"## {t}\n\n{m}" for t, m, _ in sections) + "\n"
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}: mergelab report</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Run directory: <code>{html.escape(str(run_dir))}</code></p>"
            + "".join(f"<h2>{html.escape(t)}</h2>{h}" for t, _, h in sections) + "</body></html>\n")
    files["md"] = atomic_write_text(run_dir / "report.md", md)
    files["html"] = atomic_write_text(run_dir / "report.html", page)
    return files


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:14px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px}"
        "td.num{text-align:right}th{background:#f0f0f0}img{max-width:100%;border:1px solid #eee}"
        "figure{margin:1.5em 0}figcaption{font-size:14px;color:#444}pre{background:#f6f6f6;padding:1em;overflow:auto}")
