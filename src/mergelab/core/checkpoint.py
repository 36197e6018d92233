"""Checkpoint file layout: which files of a folder hold a model's weights, and what a model folder holds.

One home for the Hugging Face layout that loading (:mod:`mergelab.core.io`), streaming
(:mod:`mergelab.methods.streaming`) and saving share:

- weights: ``model.safetensors``; sharded ``model-00001-of-00003.safetensors`` ... with
  ``model.safetensors.index.json`` (``{"weight_map": {key: shard}}``); the pickle equivalents
  ``pytorch_model.bin`` and ``pytorch_model.bin.index.json``; or a single ``*.safetensors`` file;
- sidecar files copied from the pretrained folder into a merge (config, tokenizer, processor);
- :func:`check_replaceable`: a folder may be replaced by a save only if it is a model folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.core.atomic import atomic_write_dir
from mergelab.core.errors import InputError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, PICKLE)
INDEX_FILES = (SAFETENSORS_INDEX, PICKLE_INDEX)
# files copied from the pretrained directory into a saved merge
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
    "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model",
    "sentencepiece.bpe.model", "preprocessor_config.json",
)
SHARD_NAME = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")
# what a saved model folder holds: anything else in an existing output means it is not one of ours
# and a PEFT adapter folder (LoRA merges written with --output-format adapter)
MODEL_DIR_FILES = frozenset({*WEIGHT_FILES, *INDEX_FILES, *SIDECAR_FILES, "head.safetensors", "mergelab.json",
                             "adapter_config.json", "adapter_model.safetensors", "merge_report.json"})


@dataclass(frozen=True)
class Weights:
    """Where a model's weights are: ``files`` in ``format`` ("safetensors" or "pickle"); for a sharded
    folder also its ``index`` file and ``weight_map`` (key -> shard file name)."""

    path: Path
    format: str
    files: tuple[Path, ...]
    index: Path | None = None
    weight_map: dict[str, str] = field(default_factory=dict)

    @property
    def streamable(self) -> bool:
        return self.format == "safetensors"


def _file_format(path: Path) -> str:
    return "safetensors" if path.suffix == ".safetensors" else "pickle"


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{index}: not a valid shard index (expected a 'weight_map' object)") from None
    except OSError as exc:
        raise InputError(f"{index}: cannot read ({exc.strerror or exc})") from None
    return weight_map


def locate_weights(path: str | os.PathLike[str]) -> Weights:
    """The weight files of a model file or folder, safetensors preferred over pickle.

    A folder: ``model.safetensors``, else ``model.safetensors.index.json`` and its shards, else
    ``pytorch_model.bin``, else ``pytorch_model.bin.index.json`` and its shards, else its only
    ``*.safetensors`` file. Raises :class:`InputError` naming the folder, the index or the missing shard.
    """
    path = Path(path)
    if path.is_file():
        return Weights(path, _file_format(path), (path,))
    if not path.is_dir():
        raise InputError(f"{path}: no such file or directory")
    for fmt, single, index_name in (("safetensors", SAFETENSORS, SAFETENSORS_INDEX), ("pickle", PICKLE, PICKLE_INDEX)):
        if (path / single).is_file():
            return Weights(path, fmt, (path / single,))
        index = path / index_name
        if index.is_file():
            weight_map = _read_index(index)
            shards = list(dict.fromkeys(weight_map.values()))
            for shard in shards:
                if not (path / shard).is_file():
                    raise InputError(f"{index}: shard {shard!r} listed in the index is missing")
            return Weights(path, fmt, tuple(path / s for s in shards), index, weight_map)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return Weights(path, "safetensors", (singles[0],))
    raise InputError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES + INDEX_FILES)})")


def shard_names(n: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-0000n.safetensors`` ..."""
    return [SAFETENSORS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def copy_sidecars(source: Path | None, target: Path) -> None:
    """Copy the config, tokenizer and processor files of the folder ``source`` (if it is one) into ``target``."""
    if source is None or not Path(source).is_dir():
        return
    for name in SIDECAR_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, target / name)


def check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is absent, empty, or a model folder (as a save writes).

    Replacing a folder deletes what it held: ``--out ~/Documents`` must not.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise InputError(f"output path {out} exists and is not a folder; refusing to replace it")
    foreign = sorted(p.name for p in out.iterdir()
                     if not (p.is_file() and (p.name in MODEL_DIR_FILES or SHARD_NAME.fullmatch(p.name))))
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(
            f"output path {out} holds {shown}, which a saved model folder does not; refusing to "
            "replace it. Choose a new or empty folder, or a previous merge output."
        )


def write_model_dir(out: Path, fill: Callable[[Path], None]) -> Path:
    """:func:`mergelab.core.atomic.atomic_write_dir` for a model folder: refuses to replace anything else."""
    return atomic_write_dir(out, fill, replaceable=check_replaceable)


__all__ = [
    "INDEX_FILES", "MODEL_DIR_FILES", "PICKLE", "PICKLE_INDEX", "SAFETENSORS", "SAFETENSORS_INDEX", "SIDECAR_FILES",
    "WEIGHT_FILES", "Weights", "check_replaceable", "copy_sidecars", "locate_weights", "shard_names", "write_model_dir",
]
