"""safetensors files read and written a slice at a time, never a whole model in memory.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length N, N bytes of
JSON ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
raw little-endian tensor bytes, offsets relative to the end of the header.

Reading uses the header and ``os.preadv`` into reusable buffers rather than a memory map
(``safetensors.safe_open``): pages of a mapped file count in the process' resident memory for as long as
the file stays open, so a merge that maps T+1 models looks as large as the models; reading slices into
buffers keeps the resident memory at a few slices per model, and it is the same single copy out of the
page cache. Every error names the file, and the key where there is one.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mergelab.core.checkpoint import SAFETENSORS, SAFETENSORS_INDEX, locate_weights, shard_names
from mergelab.core.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: ``file`` from byte ``start``, ``numel`` elements of ``dtype``."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def _unreadable(path: Path, detail: str) -> InputError:
    """The message of a corrupt or truncated file, as the in-memory loader words it (mergelab.core.io)."""
    return InputError(f"{path}: cannot read weights ({detail})")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, in file order, after checking the header against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise _unreadable(path, f"{size} bytes, too short for a safetensors file (truncated?)")
            n = int.from_bytes(raw, "little")
            if n > size - 8 or n > _MAX_HEADER:
                raise _unreadable(path, f"header length {n} does not fit the file's {size} bytes: "
                                 "truncated, or not a safetensors file")
            text = fh.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path, f"the safetensors header is not a JSON object ({exc}); corrupt file?") from None
    base = 8 + n
    out: list[tuple[int, TensorInfo]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _unreadable(path, f"key {key!r}: bad header entry {entry!r} (unknown dtype or "
                             "missing shape/data_offsets)") from None
        info = TensorInfo(key, path, dtype, shape, base + begin)
        if end - begin != info.nbytes or begin < 0 or any(d < 0 for d in shape):
            raise _unreadable(path, f"key {key!r}: data_offsets {[begin, end]} do not hold shape {list(shape)} "
                             f"of {entry['dtype']} ({info.nbytes} bytes)")
        if base + end > size:
            raise _unreadable(path, f"key {key!r}: needs bytes up to {base + end} but the file has {size}; "
                             "the file is truncated")
        out.append((begin, info))
    return {info.key: info for _, info in sorted(out, key=lambda x: x[0])}


class SafetensorsModel(Mapping[str, TensorInfo]):
    """A model's tensors in one safetensors file, a sharded directory (with its index) or a directory with
    one ``model.safetensors`` (:func:`mergelab.core.checkpoint.locate_weights`); a mapping key -> header entry,
    read by slices with :meth:`read`. ``owner`` names the model in errors."""

    needs_buffer = True

    def __init__(self, path: str | os.PathLike[str], owner: str):
        self.owner = owner
        self.path = Path(path)
        self.tensors = self._locate(self.path)
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def file_of(self, key: str) -> Path:
        return self.tensors[key].file

    def _locate(self, path: Path) -> dict[str, TensorInfo]:
        if path.is_file() and path.suffix != ".safetensors":
            raise InputError(f"{self.owner} {path}: streaming reads .safetensors files; merge in memory "
                             "(without --stream) to read this format")
        try:
            weights = locate_weights(path)
        except InputError as exc:
            if "no weights found" not in str(exc):
                raise
            raise InputError(f"{self.owner} {path}: no safetensors weights found (expected {SAFETENSORS} or "
                             f"{SAFETENSORS_INDEX}); merge in memory (without --stream) for other formats") from None
        if not weights.streamable:
            raise InputError(f"{self.owner} {path}: {weights.files[0].name} is a pickle checkpoint; streaming reads "
                             "safetensors only, so this merge runs in memory (without --stream)")
        if weights.index is None:
            return read_header(weights.files[0])
        headers = {f.name: read_header(f) for f in weights.files}
        for key, shard in weights.weight_map.items():
            if key not in headers[shard]:
                raise InputError(f"{path / shard}: has no tensor {key!r}, which {weights.index.name} places there")
        out: dict[str, TensorInfo] = {}
        for shard, tensors in headers.items():  # file order: sequential reads
            out.update({k: info for k, info in tensors.items() if weights.weight_map.get(k) == shard})
        return out

    def read(self, key: str, start: int, count: int, buffer: Tensor | None) -> Tensor:
        """Elements ``start .. start+count`` of ``key`` (flattened), read into ``buffer`` (uint8, large enough;
        None: a new one)."""
        info = self.tensors[key]
        nbytes = count * info.itemsize
        if buffer is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        offset = info.start + start * info.itemsize
        fd = self._fds.get(info.file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        view = memoryview(buffer.numpy())[:nbytes]
        got = 0
        while got < nbytes:
            r = os.preadv(fd, [view[got:]], offset + got)
            if r <= 0:
                raise InputError(f"{info.file}, key {key!r}: file ended while reading (truncated since opened?)")
            got += r
        return buffer[:nbytes].view(info.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ShardedWriter:
    """Writes tensors, in the order given, as safetensors shards of at most ``shard_size`` bytes each
    (a larger tensor gets a shard of its own) plus ``model.safetensors.index.json`` when there are
    several. Each tensor's bytes are appended as they come (:meth:`write`), so no shard is ever held in
    memory; the headers are written first, from the known shapes."""

    def __init__(self, directory: Path, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 shard_size: int, metadata: dict[str, str] | None = None):
        if shard_size <= 0:
            raise InputError(f"shard size must be positive, got {shard_size}")
        self.directory = Path(directory)
        self.metadata = dict(metadata or {"format": "pt"})
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        used = 0
        for key, dtype, shape in entries:
            nbytes = _nbytes(dtype, shape)
            if shards[-1] and used + nbytes > shard_size:
                shards.append([])
                used = 0
            shards[-1].append((key, dtype, shape))
            used += nbytes
        self.shards = shards
        self.names = shard_names(len(shards))
        self._order = [(i, key) for i, shard in enumerate(shards) for key, _, _ in shard]
        self._sizes = {key: _nbytes(dtype, shape) for key, dtype, shape in entries}
        self._next = 0
        self._shard = -1
        self._fh = None
        self._left = 0
        self.total_size = sum(self._sizes.values())

    def _open(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for key, dtype, shape in self.shards[i]:
            n = _nbytes(dtype, shape)
            header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.directory / self.names[i], "wb", buffering=0)
        self._fh.write(len(raw).to_bytes(8, "little") + raw)
        self._shard = i

    def begin(self, key: str) -> None:
        """Start the next tensor; it must be ``key`` (tensors come in the order given)."""
        if self._left:
            raise RuntimeError(f"{self._left} bytes of the previous tensor were not written")
        shard, expected = self._order[self._next]
        if key != expected:
            raise RuntimeError(f"tensor {key!r} written out of order (expected {expected!r})")
        if shard != self._shard:
            self._open(shard)
        self._next += 1
        self._left = self._sizes[key]

    def write(self, chunk: Tensor) -> None:
        data = chunk.detach().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() > self._left:
            raise RuntimeError("more bytes written than the tensor holds")
        view = memoryview(data.numpy())
        done = 0
        while done < len(view):
            done += self._fh.write(view[done:])
        self._left -= data.numel()

    def close(self) -> None:
        """Finish the last shard and write the index (if sharded); every tensor must have been written."""
        if self._left or self._next != len(self._order):
            raise RuntimeError("not every tensor was written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.shards) == 0 or (len(self.shards) == 1 and not self.shards[0]):
            self._open(0)
            self._fh.close()
            self._fh = None
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {key: self.names[i] for i, key in self._order}}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            s, factor = s[: -len(unit)], mult
            break
    else:
        factor = 1
    try:
        value = float(s)
    except ValueError:
        raise InputError(f"shard size {text!r}: expected bytes or a size like 5GB, 500MB, 2GiB") from None
    if value <= 0:
        raise InputError(f"shard size {text!r} must be positive")
    return int(value * factor)
