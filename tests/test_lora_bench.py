"""A LoRA benchmark end to end on a tiny BERT (issue 16): LoRA experts trained with PEFT and cached as adapter
folders, every kind of row merging their factors, ``mergelab bench --benchmark NAME`` on it; text5-lora's spec."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mergelab.core import lora
from mergelab.core.errors import InputError
from mergelab.experiment.runner import run_benchmark
from mergelab.pools import finetune
from mergelab.pools.benchmarks import BenchmarkSpec, TaskSpec, get_benchmark
from mergelab.pools.finetune_lora import BERT_BODY_LINEARS, LoraRecipe
from tests.tiny_models import VOCAB, tiny_bert_config, tiny_tokenizer

peft = pytest.importorskip("peft")
WORDS = VOCAB[5:]
ROWS = ["task_arithmetic_0.3", "ties", "se_merging_task_arithmetic", "se_prototype_task_arithmetic_fast",
        "adamerging_layerwise", "symerge"]
# the six linears of each block (attention query/key/value/output, MLP intermediate/output), 2 blocks
LINEARS = [f"encoder.layer.{i}.{m}.weight" for i in range(2) for m in
           ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense")]


@pytest.fixture(scope="module")
def lora_spec(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkSpec:
    from transformers import BertModel

    d: Path = tmp_path_factory.mktemp("tiny-lora-bench")
    model = d / "model"
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(model))
    tiny_tokenizer().save_pretrained(str(model))
    tasks = []
    for k in range(3):
        words = WORDS[k * 12: (k + 1) * 12]
        rows = ["text,label"] + [f"{words[i % 6]} {words[6 + (i * 7) % 6]} {words[(i * 5) % 12]},{i % 2}"
                                 for i in range(40)]
        path = d / f"task{k}.csv"
        path.write_text("\n".join(rows) + "\n")
        tasks.append(TaskSpec(f"task{k}", 24, 8, 8, path=str(path)))
    return BenchmarkSpec(
        name="tiny-lora", backbone=str(model), tasks=tuple(tasks),
        recipe=finetune.FinetuneRecipe(steps=4, batch_size=8, body_lr=1e-2, head_lr=1e-2, warmup_fraction=0.0),
        max_length=12, lambdas=(0.3, 0.6), search_per_task=5, lora=LoraRecipe(rank=2, alpha=4.0),
        adaptive_steps=(("adamerging_layerwise", 2), ("symerge", 3)),
    )


def test_lora_benchmark_trains_adapters_caches_them_and_merges_their_factors(lora_spec, tmp_path, monkeypatch):
    from mergelab.methods.dynamic import se_merging

    stacks = []
    real = se_merging.StackedVectors.from_vectors

    def spy(vectors, device=None):
        stacks.append(real(vectors, device))
        return stacks[-1]

    monkeypatch.setattr(se_merging.StackedVectors, "from_vectors", staticmethod(spy))
    cache = tmp_path / "cache"
    res = run_benchmark(lora_spec, out_dir=tmp_path / "run", cache_dir=cache, progress=False, rows=ROWS)
    assert set(res["methods"]) == {"individual", "pretrained", *ROWS}
    for row in res["methods"].values():
        assert all(0 <= a <= 1 for a in row["per_task"].values())
    assert res["methods"]["individual"]["params"]["lora"]["rank"] == 2
    # each expert is a PEFT adapter folder in the cache (no full body), on the six linears of each block only
    entries = sorted(p for p in (cache / "experts-lora").iterdir() if p.name != ".locks")
    assert len(entries) == 3 and not (cache / "experts").exists()
    for entry in entries:
        assert sorted(p.name for p in entry.iterdir()) == ["adapter", "head.safetensors", "meta.json"]
        cfg = json.loads((entry / "adapter" / "adapter_config.json").read_text())
        assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["peft_type"] == "LORA"
        vec = lora.load_lora(entry / "adapter", lora_spec.family().pretrained_state())
        assert sorted(vec.modules) == sorted(LINEARS)
        assert all(float(m.B.abs().max()) > 0 for m in vec.modules.values())  # trained (PEFT starts B at 0)
    # the SE rows mixed the adapters' factors: no dense task vector stacked
    assert stacks and all(s.factors and not s.tensors for s in stacks)
    assert all(set(s.factors) == set(LINEARS) for s in stacks)
    # a second run reads the cached adapters and reproduces the rows
    again = run_benchmark(lora_spec, cache_dir=cache, progress=False, rows=ROWS[:3])
    assert all(e["cache_hit"] for e in again["experts"].values())
    for name in ("individual", *ROWS[:3]):
        assert again["methods"][name]["per_task"] == res["methods"][name]["per_task"], name


def test_bench_cli_runs_a_registered_lora_benchmark(lora_spec, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mergelab.cli import app
    from mergelab.pools import benchmarks

    monkeypatch.setitem(benchmarks.BENCHMARKS, lora_spec.name, lora_spec)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["bench", "--benchmark", "tiny-lora", "--row", "se_prototype_task_arithmetic",
                                   "--cache", str(tmp_path / "cache"), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"individual", "pretrained", "se_prototype_task_arithmetic"}
    assert (tmp_path / "cache" / "experts-lora").is_dir()


def test_text5_lora_spec_targets_the_attention_and_mlp_linears():
    from transformers import BertModel

    spec = get_benchmark("text5-lora")
    text5 = get_benchmark("text5")
    assert spec.tasks == text5.tasks and spec.seed == text5.seed and spec.max_length == text5.max_length
    assert spec.lora is not None and spec.lora.rank == 16
    names = [n for n, _ in BertModel(tiny_bert_config()).named_modules()]
    targeted = [n for n in names if re.fullmatch(spec.lora.target_modules, n)]
    assert [f"{n}.weight" for n in targeted] == LINEARS  # not the pooler, not the embeddings
    assert spec.lora.target_modules == BERT_BODY_LINEARS
    for bad, match in (({"rank": 0}, "'rank'"), ({"alpha": -1.0}, "'alpha'"), ({"dropout": 1.0}, "'dropout'"),
                       ({"target_modules": "("}, "'target_modules'")):
        with pytest.raises(InputError, match=match):
            LoraRecipe(**bad)
