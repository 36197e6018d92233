"""Streamed static merges: slice by slice from safetensors files to safetensors shards.

A static merge is elementwise once its per-task thresholds are known, so it can run over slices of
``CHUNK`` elements of each tensor: read the slice from the pretrained model and from each expert, form
the task vectors, process them (DARE's drop, TIES' trim / elect / disjoint split), combine, write. Every
step calls the same functions of :mod:`mergelab.core.kernels` as the in-memory merge, so the result is
bit-identical to :func:`mergelab.merge`. Peak memory is a few slices per model (T + 1 models), not
whole models, plus the output's shard headers.

TIES needs its magnitude thresholds before trimming:

- ``scope="tensor"``: per tensor, two passes over that tensor's slices (radix selection,
  :class:`~mergelab.core.kernels.KthLargestAbs`) and then the merge pass;
- ``scope="global"`` (the paper's top-k over the whole task vector): two passes over the whole
  models for the exact global threshold of each task, then the merge pass, three reads in all.

DARE's mask of each (task, tensor) comes from its own counter-based generator
(:func:`~mergelab.core.kernels.dare_generator`), jumped to each slice's first element, so every slice, in any
pass and on any thread, sees the same dropped values as the in-memory merge.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergelab.core import kernels
from mergelab.core.errors import IncompatibleModelsError, InputError
from mergelab.core.io import SIDECAR_FILES, atomic_write_dir, check_output_path, resolve_model_path
from mergelab.core.statedict import TaskVector
from mergelab.methods.registry import check_params
from mergelab.methods.streaming.files import SafetensorsModel, ShardedWriter, TensorInfo, parse_size

DEFAULT_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class Pipeline:
    """The per-slice steps of one static method, read off its :class:`~mergelab.methods.MergePlan`."""

    coefficients: tuple[float, ...]
    drop_rate: float = 0.0
    seed: int = 0
    ties: bool = False
    density: float = 1.0
    scope: str = "global"
    label: str = ""  # "merge 'ties' with parameters {...}", for error messages

    @property
    def trims(self) -> bool:
        return self.ties and self.density < 1.0

    @classmethod
    def of(cls, method: str, tasks: list[str], params: Mapping[str, Any]) -> Pipeline:
        """Validate ``params`` with the method itself, run on empty task vectors (no tensor is touched),
        and translate its plan into slice steps."""
        info = check_params(method, params)
        plan = info.fn({t: TaskVector({}) for t in tasks}, **params)
        coeffs = tuple(plan.coefficients[t] for t in tasks)
        p = plan.params
        label = f"merge {method!r} with parameters {dict(params)!r}"
        if plan.method in ("average", "task_arithmetic"):
            return cls(coeffs, label=label)
        if plan.method == "ties":
            return cls(coeffs, ties=True, density=p["density"], scope=p["scope"], label=label)
        if plan.method == "dare_task_arithmetic":
            return cls(coeffs, drop_rate=p["drop_rate"], seed=p["seed"], label=label)
        if plan.method == "dare_ties":
            return cls(coeffs, drop_rate=p["drop_rate"], seed=p["seed"], ties=True,
                       density=p["density"], scope=p["scope"], label=label)
        raise InputError(f"method {method!r} cannot be streamed yet; merge in memory (without --stream)")


class _Inputs:
    """The pretrained model and the experts, checked against each other from their headers alone."""

    def __init__(self, pretrained: str | os.PathLike[str], experts: Mapping[str, str | os.PathLike[str]]):
        if not experts:
            raise InputError("no experts given: merging needs at least one expert model")
        self.pre_path = resolve_model_path(pretrained)
        self.pre = SafetensorsModel(self.pre_path, "pretrained")
        self.experts = {t: SafetensorsModel(resolve_model_path(p), f"expert {t!r}") for t, p in experts.items()}
        self.tasks = list(experts)
        pre = self.pre.tensors
        for t, model in self.experts.items():
            missing = [k for k in pre if k not in model.tensors]
            extra = [k for k in model.tensors if k not in pre]
            if missing or extra:
                what = f"missing key {missing[0]!r}" if missing else f"extra key {extra[0]!r}"
                more = len(missing) + len(extra) - 1
                raise IncompatibleModelsError(
                    f"expert {t!r} ({model.path}) does not match the pretrained model ({self.pre_path}): {what}"
                    f"{f' and {more} more' if more else ''}. Are both the same architecture?")
            for key, ref in pre.items():
                got = model.tensors[key]
                if got.shape != ref.shape:
                    raise IncompatibleModelsError(
                        f"expert {t!r}, key {key!r} ({got.file}): shape {got.shape} differs from the pretrained "
                        f"model's {ref.shape} ({ref.file})")
                if got.dtype.is_floating_point != ref.dtype.is_floating_point:
                    raise IncompatibleModelsError(
                        f"expert {t!r}, key {key!r} ({got.file}): dtype {got.dtype} cannot be merged with the "
                        f"pretrained model's {ref.dtype} (one is floating point, the other is not)")
        self.mergeable = [k for k, info in pre.items() if info.dtype.is_floating_point]

    def close(self) -> None:
        self.pre.close()
        for m in self.experts.values():
            m.close()


class StreamMerger:
    """One streamed merge; :meth:`run` writes the output directory.

    Slices are processed by ``threads`` worker threads, each running torch single-threaded: whole
    slices in parallel (reading included) rather than each small operation split across threads, which
    keeps both cores busy without a barrier per operation and stays robust on a shared machine.
    Results are consumed in slice order, with at most ``threads + 1`` slices in flight.
    """

    def __init__(self, inputs: _Inputs, pipeline: Pipeline, *, chunk: int = kernels.CHUNK,
                 check_finite: bool = True, threads: int | None = None,
                 progress: Callable[[int], None] | None = None):
        self.inp = inputs
        self.pipe = pipeline
        self.chunk = int(chunk) + int(chunk) % 2  # DARE slices start at even elements
        self.check_finite = check_finite
        self.threads = max(1, threads or torch.get_num_threads())
        self.progress = progress or (lambda n: None)
        self._checked: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None

    # -------------------------------------------------------------- slices

    def _jobs(self, key: str) -> list[tuple[str, int, int, bool]]:
        n = self.inp.pre.tensors[key].numel
        check = self.check_finite and key not in self._checked
        self._checked.add(key)
        return [(key, s, min(self.chunk, n - s), check) for s in range(0, n, self.chunk)]

    def _slice(self, key: str, start: int, count: int, check: bool) -> tuple[Tensor, list[Tensor]]:
        """The pretrained slice and the processed task-vector slices of elements start .. start+count."""
        info = self.inp.pre.tensors[key]
        p = self.inp.pre.read(key, start, count, torch.empty(count * info.itemsize, dtype=torch.uint8))
        es = []
        for t in self.inp.tasks:
            m = self.inp.experts[t]
            es.append(m.read(key, start, count, torch.empty(count * m.tensors[key].itemsize, dtype=torch.uint8)))
        if check:
            self._check_finite(key, p, es)
        taus = [kernels.task_vector(e, p) for e in es]
        if self.pipe.drop_rate > 0:
            taus = [kernels.drop(v, self.pipe.drop_rate, kernels.dare_generator(self.pipe.seed, t, key, start))
                    for v, t in zip(taus, self.inp.tasks)]
        return p, taus

    def _check_finite(self, key: str, p: Tensor, es: list[Tensor]) -> None:
        for owner, model, x in [("pretrained", self.inp.pre, p),
                                *((f"expert {t!r}", self.inp.experts[t], e) for t, e in zip(self.inp.tasks, es))]:
            if not kernels.all_finite(x):
                raise IncompatibleModelsError(
                    f"{owner}, key {key!r} ({model.tensors[key].file}): non-finite value(s) (NaN or Inf); "
                    "refusing to merge")

    def _map(self, jobs: Iterable[tuple[str, int, int, bool]], fn: Callable[[Tensor, list[Tensor]], Any]) -> Iterator[Any]:
        """``fn(pretrained slice, task-vector slices)`` for each job on the workers, results in job order."""
        def work(job):
            return fn(*self._slice(*job))

        if self._pool is None:
            for job in jobs:
                yield work(job)
            return
        window: deque = deque()
        for job in jobs:
            window.append(self._pool.submit(work, job))
            if len(window) > self.threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def _thresholds(self, keys: list[str]) -> list[Tensor]:
        """Each task's exact k-th largest |tau| over ``keys`` (one key: TIES per tensor; all: global)."""
        n = sum(self.inp.pre.tensors[k].numel for k in keys)
        sels = [kernels.KthLargestAbs(kernels.kept_count(n, self.pipe.density)) for _ in self.inp.tasks]
        for add in ("add_coarse", "add_fine"):
            def feed(p, taus, add=add):
                for sel, v in zip(sels, taus):
                    getattr(sel, add)(v)

            for key in keys:
                for _ in self._map(self._jobs(key), feed):
                    pass
                if len(keys) > 1:
                    self.progress(1)
            if add == "add_coarse":
                for sel in sels:
                    sel.end_coarse()
        return [sel.value() for sel in sels]

    def _merge_key(self, key: str, writer: ShardedWriter, thresholds: list[Tensor] | None) -> None:
        pipe = self.pipe

        def merged(p: Tensor, taus: list[Tensor]) -> Tensor:
            if pipe.ties:
                if thresholds is not None:
                    taus = [kernels.trim(v, thr) for v, thr in zip(taus, thresholds)]
                taus = kernels.disjoint_parts(taus, kernels.elect_sign(taus))
            out = kernels.combine_tensor(p, zip(pipe.coefficients, taus)).to(p.dtype)
            kernels.require_finite_result(key, out, pipe.label)
            return out

        writer.begin(key)
        for out in self._map(self._jobs(key), merged):
            writer.write(out)

    def _copy_key(self, key: str, writer: ShardedWriter) -> None:
        info = self.inp.pre.tensors[key]
        writer.begin(key)
        for start in range(0, info.numel, self.chunk):
            count = min(self.chunk, info.numel - start)
            writer.write(self.inp.pre.read(key, start, count, torch.empty(count * info.itemsize, dtype=torch.uint8)))

    # -------------------------------------------------------------- the merge

    def passes(self) -> int:
        """How many times each mergeable tensor is read (for progress bars)."""
        return 3 if self.pipe.trims and self.pipe.scope == "global" else 1

    def run(self, directory: Path, shard_size: int) -> None:
        torch_threads = torch.get_num_threads()
        if self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mergelab-stream")
            torch.set_num_threads(1)
        try:
            self._run(directory, shard_size)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            torch.set_num_threads(torch_threads)

    def _run(self, directory: Path, shard_size: int) -> None:
        pre = self.inp.pre.tensors
        entries = [(k, info.dtype, info.shape) for k, info in pre.items()]
        global_thr = None
        mergeable = [k for k in self.inp.mergeable if pre[k].numel]
        if self.pipe.trims and self.pipe.scope == "global" and mergeable:
            global_thr = self._thresholds(mergeable)
        writer = ShardedWriter(directory, entries, shard_size)
        for key, info in pre.items():
            if not info.dtype.is_floating_point:
                self._copy_key(key, writer)
            else:
                thr = global_thr
                if self.pipe.trims and self.pipe.scope == "tensor" and info.numel:
                    thr = self._thresholds([key])
                self._merge_key(key, writer, thr)
            self.progress(1)
        writer.close()


def stream_merge(
    method: str,
    pretrained: str | os.PathLike[str],
    experts: Mapping[str, str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    chunk: int = kernels.CHUNK,
    check_finite: bool = True,
    threads: int | None = None,
    progress: bool = False,
    **params: Any,
) -> Path:
    """Merge safetensors models slice by slice into a (sharded) Hugging Face directory at ``out``.

    Same methods, parameters and result (``torch.equal``) as :func:`mergelab.merge`; memory is a few
    slices of ``chunk`` elements per model and worker thread (``threads``, default: torch's thread
    count). ``shard_size``: bytes per output shard (``"5GB"``,
    ``"500MB"`` or a number). The directory is written atomically (temporary directory + rename),
    with the pretrained directory's config and tokenizer files.
    """
    size = parse_size(shard_size)
    if int(chunk) < 1:
        raise InputError(f"chunk must be a positive number of elements, got {chunk}")
    pipeline = Pipeline.of(method, list(experts), params)
    out_p = check_output_path(out, [pretrained, *experts.values()])
    inputs = _Inputs(pretrained, experts)
    try:
        merger = StreamMerger(inputs, pipeline, chunk=chunk, check_finite=check_finite, threads=threads)
        total = len(inputs.pre.tensors) + (2 * len(inputs.mergeable) if merger.passes() == 3 else 0)

        def fill(tmp: Path) -> None:
            if progress:
                from rich.progress import Progress

                with Progress(transient=True) as bar:
                    task = bar.add_task(f"streaming {method}", total=total)
                    merger.progress = lambda n: bar.advance(task, n)
                    merger.run(tmp, size)
            else:
                merger.run(tmp, size)
            if inputs.pre_path.is_dir():
                for name in SIDECAR_FILES:
                    if (inputs.pre_path / name).is_file():
                        shutil.copy2(inputs.pre_path / name, tmp / name)

        return atomic_write_dir(out_p, fill)
    finally:
        inputs.close()


__all__ = ["DEFAULT_SHARD_SIZE", "Pipeline", "StreamMerger", "TensorInfo", "stream_merge"]
