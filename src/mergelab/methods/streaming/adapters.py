"""LoRA adapters as streamed experts: a base larger than memory merged with adapters, slice by slice.

A LoRA expert's task vector is s B A on each adapted weight and zero elsewhere (Hu et al. 2021, Eq. 3;
:mod:`mergelab.core.lora`). :class:`AdapterSource` gives it to the streaming engine as a source that hands over its
task vector directly (``delta``): for a slice of a weight's flattened values it forms only the rows of s B A that
the slice covers, from those rows' factors (:meth:`~mergelab.core.lora.LoraModule.delta_rows`), so no dense update
and no expert model exist in memory, and the task vector is s B A itself (not rounded through W0 + s B A). The
engine then runs the method's per-tensor form as for full experts: TIES and DARE act on the true updates. Memory:
the adapters' factors (in float32) plus the engine's few slices per model; the base is read once per pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from mergelab.core.errors import InputError
from mergelab.core.lora import LoraTaskVector, load_lora
from mergelab.methods.streaming.files import SafetensorsModel


class AdapterSource:
    """A PEFT LoRA adapter folder over the streamed base ``pre``: its factors in memory, its task vector by slices."""

    needs_buffer = False

    def __init__(self, path: str | Path, pre: SafetensorsModel, owner: str):
        self.owner = owner
        self.path = Path(path)
        self.pre = pre
        self.tensors = pre.tensors  # the expert's keys, shapes and dtypes are the base's
        try:  # every field, name and shape checked before anything is read
            self.vector: LoraTaskVector = load_lora(self.path, pre)
        except InputError as exc:
            raise type(exc)(f"{owner}: {exc}") from exc

    def delta(self, key: str, start: int, count: int, out: Tensor) -> Tensor:
        """Elements ``start .. start + count`` of the flattened s B A of ``key`` (zero where nothing is adapted)."""
        module = self.vector.modules.get(key)
        if module is None:
            return out.zero_()
        cols = int(self.tensors[key].shape[1])
        first, last = start // cols, -(-(start + count) // cols)
        rows = module.delta_rows(first, last).reshape(-1)
        offset = start - first * cols
        return out.copy_(rows[offset:offset + count])

    def read(self, key: str, start: int, count: int, buffer: Tensor | None = None) -> Tensor:
        """The expert's values W0 + s B A in float32 (the engine asks only to name a non-finite input)."""
        info = self.tensors[key]
        p = self.pre.read(key, start, count, torch.empty(count * info.itemsize, dtype=torch.uint8))
        if not info.dtype.is_floating_point:
            return p
        return p.to(torch.float32) + self.delta(key, start, count, torch.empty(count))

    def file_of(self, key: str) -> Path:
        return self.path


__all__ = ["AdapterSource"]
