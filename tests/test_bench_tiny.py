"""``run_benchmark`` end to end on a tiny BERT and users' CSV tasks: every row, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelab.experiment.runner import run_benchmark
from mergelab.pools import finetune
from mergelab.pools.benchmarks import BenchmarkSpec, TaskSpec
from mergelab.pools.evaluate import evaluate_tasks as real_evaluate_tasks
from tests.tiny_models import VOCAB, tiny_bert_config, tiny_tokenizer

WORDS = VOCAB[5:]


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkSpec:
    from transformers import BertModel

    d: Path = tmp_path_factory.mktemp("tiny-bench")
    model = d / "model"
    model.mkdir()
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(model))
    tiny_tokenizer().save_pretrained(str(model))
    tasks = []
    for k in range(3):
        words = WORDS[k * 12 : (k + 1) * 12]
        rows = ["text,label"] + [f"{words[i % 6]} {words[6 + (i * 7) % 6]} {words[(i * 5) % 12]},{i % 2}" for i in range(40)]
        path = d / f"task{k}.csv"
        path.write_text("\n".join(rows) + "\n")
        tasks.append(TaskSpec(f"task{k}", 24, 8, 8, path=str(path)))
    return BenchmarkSpec(
        name="tiny", backbone=str(model), tasks=tuple(tasks),
        recipe=finetune.FinetuneRecipe(steps=4, batch_size=8, body_lr=1e-3, head_lr=1e-2, warmup_fraction=0.0),
        max_length=12, lambdas=(0.3, 0.6), search_per_task=5,
        adaptive_steps=(("adamerging_taskwise", 2), ("adamerging_layerwise", 2), ("adamerging_plusplus", 2),
                        ("adamerging_plusplus_taskwise", 2), ("symerge", 3)),
    )  # fmt: skip


def test_every_row_and_the_files(tiny_spec: BenchmarkSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []

    def spy(family, body, heads, splits, **kw):
        sizes.append({t: len(s) for t, s in splits.items()})
        return real_evaluate_tasks(family, body, heads, splits, **kw)

    monkeypatch.setattr("mergelab.experiment.runner.evaluate_tasks", spy)
    res = run_benchmark(tiny_spec, out_dir=tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    names = set(res["methods"])
    expected = {"individual", "pretrained", "average", "task_arithmetic", "task_arithmetic_0.3", "ties",
                "dare_task_arithmetic", "dare_ties", "se_merging_task_arithmetic", "se_prototype_task_arithmetic",
                "se_merging_task_arithmetic_cached", "se_prototype_ties", "se_prototype_task_arithmetic_fast", "adamerging_taskwise", "adamerging_layerwise",
                "adamerging_plusplus", "adamerging_plusplus_taskwise", "symerge", "task_arithmetic+symerge_heads", "ties+symerge_heads",
                "se_prototype_task_arithmetic_fast+symerge_heads"}
    assert expected <= names, expected - names
    for row in res["methods"].values():
        assert all(0 <= a <= 1 for a in row["per_task"].values())
    # searches read 5 validation examples per task; test evaluations the whole 8
    assert {5} == {n for s in sizes for n in s.values()} - {8}
    # Task Arithmetic at 0.3 is evaluated on test once, whichever row asks first
    ta, ta03 = res["methods"]["task_arithmetic"], res["methods"]["task_arithmetic_0.3"]
    if ta["params"]["scaling"] == 0.3:
        assert ta["per_task"] == ta03["per_task"]
        # individual, pretrained and 6 static rows evaluate on test, but the two at 0.3 share one evaluation
        # (7); then the 5 adaptive rows and the 2 static transfer rows, all through the one runner
        assert sum(1 for s in sizes if set(s.values()) == {8}) == 7 + 5 + 2
    # reuse of test features: the transfer rows rerun the static Task Arithmetic 0.3 and TIES bodies, and
    # SyMerge's pseudo-labels are each expert on its own test texts: three hits per task
    assert res["feature_cache"]["hits"] == 3 * len(res["tasks"])
    # (that a cached evaluation equals a fresh one is tests/test_methods.py's feature-cache test)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["methods"].keys() == res["methods"].keys()
    assert (tmp_path / "run" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_filter(tiny_spec: BenchmarkSpec, tmp_path: Path) -> None:
    res = run_benchmark(tiny_spec, cache_dir=tmp_path / "cache", progress=False,
                        rows=["task_arithmetic_0.3", "se_prototype_task_arithmetic_fast"])
    assert set(res["methods"]) == {"individual", "pretrained", "task_arithmetic_0.3", "se_prototype_task_arithmetic_fast"}
