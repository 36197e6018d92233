"""One loader per data format, each returning the one task type :class:`~mergelab.pools.data.tasks.TaskData`.

The same loaders read a user's task files (``mergelab bench --task``, ``benchmark.tasks``) and a pool
YAML's ``tasks`` (:func:`load_task_data`, from a :class:`~mergelab.pools.pool.TaskDataConfig`):

- ``.csv`` / ``.tsv`` (:func:`load_csv_task`) and ``.jsonl`` / ``.ndjson`` (:func:`load_jsonl_task`): one
  example per row, a text (and, with ``text_pair_field``, a second text: the input is the pair) and a label;
- a folder saved with ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` and ``split``), or
  a hub dataset id (:func:`load_hf_task`; fetched only when the hub is enabled: offline
  (``HF_HUB_OFFLINE=1``) it fails at once with a clear message). With ``image_field`` the inputs are that
  column's images, decoded only when read (:class:`~mergelab.pools.data.tasks.LazyColumn`);
- an image folder, one sub-folder per class, the sorted sub-folder names being the class names
  (:func:`load_image_folder`);
- a ``.pt`` file holding ``{"inputs": Tensor [N, ...], "labels": Tensor [N]}`` (:func:`load_tensor_file`,
  family ``torch``).

:func:`load_user_task` picks the loader from the path. Labels may be integers (``0``, ``1``...) or names
(``"positive"``). Names are numbered in sorted order unless ``label_names`` (or a ``ClassLabel`` feature)
gives the order. Every error names the file, the line (or row) and the field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.core import io
from mergelab.core.errors import HubUnavailableError, InputError
from mergelab.pools.data.tasks import LazyColumn, TaskData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _labels_to_ints(
    raw: list[tuple[str, Any]],
    label_names: Sequence[str] | None,
    path: Path,
    label_field: str,
) -> tuple[list[int], list[str]]:
    """``raw`` holds (where, value) pairs; where is "line 3" / "row 3"."""
    if label_names is not None:
        names = [str(n) for n in label_names]
        index = {n: i for i, n in enumerate(names)}
        out = []
        for where, value in raw:
            if isinstance(value, bool):
                raise InputError(f"{path}: {where}: field {label_field!r} is a boolean ({value!r})")
            if isinstance(value, int):
                if not 0 <= value < len(names):
                    raise InputError(
                        f"{path}: {where}: field {label_field!r} is {value}, outside 0..{len(names) - 1}"
                    )
                out.append(value)
            elif str(value) in index:
                out.append(index[str(value)])
            elif str(value).strip().lstrip("-").isdigit() and 0 <= int(str(value)) < len(names):
                out.append(int(str(value)))
            else:
                raise InputError(
                    f"{path}: {where}: field {label_field!r} is {value!r}, not one of the label names {names}"
                )
        return out, names

    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v.strip())
        return None

    ints = [as_int(v) for _, v in raw]
    if raw and all(i is not None for i in ints):
        for (where, value), i in zip(raw, ints, strict=True):
            if i < 0:  # type: ignore[operator]
                raise InputError(
                    f"{path}: {where}: field {label_field!r} is {value!r}; integer labels start at 0"
                )
        top = max(ints)  # type: ignore[type-var]
        return [int(i) for i in ints], [str(k) for k in range(top + 1)]  # type: ignore[arg-type]
    for where, value in raw:
        if not isinstance(value, str):
            raise InputError(
                f"{path}: {where}: field {label_field!r} is {value!r}; labels of one file must be all "
                f"integers or all names"
            )
    names = sorted({str(v) for _, v in raw})
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v)] for _, v in raw], names


def _finish(
    path: Path,
    name: str | None,
    texts: Sequence[Any],
    raw_labels: list[tuple[str, Any]],
    ids: list[str],
    label_names: Sequence[str] | None,
    label_field: str,
    source: str,
) -> TaskData:
    if not len(texts):
        raise InputError(f"{path}: no examples (the file holds no data rows)")
    labels, names = _labels_to_ints(raw_labels, label_names, path, label_field)
    task = TaskData(
        name=name or path.stem,
        inputs=texts,
        labels=labels,
        ids=ids,
        groups=None,
        label_names=names,
        source=source,
    )
    return task


def _check_text(value: Any, path: Path, where: str, text_field: str) -> str:
    if value is None:
        raise InputError(f"{path}: {where}: field {text_field!r} is missing")
    if not isinstance(value, str):
        raise InputError(f"{path}: {where}: field {text_field!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise InputError(f"{path}: {where}: field {text_field!r} is empty")
    return value


def load_csv_task(
    path: str | Path,
    name: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Sequence[str] | None = None,
    delimiter: str | None = None,
    text_pair_field: str | None = None,
) -> TaskData:
    """A task from a CSV (or TSV: ``.tsv`` or ``delimiter="\\t"``) file with a header row; with
    ``text_pair_field`` each input is the pair (text, second text)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    texts, raw, ids = [], [], []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            fields = reader.fieldnames or []
            for want in (text_field, label_field, *([text_pair_field] if text_pair_field else [])):
                if want not in fields:
                    raise InputError(
                        f"{path}: line 1 (header): no field {want!r} (fields: {', '.join(fields) or 'none'})"
                    )
            for row_no, row in enumerate(reader, 1):
                where = f"line {reader.line_num} (row {row_no})"
                if None in row:
                    raise InputError(f"{path}: {where}: more values than header fields")
                text = _check_text(row.get(text_field), path, where, text_field)
                if text_pair_field:
                    text = (text, _check_text(row.get(text_pair_field), path, where, text_pair_field))
                texts.append(text)
                label = row.get(label_field)
                if label is None or not label.strip():
                    raise InputError(f"{path}: {where}: field {label_field!r} is missing or empty")
                raw.append((where, label.strip()))
                ids.append(f"{path.stem}-{row_no}")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise InputError(f"{path}: malformed CSV: {e}") from None
    return _finish(path, name, texts, raw, ids, label_names, label_field, f"user file {path}")


def load_jsonl_task(
    path: str | Path,
    name: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Sequence[str] | None = None,
    text_pair_field: str | None = None,
) -> TaskData:
    """A task from a JSON Lines file: one object per line with ``text`` and ``label``; blank lines skipped.
    With ``text_pair_field`` each input is the pair (text, second text)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    texts, raw, ids = [], [], []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: {where}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{path}: {where}: expected a JSON object, got {type(obj).__name__}")
                text = _check_text(obj.get(text_field), path, where, text_field)
                if text_pair_field:
                    text = (text, _check_text(obj.get(text_pair_field), path, where, text_pair_field))
                texts.append(text)
                if label_field not in obj or obj[label_field] is None or obj[label_field] == "":
                    raise InputError(f"{path}: {where}: field {label_field!r} is missing")
                raw.append((where, obj[label_field]))
                ids.append(str(obj["id"]) if "id" in obj else f"{path.stem}-{lineno}")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    return _finish(path, name, texts, raw, ids, label_names, label_field, f"user file {path}")


def _datasets():
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise InputError("reading a Hugging Face dataset needs the 'datasets' package "
                         "(pip install datasets, or pip install 'mergelab[hub]')") from None
    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_hf_task(
    path_or_id: str | Path,
    split: str | None = None,
    name: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    config: str | None = None,
    text_pair_field: str | None = None,
    image_field: str | None = None,
    limit: int | None = None,
) -> TaskData:
    """A task from a Hugging Face ``datasets`` dataset: a folder made by ``save_to_disk``, else a hub id.

    With a ``DatasetDict`` name the ``split``. Label names come from a ``ClassLabel`` feature if the
    label column has one. With ``image_field`` the inputs are that column's images, read and decoded only
    when asked for (:class:`~mergelab.pools.data.tasks.LazyColumn`); else ``text_field`` (and
    ``text_pair_field``) give texts. ``limit``: the first N rows only. ``datasets`` is imported only here.
    """
    datasets = _datasets()
    p = Path(path_or_id).expanduser()
    if p.exists():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001
            raise InputError(
                f"{p}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})"
            ) from None
        source = f"Hugging Face dataset on disk {p}"
    else:
        if not io.looks_like_hub_id(str(path_or_id)):
            raise InputError(f"{path_or_id}: no such file or folder")
        if io.hub_offline():
            raise HubUnavailableError(
                f"{path_or_id}: not a local path, and the Hugging Face hub is disabled (HF_HUB_OFFLINE/"
                "TRANSFORMERS_OFFLINE is set). Save the dataset with save_to_disk on a machine with internet "
                "and point 'path' at the folder.")
        try:
            ds = datasets.load_dataset(str(path_or_id), config, split=split)
        except Exception as e:  # noqa: BLE001  (network and format errors come in many types)
            raise HubUnavailableError(
                f"{path_or_id}: no such folder, and loading it from the Hugging Face hub failed "
                f"({type(e).__name__}: {e}); offline, save the dataset with save_to_disk and pass the folder"
            ) from None
        source = f"Hugging Face dataset {path_or_id}" + (f" ({config})" if config else "")
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise InputError(f"{path_or_id}: the dataset has splits {list(ds)}; name one with split=")
        if split not in ds:
            raise InputError(f"{path_or_id}: no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    wanted = (image_field,) if image_field else (text_field, *([text_pair_field] if text_pair_field else []))
    for want in (*wanted, label_field):
        if want not in ds.column_names:
            raise InputError(f"{path_or_id}: no field {want!r} (columns: {', '.join(ds.column_names)})")
    feature = ds.features[label_field]
    names = list(feature.names) if hasattr(feature, "names") else None
    n = len(ds) if limit is None else min(len(ds), limit)
    labels = list(ds.select(range(n))[label_field]) if n else []
    raw = [(f"row {i}", v) for i, v in enumerate(labels)]
    ids = [f"{p.name}-{i}" for i in range(n)]
    if image_field:
        return _finish(p, name or p.name, LazyColumn(ds, image_field, range(n)), raw, ids, names, label_field,
                       source)
    texts: list[Any] = []
    for i in range(n):
        row = ds[i]
        where = f"row {i}"
        text = _check_text(row[text_field], p, where, text_field)
        if text_pair_field:
            text = (text, _check_text(row[text_pair_field], p, where, text_pair_field))
        texts.append(text)
        if "id" in row:
            ids[i] = str(row["id"])
    return _finish(p, name or p.name, texts, raw, ids, names, label_field, source)


def load_image_folder(path: str | Path, name: str | None = None) -> TaskData:
    """A task from an image folder: one sub-folder per class (sorted names = class names), images inside."""
    from PIL import Image  # noqa: PLC0415

    path = Path(path)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{path}: an image folder needs one sub-folder per class (or give a saved dataset folder)")
    inputs, labels, ids = [], [], []
    for k, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(f) as im:
                        inputs.append(im.convert("RGB"))
                except OSError as exc:
                    raise InputError(f"{f}: not a readable image ({exc})") from None
                labels.append(k)
                ids.append(f"{cls}/{f.name}")
    if not inputs:
        raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class sub-folders")
    return TaskData(name or path.name, inputs, labels, ids=ids, label_names=classes, source=f"image folder {path}")


def load_tensor_file(path: str | Path, name: str | None = None) -> TaskData:
    """A task from a ``.pt`` file holding ``{"inputs": Tensor [N, ...], "labels": Tensor [N]}``."""
    path = Path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), torch.Tensor) \
            or not isinstance(obj.get("labels"), torch.Tensor):
        raise InputError(f"{path}: expected a dict with tensors 'inputs' [N, ...] and 'labels' [N]")
    if len(obj["inputs"]) != len(obj["labels"]):
        raise InputError(f"{path}: {len(obj['inputs'])} inputs but {len(obj['labels'])} labels")
    return TaskData(name or path.stem, list(obj["inputs"]), [int(v) for v in obj["labels"].tolist()],
                    source=f"tensor file {path}")


def load_user_task(path: str | Path, name: str | None = None, **kwargs: Any) -> TaskData:
    """Dispatch on the path: ``.csv`` / ``.tsv``, ``.jsonl`` / ``.ndjson``, ``.pt``, a saved dataset folder,
    an image folder, or a hub dataset id; ``kwargs`` go to that format's loader."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if p.is_dir():
        if _is_saved_dataset(p) or not any(c.is_dir() for c in p.iterdir()):
            return load_hf_task(p, name=name, **kwargs)
        return load_image_folder(p, name=name)
    if suffix in (".csv", ".tsv"):
        return load_csv_task(p, name=name, **kwargs)
    if suffix in (".jsonl", ".ndjson"):
        return load_jsonl_task(p, name=name, **kwargs)
    if suffix == ".pt" and p.is_file():
        return load_tensor_file(p, name=name)
    if not p.exists():
        if io.looks_like_hub_id(str(path)) and suffix == "":
            return load_hf_task(str(path), name=name, **kwargs)
        raise InputError(f"{p}: no such file or folder")
    raise InputError(
        f"{p}: unknown task file type {suffix!r}; use .csv, .tsv, .jsonl, .pt, an image folder or a saved dataset folder"
    )


def load_task_data(name: str, cfg: Any, kind: str, where: str | None = None) -> TaskData:
    """Task ``name`` of a pool YAML per ``cfg`` (a :class:`~mergelab.pools.pool.TaskDataConfig`) with the
    loader of its format; ``kind``: 'text' (texts or text pairs) or 'image'. Errors start with ``where``
    (default ``pool.tasks.NAME``)."""
    where = where or f"pool.tasks.{name}"
    p = Path(cfg.path).expanduser()
    is_dataset = (p.is_dir() and (_is_saved_dataset(p) or not any(c.is_dir() for c in p.iterdir()))) \
        or (not p.exists() and p.suffix == "")
    try:
        if is_dataset:
            fields: dict[str, Any] = {"image_field": cfg.image_field} if kind == "image" else \
                {"text_field": cfg.text_field, "text_pair_field": cfg.text_pair_field}
            task = load_hf_task(cfg.path, split=cfg.split or "test", name=name, label_field=cfg.label_field,
                                config=cfg.subset, limit=cfg.limit, **fields)
        elif p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson"):
            task = load_user_task(p, name=name, text_field=cfg.text_field, label_field=cfg.label_field,
                                  text_pair_field=cfg.text_pair_field)
        else:
            task = load_user_task(p, name=name)
    except InputError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if cfg.limit is not None and len(task) > cfg.limit:
        task = task.subset(range(cfg.limit))
    return task
