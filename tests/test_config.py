"""Run configuration files: the schema, sweeps, relative paths, and errors naming file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from mergelab.core.errors import InputError
from mergelab.experiment.config import ConfigError, RunConfig, load_config, parse_config, sweep

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

GOOD = """\
pool:
  pretrained: base
  experts:
    a: ea
    b: eb
methods:
  - name: task_arithmetic
    params:
      scaling: [0.2, 0.4]
  - name: ties
    params: {density: [0.1, 0.2, 0.3], scaling: [0.5, 1.0], scope: tensor}
  - name: average
  - name: average
    label: weighted
    params:
      weights: [[2, 1]]
outputs:
  run_dir: runs/x
  save_models: false
seed: 3
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_and_sweep_order(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.kind == "merge" and cfg.seed == 3 and cfg.outputs.save_models is False
    points = sweep(cfg)
    # 2 + 3 x 2 + 1 + 1 merges; the cartesian product runs in the order the keys are written
    assert len(points) == 10
    assert [p[2]["scaling"] for p in points[:2]] == [0.2, 0.4]
    ties = [(p[2]["density"], p[2]["scaling"]) for p in points[2:8]]
    assert ties == [(0.1, 0.5), (0.1, 1.0), (0.2, 0.5), (0.2, 1.0), (0.3, 0.5), (0.3, 1.0)]
    assert all(p[2]["scope"] == "tensor" for p in points[2:8])
    labels = [p[0] for p in points]
    assert len(set(labels)) == len(labels)
    assert labels[0] == "task_arithmetic_scaling=0.2"
    assert labels[8] == "average"
    # a list of lists is one merge whose value is the inner list
    assert points[9][0].startswith("weighted_") and points[9][2] == {"weights": [2, 1]}


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    again = parse_config(yaml.safe_dump(cfg.resolved_dict()), check_methods=True)
    assert again == cfg
    assert again.outputs.plots is True  # defaults are written out


def test_relative_pool_paths_follow_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base").mkdir()
    (tmp_path / "cfg" / "ea").mkdir()
    path = write(tmp_path / "cfg", "pool: {pretrained: base, experts: {a: ea, b: missing}}\nmethods: [{name: average}]\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert Path(cfg.pool.pretrained) == (tmp_path / "cfg" / "base").resolve()
    assert Path(cfg.pool.experts["a"]) == (tmp_path / "cfg" / "ea").resolve()
    assert cfg.pool.experts["b"] == "missing"  # not found anywhere: left as written (a hub id, or an error later)


def test_benchmark_config(tmp_path):
    cfg = load_config(write(tmp_path, "benchmark: {name: reduced, rows: [ties, symerge]}\n"))
    assert cfg.kind == "bench" and cfg.benchmark.rows == ["ties", "symerge"]


def test_pool_evaluation_config(tmp_path):
    """A pool with an evaluation section and no methods is a bench config; its defaults hold 32 examples out."""
    cfg = load_config(write(tmp_path, "pool: {pretrained: p, experts: {a: x}}\nevaluation: {rows: [ties], limit: 5}\n"))
    assert cfg.kind == "merge" and cfg.methods == [] and cfg.evaluation.rows == ["ties"]
    assert cfg.pool_evaluation().validation_per_task == 32 and cfg.evaluation.limit == 5
    plain = load_config(write(tmp_path, "pool: {pretrained: p, experts: {a: x}}\nmethods: [{name: average}]\n"))
    assert plain.evaluation is None and plain.pool_evaluation().rows is None


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    cfg = load_config(path)
    assert cfg.kind in ("merge", "bench")
    if cfg.kind == "merge":
        assert sweep(cfg)


def _error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert isinstance(info.value, InputError)
    assert msg.startswith(f"{path}:")
    assert "\n" not in msg
    return msg


# (YAML, expected "LINE: FIELD" in the message, and a word of what was expected)
BAD = [
    ("pool: {pretrained: p, experts: {a: x}}\nmethods: [{name: average}]\ncolour: red\n",
     ":3: colour: unknown field", "expected one of: pool, methods, benchmark"),
    ("pool:\n  pretrained: p\n  experts: {a: x}\n  heads: h\nmethods: [{name: average}]\n",
     ":4: pool.heads: unknown field", "pretrained"),
    ("pool: {pretrained: p, experts: {a: x}}\nmethods:\n  - name: average\n  - name: ties\n    parms: {}\n",
     ":5: methods[1].parms: unknown field", "name, params, label"),
    ("pool: {pretrained: p, experts: {a: x}}\nmethods: [{name: average}]\noutputs:\n  save_model: true\n",
     ":4: outputs.save_model: unknown field", "save_models"),
    ("pool: {pretrained: p, experts: {a: x}}\nmethods: [{name: average}]\nseed: many\n",
     ":3: seed:", "integer"),
    ("pool: {pretrained: p, experts: {a: x}}\nmethods: [{name: average}]\noutputs:\n  plots: perhaps\n",
     ":4: outputs.plots:", "boolean"),
    ("pool: {pretrained: p, experts: [a, b]}\nmethods: [{name: average}]\n",
     ":1: pool.experts:", "dictionary"),
    ("pool: {pretrained: p, experts: {a: x}}\nmethods: [{name: average}]\ndevice: gpu\n",
     ":3: device:", "cpu, cuda"),
    ("pool:\n  pretrained: p\n  experts: {a: x}\nmethods:\n  - name: average\n  - name: tie\n",
     ":6: methods[1].name: unknown merge method 'tie'", "average, dare, task_arithmetic, ties"),
    ("pool:\n  pretrained: p\n  experts: {a: x}\nmethods:\n  - name: ties\n    params:\n      density: [0.2,\n                1.5]\n",
     ":8: methods[0].params.density[1]:", "density"),
    ("pool:\n  pretrained: p\n  experts: {a: x}\nmethods:\n  - name: ties\n    params:\n      scaling: 1\n      alpha: 2\n",
     ":8: methods[0].params.alpha: 'ties' has no parameter 'alpha'", "scaling, density, scope"),
    ("pool:\n  pretrained: p\n  experts: {a: x}\nmethods:\n  - name: ties\n    params:\n      density: []\n",
     ":7: methods[0].params.density: empty list", "at least one value"),
    ("pool:\n  pretrained: p\n  experts: {a: x, b: y}\nmethods:\n  - name: task_arithmetic\n    params:\n      scaling: {a: 0.3, c: 0.3}\n",
     ":7: methods[0].params.scaling:", "exactly the tasks"),
    ("pool:\n  pretrained: p\n  experts: {a: x}\nmethods:\n  - name: dare\n    params: {combine: sum}\n",
     ":6: methods[0].params.combine:", "'task_arithmetic' or 'ties'"),
    ("pool:\n  pretrained: p\n  experts: {a: x}\nmethods:\n  - name: average\n  - name: average\n",
     ":6: methods[1]: the merge 'average' is already made by methods[0]", "label"),
    ("pool:\n  pretrained: p\n  experts: {a: x}\n  experts: {b: y}\n", ":4: pool.experts: duplicate key", "line 3"),
    ("pool:\n  pretrained: [p\n", ":3: not valid YAML", "expected"),
    ("pool: {pretrained: p, experts: {}}\nmethods: [{name: average}]\n", ":1: pool.experts:", "at least one expert"),
    ("pool: {experts: {a: x}}\nmethods: [{name: average}]\n", ":1: pool.pretrained: missing", "required"),
    ("pool: {pretrained: p, experts: {a: x}}\n", ":1: (top level):", "non-empty 'methods'"),
    ("benchmark: {name: text5}\npool: {pretrained: p, experts: {a: x}}\nmethods: [{name: average}]\n",
     ":1: (top level):", "exactly one of 'pool'"),
    ("seed: 1\n", ":1: (top level):", "exactly one of 'pool'"),
    ("benchmark:\n  name: text6\n", ":2: benchmark.name: unknown benchmark 'text6'", "text5"),
    ("benchmark:\n  rows:\n    - ties\n    - tie\n", ":4: benchmark.rows[1]: unknown row 'tie'", "se_prototype_ties"),
    ("benchmark: {name: text5}\ndevice: cuda\n", ":2: device:", "CPU"),
    ("- pool\n- methods\n", ":1:", "mapping"),
    ("seed: -1\npool: {pretrained: p, experts: {a: x}}\nmethods: [{name: average}]\n", ":1: seed:", "greater than or equal to 0"),
    ("pool: {pretrained: p, experts: {a: x}}\nevaluation:\n  rows: [ties, tie]\n",
     ":3: evaluation.rows[1]: unknown row 'tie'", "task_arithmetic_0.3"),
    ("pool: {pretrained: p, experts: {a: x}}\nevaluation:\n  validation_per_task: -1\n",
     ":3: evaluation.validation_per_task:", "greater than or equal to 0"),
    ("pool: {pretrained: p, experts: {a: x}}\nevaluation:\n  row: [ties]\n", ":3: evaluation.row: unknown field",
     "validation_per_task"),
    ("benchmark: {name: text5}\nevaluation: {rows: [ties]}\n", ":1: (top level):", "'evaluation' applies to a 'pool'"),
]


@pytest.mark.parametrize("text,where,expected", BAD)
def test_bad_config_names_file_line_field_and_expectation(tmp_path, text, where, expected):
    msg = _error(tmp_path, text)
    assert where in msg, msg
    assert expected in msg, msg


def test_several_errors_are_listed_on_one_line(tmp_path):
    msg = _error(tmp_path, "pool: {pretrained: p, experts: {a: x}, x: 1}\nmethods: [{name: average}]\nseed: s\ny: 2\n")
    assert ":1: pool.x: unknown field" in msg and ":3: seed:" in msg and ":4: y: unknown field" in msg


def test_missing_empty_and_folder_configs(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="empty configuration"):
        load_config(write(tmp_path, "# nothing\n"))
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00pool")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(tmp_path / "bin.yaml")


def test_python_construction_has_the_same_rules():
    with pytest.raises(ValueError):
        RunConfig(pool={"pretrained": "p", "experts": {"a": "x"}}, methods=[{"name": "average", "extra": 1}])
    cfg = RunConfig(benchmark={"name": "text5"})
    assert cfg.outputs.report is True and cfg.device == "cpu"


@pytest.mark.parametrize(
    "raw,expected",
    [("1e-3", 0.001), ("2.5E4", 25000.0), ("-1e2", -100.0), (".5e1", 5.0), ("1.0e+38", 1.0e38), ("0.3", 0.3),
     ("3", 3), ("1e3x", "1e3x"), ("1.2.3", "1.2.3"), ("e5", "e5"), ("'1e-3'", "1e-3")],
)
def test_exponent_floats_are_numbers_in_params_and_configs(tmp_path, raw, expected):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; we read YAML 1.2 floats, in --param values and in configs."""
    from mergelab.cli import parse_params

    got = parse_params([f"scaling={raw}"])["scaling"]
    assert got == expected and type(got) is type(expected)
    cfg = parse_config(GOOD.replace("scaling: [0.2, 0.4]", f"scaling: [{raw}]"), check_methods=False)
    value = sweep(cfg)[0][2]["scaling"]
    assert value == expected and type(value) is type(expected)
