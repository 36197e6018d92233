"""Tasks, splits, the offline sources and users' task files (fast)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mergelab.core.errors import InputError
from mergelab.pools.data import sources
from mergelab.pools.data.loaders import load_csv_task, load_hf_task, load_jsonl_task, load_user_task
from mergelab.pools.data.sources import SOURCES, TEXT_KIND, check_distinct_inputs, load_source
from mergelab.pools.data.tasks import TaskData, TextTask, split_task

WORDNET_PRESENT = (sources.WORDNET_DIR / "data.noun").is_file()


def toy_task(n: int = 100, n_classes: int = 3, groups: bool = False) -> TaskData:
    labels = [i % n_classes for i in range(n)]
    return TaskData(
        name="toy",
        inputs=[f"text number {i}" for i in range(n)],
        labels=labels,
        ids=[f"toy-{i}" for i in range(n)],
        groups=[f"g{i // 5}" for i in range(n)] if groups else None,
        label_names=[f"c{k}" for k in range(n_classes)],
        source="test",
    )


# ---------------------------------------------------------------------------------------------- sources
EXPECTED = {  # name: (minimum examples, number of classes)
    "rt_sentiment": (12000, 2),
    "rt_plot_vs_review": (13000, 2),
    "debate_party": (650, 3),
    "debate_speaker": (650, 9),
    "convention_party": (2500, 2),
    "bbc_topic": (2200, 5),
    "wordnet_noun": (80000, 26),
    "wordnet_verb": (13000, 15),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_is_sane(name: str) -> None:
    if name.startswith("wordnet") and not WORDNET_PRESENT:
        with pytest.raises(InputError, match=r"data\.(noun|verb)"):
            load_source(name)
        return
    task = load_source(name)
    min_n, n_classes = EXPECTED[name]
    assert task.name == name
    assert len(task) >= min_n
    assert task.n_classes == n_classes
    assert set(task.labels) == set(range(n_classes)), "every class has examples"
    assert len(set(task.ids)) == len(task)
    assert all(t.strip() for t in task.texts)
    assert task.source
    assert name in TEXT_KIND


def test_sources_are_deterministic() -> None:
    a, b = load_source("debate_party"), load_source("debate_party")
    assert a.ids == b.ids and a.texts == b.texts and a.labels == b.labels


def test_convention_groups_are_speeches() -> None:
    task = load_source("convention_party")
    assert task.groups is not None
    assert len(set(task.groups)) == 189
    for g, labels in _by_group(task).items():
        assert len(set(labels)) == 1, f"speech {g} has paragraphs of two parties"


def _by_group(task: TextTask) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for g, y in zip(task.groups or [], task.labels, strict=True):
        out.setdefault(g, []).append(y)
    return out


def test_wordnet_missing_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "WORDNET_DIR", tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"nowhere/data\.noun.*wordnet-base"):
        sources.load_wordnet_noun()


def test_missing_package_gives_clear_error() -> None:
    with pytest.raises(InputError, match="not installed"):
        sources.package_data_dir("surely_not_a_package_xyz", "data")


def test_tasks_sharing_texts_are_refused() -> None:
    check_distinct_inputs(["rt_sentiment", "bbc_topic", "debate_party", "convention_party", "wordnet_noun"])
    with pytest.raises(InputError, match="same input texts"):
        check_distinct_inputs(["rt_sentiment", "rt_plot_vs_review"])
    with pytest.raises(InputError, match="same input texts"):
        check_distinct_inputs(["debate_party", "bbc_topic", "debate_speaker"])


def test_unknown_source() -> None:
    with pytest.raises(InputError, match="unknown task source"):
        load_source("nope")


# ---------------------------------------------------------------------------------------------- splits
def _ids(splits: dict[str, TextTask]) -> dict[str, set[str]]:
    return {k: set(v.ids) for k, v in splits.items()}  # type: ignore[arg-type]


def test_split_sizes_no_leakage_stratified() -> None:
    task = toy_task(300, 3)
    sp = split_task(task, seed=0, n_train=150, n_val=60, n_test=90)
    assert [len(sp[k]) for k in ("train", "validation", "test")] == [150, 60, 90]
    ids = _ids(sp)
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    for part in sp.values():
        counts = Counter(part.labels)
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced task, stratified split
        assert part.label_names == task.label_names
        for i, t, y in zip(part.ids, part.texts, part.labels, strict=True):  # type: ignore[arg-type]
            k = task.ids.index(i)  # type: ignore[union-attr]
            assert task.texts[k] == t and task.labels[k] == y


def test_same_seed_same_split_other_seed_other_split() -> None:
    task = toy_task(200, 2)
    a = split_task(task, 7, 100, 40, 40)
    b = split_task(task, 7, 100, 40, 40)
    c = split_task(task, 8, 100, 40, 40)
    assert all(a[k].ids == b[k].ids for k in a)
    assert a["test"].ids != c["test"].ids


def test_test_split_does_not_move_when_train_size_changes() -> None:
    task = toy_task(300, 3)
    a = split_task(task, 0, 100, 50, 50)
    b = split_task(task, 0, 200, 50, 50)
    assert a["test"].ids == b["test"].ids and a["validation"].ids == b["validation"].ids


def test_imbalanced_stratification() -> None:
    labels = [0] * 900 + [1] * 100
    task = TextTask("imb", [f"t{i}" for i in range(1000)], labels, label_names=["a", "b"])
    sp = split_task(task, 0, 500, 100, 200)
    assert abs(Counter(sp["test"].labels)[1] - 20) <= 1
    assert abs(Counter(sp["validation"].labels)[1] - 10) <= 1


def test_grouped_split_groups_never_cross() -> None:
    task = toy_task(400, 2, groups=True)
    sp = split_task(task, 3, 200, 50, 80)
    groups = {k: set(v.groups or []) for k, v in sp.items()}
    assert not groups["train"] & groups["validation"]
    assert not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    assert len(sp["test"]) <= 80 and len(sp["validation"]) <= 50 and len(sp["train"]) <= 200
    assert len(sp["test"]) >= 70 and len(sp["validation"]) >= 40


def test_real_grouped_split_convention() -> None:
    task = load_source("convention_party")
    sp = split_task(task, 0, 1500, 300, 600)
    speech = {k: set(v.groups or []) for k, v in sp.items()}
    assert not speech["train"] & speech["test"] and not speech["validation"] & speech["test"]
    assert not speech["train"] & speech["validation"]
    assert len(sp["test"]) == 600 and len(sp["validation"]) == 300
    assert not _ids(sp)["train"] & _ids(sp)["test"]


def test_grouped_split_too_few_groups() -> None:
    task = TextTask("few", ["a", "b", "c", "d"], [0, 1, 0, 1], groups=["x", "x", "y", "y"])
    with pytest.raises(InputError, match="'few'.*too few"):
        split_task(task, 0, 2, 2, 2)


def test_split_errors_name_the_task() -> None:
    with pytest.raises(ValueError, match="'empty' is empty"):
        split_task(TextTask("empty", [], []), 0, 1, 1, 1)
    with pytest.raises(ValueError, match="'mono' has a single class"):
        split_task(TextTask("mono", ["a", "b", "c"], [0, 0, 0], label_names=["x", "y"]), 0, 1, 1, 1)
    with pytest.raises(ValueError, match="'small' has 100 examples"):
        split_task(toy_task(100).subset(range(100), name="small"), 0, 80, 20, 20)
    with pytest.raises(ValueError, match="n_val must be a positive int"):
        split_task(toy_task(100), 0, 10, 0, 10)


def test_task_construction_errors() -> None:
    with pytest.raises(ValueError, match=r"'bad'.*label 5, outside 0\.\.1"):
        TextTask("bad", ["a", "b"], [0, 5], label_names=["x", "y"])
    with pytest.raises(ValueError, match="'bad': 2 texts but 1 labels"):
        TextTask("bad", ["a", "b"], [0])
    with pytest.raises(ValueError, match="'bad'.*label -1"):
        TextTask("bad", ["a", "b"], [0, -1], label_names=["x", "y"])
    with pytest.raises(ValueError, match="id 'same' occurs more than once"):
        TextTask("bad", ["a", "b"], [0, 1], ids=["same", "same"])


# ---------------------------------------------------------------------------------------------- user files
def test_csv_with_label_names(tmp_path: Path) -> None:
    p = tmp_path / "reviews.csv"
    p.write_text('text,label\n"good, really",pos\nbad,neg\nfine,pos\n')
    task = load_user_task(p)
    assert task.name == "reviews"
    assert task.label_names == ["neg", "pos"]
    assert task.labels == [1, 0, 1]
    assert task.texts[0] == "good, really"
    assert len(set(task.ids)) == 3


def test_csv_int_labels_and_given_order(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("label,text\n0,a\n2,b\n1,c\n")
    assert load_csv_task(p).labels == [0, 2, 1]
    assert load_csv_task(p).label_names == ["0", "1", "2"]
    q = tmp_path / "n.csv"
    q.write_text("text,label\na,pos\nb,neg\n")
    task = load_csv_task(q, label_names=["pos", "neg"])
    assert task.labels == [0, 1]


def test_csv_errors_name_file_line_field(tmp_path: Path) -> None:
    p = tmp_path / "nohead.csv"
    p.write_text("sentence,label\na,1\n")
    with pytest.raises(InputError, match=r"nohead\.csv: line 1 \(header\): no field 'text'"):
        load_csv_task(p)
    q = tmp_path / "emptytext.csv"
    q.write_text("text,label\na,1\n  ,0\n")
    with pytest.raises(InputError, match=r"emptytext\.csv: line 3 \(row 2\): field 'text' is empty"):
        load_csv_task(q)
    r = tmp_path / "nolabel.csv"
    r.write_text("text,label\na,1\nb,\n")
    with pytest.raises(InputError, match=r"nolabel\.csv: line 3 \(row 2\): field 'label'"):
        load_csv_task(r)
    s = tmp_path / "names.csv"
    s.write_text("text,label\na,pos\nb,meh\n")
    with pytest.raises(InputError, match=r"names\.csv: line 3 \(row 2\): field 'label' is 'meh'"):
        load_csv_task(s, label_names=["pos", "neg"])
    e = tmp_path / "empty.csv"
    e.write_text("text,label\n")
    with pytest.raises(InputError, match=r"empty\.csv: no examples"):
        load_csv_task(e)
    with pytest.raises(InputError, match="no such file"):
        load_csv_task(tmp_path / "missing.csv")


def test_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y", "id": "b1"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_user_task(p, name="mine")
    assert task.name == "mine" and task.labels == [0, 1] and task.label_names == ["x", "y"]
    assert task.ids == ["t-1", "b1"]
    q = tmp_path / "ints.jsonl"
    q.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert load_jsonl_task(q).labels == [1, 0]


def test_jsonl_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(InputError, match=r"bad\.jsonl: line 2: not valid JSON"):
        load_jsonl_task(p)
    q = tmp_path / "nolabel.jsonl"
    q.write_text('{"text": "a", "label": 1}\n\n{"text": "b"}\n')
    with pytest.raises(InputError, match=r"nolabel\.jsonl: line 3: field 'label' is missing"):
        load_jsonl_task(q)
    r = tmp_path / "notext.jsonl"
    r.write_text('{"text": 3, "label": 1}\n')
    with pytest.raises(InputError, match=r"notext\.jsonl: line 1: field 'text' is int"):
        load_jsonl_task(r)
    m = tmp_path / "mixed.jsonl"
    m.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n')
    with pytest.raises(
        InputError, match=r"mixed\.jsonl: line 1: field 'label' is 1; .*all integers or all names"
    ):
        load_jsonl_task(m)
    n = tmp_path / "neg.jsonl"
    n.write_text('{"text": "a", "label": -1}\n')
    with pytest.raises(InputError, match=r"neg\.jsonl: line 1: .*start at 0"):
        load_jsonl_task(n)
    a = tmp_path / "arr.jsonl"
    a.write_text("[1, 2]\n")
    with pytest.raises(InputError, match=r"arr\.jsonl: line 1: expected a JSON object"):
        load_jsonl_task(a)


def test_user_task_dispatch_errors(tmp_path: Path) -> None:
    p = tmp_path / "t.xlsx"
    p.write_text("x")
    with pytest.raises(InputError, match="unknown task file type"):
        load_user_task(p)
    with pytest.raises(InputError, match="no such file"):
        load_user_task(tmp_path / "nope.parquet")


def test_hf_dataset_without_datasets_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(InputError, match="needs the 'datasets' package"):
        load_hf_task(tmp_path)
