"""Model I/O: load state dicts from local files, Hugging Face directories or the hub; save merges.

Loading accepts
- a Hugging Face model directory (``model.safetensors``, sharded ``model.safetensors.index.json``,
  or ``pytorch_model.bin`` / its sharded index; :func:`mergelab.core.checkpoint.locate_weights`),
- a single ``.safetensors`` (or ``.bin`` / ``.pt``) file,
- a hub id such as ``openai/clip-vit-base-patch32`` (needs internet; offline it fails fast).

Saving writes a Hugging Face directory (``config.json`` and tokenizer files copied from the
pretrained directory, weights as ``model.safetensors``) into a temporary directory next to the
destination and renames it into place (:mod:`mergelab.core.atomic`), so a crash never leaves a
half-written model where a good one stood. Writing over (or inside) any input is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

# Atomic writes and the checkpoint layout have their own modules; the names below stay importable
# from here for the modules that still do.
from mergelab.core.atomic import atomic_write_bytes, atomic_write_text, check_output_path
from mergelab.core.checkpoint import (
    INDEX_FILES,
    SAFETENSORS,
    SIDECAR_FILES,
    WEIGHT_FILES,
    check_replaceable,
    copy_sidecars,
    locate_weights,
)
from mergelab.core.checkpoint import write_model_dir as atomic_write_dir
from mergelab.core.errors import HubUnavailableError, InputError


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
    out: dict[str, Tensor] = {}
    for f in locate_weights(path).files:
        out.update(_load_file(f))
    return out


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
        save_file(_contiguous_unshared(state_dict), str(tmp / SAFETENSORS), metadata=dict(metadata or {"format": "pt"}))
        copy_sidecars(like_p, tmp)

    return atomic_write_dir(out_p, fill)


__all__ = [
    "INDEX_FILES", "SIDECAR_FILES", "WEIGHT_FILES", "atomic_write_bytes", "atomic_write_dir", "atomic_write_text",
    "check_output_path", "check_replaceable", "hub_offline", "load_state_dict", "looks_like_hub_id",
    "resolve_model_path", "save_model", "strip_prefix",
]
