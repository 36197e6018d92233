"""Studies and the trials they ask for: task subsets, grids, seeded random draws, Optuna searches.

A study is one ``methods`` entry on one task subset with one seed. Its planner hands out trials in
rounds (:meth:`Planner.ask`) and takes their records back (:meth:`Planner.tell`):

- **grid** and **random**: every point at once (random: ``trials`` draws from a ``random.Random`` seeded by
  the search seed and the study), on the validation split; then the best point on test. A study with one
  point, or ``select: none``, evaluates its points on test directly.
- **optuna**: the driver owns an in-memory Optuna study (Akiba et al., KDD 2019) and asks ``batch`` trials
  per round; a round's values are told in the round's order once all of it is back, so the sampler (TPE,
  Bergstra et al. 2011; CMA-ES, Hansen 2016, via ``cmaes``) sees the same history whatever order a
  cluster finishes them in, and the same config and seed give the same trials. A restarted sweep replays
  the rounds: the trials it finds in the sweep folder are told without running again.

The selected trial is the best on validation (ties: the earliest); its parameters run once more on test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergelab.core.errors import InputError
from mergelab.experiment.sweep.config import MethodEntry, SweepConfig, expand_grid, is_range
from mergelab.experiment.sweep.trial import Trial

CLUSTER_HINT = "pip install 'mergelab[cluster]'"


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from ``parts`` (stable across processes and machines, unlike ``hash``)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


def task_subsets(tasks: Sequence[str], sizes: Sequence[int] | None, max_per_size: int | None,
                 seed: int) -> list[tuple[str, ...]]:
    """Every subset of each size (in the pool's task order), or a seeded sample of ``max_per_size`` of them."""
    if not sizes:
        return [tuple(tasks)]
    out: list[tuple[str, ...]] = []
    for k in sizes:
        combos = list(itertools.combinations(tasks, k))
        if max_per_size is not None and len(combos) > max_per_size:
            rng = random.Random(derived_seed("subsets", seed, k, list(tasks)))
            keep = sorted(rng.sample(range(len(combos)), max_per_size))
            combos = [combos[i] for i in keep]
        out.extend(combos)
    return out


@dataclass(frozen=True)
class Study:
    label: str
    entry: MethodEntry
    tasks: tuple[str, ...]
    seed: int
    mode: str
    trials: int
    sampler: str
    batch: int
    search_seed: int
    pool: str
    steps: dict[str, int]

    @property
    def key(self) -> str:
        return f"{self.label}|{','.join(self.tasks)}|seed={self.seed}"

    def trial(self, index: int | str, params: Mapping[str, Any], split: str) -> Trial:
        steps = dict(self.steps) if self.entry.name in self.steps else {}
        return Trial(self.label, index, self.entry.name, dict(params), self.tasks, self.seed, split, self.pool,
                     tuple(self.entry.scaling_grid) if self.entry.scaling_grid else None, steps=steps)


def plan_studies(cfg: SweepConfig, pool: str, steps: Mapping[str, int] | None = None) -> list[Study]:
    """Every study of ``cfg``: methods x subsets x seeds, in that order."""
    subsets = task_subsets(cfg.task_names(), cfg.subsets.sizes, cfg.subsets.max_per_size, cfg.subsets.seed)
    out = []
    for entry in cfg.methods:
        for tasks in subsets:
            for seed in cfg.seeds:
                out.append(Study(entry.study_label, entry, tasks, seed, cfg.mode_of(entry),
                                 entry.trials or cfg.search.trials, entry.sampler or cfg.search.sampler,
                                 cfg.search.batch, cfg.search.seed, pool, dict(steps or {})))
    return out


# ---------------------------------------------------------------------------------------------- planners


def _best(told: Sequence[tuple[Trial, Mapping[str, Any]]]) -> Trial | None:
    ok = [(t, r) for t, r in told if r.get("status") == "ok" and r.get("average") is not None]
    if not ok:
        return None
    i = max(range(len(ok)), key=lambda j: (ok[j][1]["average"], -j))
    return ok[i][0]


class Planner:
    """Hands out a study's trials in rounds; the last round is the selected parameters on test."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.told: list[tuple[Trial, dict[str, Any]]] = []
        self.final: Trial | None = None
        self.final_record: dict[str, Any] | None = None
        self._round: list[Trial] = []
        self._waiting: dict[int, dict[str, Any] | None] = {}
        self.done = False
        self.failed_selection = False

    @property
    def searches(self) -> bool:
        """Whether the study picks among trials on validation (else it evaluates on test directly)."""
        raise NotImplementedError

    @property
    def total(self) -> int:
        """Trials this study runs (the final test trial included)."""
        raise NotImplementedError

    def _next_round(self) -> list[Trial]:
        """The next round of search trials, or [] when the search is over."""
        raise NotImplementedError

    def _told_round(self, round_: list[Trial], records: list[dict[str, Any]]) -> None:
        """A whole round is back (in round order)."""

    def ask(self) -> list[Trial]:
        if self.done or self._round:
            return []
        if self.final is not None:
            return []
        batch = self._next_round()
        if not batch:
            if not self.searches:
                self.done = True
                return []
            best = _best(self.told)
            if best is None:
                self.failed_selection = True
                self.done = True
                return []
            self.final = self.study.trial("final", best.params, "test")
            self._round = [self.final]
            self._waiting = {0: None}
            return [self.final]
        self._round = batch
        self._waiting = dict.fromkeys(range(len(batch)))
        return list(batch)

    def tell(self, trial: Trial, record: dict[str, Any]) -> None:
        for i, t in enumerate(self._round):
            if t is trial and self._waiting.get(i) is None:
                self._waiting[i] = record
                break
        else:
            raise RuntimeError(f"trial {trial.id} told twice or not asked")
        if any(v is None for v in self._waiting.values()):
            return
        round_, records = self._round, [self._waiting[i] for i in range(len(self._round))]
        self._round, self._waiting = [], {}
        if self.final is not None and round_ == [self.final]:
            self.final_record = records[0]
            self.done = True
            return
        self.told.extend(zip(round_, records))
        self._told_round(round_, records)


class PointsPlanner(Planner):
    """Grid points or seeded random draws: one round of all points, then the best on test."""

    def __init__(self, study: Study, points: list[dict[str, Any]]) -> None:
        super().__init__(study)
        self.points = points
        self._asked = False

    @property
    def searches(self) -> bool:
        return len(self.points) > 1 and self.study.entry.select == "validation"

    @property
    def total(self) -> int:
        return len(self.points) + (1 if self.searches else 0)

    def _next_round(self) -> list[Trial]:
        if self._asked:
            return []
        self._asked = True
        split = "validation" if self.searches else "test"
        return [self.study.trial(i, p, split) for i, p in enumerate(self.points)]


def random_points(params: Mapping[str, Any], tasks: Sequence[str], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` draws: a list's entry uniformly, a range uniformly (``log``: log-uniformly; ``step``: on its
    grid), ``per_task``: one draw per task."""
    import math

    rng = random.Random(seed)

    def draw(v: Any) -> Any:
        if isinstance(v, list):
            return v[rng.randrange(len(v))]
        lo, hi = float(v["low"]), float(v["high"])
        if v.get("log"):
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if v.get("step"):
            k = int(math.floor((hi - lo) / v["step"] + 1e-9))
            return float(lo + v["step"] * rng.randint(0, k))
        return float(rng.uniform(lo, hi))

    out = []
    for _ in range(n):
        point = {}
        for key, v in params.items():
            if is_range(v) and v.get("per_task"):
                point[key] = {t: draw(v) for t in tasks}
            elif isinstance(v, list) or is_range(v):
                point[key] = draw(v)
            else:
                point[key] = v
        out.append(point)
    return out


def _optuna():
    try:
        import optuna
    except ImportError:
        raise InputError(f"search: optuna needs the package optuna ({CLUSTER_HINT})") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_sampler(name: str, seed: int):
    optuna = _optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE and constant liar are marked experimental
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if name == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise InputError(f"sampler: cmaes needs the package cmaes ({CLUSTER_HINT})") from None
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        return optuna.samplers.RandomSampler(seed=seed)


class OptunaPlanner(Planner):
    """An Optuna study owned by the driver (ask / tell), ``batch`` trials per round."""

    def __init__(self, study: Study) -> None:
        super().__init__(study)
        optuna = _optuna()
        self.optuna = optuna
        seed = derived_seed("optuna", study.search_seed, study.key)
        self.ostudy = optuna.create_study(direction="maximize", sampler=make_sampler(study.sampler, seed))
        self._asked = 0
        self._handles: dict[int, Any] = {}

    @property
    def searches(self) -> bool:
        return True

    @property
    def total(self) -> int:
        return self.study.trials + 1

    def _suggest(self, ot) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for key, v in self.study.entry.params.items():
            if isinstance(v, list):
                params[key] = ot.suggest_categorical(key, v) if len(v) > 1 else v[0]
            elif is_range(v):
                def one(name: str, v=v) -> float:
                    if v["low"] == v["high"]:
                        return float(v["low"])
                    return float(ot.suggest_float(name, float(v["low"]), float(v["high"]), log=bool(v.get("log")),
                                                  step=v.get("step")))

                params[key] = {t: one(f"{key}[{t}]") for t in self.study.tasks} if v.get("per_task") else one(key)
            else:
                params[key] = v
        return params

    def _next_round(self) -> list[Trial]:
        n = min(self.study.batch, self.study.trials - self._asked)
        if n <= 0:
            return []
        batch = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(n):
                ot = self.ostudy.ask()
                trial = self.study.trial(self._asked, self._suggest(ot), "validation")
                self._handles[self._asked] = ot
                self._asked += 1
                batch.append(trial)
        return batch

    def _told_round(self, round_: list[Trial], records: list[dict[str, Any]]) -> None:
        state = self.optuna.trial.TrialState
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for trial, rec in zip(round_, records):
                ot = self._handles.pop(int(trial.index))
                if rec.get("status") == "ok" and rec.get("average") is not None:
                    self.ostudy.tell(ot, float(rec["average"]))
                else:
                    self.ostudy.tell(ot, state=state.FAIL)


def make_planner(study: Study) -> Planner:
    entry = study.entry
    if not any(isinstance(v, list) or is_range(v) for v in entry.params.values()):
        return PointsPlanner(study, [dict(entry.params)])  # nothing to search: one trial on test
    if study.mode == "optuna":
        return OptunaPlanner(study)
    if study.mode == "random":
        seed = derived_seed("random", study.search_seed, study.key)
        return PointsPlanner(study, random_points(entry.params, study.tasks, study.trials, seed))
    return PointsPlanner(study, expand_grid(entry.params))


__all__ = ["OptunaPlanner", "Planner", "PointsPlanner", "Study", "derived_seed", "make_planner", "plan_studies",
           "random_points", "task_subsets"]
