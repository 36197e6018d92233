"""Faults: a merge or a fine-tuning killed mid-way (a real SIGKILL of a subprocess), and disk-full writes.

The killed process is slowed down at the moment it writes weights: its ``save_file`` writes half of
the bytes, signals the test through a file, and sleeps until it is killed. Afterwards the previous
output (or cache entry) must be byte-for-byte as it was, nothing half-written may sit at the target,
and the next run must complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.core import atomic, io
from mergelab.pools import finetune as ft
from mergelab.pools.data.tasks import TextTask
from mergelab.pools.families.text import TextClassifierFamily

from .tiny_models import VOCAB, save_tiny_pool

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

# Patched into the child: write half of the file, tell the parent, wait to be killed.
# The child stands for a user's run in a terminal, where Ctrl-C raises KeyboardInterrupt. Started from a
# background job (`nohup make test &`), it would inherit SIGINT ignored, and Python keeps an inherited
# SIG_IGN: the SIGINT of test_merge_interrupted_cleans_up would be lost. So it sets the terminal's handler.
SLOW_SAVE = r'''
import os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)
import safetensors.torch as st

READY = Path(sys.argv[1])

def slow_save_file(tensors, filename, metadata=None):
    data = st.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    READY.write_text(str(os.getpid()))
    time.sleep(300)
'''

MERGE_CHILD = SLOW_SAVE + r'''
st.save_file = slow_save_file
sys.argv = ["mergelab", *sys.argv[2:]]
from mergelab.cli import main
main()
'''

FINETUNE_CHILD = SLOW_SAVE + r'''
import json
from mergelab.pools import finetune as ft
from mergelab.pools.data.tasks import TextTask
from mergelab.pools.families.text import TextClassifierFamily

model_dir, cache, task_file, mode = sys.argv[2:6]
spec = json.loads(Path(task_file).read_text())
task = TextTask(spec["name"], spec["texts"], spec["labels"], label_names=spec["label_names"])
family = TextClassifierFamily(model_dir, max_length=16)
recipe = ft.FinetuneRecipe(**spec["recipe"])
if mode == "write":
    ft.save_file = slow_save_file
else:  # "train": stop during the third training step
    tokenize, calls = family.tokenize, []
    def slow_tokenize(texts):
        calls.append(1)
        if len(calls) == 3:
            READY.write_text(str(os.getpid()))
            time.sleep(300)
        return tokenize(texts)
    family.tokenize = slow_tokenize
ft.get_or_train_expert(family, task, recipe, cache_dir=cache, progress=False)
'''


def digest(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def run_and_kill(script: str, ready: Path, *args: str, timeout: float = 120.0, sig: int = signal.SIGKILL) -> str:
    """Start ``script`` in a fresh interpreter, wait for it to signal ``ready``, send ``sig`` (SIGKILL);
    return its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(ready), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"the child ended (status {proc.returncode}) before the write:\n{proc.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("the child never reached the write")
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        output = proc.communicate(timeout=60)[0].decode()
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        return output + f"\n[status {proc.returncode}]"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return save_tiny_pool(tmp_path_factory.mktemp("fault-pool"))


def merge_args(pre, a, b, out, method="ties"):
    # --in-memory: the faults below are injected into safetensors.torch.save_file, which the in-memory save calls
    return ["merge", "-m", method, "-p", str(pre), "-e", f"a={a}", "-e", f"b={b}", "-o", str(out), "--in-memory"]


# ---------------------------------------------------------------------------------------------- merge killed
def test_merge_killed_mid_write_keeps_previous_output(pool, tmp_path):
    root, pre, a, b = pool
    out = tmp_path / "merged"
    assert runner.invoke(app, merge_args(pre, a, b, out, "average")).exit_code == 0
    before = digest(out)
    inputs_before = {p: digest(p) for p in (pre, a, b)}

    ready = tmp_path / "ready"
    run_and_kill(MERGE_CHILD, ready, *merge_args(pre, a, b, out, "ties"))

    # the previous output is intact and still loads; the inputs too
    assert digest(out) == before
    assert inputs_before == {p: digest(p) for p in (pre, a, b)}
    io.load_state_dict(out)
    # the half-written file exists, but only in the killed writer's temporary folder beside the target
    leftovers = list(tmp_path.glob(".merged.tmp-*"))
    assert len(leftovers) == 1
    partial = leftovers[0] / "model.safetensors"
    assert 0 < partial.stat().st_size < (out / "model.safetensors").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["merged", "ready"]

    # the next run completes, replaces the output, and removes the dead writer's leftovers
    result = runner.invoke(app, merge_args(pre, a, b, out, "ties"))
    assert result.exit_code == 0, result.output
    expected = mergelab.merge("ties", io.load_state_dict(pre), {"a": io.load_state_dict(a), "b": io.load_state_dict(b)})
    got = io.load_state_dict(out)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert not list(tmp_path.glob(".merged.*"))


# ---------------------------------------------------------------------------------------------- fine-tuning killed
WORDS = VOCAB[5:]


def toy_task(name: str, k: int) -> TextTask:
    words = WORDS[k * 10 : (k + 1) * 10]
    texts = [f"{words[i % 5]} {words[5 + (i * 3) % 5]}" for i in range(24)]
    return TextTask(name, texts, [i % 2 for i in range(24)], label_names=["n", "p"])


RECIPE = ft.FinetuneRecipe(steps=6, batch_size=8, body_lr=1e-3, head_lr=1e-2, warmup_fraction=0.0)


@pytest.fixture(scope="module")
def family(pool):
    return TextClassifierFamily(pool[1], max_length=16)


def _task_file(tmp_path: Path, task: TextTask) -> Path:
    path = tmp_path / f"{task.name}.json"
    path.write_text(json.dumps({"name": task.name, "texts": task.texts, "labels": task.labels,
                                "label_names": task.label_names, "recipe": RECIPE.to_dict()}))
    return path


@pytest.mark.parametrize("mode", ["write", "train"])
def test_finetune_killed_keeps_the_cache(pool, family, tmp_path, mode):
    cache = tmp_path / "cache"
    first = ft.get_or_train_expert(family, toy_task("first", 0), RECIPE, cache_dir=cache, progress=False)
    assert first.meta["cache_hit"] is False
    before = digest(cache)

    second = toy_task("second", 1)
    run_and_kill(FINETUNE_CHILD, tmp_path / "ready", str(pool[1]), str(cache), str(_task_file(tmp_path, second)), mode)

    experts = cache / "experts"
    entry = ft.expert_dir(family, second, RECIPE, cache)
    assert not entry.exists()  # no half entry under the real name
    # the earlier entry is byte-for-byte as it was and is still a hit
    # (beside the killed run's temporary folder and the empty lock file it held: its lock died with it,
    # which the training below shows by not waiting)
    assert {k: v for k, v in digest(cache).items() if not k.startswith(("experts/.tmp-", "experts/.locks/"))} == {
        k: v for k, v in before.items() if not k.startswith("experts/.locks/")}
    assert ft.get_or_train_expert(family, toy_task("first", 0), RECIPE, cache_dir=cache, progress=False).meta["cache_hit"]
    tmp = [p for p in experts.iterdir() if p.name.startswith(".tmp-")]
    if mode == "write":  # killed while writing: the half-written body is in a temporary folder only
        assert len(tmp) == 1 and 0 < (tmp[0] / "body.safetensors").stat().st_size
        assert not (tmp[0] / "meta.json").exists()
    else:  # killed while training: nothing was written at all
        assert tmp == []

    # the next run trains, stores a complete entry, and the one after reads it
    again = ft.get_or_train_expert(family, second, RECIPE, cache_dir=cache, progress=False)
    assert again.meta["cache_hit"] is False and entry.is_dir()
    assert json.loads((entry / "meta.json").read_text())["complete"] is True
    hit = ft.get_or_train_expert(family, second, RECIPE, cache_dir=cache, progress=False)
    assert hit.meta["cache_hit"] is True
    assert all(torch.equal(hit.body_state[k], again.body_state[k]) for k in again.body_state)


# ---------------------------------------------------------------------------------------------- disk full
def _enospc_after_half(tensors, filename, metadata=None):
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    Path(filename).write_bytes(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(filename))


def test_disk_full_during_merge_cli(pool, tmp_path, monkeypatch):
    root, pre, a, b = pool
    out = tmp_path / "merged"
    assert runner.invoke(app, merge_args(pre, a, b, out, "average")).exit_code == 0
    before = digest(out)
    monkeypatch.setattr("safetensors.torch.save_file", _enospc_after_half)
    result = runner.invoke(app, merge_args(pre, a, b, out, "ties"))
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert digest(out) == before
    assert not list(tmp_path.glob(".merged.*"))


def test_disk_full_during_the_default_streamed_merge(pool, tmp_path, monkeypatch):
    """The default (streamed) merge hits a full disk mid-shard: exit 1 with the reason, the previous
    output intact, no temporary folder left."""
    from mergelab.methods.streaming.files import ShardedWriter

    root, pre, a, b = pool
    out = tmp_path / "merged"
    args = [x for x in merge_args(pre, a, b, out, "average") if x != "--in-memory"]
    assert runner.invoke(app, args).exit_code == 0
    before = digest(out)
    real_write, calls = ShardedWriter.write, []

    def full(self, chunk):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, chunk)

    monkeypatch.setattr(ShardedWriter, "write", full)
    result = runner.invoke(app, [x if x != "average" else "ties" for x in args])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert len(calls) > 3 and digest(out) == before
    assert not list(tmp_path.glob(".merged.*"))


def test_disk_full_in_atomic_write_bytes(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    io.atomic_write_text(target, '{"old": 1}\n')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        io.atomic_write_text(target, '{"new": 2}\n')
    assert target.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_disk_full_in_the_expert_cache(family, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    task = toy_task("full", 2)
    monkeypatch.setattr(ft, "save_file", _enospc_after_half)
    with pytest.raises(OSError, match="No space left"):
        ft.get_or_train_expert(family, task, RECIPE, cache_dir=cache, progress=False)
    # neither an entry nor a temporary folder: only the folder of (empty) lock files
    assert [p.name for p in (cache / "experts").iterdir()] == [".locks"]
    monkeypatch.undo()
    assert ft.get_or_train_expert(family, task, RECIPE, cache_dir=cache, progress=False).meta["cache_hit"] is False
    assert ft.get_or_train_expert(family, task, RECIPE, cache_dir=cache, progress=False).meta["cache_hit"] is True


# ---------------------------------------------------------------------------------------------- replacing an output
def test_replacing_an_output_never_leaves_the_target_missing(tmp_path, monkeypatch):
    """Where the system can swap two directories atomically (Linux renameat2), a replacement never moves
    the previous output aside; elsewhere the two-rename fallback still ends with the new output."""
    out = io.save_model({"w": torch.ones(3)}, tmp_path / "out")
    probe_a, probe_b = tmp_path / "pa", tmp_path / "pb"
    probe_a.mkdir()
    probe_b.mkdir()
    (probe_a / "f").write_text("a")
    supported = atomic._exchange(probe_a, probe_b)
    if supported:
        assert (probe_b / "f").read_text() == "a" and not (probe_a / "f").exists()
    moved_aside = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moved_aside.append(Path(src)), real_replace(src, dst))[1])
    io.save_model({"w": torch.full((3,), 2.0)}, out)
    assert torch.equal(io.load_state_dict(out)["w"], torch.full((3,), 2.0))
    assert (out in moved_aside) is (not supported)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the fallback path
    io.save_model({"w": torch.full((3,), 3.0)}, out)
    assert torch.equal(io.load_state_dict(out)["w"], torch.full((3,), 3.0))
    assert not list(tmp_path.glob(".out.*"))


def test_merge_interrupted_cleans_up(pool, tmp_path):
    """Ctrl-C (SIGINT) during the write: the temporary folder is removed at once, the previous output kept."""
    root, pre, a, b = pool
    out = tmp_path / "merged"
    assert runner.invoke(app, merge_args(pre, a, b, out, "average")).exit_code == 0
    before = digest(out)
    output = run_and_kill(MERGE_CHILD, tmp_path / "ready", *merge_args(pre, a, b, out, "ties"), sig=signal.SIGINT)
    assert output.endswith("[status 130]"), output
    assert "Traceback" not in output
    assert digest(out) == before
    assert not list(tmp_path.glob(".merged.*"))
