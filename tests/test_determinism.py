"""Determinism: the same inputs, parameters and seed give bit-identical merged weights (DARE included),
in one process, across processes and across thread counts, and identical benchmark accuracies."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mergelab
from mergelab.core import io
from mergelab.experiment.runner import run_benchmark
from mergelab.pools import finetune
from mergelab.pools.benchmarks import BenchmarkSpec, TaskSpec

from .tiny_models import VOCAB, save_tiny_bert, tiny_bert_config, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
METHODS = [("average", {}), ("task_arithmetic", {"scaling": 0.4}), ("ties", {"density": 0.3}),
           ("dare", {"drop_rate": 0.7, "seed": 7}), ("dare", {"drop_rate": 0.5, "seed": 3, "combine": "ties"})]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("det-pool")
    pre = save_tiny_bert(root / "pre", seed=0)
    experts = {n: save_tiny_bert(root / n, seed=s, perturb=0.02, base=pre) for n, s in (("a", 1), ("b", 2), ("c", 3))}
    return pre, experts


def _load(pool):
    pre, experts = pool
    return io.load_state_dict(pre), {n: io.load_state_dict(p) for n, p in experts.items()}


@pytest.mark.parametrize("method,params", METHODS)
def test_same_seed_same_weights_in_process(pool, method, params):
    pre, experts = _load(pool)
    first = mergelab.merge(method, pre, experts, **params)
    second = mergelab.merge(method, *_load(pool), **params)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_dare_seed_matters(pool):
    """Not vacuous: another seed drops other entries."""
    pre, experts = _load(pool)
    one = mergelab.merge("dare", pre, experts, drop_rate=0.7, seed=7)
    other = mergelab.merge("dare", pre, experts, drop_rate=0.7, seed=8)
    assert any(not torch.equal(one[k], other[k]) for k in one if one[k].is_floating_point())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CHILD = r'''
import hashlib, sys, torch
from pathlib import Path
from mergelab.cli import app
from mergelab.pools import finetune as ft
from mergelab.pools.data.tasks import TextTask
from mergelab.pools.families.text import TextClassifierFamily

pre, words, merge_args = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
try:  # the real command line, in this fresh interpreter
    app(merge_args, prog_name="mergelab")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
# fine-tuning with the same thread count in every child (thread count changes the low bits)
torch.set_num_threads(1)
family = TextClassifierFamily(Path(pre), max_length=16)
texts = [f"{words[i % 7]} {words[7 + (i * 3) % 9]} {words[(i * 5) % 20]}" for i in range(48)]
task = TextTask("t", texts, [i % 2 for i in range(48)], label_names=["n", "p"])
expert = ft.train_expert(family, task, ft.FinetuneRecipe(steps=8, batch_size=16, body_lr=1e-3, head_lr=1e-2),
                         progress=False)
h = hashlib.sha256()
for k in sorted(expert.body_state):
    h.update(k.encode())
    h.update(expert.body_state[k].numpy().tobytes())
h.update(expert.head.weight.detach().numpy().tobytes())
print("DIGEST", h.hexdigest())
'''


def test_bit_identical_across_processes_and_threads(pool, tmp_path):
    """Two fresh interpreters (1 and 2 threads) run `mergelab merge` (DARE then TIES) and write
    byte-identical model.safetensors, equal to this process's merge; and they fine-tune an expert (dropout
    on, one thread each) to the same bits."""
    pre, experts = pool
    method, params = METHODS[4]
    args = ["merge", "-m", method, "-p", str(pre)]
    for name, path in experts.items():
        args += ["-e", f"{name}={path}"]
    for k, v in params.items():
        args += ["--param", f"{k}={v}"]
    procs = []
    for threads in (1, 2):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(pre), " ".join(VOCAB[5:]), *args,
                                       "-o", str(tmp_path / f"t{threads}")],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    finetuned = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()
        finetuned += [line.split()[1] for line in out.decode().splitlines() if line.startswith("DIGEST")]
    pre_sd, expert_sds = _load(pool)
    here = io.save_model(mergelab.merge(method, pre_sd, expert_sds, **params), tmp_path / "here", like=pre)
    digests = {_sha(d / "model.safetensors") for d in (tmp_path / "t1", tmp_path / "t2", here)}
    assert len(digests) == 1
    assert len(finetuned) == 2 and finetuned[0] == finetuned[1]


# ---------------------------------------------------------------------------------------------- benchmark
@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> BenchmarkSpec:
    from transformers import BertModel

    d = tmp_path_factory.mktemp("det-bench")
    model = d / "model"
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(model))
    tiny_tokenizer().save_pretrained(str(model))
    words = VOCAB[5:]
    tasks = []
    for k in range(2):
        w = words[k * 12 : (k + 1) * 12]
        rows = ["text,label"] + [f"{w[i % 6]} {w[6 + (i * 7) % 6]} {w[(i * 5) % 12]},{i % 2}" for i in range(40)]
        (d / f"task{k}.csv").write_text("\n".join(rows) + "\n")
        tasks.append(TaskSpec(f"task{k}", 24, 8, 8, path=str(d / f"task{k}.csv")))
    return BenchmarkSpec(
        name="tiny-det", backbone=str(model), tasks=tuple(tasks),
        recipe=finetune.FinetuneRecipe(steps=6, batch_size=8, body_lr=1e-3, head_lr=1e-2, warmup_fraction=0.0),
        max_length=12, lambdas=(0.3, 0.6), search_per_task=5,
        adaptive_steps=(("adamerging_taskwise", 2), ("symerge", 2)),
    )  # fmt: skip


def _untimed(d: dict) -> dict:
    """Everything but wall-clock measurements (``seconds_per_step`` and the like)."""
    return {k: v for k, v in d.items() if "second" not in k}


ROWS = ["task_arithmetic", "dare_task_arithmetic", "dare_ties", "se_prototype_task_arithmetic_fast",
        "adamerging_taskwise", "symerge"]


def test_bench_twice_identical_accuracies_and_experts(tiny_spec, tmp_path):
    """Two runs with separate expert caches: the experts are fine-tuned twice to the same bits, and every
    row's accuracies, chosen parameters and validation scores are identical."""
    runs = [run_benchmark(tiny_spec, out_dir=tmp_path / f"run{i}", cache_dir=tmp_path / f"cache{i}", rows=ROWS,
                          progress=False) for i in range(2)]
    assert set(runs[0]["methods"]) >= set(ROWS)
    for name, row in runs[0]["methods"].items():
        other = runs[1]["methods"][name]
        assert row["per_task"] == other["per_task"], name
        assert _untimed(row["params"]) == _untimed(other["params"]), name
        assert row.get("validation") == other.get("validation"), name
    saved = [json.loads((tmp_path / f"run{i}" / "results.json").read_text()) for i in range(2)]
    assert [{n: r["per_task"] for n, r in s["methods"].items()} for s in saved][0] == \
           {n: r["per_task"] for n, r in saved[1]["methods"].items()}
    bodies = [{p.parent.name: _sha(p) for p in (tmp_path / f"cache{i}" / "experts").glob("*/body.safetensors")}
              for i in range(2)]
    assert len(bodies[0]) == 2 and bodies[0] == bodies[1]

