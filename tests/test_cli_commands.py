"""Every command of the ``mergelab`` app through typer's test runner: config runs, run directories,
fine-tuning, reports, and bad input (exit status 2, one line, no traceback)."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.core import io

from .tiny_models import VOCAB, save_tiny_bert, tiny_bert_config, tiny_tokenizer

runner = CliRunner()
COMMANDS = ["merge", "bench", "adapt", "analyze", "finetune", "methods", "report"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    pre = save_tiny_bert(root / "pre", seed=0)
    for i, name in enumerate(["a", "b", "c"]):
        save_tiny_bert(root / name, seed=i + 1, perturb=0.02, base=pre)
    return root


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def sweep_config(root: Path, run_dir: Path, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        pool:
          pretrained: {root / 'pre'}
          experts: {{a: {root / 'a'}, b: {root / 'b'}, c: {root / 'c'}}}
        methods:
          - name: task_arithmetic
            params: {{scaling: [0.2, 0.5]}}
          - name: ties
            params: {{density: 0.3, scaling: 1.0}}
        outputs:
          run_dir: {run_dir}
        """) + extra


def check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG, path
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)


def assert_one_line_exit_2(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = result.output.strip()
    for needle in needles:
        assert needle in text, text
    return text


# ---------------------------------------------------------------------------------------------- help, version


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"mergelab {command}" in result.output


def test_top_level_help_lists_every_command_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    assert "--quiet" in result.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and mergelab.__version__ in version.output


def test_methods_lists_each_method_with_parameters():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in mergelab.methods.available():
        assert name in result.output
    assert "density" in result.output and "drop_rate" in result.output


# ---------------------------------------------------------------------------------------------- merge --config


def test_merge_config_runs_the_sweep_into_a_run_dir(pool, tmp_path):
    before = digest(pool)
    run_dir = tmp_path / "run"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(sweep_config(pool, run_dir))
    result = runner.invoke(app, ["merge", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert digest(pool) == before  # inputs untouched
    for name in ("config.yaml", "environment.json", "run.log", "results.json", "results.md", "report.md",
                 "report.html", "merge_coefficients.png"):
        assert (run_dir / name).is_file(), name
    res = json.loads((run_dir / "results.json").read_text())
    labels = ["task_arithmetic_scaling=0.2", "task_arithmetic_scaling=0.5", "ties_density=0.3_scaling=1.0"]
    assert list(res["merges"]) == labels and res["complete"] is True
    pre = io.load_state_dict(pool / "pre")
    experts = {t: io.load_state_dict(pool / t) for t in "abc"}
    for label, (method, params) in zip(labels, [("task_arithmetic", {"scaling": 0.2}),
                                                ("task_arithmetic", {"scaling": 0.5}),
                                                ("ties", {"density": 0.3, "scaling": 1.0})]):
        saved = io.load_state_dict(run_dir / "models" / label)
        expected = mergelab.merge(method, pre, experts, **params)
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[k], expected[k]) for k in expected), label
        assert res["merges"][label]["model_dir"] == f"models/{label}"
    # coefficient of each task vector, recomputed here from the flattened floating tensors
    keys = [k for k, v in pre.items() if v.is_floating_point()]
    flat = lambda sd: torch.cat([sd[k].double().flatten() for k in keys])  # noqa: E731
    merged = flat(io.load_state_dict(run_dir / "models" / labels[1]))
    delta = merged - flat(pre)
    for t in "abc":
        tau = flat(experts[t]) - flat(pre)
        assert res["merges"][labels[1]]["coefficient"][t] == pytest.approx(float(delta @ tau / (tau @ tau)), rel=1e-4)
        assert res["merges"][labels[1]]["cosine"][t] == pytest.approx(
            float(delta @ tau / (delta.norm() * tau.norm())), rel=1e-4)
    # the resolved config reproduces the run: same sweep, defaults written out
    from mergelab.experiment.config import load_config, sweep

    again = load_config(run_dir / "config.yaml")
    assert [p[0] for p in sweep(again)] == labels and again.outputs.save_models is True
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["mergelab"] == mergelab.__version__
    log = (run_dir / "run.log").read_text()
    assert all(label in log for label in labels)
    assert re.match(r"\d\d:\d\d:\d\d ", log)
    check_png(run_dir / "merge_coefficients.png")
    report = (run_dir / "report.md").read_text()
    c = res["merges"][labels[0]]["coefficient"]
    assert f"| {labels[0]} | task_arithmetic | scaling=0.2 | {c['a']:.3f} | {c['b']:.3f} | {c['c']:.3f} |" in report
    assert "](merge_coefficients.png)" in report and "## Environment" in report and "## Configuration" in report


def test_merge_config_device(pool, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(sweep_config(pool, tmp_path / "auto", "device: auto\n"))
    result = runner.invoke(app, ["-q", "merge", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "auto" / "environment.json").read_text())["device"] == "cpu"
    cfg.write_text(sweep_config(pool, tmp_path / "cuda", "device: cuda:1\n"))
    assert_one_line_exit_2(runner.invoke(app, ["merge", "-c", str(cfg)]), "device: 'cuda:1'", "no CUDA device")
    assert not (tmp_path / "cuda").exists()


def test_merge_config_out_overrides_run_dir_and_no_models(pool, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(sweep_config(pool, tmp_path / "ignored", "").replace("outputs:\n", "outputs:\n  save_models: false\n"))
    result = runner.invoke(app, ["--quiet", "merge", "-c", str(cfg), "--out", str(tmp_path / "here")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "ignored").exists()
    assert (tmp_path / "here" / "results.json").is_file() and not (tmp_path / "here" / "models").exists()
    assert "coefficient" not in result.output  # --quiet: only the summary line on the terminal
    assert "coefficient" in (tmp_path / "here" / "run.log").read_text()  # the log has everything
    assert f"run_dir: {tmp_path / 'here'}" in (tmp_path / "here" / "config.yaml").read_text()


def test_merge_config_relative_paths_from_the_config_folder(pool, tmp_path, monkeypatch):
    cfg = pool / "rel.yaml"
    cfg.write_text("pool: {pretrained: pre, experts: {a: a, b: b}}\nmethods: [{name: average}]\n"
                   "outputs: {save_models: false, report: false}\n")
    monkeypatch.chdir(tmp_path)
    try:
        result = runner.invoke(app, ["merge", "--config", str(cfg), "--out", "out"])
    finally:
        cfg.unlink()
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "results.json").is_file() and not (tmp_path / "out" / "report.html").exists()


def test_merge_flag_form_still_works(pool, tmp_path):
    result = runner.invoke(app, ["merge", "-m", "task_arithmetic", "-p", str(pool / "pre"), "-e", f"a={pool / 'a'}",
                                 "-e", f"b={pool / 'b'}", "--param", "scaling=0.4", "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    expected = mergelab.merge("task_arithmetic", io.load_state_dict(pool / "pre"),
                              {t: io.load_state_dict(pool / t) for t in "ab"}, scaling=0.4)
    saved = io.load_state_dict(tmp_path / "m")
    assert all(torch.equal(saved[k], v) for k, v in expected.items())


BAD_CONFIGS = [
    ("methods:\n  - name: ties\n    params: {density: 3}\n", ":7: methods[0].params.density"),
    ("methods:\n  - name: tis\n", ":6: methods[0].name: unknown merge method 'tis'"),
    ("methods:\n  - name: ties\n    params: {alpha: 3}\n", ":7: methods[0].params.alpha"),
    ("methods:\n  - name: ties\nseed: one\n", ":7: seed: expected a valid integer"),
    ("methods:\n  - name: ties\nsave_models: true\n", ":7: save_models: unknown field"),
]


@pytest.mark.parametrize("tail,needle", BAD_CONFIGS)
def test_merge_bad_config_exit_2_with_line(pool, tmp_path, tail, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"pool:\n  pretrained: {pool / 'pre'}\n  experts:\n    a: {pool / 'a'}\n" + tail)
    result = runner.invoke(app, ["merge", "--config", str(cfg), "--out", str(tmp_path / "run")])
    text = assert_one_line_exit_2(result, f"{cfg}{needle}")
    assert len(text.splitlines()) <= 3  # one message (the terminal may wrap it)
    assert not (tmp_path / "run").exists()


def test_merge_config_errors(pool, tmp_path):
    missing = runner.invoke(app, ["merge", "--config", str(tmp_path / "none.yaml")])
    assert_one_line_exit_2(missing, "none.yaml: no such configuration file")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(sweep_config(pool, tmp_path / "r"))
    both = runner.invoke(app, ["merge", "--config", str(cfg), "--method", "ties"])
    assert_one_line_exit_2(both, "drop --method")
    assert_one_line_exit_2(runner.invoke(app, ["merge"]), "missing --method, --pretrained, --expert, --out")
    bench_cfg = tmp_path / "b.yaml"
    bench_cfg.write_text("benchmark: {name: reduced}\n")
    assert_one_line_exit_2(runner.invoke(app, ["merge", "--config", str(bench_cfg)]), "mergelab bench --config")
    # a run directory inside an input is refused before anything is written
    inside = runner.invoke(app, ["merge", "--config", str(cfg), "--out", str(pool / "a" / "run")])
    assert_one_line_exit_2(inside, "would overwrite the input")
    assert not (pool / "a" / "run").exists()
    gone = tmp_path / "gone.yaml"
    gone.write_text(sweep_config(pool, tmp_path / "g").replace(str(pool / "c"), str(tmp_path / "no-such-expert")))
    assert_one_line_exit_2(runner.invoke(app, ["merge", "-c", str(gone)]), "pool.experts.c", "no-such-expert")
    # bad input found mid-run removes the run directory this command created: refused input leaves nothing
    assert not (tmp_path / "g").exists()


def test_hub_config_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = Path(__file__).resolve().parent.parent
    result = runner.invoke(app, ["merge", "--config", str(root / "configs" / "hub_llm_sweep.yaml"),
                                 "--out", str(tmp_path / "hub")])
    assert_one_line_exit_2(result, "Qwen/Qwen2.5-0.5B", "hub is disabled")


# ---------------------------------------------------------------------------------------------- bench


WORDS = VOCAB[5:]


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    """A registered benchmark 'tiny-cli': a tiny BERT and two CSV tasks; experts fine-tune in a second."""
    from transformers import BertModel

    from mergelab.pools import finetune
    from mergelab.pools.benchmarks import BENCHMARKS, BenchmarkSpec, TaskSpec

    d = tmp_path_factory.mktemp("tiny-bench")
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(d / "model"))
    tiny_tokenizer().save_pretrained(str(d / "model"))
    tasks = []
    for k in range(2):
        words = WORDS[k * 12 : (k + 1) * 12]
        rows = ["text,label"] + [f"{words[(i % 2) * 6 + i % 6]} {words[(i % 2) * 6 + (i * 5) % 6]},{i % 2}"
                                 for i in range(40)]
        (d / f"task{k}.csv").write_text("\n".join(rows) + "\n")
        tasks.append(TaskSpec(f"task{k}", 24, 8, 8, path=str(d / f"task{k}.csv")))
    spec = BenchmarkSpec(name="tiny-cli", backbone=str(d / "model"), tasks=tuple(tasks),
                         recipe=finetune.FinetuneRecipe(steps=4, batch_size=8, body_lr=1e-3, head_lr=1e-2,
                                                        warmup_fraction=0.0),
                         max_length=12, lambdas=(0.3, 0.6), search_per_task=5)
    BENCHMARKS[spec.name] = spec
    yield spec, d
    BENCHMARKS.pop(spec.name, None)


def test_bench_config_writes_a_complete_run_dir_and_report(tiny_benchmark, tmp_path):
    spec, d = tiny_benchmark
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(f"benchmark:\n  name: tiny-cli\n  rows: [task_arithmetic_0.3, ties]\n  cache: {tmp_path / 'cache'}\n"
                   f"outputs:\n  run_dir: {tmp_path / 'run'}\n")
    result = runner.invoke(app, ["--quiet", "bench", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    # the keys scripts read are unchanged
    assert {"benchmark", "tasks", "methods", "splits", "experts", "environment", "seconds_total"} <= set(res)
    assert set(res["methods"]) == {"individual", "pretrained", "task_arithmetic_0.3", "ties"}
    for name in ("results.md", "accuracy.png", "config.yaml", "environment.json", "run.log", "report.md",
                 "report.html", "report_accuracy.png"):
        assert (run / name).is_file(), name
    log = (run / "run.log").read_text()
    assert "tiny-cli" in log and "task_arithmetic_0.3" in log and "test accuracy" in log  # rows and the table
    # the report's table holds results.json's numbers
    md = (run / "report.md").read_text()
    ties = res["methods"]["ties"]
    row = next(line for line in md.splitlines() if line.startswith("| ties |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # each accuracy with its binomial standard error sqrt(p (1 - p) / n), n the task's test-set size
    se = {t: (ties["per_task"][t] * (1 - ties["per_task"][t]) / res["splits"][t]["test"]) ** 0.5 for t in res["tasks"]}
    assert cells[1] == "validation"  # what the row read: TIES searches its scaling on labeled validation data
    assert cells[2:4] == [f"{100 * ties['per_task'][t]:.1f} ±{100 * se[t]:.1f}" for t in res["tasks"]]
    avg_se = sum(s * s for s in se.values()) ** 0.5 / len(se)
    assert cells[4] == f"{100 * ties['average']:.1f} ±{100 * avg_se:.1f}"
    assert cells[5] == f"{100 * ties['normalized_average']:.1f}"
    # images: valid PNGs, referenced by the Markdown and embedded in the HTML
    for png in ("report_accuracy.png", "accuracy.png"):
        check_png(run / png)
    assert "](report_accuracy.png)" in md
    html = (run / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    import base64

    assert embedded and all(base64.b64decode(e)[:8] == PNG for e in embedded)
    assert base64.b64decode(embedded[0]) == (run / "report_accuracy.png").read_bytes()


def test_bench_flag_form_writes_config_and_log(tiny_benchmark, tmp_path):
    result = runner.invoke(app, ["bench", "-b", "tiny-cli", "--row", "average", "--cache", str(tmp_path / "cache"),
                                 "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    assert "results:" in result.output and "average" in result.output
    from mergelab.experiment.config import load_config

    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg.benchmark.name == "tiny-cli" and cfg.benchmark.rows == ["average"]
    assert (tmp_path / "run" / "run.log").read_text().strip()


def test_bench_config_on_user_task_files(tiny_benchmark, tmp_path):
    """A config naming the user's own CSV files (``benchmark.tasks``) runs through the same runner: the
    static row equals ``methods.merge`` evaluated here on the experts the run cached, the experts row each
    expert's own accuracy, and the resolved config records the files."""
    from mergelab import methods
    from mergelab.experiment.config import load_config
    from mergelab.experiment.results import read_results
    from mergelab.experiment.rundir import benchmark_spec
    from mergelab.experiment.runner import load_context
    from mergelab.pools.evaluate import evaluate_tasks

    _, d = tiny_benchmark
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"benchmark:\n  name: tiny-cli\n  tasks: {{reviews: {d / 'task0.csv'}, news: {d / 'task1.csv'}}}\n"
                   f"  rows: [task_arithmetic_0.3]\n  cache: {tmp_path / 'cache'}\n")
    result = runner.invoke(app, ["--quiet", "bench", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    res = read_results(tmp_path / "run" / "results.json")
    assert res.tasks == ["reviews", "news"] and set(res.methods) == {"individual", "pretrained", "task_arithmetic_0.3"}
    pool = load_context(benchmark_spec(load_config(cfg)), cache_dir=tmp_path / "cache", progress=False)
    assert all(m.get("cache_hit") for m in pool.expert_meta.values())  # the run's experts, not new ones
    test = {t: s["test"] for t, s in pool.splits.items()}
    merged = methods.merge("task_arithmetic", pool.pretrained, pool.experts, scaling=0.3)
    assert res.methods["task_arithmetic_0.3"].per_task == pytest.approx(
        evaluate_tasks(pool.family, merged, pool.heads, test))
    for t in pool.tasks:
        assert res.methods["individual"].per_task[t] == pytest.approx(
            evaluate_tasks(pool.family, pool.experts[t], {t: pool.heads[t]}, {t: test[t]})[t])
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.benchmark.tasks == {"reviews": str(d / "task0.csv"), "news": str(d / "task1.csv")}


def test_bench_pool_config_errors(pool, tmp_path):
    """A pool config for bench: an unknown evaluation row names its line; a pool without task data, or
    with too few examples to hold out, is refused naming the key; merge --config refuses a pool config
    with no methods."""
    base = f"pool:\n  pretrained: {pool / 'pre'}\n  experts: {{a: {pool / 'a'}, b: {pool / 'b'}}}\n"
    bad = tmp_path / "b.yaml"
    bad.write_text(base + "evaluation:\n  rows: [tie]\n")
    assert_one_line_exit_2(runner.invoke(app, ["bench", "-c", str(bad), "--out", str(tmp_path / "r")]),
                           f"{bad}:5: evaluation.rows[0]: unknown row 'tie'")
    bad.write_text(base + "evaluation:\n  rows: [average]\n")
    assert_one_line_exit_2(runner.invoke(app, ["bench", "-c", str(bad), "--out", str(tmp_path / "r")]),
                           "pool.tasks: none")
    assert not (tmp_path / "r").exists()
    (tmp_path / "a.csv").write_text("text,label\nthe movie,0\nbad film,1\n")
    bad.write_text(base + f"  tasks: {{a: {{path: {tmp_path / 'a.csv'}}}, b: {{path: {tmp_path / 'a.csv'}}}}}\n"
                   "evaluation:\n  rows: [average]\n  validation_per_task: 2\n")
    assert_one_line_exit_2(runner.invoke(app, ["bench", "-c", str(bad), "--out", str(tmp_path / "r")]),
                           "pool.tasks.a: 2 examples")
    assert_one_line_exit_2(runner.invoke(app, ["merge", "-c", str(bad), "--out", str(tmp_path / "m")]),
                           "methods: none")


def test_bench_bad_input_exit_2(tmp_path):
    assert_one_line_exit_2(runner.invoke(app, ["bench", "--row", "tie", "--out", str(tmp_path / "r")]), "--row 'tie'")
    assert not (tmp_path / "r").exists()
    bad = tmp_path / "b.yaml"
    bad.write_text("benchmark:\n  name: text5\n  row: [ties]\n")
    assert_one_line_exit_2(runner.invoke(app, ["bench", "-c", str(bad)]), f"{bad}:3: benchmark.row: unknown field")
    bad.write_text("benchmark: {name: text5}\n")
    assert_one_line_exit_2(runner.invoke(app, ["bench", "-c", str(bad), "--row", "ties"]), "drop --row")
    assert_one_line_exit_2(runner.invoke(app, ["bench", "-b", "nope"]), "unknown benchmark 'nope'")
    assert_one_line_exit_2(runner.invoke(app, ["bench", "-c", str(tmp_path / "missing.yaml")]), "no such configuration")


# ---------------------------------------------------------------------------------------------- finetune


def test_finetune_saves_an_hf_expert_equal_to_train_expert(tiny_benchmark, tmp_path):
    from transformers import AutoModel

    from mergelab.pools.data.loaders import load_user_task
    from mergelab.pools.data.tasks import split_task
    from mergelab.pools.families.text import TextClassifierFamily
    from mergelab.pools.finetune import FinetuneRecipe, train_expert

    spec, d = tiny_benchmark
    task_file = d / "task0.csv"
    before = digest(d)
    out = tmp_path / "expert"
    result = runner.invoke(app, ["finetune", "--task", f"mine={task_file}", "--out", str(out), "--backbone",
                                 str(d / "model"), "--steps", "3", "--batch-size", "8", "--max-length", "12",
                                 "--no-cache", "-q"])
    assert result.exit_code == 0, result.output
    assert digest(d) == before
    meta = json.loads((out / "expert.json").read_text())
    assert meta["task"] == "mine" and meta["label_names"] == ["0", "1"]
    assert meta["sizes"] == {"train": 28, "validation": 4, "test": 8}  # 40 examples, holdout 0.2
    assert set(meta["accuracy"]) == {"validation", "test"} and all(0 <= a <= 1 for a in meta["accuracy"].values())
    # the same recipe and split, trained here, gives the same weights
    recipe = FinetuneRecipe(steps=3, batch_size=8, body_lr=3e-4, head_lr=2e-3, seed=0)
    family = TextClassifierFamily(d / "model", max_length=12)
    train = split_task(load_user_task(task_file, name="mine"), 0, 28, 4, 8)["train"]
    ref = train_expert(family, train, recipe, progress=False)
    saved = io.load_state_dict(out)
    assert saved.keys() == ref.body_state.keys()
    assert all(torch.equal(saved[k], ref.body_state[k]) for k in saved)
    from safetensors.torch import load_file

    head = load_file(str(out / "head.safetensors"))
    assert torch.equal(head["weight"], ref.head.weight) and head["weight"].shape == (2, 32)
    model = AutoModel.from_pretrained(str(out))  # a Hugging Face folder, usable as a pool expert
    assert torch.equal(model.state_dict()["encoder.layer.0.attention.self.query.weight"],
                       ref.body_state["encoder.layer.0.attention.self.query.weight"])


def test_finetuned_experts_merge_with_a_backbone_that_stores_position_ids(tiny_benchmark, tmp_path):
    """Packaged checkpoints (all-MiniLM-L6-v2) hold the integer buffer embeddings.position_ids, which the
    module's state dict leaves out; the saved expert must still merge with that folder as the pretrained model."""
    import shutil

    from safetensors.torch import save_file

    spec, d = tiny_benchmark
    backbone = tmp_path / "backbone"
    shutil.copytree(d / "model", backbone)
    sd = io.load_state_dict(backbone)
    assert "embeddings.position_ids" not in sd
    sd["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    save_file(sd, str(backbone / "model.safetensors"))
    for k in range(2):
        result = runner.invoke(app, ["-q", "finetune", "--task", f"t{k}={d / f'task{k}.csv'}", "--out",
                                     str(tmp_path / f"e{k}"), "--backbone", str(backbone), "--steps", "2",
                                     "--batch-size", "8", "--max-length", "12", "--no-cache", "--holdout", "0"])
        assert result.exit_code == 0, result.output
    saved = io.load_state_dict(tmp_path / "e0")
    assert torch.equal(saved["embeddings.position_ids"], sd["embeddings.position_ids"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"pool: {{pretrained: {backbone}, experts: {{t0: {tmp_path / 'e0'}, t1: {tmp_path / 'e1'}}}}}\n"
                   f"methods: [{{name: ties}}]\noutputs: {{run_dir: {tmp_path / 'run'}}}\n")
    result = runner.invoke(app, ["-q", "merge", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "models" / "ties" / "model.safetensors").is_file()


@pytest.mark.parametrize("args,needle", [
    (["--task", "nofile"], "expected NAME=PATH"),
    (["--task", "t=/no/such.csv"], "/no/such.csv"),
    (["--task", "t=x.csv", "--holdout", "1.5"], "--holdout 1.5"),
    (["--task", "t=x.csv", "--steps", "0"], "steps"),
    (["--task", "t=x.csv", "--backbone", "/no/model"], "/no/model"),
])
def test_finetune_bad_input_exit_2(tmp_path, args, needle):
    (tmp_path / "x.csv").write_text("text,label\nthe movie,0\n")
    result = runner.invoke(app, ["finetune", *[a.replace("x.csv", str(tmp_path / "x.csv")) for a in args],
                                 "--out", str(tmp_path / "o")])
    assert_one_line_exit_2(result, needle)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- report, adapt, analyze


def test_adapt_and_analyze_write_options_environment_and_log(tiny_benchmark, tmp_path):
    """adapt and analyze have no config file: options.json records the command with every default filled in."""
    cache = str(tmp_path / "cache")
    adapt = tmp_path / "adapt"
    result = runner.invoke(app, ["-q", "adapt", "-b", "tiny-cli", "-m", "adamerging_taskwise", "--steps", "2",
                                 "--seed", "4", "--cache", cache, "--out", str(adapt)])
    assert result.exit_code == 0, result.output
    opts = json.loads((adapt / "options.json").read_text())
    assert opts["command"] == "adapt"
    assert opts["options"] | {"out": None} == {
        "method": "adamerging_taskwise", "benchmark": "tiny-cli", "config": None, "steps": 2, "out": None, "lr": None,
        "seed": 4, "task_layer": "head", "loss": "selflabel", "clamp": True, "adapt_split": "test", "cache": cache,
        "save_models": False, "evaluate": True, "threads": None}
    env = json.loads((adapt / "environment.json").read_text())
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    log = (adapt / "run.log").read_text()
    assert "adamerging_taskwise: test average" in log and "2 steps" in log
    assert json.loads((adapt / "result.json").read_text())["steps"] == 2
    assert runner.invoke(app, ["report", str(adapt)]).exit_code == 0
    assert "## Command and options" in (adapt / "report.md").read_text()

    analysis = tmp_path / "an"
    result = runner.invoke(app, ["-q", "analyze", "routing", "-b", "tiny-cli", "--n-per-task", "4", "--layer", "1",
                                 "--cache", cache, "--out", str(analysis)])
    assert result.exit_code == 0, result.output
    opts = json.loads((analysis / "options.json").read_text())
    assert opts["command"] == "analyze" and opts["options"]["kind"] == "routing"
    assert opts["options"]["router"]["layer"] == 1 and opts["options"]["n_per_task"] == 4
    assert (analysis / "environment.json").is_file() and (analysis / "probe_study.json").is_file()
    assert "probe_study.json" in (analysis / "run.log").read_text()
    # bad input found once the run started removes the folder the command created
    gone = tmp_path / "gone"
    bad = runner.invoke(app, ["adapt", "-b", "nope", "-m", "symerge", "--out", str(gone)])
    assert bad.exit_code == 2 and not gone.exists()




def test_report_of_an_adapt_and_analysis_folder(tmp_path):
    from mergelab.experiment import plots

    run = tmp_path / "adapt"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({
        "benchmark": "tiny", "method": "symerge", "per_task": {"x": 0.8, "y": 0.6}, "average": 0.7,
        "normalized_average": 0.875, "expert_per_task": {"x": 0.9, "y": 0.7}}))
    routing = {"tasks": ["x", "y"], "confusion": [[8, 2], [3, 7]], "normalisation": "relative", "layer": 1,
               "accuracy": 0.75, "mean_entropy": 0.3, "max_entropy": 0.69}
    plots.routing_plot(routing, run / "analysis" / "routing_confusion.png")
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    md = (run / "report.md").read_text()
    assert "| symerge | 80.0 | 60.0 | 70.0 | 87.5 |" in md
    assert "| individual | 90.0 | 70.0 | 80.0 | 100.0 |" in md
    assert "](analysis/routing_confusion.png)" in md and "routing confusion" in md.lower()
    check_png(run / "report_accuracy.png")
    check_png(run / "analysis" / "routing_confusion.png")
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2


def test_report_of_plots_only(tmp_path):
    from mergelab.experiment import plots

    sweep = [{"layer": i, "exact": {"average": 0.5 + i / 20, "seconds_per_sample": 0.01},
              "fast": {"average": 0.55, "seconds_per_sample": 0.004}} for i in (1, 2)]
    plots.probe_sweep_plot(sweep, tmp_path / "probe_sweep.png")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "probe layer" in (tmp_path / "report.md").read_text()


def test_report_bad_input_exit_2(tmp_path):
    assert_one_line_exit_2(runner.invoke(app, ["report", str(tmp_path / "none")]), "no such run directory")
    (tmp_path / "f.txt").write_text("x")
    assert_one_line_exit_2(runner.invoke(app, ["report", str(tmp_path / "f.txt")]), "not a folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_exit_2(runner.invoke(app, ["report", str(tmp_path / "empty")]), "no results.json")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    assert_one_line_exit_2(runner.invoke(app, ["report", str(tmp_path / "broken")]), "results.json: not valid JSON")


def test_adapt_and_analyze_bad_input_exit_2(tmp_path):
    adapt = runner.invoke(app, ["adapt", "--method", "nope", "--out", str(tmp_path / "a")])
    assert_one_line_exit_2(adapt, "--method 'nope'")
    quiet_adapt = runner.invoke(app, ["--quiet", "adapt", "--method", "symerge", "--steps", "-1", "--out", str(tmp_path)])
    assert_one_line_exit_2(quiet_adapt, "--steps -1")
    analyze = runner.invoke(app, ["analyze", "nonsense"])
    assert_one_line_exit_2(analyze, "unknown analysis 'nonsense'")


def test_report_draws_routing_and_learned_coefficients_from_bench_results(tmp_path):
    conf = [[45, 5], [12, 38]]
    per_task = {"x": 45 / 50, "y": 38 / 50}
    row = {"per_task": {"x": 0.7, "y": 0.6}, "average": 0.65, "normalized_average": 0.9, "seconds": 1}
    results = {"benchmark": "synthetic", "tasks": ["x", "y"], "methods": {
        "individual": {**row, "per_task": {"x": 0.8, "y": 0.64}, "average": 0.72, "normalized_average": 1.0},
        "se_merging_task_arithmetic": {**row, "routing": {"routing_accuracy": 83 / 100, "routing_accuracy_per_task": per_task,
                                                          "confusion": conf, "mean_weight_entropy": 0.41}},
        "symerge": {**row, "params": {"coefficient_mean": {"x": 0.31, "y": 0.27}}},
    }}
    (tmp_path / "results.json").write_text(json.dumps(results))
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report.md").read_text()
    # routing accuracy overall and per task: the confusion's diagonal over its rows, computed here
    assert "| se_merging_task_arithmetic | 83.0 | 90.0 | 76.0 | 0.41 |" in md
    for png in ("report_accuracy.png", "report_routing.png", "report_coefficients.png"):
        check_png(tmp_path / png)
        assert f"]({png})" in md
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 3


def test_bench_steps_override_the_benchmarks_adaptation_budget(tiny_benchmark, tmp_path):
    result = runner.invoke(app, ["bench", "-b", "tiny-cli", "--row", "adamerging_taskwise", "--steps",
                                 "adamerging_taskwise=2", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    from mergelab.experiment.config import load_config
    from mergelab.experiment.results import read_results

    assert read_results(tmp_path / "run" / "results.json").methods["adamerging_taskwise"].params["steps"] == 2
    assert load_config(tmp_path / "run" / "config.yaml").benchmark.steps == {"adamerging_taskwise": 2}
    for bad, says in (("ties=3", "'ties' is no adaptive method"), ("symerge=-1", "non-negative integer"),
                      ("symerge", "expected METHOD=N")):
        assert_one_line_exit_2(runner.invoke(app, ["bench", "--steps", bad, "--out", str(tmp_path / "r")]), says)
    assert not (tmp_path / "r").exists()
    cfg = tmp_path / "s.yaml"
    cfg.write_text("benchmark:\n  name: text5\n  steps: {average: 3}\n")
    assert_one_line_exit_2(runner.invoke(app, ["bench", "-c", str(cfg)]), "is no adaptive method")


def test_error_messages_print_brackets_verbatim(tmp_path):
    # rich would read "[x]" (or "[cluster]" in "pip install 'mergelab[cluster]'") as markup and drop it
    missing = tmp_path / "[x].csv"
    assert_one_line_exit_2(runner.invoke(app, ["bench", "--task", f"a={missing}", "--out", str(tmp_path / "r")]),
                           f"{missing}: no such file")
