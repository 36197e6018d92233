"""Streamed static merges: slice by slice from safetensors files to safetensors shards.

A registered static method declares its per-tensor form (``register(name, stream=...)``, a
:class:`~mergelab.core.kernels.SliceForm` built from the shared kernels); :func:`stream_merge` runs that form
in :mod:`mergelab.methods.streaming.engine` with the files as the source and safetensors shards as the sink,
the same engine :func:`mergelab.merge` runs on state dicts, so the result is bit-identical to the
in-memory merge. Peak memory is a few slices per model per worker thread, not whole models, plus
the output's shard headers. A method registered without a form is refused here with a message
saying so; ``mergelab merge`` then runs it in memory.

TIES needs its magnitude thresholds before trimming:

- ``scope="tensor"``: per tensor, two passes over that tensor's slices (radix selection,
  :class:`~mergelab.core.kernels.KthLargestAbs`) and then the merge pass;
- ``scope="global"`` (the paper's top-k over the whole task vector): two passes over the whole
  models for the exact global threshold of each task, then the merge pass, three reads in all.

DARE's mask of each (task, tensor) comes from its own generator (:func:`~mergelab.core.kernels.dare_keep_mask`),
jumped to each slice's first element, so every slice, in any pass and on any thread, sees the same
dropped values as the in-memory merge.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergelab.core.atomic import check_output_path
from mergelab.core.checkpoint import copy_sidecars, write_model_dir
from mergelab.core.errors import InputError
from mergelab.core.io import resolve_model_path
from mergelab.core.lora import is_adapter_dir
from mergelab.core.statedict import check_compatible
from mergelab.methods.registry import merge_label, slice_form
from mergelab.methods.streaming.adapters import AdapterSource
from mergelab.methods.streaming.engine import SliceMerger
from mergelab.methods.streaming.files import SafetensorsModel, ShardedWriter, TensorInfo, parse_size

DEFAULT_SHARD_SIZE = "5GB"


class StreamInputs:
    """The pretrained model and the experts as safetensors, checked against each other from their headers."""

    def __init__(self, pretrained: str | os.PathLike[str], experts: Mapping[str, str | os.PathLike[str]]):
        if not experts:
            raise InputError("no experts given: merging needs at least one expert model")
        self.pre_path = resolve_model_path(pretrained)
        self.pre = SafetensorsModel(self.pre_path, "pretrained")
        self.experts: dict[str, SafetensorsModel | AdapterSource] = {}
        self.tasks = list(experts)
        try:
            for t, p in experts.items():  # a LoRA adapter folder is read as factors over the base (adapters.py)
                self.experts[t] = (AdapterSource(p, self.pre, f"expert {t!r}") if is_adapter_dir(p) else
                                   SafetensorsModel(resolve_model_path(p), f"expert {t!r}"))
            full = {t: m for t, m in self.experts.items() if isinstance(m, SafetensorsModel)}
            if full:
                check_compatible(self.pre, full, check_finite=False)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.pre.close()
        for m in self.experts.values():
            if isinstance(m, SafetensorsModel):
                m.close()


def streamable(pretrained: str | os.PathLike[str], experts: Mapping[str, str | os.PathLike[str]]) -> str | None:
    """None if every model can be streamed (safetensors, sharded or not), else why not (naming the model)."""
    from mergelab.core.checkpoint import locate_weights

    models = [("pretrained", pretrained), *((f"expert {t!r}", p) for t, p in experts.items() if not is_adapter_dir(p))]
    for owner, spec in models:
        try:
            weights = locate_weights(resolve_model_path(spec))
        except InputError:
            return None  # the streamed merge reports the problem itself, naming the file
        if not weights.streamable:
            return (f"{owner} {spec} is a pickle checkpoint ({weights.files[0].name}); streaming reads safetensors "
                    "only (convert it with safetensors.torch.save_file to stream)")
    return None


def stream_merge(
    method: str,
    pretrained: str | os.PathLike[str],
    experts: Mapping[str, str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    chunk: int | None = None,
    check_finite: bool = True,
    threads: int | None = None,
    progress: bool = False,
    **params: Any,
) -> Path:
    """Merge safetensors models slice by slice into a (sharded) Hugging Face directory at ``out``.

    An expert may be a PEFT LoRA adapter folder over ``pretrained``: its task vector s B A is formed slice by slice
    from its factors (:mod:`mergelab.methods.streaming.adapters`); equal to the in-memory LoRA merge up to float
    rounding (the factored Task Arithmetic there sums in another order).

    Same methods, parameters and result (``torch.equal``) as :func:`mergelab.merge`; memory is a few
    slices of ``chunk`` elements per model and worker thread (``threads``, default: torch's thread
    count; ``chunk`` default: the engine's, see :data:`mergelab.core.kernels.CHUNK`). ``shard_size``: bytes per output shard (``"5GB"``, ``"500MB"`` or a number). The
    directory is written atomically (temporary directory + rename), with the pretrained directory's
    config and tokenizer files.
    """
    size = parse_size(shard_size)
    if chunk is not None and int(chunk) < 1:
        raise InputError(f"chunk must be a positive number of elements, got {chunk}")
    form = slice_form(method, list(experts), params)
    out_p = check_output_path(out, [pretrained, *experts.values()])
    inputs = StreamInputs(pretrained, experts)
    try:
        merger = SliceMerger(inputs.pre, inputs.experts, form, label=merge_label(method, params), chunk=chunk,
                             check_finite=check_finite, threads=threads)
        floating = sum(1 for info in inputs.pre.tensors.values() if info.dtype.is_floating_point)
        total = len(inputs.pre.tensors) + (2 * floating if merger.passes() == 3 else 0)

        def fill(tmp: Path) -> None:
            entries = [(k, info.dtype, info.shape) for k, info in inputs.pre.tensors.items()]
            writer = ShardedWriter(tmp, entries, size)
            if progress:
                from rich.progress import Progress

                with Progress(transient=True) as bar:
                    task = bar.add_task(f"streaming {method}", total=total)
                    merger.progress = lambda n: bar.advance(task, n)
                    merger.run(writer)
            else:
                merger.run(writer)
            writer.close()
            copy_sidecars(inputs.pre_path, tmp)

        return write_model_dir(out_p, fill)
    finally:
        inputs.close()


__all__ = ["DEFAULT_SHARD_SIZE", "StreamInputs", "TensorInfo", "stream_merge", "streamable"]
