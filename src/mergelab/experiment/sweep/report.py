"""A sweep's tables and plots: the studies, the task-count curve, the searches.

- ``results.json``: the studies run on the whole task set, one row each (its selected trial's test
  accuracy; ``label@seed=N`` when there are several seeds), with the ``individual`` and ``pretrained``
  reference rows: a mergelab results file, so ``mergelab report`` and the accuracy table (with standard
  errors) read it as they read a ``bench`` run;
- ``results.md``: that table, every study (subsets included) with its selected parameters, the task-count
  table and the failed trials;
- ``task_count.png``: normalised test accuracy against the number of tasks, one line per method (mean over
  the subsets and seeds of each size, the band their standard deviation, the dots each subset);
- ``search_history.png``: each searching study's validation accuracy per trial and the best so far.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.core.atomic import atomic_write_text
from mergelab.experiment.sweep.config import SweepConfig

SEARCH_NOTE = ("Searched studies report the test accuracy of the trial with the best validation accuracy "
               "(its parameters run once more on the test split); the test split never chose anything.")


def study_rows(run) -> list[dict[str, Any]]:
    """One summary per study: its selected trial's record on test (None if it has none yet)."""
    out = []
    for p in run.planners:
        s = p.study
        final = p.final_record if p.searches else (p.told[0][1] if len(p.told) == 1 else None)
        chosen_val = None
        if p.searches and p.final is not None:
            chosen_val = next((r.get("average") for t, r in p.told if t.params == p.final.params
                               and r.get("status") == "ok"), None)
        points = p.told if not p.searches else []
        out.append({"label": s.label, "method": s.entry.name, "tasks": list(s.tasks), "seed": s.seed,
                    "mode": s.mode if p.searches else ("scaling grid" if s.entry.scaling_grid else "fixed"),
                    "trials": len(p.told),
                    "failed": sum(1 for _, r in p.told if r.get("status") == "failed"),
                    "record": final, "validation": chosen_val, "points": points, "done": p.done,
                    "seconds": round(sum(r.get("seconds") or 0.0 for _, r in p.told)
                                     + ((p.final_record or {}).get("seconds") or 0.0), 3),
                    "searches": p.searches})
    return out


def _full(run) -> list[str]:
    return list(run.reference.get("tasks") or [])


def results_dict(cfg: SweepConfig, run) -> dict[str, Any]:
    """The studies on the whole task set as a mergelab results file (schema 2)."""
    from mergelab.experiment.results import SCHEMA_VERSION
    from mergelab.experiment.runner import REFERENCE_EXTRA
    from mergelab.pools.evaluate import mean, normalized_average

    tasks = _full(run)
    ref = run.reference
    expert = ref["individual"]["test"]
    rows: dict[str, Any] = {
        "individual": {"per_task": expert, "average": mean(list(expert.values())), "normalized_average": 1.0,
                       "seconds": 0.0, "params": {}, **REFERENCE_EXTRA},
        "pretrained": {"per_task": ref["pretrained"]["test"], "average": mean(list(ref["pretrained"]["test"].values())),
                       "normalized_average": normalized_average(ref["pretrained"]["test"], expert), "seconds": 0.0,
                       "params": {}, **REFERENCE_EXTRA},
    }
    seeds = len(cfg.seeds) > 1
    for st in study_rows(run):
        rec = st["record"]
        if st["tasks"] != tasks or rec is None or rec.get("status") != "ok":
            continue
        name = st["label"] + (f"@seed={st['seed']}" if seeds else "")
        rows[name] = {"per_task": rec["per_task"], "average": rec["average"],
                      "normalized_average": rec.get("normalized_average"),
                      "seconds": st["seconds"], "params": rec.get("params_run") or rec["params"],
                      "method": st["method"], "kind": _kind(st["method"]), "data": _data(st),
                      "sweep": {"search": st["mode"], "trials": st["trials"], "failed": st["failed"],
                                "validation_average": st["validation"], "seed": st["seed"]}}
    return {"schema_version": SCHEMA_VERSION, "benchmark": cfg.name, "tasks": tasks, "methods": rows,
            "splits": {t: {k: v[t] for k, v in ref.get("sizes", {}).items() if t in v} for t in tasks},
            "seconds_total": round(run.seconds, 1),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "sweep": {"complete": run.complete, "ran": len(run.ran), "found": len(run.skipped)}}


def _kind(method: str) -> str | None:
    from mergelab import methods

    try:
        return methods.get(method).kind
    except Exception:
        return None


def _data(st: Mapping[str, Any]) -> str | None:
    from mergelab import methods

    try:
        needs = {methods.get(st["method"]).needs}
    except Exception:
        return None
    if st["searches"]:
        needs.add("validation")
    if len(needs) > 1:
        needs.discard("nothing")
    return "+".join(k for k in methods.DATA_NEEDS if k in needs)


def task_count_table(run) -> tuple[list[int], dict[str, dict[int, list[float]]]]:
    """Per study label and subset size: the normalised test accuracies of its subsets (and seeds)."""
    by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    sizes: set[int] = set()
    for st in study_rows(run):
        rec = st["record"]
        for r in [rec] if rec is not None else []:
            if r and r.get("status") == "ok" and r.get("normalized_average") is not None:
                by[st["label"]][len(st["tasks"])].append(float(r["normalized_average"]))
                sizes.add(len(st["tasks"]))
    return sorted(sizes), {k: dict(v) for k, v in by.items()}


def _stats(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def task_count_cells(run) -> tuple[list[str], list[list[str]]]:
    """Header and rows: method, then per size ``mean ±sd (n)`` of the normalised accuracy in %."""
    sizes, table = task_count_table(run)
    header = ["method", *[f"{k} tasks" for k in sizes]]
    rows = []
    for label, per in table.items():
        cells = []
        for k in sizes:
            vals = per.get(k)
            if not vals:
                cells.append("-")
                continue
            m, sd = _stats(vals)
            cells.append(f"{100 * m:.1f} ±{100 * sd:.1f} ({len(vals)})")
        rows.append([label, *cells])
    return header, rows


def studies_cells(run) -> tuple[list[str], list[list[str]]]:
    header = ["study", "tasks", "seed", "search", "trials (failed)", "validation avg", "test avg", "normalised",
              "selected parameters"]
    rows = []
    for st in study_rows(run):
        rec = st["record"]
        ok = rec is not None and rec.get("status") == "ok"
        if not st["searches"] and len(st["points"]) > 1:  # select: none, a grid on test: one line per point
            for t, r in st["points"]:
                good = r.get("status") == "ok"
                rows.append([st["label"], ",".join(st["tasks"]), str(st["seed"]), "grid (test)", "1",
                             "-", _pct(r.get("average")) if good else "failed",
                             _pct(r.get("normalized_average")) if good else "-", _params(t.params)])
            continue
        rows.append([st["label"], ",".join(st["tasks"]), str(st["seed"]), st["mode"],
                     f"{st['trials']} ({st['failed']})", _pct(st["validation"]),
                     _pct(rec.get("average")) if ok else ("failed" if rec else "-"),
                     _pct(rec.get("normalized_average")) if ok else "-",
                     _params(shown_params(st["method"], rec)) if rec else "-"])
    return header, rows


def shown_params(method: str, rec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A static method's parameters as run (defaults and an inside-trial scaling search filled in); another
    method's as the study gave them (its run parameters hold timings and learned summaries)."""
    if _kind(method) == "static":
        return rec.get("params_run") or rec.get("params")
    return rec.get("params")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _params(p: Mapping[str, Any] | None) -> str:
    if not p:
        return "-"

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
        return str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in p.items())


def _md(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def sweep_markdown(cfg: SweepConfig, run, results: Mapping[str, Any]) -> str:
    from mergelab.experiment.report import STDERR_NOTE, markdown_table

    parts = [f"# {cfg.name}: sweep", "",
             f"{len(run.planners)} studies; {len(run.ran)} trials ran in this run, {len(run.skipped)} were found "
             f"done; {'complete' if run.complete else 'INCOMPLETE'}; {len(run.failed)} failed. {SEARCH_NOTE}", ""]
    if len(results["methods"]) > 2:
        parts += ["## Test accuracy on all tasks", "", "Per task with each task's own head; *normalised* = "
                  "merged / expert accuracy, averaged; " + STDERR_NOTE, "", markdown_table(results), ""]
    sizes, _ = task_count_table(run)
    if len(sizes) > 1:
        parts += ["## Normalised test accuracy by number of tasks", "",
                  "Mean ± standard deviation over the subsets (and seeds) of each size, in %, (number of subsets).",
                  "", _md(*task_count_cells(run)), "", "![task count](task_count.png)", ""]
    parts += ["## Studies", "", _md(*studies_cells(run)), ""]
    if run.failed:
        parts += ["## Failed trials", "", _md(["study", "trial", "tasks", "error"],
                                              [[str(r.get("study")), str(r.get("index")), ",".join(r.get("tasks") or []),
                                                str(r.get("error")).replace("|", "/")[:300]] for r in run.failed]), ""]
    return "\n".join(parts)


def task_count_plot(run, path: Path) -> Path | None:
    from mergelab.core.figures import pyplot, save_figure

    sizes, table = task_count_table(run)
    if len(sizes) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, (label, per) in enumerate(table.items()):
        ks = [k for k in sizes if per.get(k)]
        stats = [_stats(per[k]) for k in ks]
        m = [100 * s[0] for s in stats]
        sd = [100 * s[1] for s in stats]
        colour = cmap(i % 10)
        ax.plot(ks, m, "-o", color=colour, label=label, lw=1.6, ms=4)
        ax.fill_between(ks, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=colour, alpha=0.12)
        for k in ks:
            ax.scatter([k + 0.06 * (i - len(table) / 2)] * len(per[k]), [100 * v for v in per[k]], color=colour,
                       s=8, alpha=0.5)
    ax.set_xticks(sizes)
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("normalised test accuracy (%)")
    ax.set_title("Merging more tasks: normalised accuracy (merged / expert)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def search_plot(run, path: Path) -> Path | None:
    from mergelab.core.figures import pyplot, save_figure

    full = _full(run)
    studies = [p for p in run.planners if p.searches and p.told and list(p.study.tasks) == full]
    if not studies:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, p in enumerate(studies):
        vals = [100 * r["average"] if r.get("status") == "ok" else float("nan") for _, r in p.told]
        best, acc = [], float("-inf")
        for v in vals:
            acc = max(acc, v) if v == v else acc
            best.append(acc if acc > float("-inf") else float("nan"))
        colour = cmap(i % 10)
        name = p.study.label + (f" seed {p.study.seed}" if len({q.study.seed for q in studies}) > 1 else "")
        ax.scatter(range(len(vals)), vals, s=10, color=colour, alpha=0.6)
        ax.plot(range(len(vals)), best, color=colour, label=f"{name} ({p.study.mode})")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%), all tasks")
    ax.set_title("Searches: each trial (dots) and the best so far (line)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_sweep_outputs(cfg: SweepConfig, run, *, plots: bool = True) -> dict[str, Path]:
    """results.json, results.md, accuracy.png, task_count.png, search_history.png and sweep.json."""
    from mergelab.experiment.report import accuracy_chart
    from mergelab.experiment.results import Results

    d = run.sweep_dir
    files: dict[str, Path] = {}
    results = results_dict(cfg, run)
    Results.model_validate(results)
    files["json"] = atomic_write_text(d / "results.json", json.dumps(results, indent=2) + "\n")
    files["md"] = atomic_write_text(d / "results.md", sweep_markdown(cfg, run, results))
    if plots and len(results["methods"]) > 2:
        files["png"] = accuracy_chart(results, d / "accuracy.png")
    for name, fn in (("task_count", task_count_plot), ("search_history", search_plot)) if plots else ():
        p = fn(run, d / f"{name}.png")
        if p is not None:
            files[name] = p
    sizes, table = task_count_table(run)
    summary = {"name": cfg.name, "complete": run.complete, "seconds": round(run.seconds, 1),
               "ran": run.ran, "found": run.skipped, "failed": [r["id"] for r in run.failed],
               "studies": [{k: v for k, v in st.items() if k not in ("points",)} for st in study_rows(run)],
               "task_count": {label: {str(k): v for k, v in per.items()} for label, per in table.items()},
               "config": cfg.model_dump(mode="json")}
    files["sweep"] = atomic_write_text(d / "sweep.json", json.dumps(summary, indent=1, default=str) + "\n")
    return files


def sweep_sections(run_dir: Path) -> list[tuple[str, list[str], list[list[str]]]]:
    """``mergelab report`` on a sweep folder: (title, header, rows) of the task-count and studies tables,
    read back from ``sweep.json``."""
    try:
        summary = json.loads((run_dir / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    out = []
    tc = summary.get("task_count") or {}
    sizes = sorted({int(k) for per in tc.values() for k in per})
    if len(sizes) > 1:
        rows = []
        for label, per in tc.items():
            cells = []
            for k in sizes:
                vals = per.get(str(k))
                if vals:
                    m, sd = _stats(vals)
                    cells.append(f"{100 * m:.1f} ±{100 * sd:.1f} ({len(vals)})")
                else:
                    cells.append("-")
            rows.append([label, *cells])
        out.append(("Normalised accuracy by number of tasks", ["method", *[f"{k} tasks" for k in sizes]], rows))
    rows = []
    for st in summary.get("studies") or []:
        rec = st.get("record") or {}
        ok = rec.get("status") == "ok"
        rows.append([st["label"], ",".join(st["tasks"]), str(st["seed"]), st["mode"], f"{st['trials']} ({st['failed']})",
                     _pct(st.get("validation")), _pct(rec.get("average")) if ok else "-",
                     _pct(rec.get("normalized_average")) if ok else "-",
                     _params(shown_params(st["method"], rec))])
    out.append(("Studies", ["study", "tasks", "seed", "search", "trials (failed)", "validation avg", "test avg",
                            "normalised", "selected parameters"], rows))
    return out


__all__ = ["results_dict", "studies_cells", "sweep_markdown", "sweep_sections", "task_count_cells", "task_count_table",
           "write_sweep_outputs"]
