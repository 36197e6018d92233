"""Weak experts: the label shuffle against a direct count, the pool with one expert replaced, the CLI's errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.core.errors import InputError
from mergelab.experiment.analysis.weak import shuffle_labels, weak_table, with_expert
from mergelab.pools.data.tasks import TaskData
from mergelab.pools.pool import ModelPool


def _task(n: int = 40) -> TaskData:
    return TaskData("t", [f"text {i}" for i in range(n)], [i % 4 for i in range(n)], label_names=list("abcd"))


def test_shuffle_labels_permutes_a_seeded_share() -> None:
    task = _task()
    out, changed = shuffle_labels(task, 0.3, seed=0)
    moved = [i for i in range(40) if out.labels[i] != task.labels[i]]
    assert changed == len(moved) and 0 < changed <= 12  # 12 = 30% of 40 drawn; a permutation may leave some
    assert Counter(out.labels) == Counter(task.labels)  # a permutation among the drawn examples keeps the counts
    assert out.texts == task.texts and out.ids == task.ids
    assert shuffle_labels(task, 0.3, seed=0)[0].labels == out.labels  # same seed, same labels
    assert shuffle_labels(task, 0.3, seed=1)[0].labels != out.labels
    assert shuffle_labels(task, 0.0)[0].labels == task.labels
    with pytest.raises(InputError, match="shuffled training labels"):
        shuffle_labels(task, 1.5)


def test_with_expert_replaces_one_task_only() -> None:
    pool = ModelPool(family=None, pretrained={}, experts={"a": {"w": torch.zeros(1)}, "b": {"w": torch.ones(1)}},
                     heads={"a": torch.nn.Linear(1, 2), "b": torch.nn.Linear(1, 2)}, splits={}, name="p")
    weak = SimpleNamespace(body_state={"w": torch.full((1,), 7.0)}, head=torch.nn.Linear(1, 2), meta={"steps": 5})
    got = with_expert(pool, "b", weak)
    assert got.experts["a"] is pool.experts["a"] and float(got.experts["b"]["w"]) == 7.0
    assert got.heads["b"] is weak.head and got.expert_meta["b"] == {"steps": 5}
    assert float(pool.experts["b"]["w"]) == 1.0  # the original pool is untouched
    with pytest.raises(InputError, match="--weak-task 'c'"):
        with_expert(pool, "c", weak)


def test_weak_table_hand_case() -> None:
    row = {"average": 0.7, "average_weak": 0.6, "per_task": {"a": 0.8, "b": 0.6}, "per_task_weak": {"a": 0.5, "b": 0.7},
           "others_average": 0.6, "others_average_weak": 0.7}
    table = weak_table({"weak_task": "a", "tasks": ["a", "b"], "rows": {"ties": row}})
    assert "| ties | 70.0 | 60.0 | 80.0 | 50.0 | 60.0 | 70.0 | +10.0 |" in table


@pytest.mark.parametrize("args, message", [
    (["--weak-task", "nope"], "--weak-task 'nope'"),
    (["--weak-steps", "0"], "--weak-steps"),
    (["--shuffle", "2"], "shuffled training labels"),
    (["--weak-seed", "-1"], "--weak-seed"),
])
def test_analyze_weak_expert_bad_options_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["analyze", "weak-expert", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", [None, 7])
def test_weak_seed_draws_the_shuffle_and_the_fine_tuning(monkeypatch, seed) -> None:
    """--weak-seed seeds the label shuffle and the weak expert's recipe; without it both stay the benchmark's."""
    import mergelab.experiment.analysis.weak as weak
    import mergelab.experiment.runner as runner
    import mergelab.pools.finetune as finetune
    from mergelab.pools.benchmarks import get_benchmark

    spec = get_benchmark("text5-demo")
    task = spec.task_names[0]
    train = _task(60)
    pool = SimpleNamespace(splits={task: {"train": train}}, family="fam")
    seen = {}
    result = {"methods": {name: {"average": 0.5, "per_task": {t: 0.5 for t in spec.task_names}}
                          for name in ("individual", "task_arithmetic_0.3")},
              "tasks": list(spec.task_names), "splits": {}}
    monkeypatch.setattr(runner, "load_context", lambda *a, **k: pool)
    monkeypatch.setattr(runner, "run_pool", lambda *a, **k: result)
    monkeypatch.setattr(weak, "with_expert", lambda p, t, e: p)

    def train_expert(family, data, recipe, **kwargs):
        seen.update(labels=list(data.labels), recipe=recipe)
        return SimpleNamespace(meta={})

    monkeypatch.setattr(finetune, "get_or_train_expert", train_expert)
    study = weak.weak_expert_study(spec, task, steps=5, shuffle=0.5, seed=seed, rows=["task_arithmetic_0.3"])
    expected_seed = spec.seed if seed is None else seed
    assert seen["labels"] == list(shuffle_labels(train, 0.5, expected_seed)[0].labels)
    assert seen["recipe"].steps == 5
    assert seen["recipe"].seed == (spec.recipe.seed if seed is None else seed)
    assert study["weak_seed"] == seed and study["weak_recipe"]["seed"] == seen["recipe"].seed
    if seed is not None:
        assert seen["labels"] != list(shuffle_labels(train, 0.5, spec.seed)[0].labels)
