"""A pool task's examples for any family: texts, text pairs, images or tensors, with integer labels.

Sources (:func:`load_task_data`, read from a :class:`~mergelab.pools.pool.TaskDataConfig`):

- ``.csv`` / ``.tsv`` / ``.jsonl``: one example per row (``text_field``, optional ``text_pair_field``,
  ``label_field``);
- a folder saved with ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict`` and ``split``);
- an image folder: one sub-folder per class (the sub-folder names, sorted, are the class names);
- a ``.pt`` file holding ``{"inputs": Tensor [N, ...], "labels": Tensor [N]}`` (family ``torch``);
- a hub dataset id (``tanganke/eurosat``, ``glue`` with ``subset: cola``): fetched with ``datasets``
  only when the hub is enabled; offline (``HF_HUB_OFFLINE=1``) it fails at once with a clear message.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.core import io
from mergelab.core.errors import HubUnavailableError, InputError
from mergelab.pools.data.user import _labels_to_ints

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class LazyColumn(Sequence):
    """One column of a ``datasets.Dataset``, read (and images decoded) only when an item is asked for:
    a vision test set held as decoded images would take tens of GB of memory."""

    unsorted = True  # batching must not read every item to sort by length

    def __init__(self, dataset: Any, column: str, rows: range | None = None) -> None:
        self.dataset, self.column = dataset, column
        self.rows = rows if rows is not None else range(len(dataset))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return LazyColumn(self.dataset, self.column, self.rows[i])
        return self.dataset[self.rows[i]][self.column]


@dataclass
class TaskData:
    """Inputs and integer labels of one task. ``texts`` is an alias of ``inputs`` for the evaluation code."""

    name: str
    inputs: list[Any]
    labels: list[int]
    label_names: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise InputError(f"task {self.name!r}: {len(self.inputs)} inputs but {len(self.labels)} labels")
        if not self.inputs:
            raise InputError(f"task {self.name!r}: no examples ({self.source})")

    @property
    def texts(self) -> list[Any]:
        return self.inputs

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.inputs)


def _datasets():
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise InputError("reading Hugging Face datasets needs the 'datasets' package "
                         "(pip install 'mergelab[hub]' or pip install datasets)") from None
    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _hf_rows(cfg, where: str) -> tuple[Any, list[str] | None]:
    """A ``datasets.Dataset`` (local save_to_disk folder or hub id) and its ClassLabel names."""
    path = Path(cfg.path).expanduser()
    if path.exists():
        ds = _datasets().load_from_disk(str(path))
    else:
        if not io.looks_like_hub_id(cfg.path):
            raise InputError(f"{where}: {cfg.path}: no such file or folder")
        if io.hub_offline():
            raise HubUnavailableError(
                f"{where}: {cfg.path}: not a local path, and the Hugging Face hub is disabled (HF_HUB_OFFLINE/"
                "TRANSFORMERS_OFFLINE is set). Save the dataset with save_to_disk on a machine with internet "
                "and point 'path' at the folder.")
        try:
            ds = _datasets().load_dataset(cfg.path, cfg.subset, split=cfg.split or "test")
        except Exception as exc:  # noqa: BLE001  (network and format errors come in many types)
            raise HubUnavailableError(f"{where}: {cfg.path}: loading it from the Hugging Face hub failed "
                                      f"({type(exc).__name__}: {exc})") from None
    datasets = _datasets()
    if isinstance(ds, datasets.DatasetDict):
        split = cfg.split or "test"
        if split not in ds:
            raise InputError(f"{where}: {cfg.path}: no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    if cfg.label_field not in ds.column_names:
        raise InputError(f"{where}: {cfg.path}: no field {cfg.label_field!r} (columns: {', '.join(ds.column_names)})")
    feature = ds.features[cfg.label_field]
    return ds, (list(feature.names) if hasattr(feature, "names") else None)


def _file_rows(path: Path, where: str) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise InputError(f"{where}: {path}: line {i} is not JSON ({exc})") from None
        return rows
    raise InputError(f"{where}: {path}: unknown data file type {suffix!r} (csv, tsv, jsonl, .pt, or a folder)")


def _image_folder(path: Path, where: str) -> tuple[list[Any], list[int], list[str]]:
    from PIL import Image  # noqa: PLC0415

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{where}: {path}: an image folder needs one sub-folder per class")
    inputs, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    inputs.append(im.convert("RGB"))
                labels.append(k)
    return inputs, labels, classes


def _pt_file(path: Path, where: str) -> tuple[list[Any], list[int]]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{where}: {path}: cannot read ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), torch.Tensor) \
            or not isinstance(obj.get("labels"), torch.Tensor):
        raise InputError(f"{where}: {path}: expected a dict with tensors 'inputs' [N, ...] and 'labels' [N]")
    return list(obj["inputs"]), [int(v) for v in obj["labels"].tolist()]


def _field(row: dict[str, Any], name: str, where: str, i: int) -> Any:
    if name not in row:
        raise InputError(f"{where}: row {i} has no field {name!r} (fields: {', '.join(map(str, row))})")
    return row[name]


def load_task_data(name: str, cfg, kind: str, where: str | None = None) -> TaskData:
    """Task ``name``'s examples per ``cfg`` (a TaskDataConfig); ``kind``: 'text' (texts or pairs) or 'image'."""
    where = where or f"pool.tasks.{name}"
    path = Path(cfg.path).expanduser()
    names: list[str] | None = None
    if path.is_dir() and not _is_saved_dataset(path):
        inputs, labels, names = _image_folder(path, where)
        source = f"image folder {path}"
    elif path.suffix.lower() == ".pt" and path.is_file():
        inputs, labels = _pt_file(path, where)
        source = f"tensor file {path}"
    else:
        if path.is_file():
            rows: Any = _file_rows(path, where)
            source = f"file {path}"
        else:
            rows, names = _hf_rows(cfg, where)
            source = f"dataset {cfg.path}" + (f" ({cfg.subset})" if cfg.subset else "")
        n = len(rows) if cfg.limit is None else min(len(rows), cfg.limit)
        inputs, raw = [], []
        lazy = kind == "image" and not isinstance(rows, list)
        if lazy:  # images of a datasets.Dataset: decoded on demand; labels read from their column
            if cfg.image_field not in rows.column_names:
                raise InputError(f"{where}: {cfg.path}: no field {cfg.image_field!r} "
                                 f"(columns: {', '.join(rows.column_names)})")
            inputs = LazyColumn(rows, cfg.image_field, range(n))
            raw = [(f"row {i}", v) for i, v in enumerate(list(rows.select(range(n))[cfg.label_field]))]
        for i in range(0 if lazy else n):
            row = rows[i]
            if kind == "image":
                inputs.append(_field(row, cfg.image_field, where, i))
            else:
                text = _field(row, cfg.text_field, where, i)
                if not isinstance(text, str):
                    raise InputError(f"{where}: row {i}: field {cfg.text_field!r} is {type(text).__name__}, not text")
                if cfg.text_pair_field:
                    pair = _field(row, cfg.text_pair_field, where, i)
                    inputs.append((text, str(pair)))
                else:
                    inputs.append(text)
            raw.append((f"row {i}", _field(row, cfg.label_field, where, i)))
        labels, names = _labels_to_ints(raw, names, Path(str(cfg.path)), cfg.label_field)
    if cfg.limit is not None:
        inputs, labels = inputs[: cfg.limit], labels[: cfg.limit]
    if names is None:
        names = [str(k) for k in range(max(labels, default=-1) + 1)]
    return TaskData(name, inputs, labels, list(names), source)
