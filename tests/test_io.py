"""Model I/O: loading from directories, files and (offline) hub ids; atomic, non-overwriting saves."""

import json

import pytest
import torch
from safetensors.torch import save_file

import mergelab
from mergelab import InputError
from mergelab.core import io
from mergelab.core.errors import HubUnavailableError


def _sd():
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3), "ids": torch.arange(4)}


def test_load_single_safetensors_and_bin(tmp_path):
    sd = _sd()
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.bin")
    for name in ("m.safetensors", "m.bin"):
        loaded = io.load_state_dict(tmp_path / name)
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_load_sharded_directory(tmp_path):
    sd = _sd()
    save_file({"a.weight": sd["a.weight"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"a.bias": sd["a.bias"], "ids": sd["ids"]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00002-of-00002.safetensors",
                            "ids": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = io.load_state_dict(tmp_path)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_missing_shard_named(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(InputError, match="shard 'gone.safetensors'"):
        io.load_state_dict(tmp_path)


def test_truncated_safetensors_names_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_sd(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"m\.safetensors: cannot read weights"):
        io.load_state_dict(path)


def test_directory_without_weights(tmp_path):
    with pytest.raises(InputError, match="no weights found"):
        io.load_state_dict(tmp_path)


def test_missing_path_and_offline_hub(monkeypatch):
    with pytest.raises(InputError, match="no such file"):
        io.load_state_dict("./does/not/exist.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="openai/clip-vit-base-patch32.*local directory"):
        io.load_state_dict("openai/clip-vit-base-patch32")


def test_save_model_atomic_and_refuses_inputs(tmp_path):
    src = tmp_path / "pre"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "vocab.txt").write_text("a\n")
    save_file(_sd(), str(src / "model.safetensors"))
    out = io.save_model(_sd(), tmp_path / "out", like=src)
    assert (out / "config.json").exists() and (out / "vocab.txt").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(InputError, match="would overwrite the input"):
        io.save_model(_sd(), src, like=src)
    with pytest.raises(InputError, match="would overwrite the input"):
        io.save_model(_sd(), tmp_path, inputs=[src])  # output containing an input


def test_failed_save_keeps_previous_output(tmp_path, monkeypatch):
    out = io.save_model({"w": torch.ones(2)}, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        io.save_model({"w": torch.zeros(2)}, tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_tied_weights_saved(tmp_path):
    w = torch.randn(4, 4)
    out = io.save_model({"emb.weight": w, "lm_head.weight": w}, tmp_path / "tied")
    loaded = io.load_state_dict(out)
    assert torch.equal(loaded["emb.weight"], loaded["lm_head.weight"])


def test_merge_roundtrip_through_files(tmp_path):
    pre = {"w": torch.randn(5)}
    ex = {"w": pre["w"] + 1}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(ex, str(tmp_path / "ex.safetensors"))
    merged = mergelab.merge("task_arithmetic", io.load_state_dict(tmp_path / "pre.safetensors"),
                            {"a": io.load_state_dict(tmp_path / "ex.safetensors")})
    torch.testing.assert_close(merged["w"], pre["w"] + 0.3)
