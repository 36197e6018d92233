"""The CLI: merge end to end on tiny BERT experts, and bad input -> exit 2 without traceback."""

import hashlib

import pytest
import torch
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.core import io

from .tiny_models import save_tiny_pool

runner = CliRunner()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return save_tiny_pool(tmp_path_factory.mktemp("pool"))


def _digest(path):
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("method,params", [("ties", ["density=0.2"]), ("task_arithmetic", ["scaling=0.4"]),
                                           ("dare", ["drop_rate=0.5", "seed=3"]), ("average", [])])
def test_cli_merge_loads_with_transformers_and_equals_api(pool, tmp_path, method, params):
    from transformers import AutoModel

    root, pre, a, b = pool
    before = {p: _digest(p) for p in (pre, a, b)}
    out = tmp_path / "merged"
    args = ["merge", "--method", method, "--pretrained", str(pre), "--expert", f"a={a}", "--expert", f"b={b}", "--out", str(out)]
    for p in params:
        args += ["--param", p]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    model = AutoModel.from_pretrained(str(out))
    api_params = {k: v for k, v in (p.split("=") for p in params)}
    api_params = {k: (int(v) if v.isdigit() else float(v)) for k, v in api_params.items()}
    expected = mergelab.merge(method, io.load_state_dict(pre), {"a": io.load_state_dict(a), "b": io.load_state_dict(b)}, **api_params)
    got = model.state_dict()
    compared = 0
    for k, v in expected.items():
        if k in got:
            assert torch.equal(got[k], v), k
            compared += 1
    assert compared >= len(expected) - 2
    assert (out / "vocab.txt").exists()  # tokenizer copied from the pretrained directory
    assert before == {p: _digest(p) for p in (pre, a, b)}  # inputs untouched


def test_cli_methods_lists_all():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in mergelab.methods.available():
        assert name in result.output


def test_cli_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and mergelab.__version__ in result.output


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--method", "nope"], "unknown merge method 'nope'"),
        (["--method", "ties", "--param", "density=2"], "density"),
        (["--method", "ties", "--param", "density"], "KEY=VALUE"),
        (["--method", "ties", "--param", "alpha=1"], "alpha"),
    ],
)
def test_cli_bad_input_exit_2(pool, tmp_path, extra, needle):
    root, pre, a, b = pool
    args = ["merge", "--pretrained", str(pre), "--expert", f"a={a}", "--out", str(tmp_path / "o"), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_refuses_output_equal_to_input(pool):
    root, pre, a, b = pool
    before = _digest(a)
    result = runner.invoke(app, ["merge", "-m", "ties", "-p", str(pre), "-e", f"a={a}", "-o", str(a)])
    assert result.exit_code == 2 and "would overwrite the input" in result.output
    assert _digest(a) == before


def test_cli_missing_expert_path(pool, tmp_path):
    root, pre, a, b = pool
    result = runner.invoke(app, ["merge", "-m", "ties", "-p", str(pre), "-e", "a=/no/such/dir", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "/no/such/dir" in result.output


def test_cli_shape_mismatch_names_expert(pool, tmp_path):
    from transformers import BertModel

    from .tiny_models import tiny_bert_config

    root, pre, a, b = pool
    other = tmp_path / "wide"
    BertModel(tiny_bert_config(intermediate_size=48)).save_pretrained(str(other))
    result = runner.invoke(app, ["merge", "-m", "ties", "-p", str(pre), "-e", f"wide={other}", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "expert 'wide'" in result.output and "shape" in result.output


_LEAVE_CHILD = r"""
import atexit, sys, threading, time
from mergelab import cli

atexit.register(lambda: print("atexit ran", flush=False))
def late():
    time.sleep(0.2)
    print("thread finished", flush=False)
threading.Thread(target=late).start()  # non-daemon: a normal exit waits for it
sys.stdout.write("unflushed line\n")
sys.argv = ["mergelab", *sys.argv[1:]]
cli.main()
print("not reached")
"""


@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["merge", "--method", "nope", "--pretrained", "x",
                                                              "--expert", "a=y", "--out", "z"], 2)])
def test_console_script_exit_keeps_what_a_normal_exit_does(argv, code, tmp_path):
    """main() leaves without the interpreter's teardown, but with the exit code, the joined non-daemon
    threads, the atexit handlers and the flushed streams of a normal exit."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _LEAVE_CHILD, *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == code, proc.stderr
    out = proc.stdout.splitlines()
    assert "unflushed line" in out and "not reached" not in out
    assert out.index("thread finished") < out.index("atexit ran")  # threads first, as the interpreter does
    if code == 0:
        assert out[1] == f"mergelab {mergelab.__version__}"
    else:
        assert "unknown merge method 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_exit_with_a_message_exits_1(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from mergelab import cli; cli._leave('stopped: reason')"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == "stopped: reason"


def test_quiet_silences_hub_bars_without_importing_transformers(tmp_path):
    """--quiet must not cost transformers' import (over a second) in a command that does not need it, and the
    bars stay off once transformers does load."""
    import subprocess
    import sys

    child = ("import os, sys\n"
             "os.environ.pop('HF_HUB_DISABLE_PROGRESS_BARS', None)\n"
             "from mergelab import cli\n"
             "cli._silence_libraries()\n"
             "print('transformers' in sys.modules, 'huggingface_hub' in sys.modules)\n"
             "from transformers.utils import logging\n"
             "print(logging.is_progress_bar_enabled())\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "False"]
