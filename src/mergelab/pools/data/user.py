"""Users' own tasks: a CSV / TSV / JSONL file with a text and a label per example, or a Hugging Face
``datasets`` dataset (saved to disk with ``save_to_disk``, or a hub id when online).

Labels may be integers (``0``, ``1``...) or names (``"positive"``). Names are numbered in sorted order
unless ``label_names`` gives the order. Every error names the file, the line (or row) and the field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergelab.core.errors import HubUnavailableError, InputError
from mergelab.pools.data.tasks import TextTask


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
    texts: list[str],
    raw_labels: list[tuple[str, Any]],
    ids: list[str],
    label_names: Sequence[str] | None,
    label_field: str,
    source: str,
) -> TextTask:
    if not texts:
        raise InputError(f"{path}: no examples (the file holds no data rows)")
    labels, names = _labels_to_ints(raw_labels, label_names, path, label_field)
    task = TextTask(
        name=name or path.stem,
        texts=texts,
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
) -> TextTask:
    """A task from a CSV (or TSV: ``.tsv`` or ``delimiter="\\t"``) file with a header row."""
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
            for want in (text_field, label_field):
                if want not in fields:
                    raise InputError(
                        f"{path}: line 1 (header): no field {want!r} (fields: {', '.join(fields) or 'none'})"
                    )
            for row_no, row in enumerate(reader, 1):
                where = f"line {reader.line_num} (row {row_no})"
                if None in row:
                    raise InputError(f"{path}: {where}: more values than header fields")
                texts.append(_check_text(row.get(text_field), path, where, text_field))
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
) -> TextTask:
    """A task from a JSON Lines file: one object per line with ``text`` and ``label``; blank lines skipped."""
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
                texts.append(_check_text(obj.get(text_field), path, where, text_field))
                if label_field not in obj or obj[label_field] is None or obj[label_field] == "":
                    raise InputError(f"{path}: {where}: field {label_field!r} is missing")
                raw.append((where, obj[label_field]))
                ids.append(str(obj["id"]) if "id" in obj else f"{path.stem}-{lineno}")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    return _finish(path, name, texts, raw, ids, label_names, label_field, f"user file {path}")


def load_hf_task(
    path_or_id: str | Path,
    split: str | None = None,
    name: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    config: str | None = None,
) -> TextTask:
    """A task from a Hugging Face ``datasets`` dataset: a folder made by ``save_to_disk``, else a hub id.

    With a ``DatasetDict`` name the ``split``. Label names come from a ``ClassLabel`` feature if the
    label column has one. ``datasets`` is imported only here.
    """
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise InputError(
            f"{path_or_id}: loading a Hugging Face dataset needs the 'datasets' package (pip install datasets)"
        ) from None
    p = Path(path_or_id)
    if p.exists():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001
            raise InputError(
                f"{p}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})"
            ) from None
        source = f"Hugging Face dataset on disk {p}"
    else:
        try:
            ds = datasets.load_dataset(str(path_or_id), config, split=split)
        except Exception as e:  # noqa: BLE001
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
    for want in (text_field, label_field):
        if want not in ds.column_names:
            raise InputError(f"{path_or_id}: no field {want!r} (columns: {', '.join(ds.column_names)})")
    feature = ds.features[label_field]
    names = list(feature.names) if hasattr(feature, "names") else None
    texts, raw, ids = [], [], []
    for i, row in enumerate(ds):
        where = f"row {i}"
        texts.append(_check_text(row[text_field], p, where, text_field))
        raw.append((where, row[label_field]))
        ids.append(str(row["id"]) if "id" in row else f"{p.name}-{i}")
    return _finish(p, name or p.name, texts, raw, ids, names, label_field, source)


def load_user_task(path: str | Path, name: str | None = None, **kwargs: Any) -> TextTask:
    """Dispatch on the path: ``.csv`` / ``.tsv``, ``.jsonl`` / ``.ndjson``, or a dataset folder."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir():
        return load_hf_task(p, name=name, **kwargs)
    if suffix in (".csv", ".tsv"):
        return load_csv_task(p, name=name, **kwargs)
    if suffix in (".jsonl", ".ndjson"):
        return load_jsonl_task(p, name=name, **kwargs)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    raise InputError(
        f"{p}: unknown task file type {suffix!r}; use .csv, .tsv, .jsonl or a saved dataset folder"
    )
