"""The sweep driver: plan the studies, run the reference trial, hand out trials, keep the table.

The sweep folder::

    sweep.json         the resolved config, the pool, the studies and what this run did (written at the end)
    config.yaml        the resolved config
    environment.json   the driver's versions, command and git commit, the executor
    trials/<id>.json   one record per trial, written atomically by the trial itself (in its Ray worker)
    trials.jsonl       every trial of the plan in plan order (rebuilt from trials/ as results come in)
    results.json       the studies on the whole task set, as a mergelab results file (``mergelab report``)
    results.md, *.png  tables and plots (:mod:`mergelab.experiment.sweep.report`)

A restarted sweep reads ``trials/`` and runs only the trials without a record (``retry_failed``: also the
failed ones); an interrupted one cancels what it has in flight, so nothing it did not record ran twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.core.atomic import atomic_write_text, check_output_path
from mergelab.core.errors import InputError
from mergelab.experiment.sweep.config import SweepConfig, pool_key
from mergelab.experiment.sweep.executor import make_executor
from mergelab.experiment.sweep.fence import open_run, retire_run, wait_for_trials
from mergelab.experiment.sweep.studies import Planner, make_planner, plan_studies
from mergelab.experiment.sweep.trial import Trial, reference_trial, write_record


class SweepStore:
    """The trial records of a sweep folder (``trials/<id>.json``)."""

    def __init__(self, root: Path, retry_failed: bool = False) -> None:
        self.root = root
        self.retry_failed = retry_failed
        self.records: dict[str, dict[str, Any]] = {}

    def finished(self, trial_id: str) -> dict[str, Any] | None:
        """The record of a trial that ran (ok, or failed unless retrying), else None."""
        if trial_id in self.records:
            return self.records[trial_id]
        path = self.root / "trials" / f"{trial_id}.json"
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        if rec.get("status") == "ok" or (rec.get("status") == "failed" and not self.retry_failed):
            self.records[trial_id] = rec
            return rec
        return None

    def add(self, record: dict[str, Any]) -> None:
        self.records[record["id"]] = record


@dataclass
class SweepRun:
    """What :func:`run_sweep` did: the plan's trials (in plan order), which ran now and which were found."""

    sweep_dir: Path
    planners: list[Planner]
    reference: dict[str, Any]
    entries: list[tuple[Trial, dict[str, Any]]] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for _, r in self.entries if r.get("status") == "failed"]


def _table(planners: list[Planner], reference: tuple[Trial, dict[str, Any]] | None,
           store: SweepStore) -> list[tuple[Trial, dict[str, Any]]]:
    rows = [reference] if reference is not None else []
    for p in planners:
        rows.extend(p.told)
        if p.final is not None and p.final_record is not None:
            rows.append((p.final, p.final_record))
    return rows


def write_table(sweep_dir: Path, rows: list[tuple[Trial, dict[str, Any]]]) -> Path:
    lines = [json.dumps({**r, "study": t.study, "index": t.index}, sort_keys=False) for t, r in rows]
    return atomic_write_text(sweep_dir / "trials.jsonl", "\n".join(lines) + ("\n" if lines else ""))


def run_sweep(cfg: SweepConfig, sweep_dir: str | Path, *, executor: str = "ray", address: str | None = None,
              num_cpus: int | None = None, retry_failed: bool = False, progress: bool = True, console=None,
              plots: bool = True, on_result: Callable[[dict[str, Any]], None] | None = None) -> SweepRun:
    """Run (or resume) the sweep ``cfg`` into ``sweep_dir``; returns what ran. ``plots``: write the PNG plots
    (the tables are always written). ``on_result(record)`` is called after each trial this run executed is
    stored (a test stops a sweep from it)."""
    from rich.console import Console

    console = console or Console(stderr=True, quiet=not progress)
    t0 = time.perf_counter()
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    inputs = [*(cfg.pool.inputs() if cfg.pool is not None else list(cfg.benchmark.tasks.values())), *cfg.plugins]
    check_output_path(sweep_dir, inputs)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise InputError(f"sweep folder {sweep_dir}: exists and is not a folder")
    source = cfg.pool_source()
    pkey = pool_key(source)
    steps: dict[str, int] = {}
    if cfg.benchmark is not None:
        from mergelab.pools.benchmarks import get_benchmark

        steps = dict(get_benchmark(cfg.benchmark.name).adaptive_steps or ())
    planners = [make_planner(s) for s in plan_studies(cfg, pkey, steps)]  # Optuna missing: refused here
    store = SweepStore(sweep_dir, retry_failed)
    ex = make_executor(executor, address=address, num_cpus=num_cpus)  # before the folder: a refusal leaves none
    try:
        (sweep_dir / "trials").mkdir(parents=True, exist_ok=True)
        _write_config(cfg, sweep_dir)
        _write_environment(sweep_dir, ex)
        token = open_run(sweep_dir)
    except BaseException:
        ex.close()
        raise
    res = cfg.resources
    base = {"source": source, "sweep_dir": str(sweep_dir), "plugins": list(cfg.plugins),
            "threads": max(1, int(res.cpus)), "run_token": token}
    run = SweepRun(sweep_dir, planners, {})
    total = 1 + sum(p.total for p in planners)
    console.print(f"[bold]{cfg.name}[/]: {len(planners)} studies, {total} trials ({ex.name}, {ex.slots} CPU slot(s), "
                  f"{res.cpus:g} CPU / {res.gpus:g} GPU per trial) -> {sweep_dir}", highlight=False)
    ref_trial = reference_trial(pkey, cfg.task_names())
    ref_entry: tuple[Trial, dict[str, Any]] | None = None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=getattr(console, "console", console), disable=not progress, transient=True)
    try:
        with bar:
            job = bar.add_task("sweep", total=total)
            # the reference trial first and alone: it loads the pool (a benchmark trains missing experts into the
            # shared cache once) and measures the experts that normalised accuracy divides by
            rec = store.finished(ref_trial.id)
            if rec is None or rec.get("status") != "ok":
                ex.submit({**base, "trial": ref_trial.to_json()}, res.cpus, res.gpus)
                _, rec = ex.next_done()
                store.add(rec)
                run.ran.append(ref_trial.id)
            else:
                run.skipped.append(ref_trial.id)
            if rec.get("status") != "ok":
                raise InputError(f"the sweep's pool could not be loaded and evaluated: {rec.get('error')}")
            ref_entry = (ref_trial, rec)
            run.reference = rec
            bar.advance(job)
            base["reference"] = rec["individual"]
            inflight: dict[str, list[tuple[Planner, Trial]]] = {}
            by_handle: dict[int, str] = {}

            def dispatch() -> None:
                progressed = True
                while progressed:
                    progressed = False
                    for p in planners:
                        for trial in p.ask():
                            progressed = True
                            tid = trial.id
                            if tid in inflight:
                                inflight[tid].append((p, trial))
                                continue
                            found = store.finished(tid)
                            if found is not None:
                                run.skipped.append(tid)
                                bar.advance(job)
                                p.tell(trial, found)
                                continue
                            inflight[tid] = [(p, trial)]
                            by_handle[ex.submit({**base, "trial": trial.to_json()}, res.cpus, res.gpus)] = tid

            dispatch()
            while inflight:
                handle, rec = ex.next_done()
                tid = by_handle.pop(handle)
                if not (sweep_dir / "trials" / f"{tid}.json").is_file():  # a worker whose disk is not the driver's
                    write_record(sweep_dir, rec)
                store.add(rec)
                run.ran.append(tid)
                bar.advance(job)
                if rec.get("status") == "failed":
                    console.print(f"  [red]failed[/] {rec['study']} #{rec['index']}: {rec.get('error')}", highlight=False)
                for p, trial in inflight.pop(tid):
                    p.tell(trial, rec)
                if on_result is not None:
                    on_result(rec)
                if len(run.ran) % 4 == 0:
                    write_table(sweep_dir, _table(planners, ref_entry, store))
                dispatch()
        run.complete = all(p.done for p in planners)
    except BaseException:
        # interrupted: no trial of this run starts any more, those in flight are cancelled, and we return only
        # when none of them can still write a record (fence.py: Ray may report a cancelled task done early)
        retire_run(sweep_dir)
        ex.cancel_all(settled=lambda timeout: wait_for_trials(sweep_dir, timeout))
        raise
    finally:
        ex.close()
        run.entries = _table(planners, ref_entry, store)
        run.seconds = time.perf_counter() - t0
        run.files["trials"] = write_table(sweep_dir, run.entries)
    from mergelab.experiment.sweep.report import write_sweep_outputs

    run.files.update(write_sweep_outputs(cfg, run, plots=plots))
    return run


def _write_environment(sweep_dir: Path, ex) -> None:
    """The driver's environment (versions, command, git commit) and the executor's (Ray's version and CPUs)."""
    from importlib.metadata import PackageNotFoundError, version

    from mergelab.experiment.rundir import environment

    env = {**environment("cpu"), "executor": ex.name, "cpu_slots": ex.slots}
    for pkg in ("ray", "optuna"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    atomic_write_text(sweep_dir / "environment.json", json.dumps(env, indent=2) + "\n")


def _write_config(cfg: SweepConfig, sweep_dir: Path) -> None:
    import yaml

    atomic_write_text(sweep_dir / "config.yaml", "# resolved sweep configuration (defaults filled in)\n"
                      + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


__all__ = ["SweepRun", "SweepStore", "run_sweep", "write_table"]
