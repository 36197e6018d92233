"""Run directories, and the runs that a configuration file describes.

A run directory holds what it takes to read and repeat a run::

    config.yaml        the resolved configuration (every default filled in)
    environment.json   python / torch / transformers / mergelab versions, device, threads, git commit, command
    run.log            what the run printed, with times (written as the run goes)
    results.json       the numbers (bench: accuracies; merge: one entry per merged model)
    results.md, *.png  tables and plots
    models/<label>/    merge with outputs.save_models: each merged model as a Hugging Face directory
    report.md, report.html   from ``mergelab report`` (also written at the end of a run)

Every file but ``run.log`` is written atomically (temporary file beside it, then rename).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mergelab import __version__
from mergelab.core.errors import InputError
from mergelab.core.io import atomic_write_text, check_output_path
from mergelab.experiment.config import RunConfig, sweep


def _git(*args: str, where: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(where: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``where`` (default: this package), or None.

    ``+dirty`` is appended when tracked files differ from that commit.
    """
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    commit = _git("rev-parse", "HEAD", where=where)
    if not commit:
        return None
    changes = _git("status", "--porcelain", "--untracked-files=no", where=where)
    return commit + ("+dirty" if changes else "")


def resolve_device(device: str) -> str:
    """``auto`` -> cuda if available, else cpu; a device that is not available is refused (as a string)."""
    from mergelab.pools.families.base import resolve_device as resolve

    return str(resolve(device))


def environment(device: str = "cpu") -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "mergelab": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(), "device": device,
        "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads(),
        "git_commit": git_commit(), "command": " ".join(["mergelab", *sys.argv[1:]]), "cwd": str(Path.cwd()),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    return Path(root) / f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


class RunLog:
    """A console that also writes what it prints, without colours and with the time, to ``run.log``."""

    def __init__(self, path: str | Path, console):
        from rich.console import Console

        self.console = console
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115  (closed by close())
        self.file = Console(file=self._fh, width=120, no_color=True, highlight=False, soft_wrap=True,
                            force_terminal=False, emoji=False)

    def print(self, *objects, **kwargs) -> None:
        self.console.print(*objects, **kwargs)
        self.to_file(*objects, **kwargs)

    def to_file(self, *objects, **kwargs) -> None:
        if self._fh.closed:
            return
        self.file.print(time.strftime("%H:%M:%S"), *objects, **{k: v for k, v in kwargs.items() if k != "highlight"})
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __getattr__(self, name: str):
        return getattr(self.console, name)


def _make_run_dir(run_dir: str | Path, what: str, inputs, device: str) -> Path:
    """Create ``run_dir`` (never over an input, never over a file) with ``environment.json``."""
    run_dir = Path(run_dir)
    check_output_path(run_dir, inputs)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{what} {run_dir}: exists and is not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "environment.json", json.dumps(environment(device), indent=2) + "\n")
    return run_dir


def start_run(run_dir: str | Path, cfg: RunConfig, *, inputs=(), device: str = "cpu") -> Path:
    """Create ``run_dir`` (never over an input) with ``config.yaml`` and ``environment.json``."""
    run_dir = _make_run_dir(run_dir, "run directory", inputs, device)
    atomic_write_text(run_dir / "config.yaml",
                      "# resolved configuration of this run (defaults filled in)\n"
                      + yaml.safe_dump(cfg.resolved_dict(), sort_keys=False, allow_unicode=True))
    return run_dir


def start_command_run(run_dir: str | Path, command: str, options: Mapping[str, Any], *, inputs=(),
                      device: str = "cpu") -> Path:
    """Create ``run_dir`` for a command without a configuration file (``adapt``, ``analyze``).

    ``options.json`` holds the command and every option with its default filled in, the counterpart of a
    config run's ``config.yaml``; ``environment.json`` is the same as there.
    """
    run_dir = _make_run_dir(run_dir, "--out", inputs, device)
    record = {"command": command, "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}}
    atomic_write_text(run_dir / "options.json", json.dumps(record, indent=2) + "\n")
    return run_dir


def logged_run(run_dir: Path, quiet: bool, body, *, created: bool = False):
    """Run ``body(log)`` with a console that also writes run.log; a failure's traceback goes to the log.

    ``created``: this command made ``run_dir``. Bad input found during the run then removes it again, so
    refused input leaves nothing behind (docs/reliability.md); other failures keep it, with the log."""
    import shutil
    import traceback

    from rich.console import Console

    log = RunLog(run_dir / "run.log", Console(stderr=True, quiet=quiet, soft_wrap=True))
    try:
        return body(log)
    except InputError:
        log.close()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    except BaseException as exc:
        log.to_file(f"failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    finally:
        log.close()


# ---------------------------------------------------------------------------------------------- merge runs


def task_vector_stats(pretrained: Mapping, merged: Mapping, experts: Mapping[str, Mapping]) -> dict[str, Any]:
    """How much of each task vector a merge holds.

    With delta = theta_merged - theta_0 and tau_t = theta_t - theta_0 (s B A for a LoRA expert, one weight at a
    time), over the floating tensors:
    ``coefficient[t] = <delta, tau_t> / ||tau_t||^2`` (the least-squares weight of tau_t in delta; Task
    Arithmetic with orthogonal task vectors gives exactly its lambda_t), ``cosine[t] = <delta, tau_t> /
    (||delta|| ||tau_t||)`` and ``delta_norm = ||delta||``.
    """
    import torch

    from mergelab.core.lora import LoraTaskVector

    dots = dict.fromkeys(experts, 0.0)
    tau_sq = dict.fromkeys(experts, 0.0)
    delta_sq = 0.0
    for key, p0 in pretrained.items():
        if not torch.is_floating_point(p0) or key not in merged:
            continue
        base = p0.float()
        delta = merged[key].float().to(base.device) - base
        delta_sq += float((delta * delta).sum())
        for t, sd in experts.items():
            if isinstance(sd, LoraTaskVector):  # its task vector s B A, zero off the adapted weights
                if key not in sd:
                    continue
                tau = sd[key].to(base.device)
            else:
                tau = sd[key].float().to(base.device) - base
            dots[t] += float((delta * tau).sum())
            tau_sq[t] += float((tau * tau).sum())
    dn = delta_sq ** 0.5
    return {
        "delta_norm": dn,
        "coefficient": {t: dots[t] / tau_sq[t] if tau_sq[t] > 0 else 0.0 for t in experts},
        "cosine": {t: dots[t] / (dn * tau_sq[t] ** 0.5) if dn > 0 and tau_sq[t] > 0 else 0.0 for t in experts},
        "task_vector_norm": {t: tau_sq[t] ** 0.5 for t in experts},
    }


def run_merges(cfg: RunConfig, run_dir: str | Path, *, console, progress: bool = True,
               name: str = "merge") -> dict[str, Any]:
    """Every merge of ``cfg`` (the sweep), saved under ``run_dir/models/<label>``, with results.json/md and a plot."""
    import torch

    from mergelab import methods
    from mergelab.core import io
    from mergelab.core.lora import LoraTaskVector
    from mergelab.pools.pool import load_state_dicts

    assert cfg.pool is not None
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    points = sweep(cfg)
    console.print(f"[bold]{name}[/]: {len(points)} merge(s) of {len(cfg.pool.experts)} experts "
                  f"({', '.join(cfg.pool.experts)}) on {device}", highlight=False)
    pre, experts = load_state_dicts(cfg.pool, factored=True)  # an adapter stays factored: no expert body held
    if device != "cpu":
        pre = {k: v.to(device) for k, v in pre.items()}
        experts = {t: sd.to(device) if isinstance(sd, LoraTaskVector) else {k: v.to(device) for k, v in sd.items()}
                   for t, sd in experts.items()}
    pre_path = io.resolve_model_path(cfg.pool.pretrained)
    merges: dict[str, Any] = {}
    norms: dict[str, float] = {}

    def write(complete: bool) -> dict[str, Any]:
        results = {
            "kind": "merge", "name": name, "tasks": list(cfg.pool.experts), "pretrained": cfg.pool.pretrained,
            "experts": dict(cfg.pool.experts), "task_vector_norm": norms, "merges": merges,
            "complete": complete, "environment": {"device": device},
            "seconds_total": round(time.perf_counter() - t_start, 1),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        # after every merge, so that an interrupted sweep leaves the numbers of the merges it saved
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        return results

    from rich.progress import Progress

    with Progress(console=console.console if isinstance(console, RunLog) else console, disable=not progress,
                  transient=True) as bar:
        job = bar.add_task("merging", total=len(points))
        for label, method, params in points:
            info = methods.get(method)
            if "seed" in info.params and "seed" not in params:
                params = {**params, "seed": cfg.seed}  # the run's seed for methods that draw random numbers
            bar.update(job, description=label)
            t0 = time.perf_counter()
            merged = methods.merge(method, pre, experts, **params)
            seconds = time.perf_counter() - t0
            stats = task_vector_stats(pre, merged, experts)
            entry: dict[str, Any] = {"method": method, "params": params, "seconds": round(seconds, 3),
                                     "model_dir": None, **{k: stats[k] for k in ("delta_norm", "coefficient", "cosine")}}
            if cfg.outputs.save_models:
                out = io.save_model(merged, run_dir / "models" / label, like=pre_path if pre_path.is_dir() else None,
                                    inputs=cfg.pool.inputs(),
                                    metadata={"format": "pt", "mergelab_method": method,
                                              "mergelab_params": json.dumps(params, sort_keys=True)})
                entry["model_dir"] = str(out.relative_to(run_dir.resolve()))
            merges[label] = entry
            norms = stats["task_vector_norm"]
            write(complete=False)
            del merged
            console.print(f"  {label:<32} {seconds:6.2f}s  coefficient "
                          + "  ".join(f"{t} {c:.3f}" for t, c in stats["coefficient"].items())
                          + (f"  -> {entry['model_dir']}" if entry["model_dir"] else ""), highlight=False)
            bar.advance(job)
    results = write(complete=True)
    atomic_write_text(run_dir / "results.md", merge_markdown(results))
    if cfg.outputs.plots:
        merge_plot(results, run_dir / "merge_coefficients.png")
    return results


def merge_markdown(results: Mapping[str, Any]) -> str:
    tasks = results["tasks"]
    lines = [f"# {results['name']}: {len(results['merges'])} merge(s)", "",
             "Coefficient of each task vector in the merge (<delta, tau_t> / ||tau_t||^2) and the merge's "
             "distance from the pretrained model (||delta||).", "",
             "| merge | method | " + " | ".join(tasks) + " | norm of delta | seconds | model |",
             "|---|---|" + "---:|" * (len(tasks) + 2) + "---|"]
    for label, m in results["merges"].items():
        lines.append(f"| {label} | {m['method']} | " + " | ".join(f"{m['coefficient'][t]:.3f}" for t in tasks)
                     + f" | {m['delta_norm']:.3g} | {m['seconds']:.2f} | {m['model_dir'] or '-'} |")
    return "\n".join(lines) + "\n"


def merge_plot(results: Mapping[str, Any], path: str | Path) -> Path:
    """Two heatmaps (merge x task): each task vector's coefficient in the merge, and its cosine with the merge."""
    from mergelab.core.figures import heatmap, pyplot, save_figure

    plt = pyplot()
    tasks = list(results["tasks"])
    labels = list(results["merges"])
    coef = [[results["merges"][m]["coefficient"][t] for t in tasks] for m in labels]
    cos = [[results["merges"][m]["cosine"][t] for t in tasks] for m in labels]
    label_w = 0.08 * max(len(s) for s in labels)
    panel_w = 1.6 + 0.8 * len(tasks)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(min(20, label_w + 2 * panel_w + 1), min(14, 1.8 + 0.45 * len(labels))))
    heatmap(a1, coef, labels, tasks, "coefficient of each task vector in the merge\n<delta, tau_t> / ||tau_t||^2")
    heatmap(a2, cos, [""] * len(labels), tasks, "cosine(delta, tau_t)")
    for ax in (a1, a2):
        ax.set_aspect("auto")
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- bench runs


def benchmark_spec(cfg: RunConfig):
    """The :class:`~mergelab.pools.benchmarks.BenchmarkSpec` a ``benchmark:`` section describes."""
    import dataclasses

    from mergelab.pools.benchmarks import get_benchmark, user_benchmark

    assert cfg.benchmark is not None
    b = cfg.benchmark
    spec = user_benchmark(dict(b.tasks), base=get_benchmark(b.name)) if b.tasks else get_benchmark(b.name)
    if cfg.seed != spec.seed:  # the seed fixes the splits, the experts' training and the adaptation order
        spec = dataclasses.replace(spec, seed=cfg.seed, recipe=spec.recipe.replace(seed=cfg.seed))
    if b.steps:
        spec = dataclasses.replace(spec, adaptive_steps=tuple({**dict(spec.adaptive_steps or ()), **b.steps}.items()))
    return spec


__all__ = ["RunLog", "benchmark_spec", "default_run_dir", "environment", "git_commit", "logged_run",
           "merge_markdown", "merge_plot", "resolve_device", "run_merges", "start_command_run", "start_run",
           "task_vector_stats"]
