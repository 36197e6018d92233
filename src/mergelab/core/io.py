"""Model I/O: load state dicts from local files, Hugging Face directories or the hub; save merges.

Loading accepts
- a Hugging Face model directory (``model.safetensors``, sharded ``model.safetensors.index.json``,
  or ``pytorch_model.bin`` / its sharded index),
- a single ``.safetensors`` (or ``.bin`` / ``.pt``) file,
- a hub id such as ``openai/clip-vit-base-patch32`` (needs internet; offline it fails fast).

Saving writes a Hugging Face directory (``config.json`` and tokenizer files copied from the
pretrained directory, weights as ``model.safetensors``) into a temporary directory next to the
destination and renames it into place, so a crash never leaves a half-written model where a good
one stood. Writing over (or inside) any input is refused.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from mergelab.core.errors import HubUnavailableError, InputError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# files copied from the pretrained directory into a saved merge
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
    "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model",
    "sentencepiece.bpe.model", "preprocessor_config.json",
)


def _load_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated files raise many different types
        raise InputError(f"{path}: cannot read weights ({type(exc).__name__}: {exc}); is the file complete?") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(f"{path}: expected a state dict (a mapping of names to tensors)")
    return dict(obj)


def _load_dir(path: Path) -> dict[str, Tensor]:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return _load_file(path / name)
    for name in INDEX_FILES:
        index = path / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise InputError(f"{index}: not a valid shard index (expected a 'weight_map' object)") from exc
            out: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise InputError(f"{index}: shard {shard!r} listed in the index is missing")
                out.update(_load_file(path / shard))
            return out
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return _load_file(singles[0])
    raise InputError(
        f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES + INDEX_FILES)})"
    )


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not spec.startswith((".", "~")) and not spec.endswith(
        (".safetensors", ".bin", ".pt")
    )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """A local path for ``spec``: the path itself if it exists, else a hub snapshot (online only)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if not looks_like_hub_id(text):
        raise InputError(f"{text}: no such file or directory")
    if hub_offline():
        raise HubUnavailableError(
            f"{text}: not a local path, and the Hugging Face hub is disabled (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE "
            "is set). Download the model on a machine with internet, or point at a local directory."
        )
    from huggingface_hub import snapshot_download

    try:
        # etag_timeout keeps an unreachable hub from hanging for minutes.
        return Path(
            snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"], etag_timeout=10)
        )
    except Exception as exc:
        raise HubUnavailableError(
            f"{text}: not a local path, and fetching it from the Hugging Face hub failed ({type(exc).__name__}). "
            "Without internet, point at a local directory or .safetensors file instead."
        ) from exc


def load_state_dict(spec: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a state dict from a file, a Hugging Face directory, or a hub id."""
    path = resolve_model_path(spec)
    return _load_dir(path) if path.is_dir() else _load_file(path)


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keep the keys under ``prefix`` (e.g. ``"bert."``), without it."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- writing


def _is_within(a: Path, b: Path) -> bool:
    """True if ``a`` is ``b`` or inside it."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_output_path(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> Path:
    """Refuse an output path that is, contains, or lies inside one of the input paths."""
    out_p = Path(out).expanduser().resolve()
    for spec in inputs:
        inp = Path(spec).expanduser()
        if not inp.exists():
            continue
        inp = inp.resolve()
        if _is_within(out_p, inp) or _is_within(inp, out_p):
            raise InputError(f"output path {out} would overwrite the input {spec}; choose another --out")
    return out_p


def _contiguous_unshared(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings); give each its own memory.
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def _tmp_tag() -> str:
    """``<host>-<pid>``: whose temporary directory this is (see :func:`_remove_dead_tmp`)."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def _remove_dead_tmp(out: Path) -> None:
    """Remove temporary directories beside ``out`` left by killed writers on this host.

    Only ``.<name>.tmp-<host>-<pid>-*`` of this host whose process is gone; never the ``.old-*``
    copy (between the two renames of a replacement it may be the only copy of the previous output).
    """
    host = _tmp_tag().rsplit("-", 1)[0]
    prefix = f".{out.name}.tmp-{host}-"
    for p in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush the files under ``root`` to disk, so that a rename never publishes unwritten data."""
    for f in sorted(root.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


# what a saved model folder holds: anything else in an existing output means it is not one of ours
_MODEL_DIR_FILES = {*WEIGHT_FILES, *INDEX_FILES, *SIDECAR_FILES, "head.safetensors", "mergelab.json",
                    "adapter_config.json", "adapter_model.safetensors"}  # and a PEFT adapter folder (LoRA merges)
_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is absent, empty, or a model folder (as :func:`save_model` writes).

    Replacing a folder deletes what it held: ``--out ~/Documents`` must not.
    """
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise InputError(f"output path {out} exists and is not a folder; refusing to replace it")
    foreign = sorted(p.name for p in out.iterdir()
                     if not (p.is_file() and (p.name in _MODEL_DIR_FILES or _SHARD.fullmatch(p.name))))
    if foreign:
        raise InputError(
            f"output path {out} holds {_listing(foreign)}, which a saved model folder does not; refusing to "
            "replace it. Choose a new or empty folder, or a previous merge output."
        )


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def atomic_write_dir(out: Path, fill) -> Path:
    """Create a directory at ``out`` by ``fill(tmp_dir)`` in a sibling temporary directory + rename.

    An existing ``out`` is swapped with the new directory in one atomic step where the system allows
    it (Linux). A writer killed mid-way leaves ``out`` as it was and its temporary directory beside it;
    the next write to ``out`` on this host removes such leftovers of dead processes.
    """
    out = Path(out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_tmp(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_tmp_tag()}-", dir=out.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if out.is_dir() and not out.is_symlink() and _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous output
        elif out.exists():
            # no atomic exchange (not Linux, or a file system without it): two renames; a kill between
            # them leaves the previous output at .<name>.old-<pid>
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it into place.

    The file gets the usual permissions (0666 less the umask), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_model(
    state_dict: Mapping[str, Tensor],
    out: str | os.PathLike[str],
    *,
    like: str | os.PathLike[str] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` as a Hugging Face directory at ``out``, atomically.

    ``like``: a directory whose config and tokenizer files are copied (the pretrained model).
    ``inputs``: paths that must not be overwritten (the output may not be or contain any of them).
    """
    from safetensors.torch import save_file

    like_p = Path(like) if like is not None else None
    out_p = check_output_path(out, [*inputs, *([like_p] if like_p else [])])

    def fill(tmp: Path) -> None:
        save_file(_contiguous_unshared(state_dict), str(tmp / "model.safetensors"), metadata=dict(metadata or {"format": "pt"}))
        if like_p is not None and like_p.is_dir():
            for name in SIDECAR_FILES:
                if (like_p / name).is_file():
                    shutil.copy2(like_p / name, tmp / name)

    return atomic_write_dir(out_p, fill)
