"""The one engine of static merges: a method's :class:`~mergelab.core.kernels.SliceForm` run slice by slice.

Both :func:`mergelab.merge` (state dicts in memory) and :func:`mergelab.methods.streaming.stream_merge`
(safetensors files) run here; only the source of the slices (views of tensors, or ``preadv`` from
files into reusable buffers) and the sink (tensors, or safetensors shards) differ. So the two give
the same bits, and the in-memory merge needs the inputs plus one model (the output), never T float32
task vectors.

Per slice of ``chunk`` elements of a floating tensor, on one worker thread (torch single-threaded):

1. read the pretrained slice p (float32: the read buffer itself; otherwise converted once);
2. tau_t = e_t - p into the worker's float32 buffers (``torch.sub`` with ``out=``: one pass, no
   temporaries; a bfloat16 expert is widened inside the same pass);
3. the form's steps (DARE's drop, TIES' trim, elect and split), in place;
4. acc = p + sum_t lambda_t tau_t, one ``add_(alpha=)`` pass per task (:func:`kernels.accumulate`), or, when
   the last step has an ``accumulate`` method (TIES' :class:`~mergelab.core.kernels.ElectDisjoint`), that
   method adds the parts itself in fewer passes;
5. one ``sum`` over the result: finite, or a closer look that names the input holding a NaN/Inf (every
   step propagates NaN and Inf to the result) or reports an overflow of the coefficients.

A form whose steps each read one task's vector alone (a ``one(tau, task, ctx)`` method: DARE's
:class:`~mergelab.core.kernels.Drop`; or no steps, averaging and Task Arithmetic) runs steps 2-4 one task
at a time in one tau buffer, on slices twice as long (:data:`~mergelab.core.kernels.CHUNK`).
A :class:`~mergelab.core.kernels.Trim` first needs each task's exact k-th largest magnitude
(:class:`~mergelab.core.kernels.SampledKthLargestAbs`, passes over the task vectors as the steps
before it leave them): per tensor just before that tensor is merged (``scope="tensor"``; a tensor whose
float32 task vectors, or else whose inputs in their own dtype, fit :data:`TAU_CACHE_BYTES` is read from
the files once), or over all tensors before anything is written (``scope="global"``).

Slices run on ``threads`` workers, at most ``threads + 1`` in flight, and come out in order to the sink.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch
from torch import Tensor

from mergelab.core import kernels
from mergelab.core.kernels import SliceContext, SliceForm
from mergelab.core.statedict import non_finite_error

# Magnitudes sampled per task for a TIES threshold; tensors with fewer values are selected in one pass.
SAMPLE = 1 << 18
# ... and for one tensor held in memory (a strided sample of it: uniform, so a narrower band)
SAMPLE_CACHED = 1 << 16
# The sampling pass of a large model reads every SAMPLE_SLICES-th slice of each tensor.
SAMPLE_SLICES = 4
# Band values kept for TIES thresholds, over all tasks (16M: 64 MB); past it, a third pass.
BAND_VALUES = 1 << 24
# Per-tensor TIES keeps a file-backed tensor's task vectors in memory up to this size, so that it is
# read once instead of three times.
TAU_CACHE_BYTES = 96 << 20


class Source(Protocol):
    """A model's tensors, read by slices. ``tensors[key]`` has ``dtype`` and ``shape``."""

    owner: str
    tensors: Mapping[str, Any]

    def read(self, key: str, start: int, count: int, buffer: Tensor | None) -> Tensor:
        """Elements ``start .. start + count`` of ``key`` flattened, in its dtype (possibly in ``buffer``, a
        uint8 tensor of at least ``count * itemsize`` bytes); the caller never writes into the result."""

    def file_of(self, key: str) -> Any: ...


# A source may also give its task vector directly: ``delta(key, start, count, out)`` writes the float32 slice
# e - p into ``out`` and returns it (a LoRA adapter's s B A, formed from its factors: no rounding through p + tau).


class StateDictSource:
    """Slices of in-memory tensors: views, no copies."""

    needs_buffer = False

    def __init__(self, sd: Mapping[str, Tensor], owner: str):
        self.owner = owner
        self.tensors = sd
        self._flat: dict[str, Tensor] = {}

    def read(self, key: str, start: int, count: int, buffer: Tensor | None = None) -> Tensor:
        flat = self._flat.get(key)
        if flat is None:
            flat = self._flat[key] = self.tensors[key].detach().reshape(-1)
        return flat[start:start + count]

    def file_of(self, key: str) -> None:
        return None

    def release(self, key: str) -> None:
        self._flat.pop(key, None)


class HeldTensor:
    """One tensor of a file-backed source, read into memory once: per-tensor TIES reads a tensor two to
    three times (thresholds, then the merge), so one whose inputs fit :data:`TAU_CACHE_BYTES` in their own
    dtype (bfloat16: half the float32 task vectors' size) is read from the files once and sliced from here."""

    needs_buffer = False

    def __init__(self, source: Source, key: str, values: Tensor):
        self.owner = source.owner
        self.tensors = source.tensors
        self._source, self._key, self._values = source, key, values

    def read(self, key: str, start: int, count: int, buffer: Tensor | None = None) -> Tensor:
        if key != self._key:
            raise KeyError(f"holds {self._key!r}, asked for {key!r}")
        return self._values[start:start + count]

    def file_of(self, key: str) -> Any:
        return self._source.file_of(key)


class Sink(Protocol):
    def begin(self, key: str) -> None: ...
    def write(self, chunk: Tensor) -> None: ...


class StateDictSink:
    """Collects the merged tensors in memory (one model)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self._flat: Tensor | None = None
        self._at = 0

    def allocate(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.tensors[key] = torch.empty(shape, dtype=dtype)

    def begin(self, key: str) -> None:
        self._flat = self.tensors[key].view(-1)
        self._at = 0

    def write(self, chunk: Tensor) -> None:
        n = chunk.numel()
        self._flat[self._at:self._at + n].copy_(chunk.reshape(-1))
        self._at += n


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


class SliceMerger:
    """One merge of ``experts`` into ``pre`` with ``form``; :meth:`run` writes every tensor to a sink.

    ``label`` names the merge in errors ("merge 'ties' with parameters {...}"); ``check_finite``: name
    the input that holds a NaN/Inf (else only the non-finite result is refused).
    """

    def __init__(self, pre: Source, experts: Mapping[str, Source], form: SliceForm, *, label: str,
                 chunk: int | None = None, threads: int | None = None, check_finite: bool = True,
                 progress: Callable[[int], None] | None = None):
        self.pre = pre
        self.experts = dict(experts)
        self.tasks = tuple(experts)
        self.sources = [pre, *self.experts.values()]
        self._raw = [getattr(s, "needs_buffer", True) for s in self.sources]  # which sources read into buffers
        missing = [t for t in self.tasks if t not in form.coefficients]
        if missing:
            raise ValueError(f"the slice form has no coefficient for task(s) {missing}")
        self.coefficients = [float(form.coefficients[t]) for t in self.tasks]
        self.steps = list(form.steps)
        self.trim_at = form.trim_at
        # every step reads one task's vector alone (DARE with Task Arithmetic; no step at all): form and add
        # the task vectors one at a time in one buffer, instead of holding all T of a slice at once
        self._per_task = all(hasattr(s, "one") for s in self.steps)
        self.label = label
        if chunk is None:  # see kernels.CHUNK
            chunk = kernels.CHUNK * (2 if self._per_task else 1)
        self.chunk = -(-int(chunk) // kernels.DARE_ALIGN) * kernels.DARE_ALIGN  # DARE slices start at multiples of 8
        self.select_chunk = 2 * self.chunk  # TIES' threshold passes: fewer, larger calls
        self.threads = max(1, threads or torch.get_num_threads())
        self.check_finite = check_finite
        self.progress = progress or (lambda n: None)
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._thresholds: tuple[Tensor, ...] | None = None
        self._lambdas: tuple[float, ...] | None = None
        self._cache_buf: Tensor | None = None
        self._cache_p: Tensor | None = None
        self._cache_tau: list[Tensor] = []

    # -------------------------------------------------------------- per-worker buffers

    def _buffers(self) -> dict[str, Any]:
        b = getattr(self._local, "b", None)
        if b is None:
            c = self.select_chunk if self.trim_at is not None else self.chunk
            b = self._local.b = {
                "raw": [torch.empty(c * 8, dtype=torch.uint8) if raw else None for raw in self._raw],
                "p32": torch.empty(c), "tau": [torch.empty(c) for _ in self.tasks], "scratch": torch.empty(c),
            }
        return b

    # -------------------------------------------------------------- one slice

    def _pre32(self, key: str, start: int, count: int, b: dict) -> tuple[Tensor, Tensor]:
        p = self.pre.read(key, start, count, b["raw"][0])
        return p, (p if p.dtype == torch.float32 else b["p32"][:count].copy_(p))

    def _tau(self, i: int, key: str, start: int, count: int, p32: Tensor, b: dict, out: Tensor) -> Tensor:
        """Task ``i``'s task vector on one slice, in ``out``."""
        src = self.experts[self.tasks[i]]
        delta = getattr(src, "delta", None)
        if delta is not None:
            return delta(key, start, count, out)
        return torch.sub(src.read(key, start, count, b["raw"][i + 1]), p32, out=out)

    def _taus(self, key: str, start: int, count: int, p32: Tensor, b: dict, upto: int | None) -> list[Tensor]:
        """The task vectors of one slice after the steps before index ``upto`` (all steps: None)."""
        taus = [self._tau(i, key, start, count, p32, b, b["tau"][i][:count]) for i in range(len(self.tasks))]
        ctx = SliceContext(key, start, self.tasks, self._thresholds, self._lambdas)
        for step in self.steps[:upto]:
            taus = step(taus, ctx)
        return taus

    def _merge_cached(self, key: str, start: int, count: int) -> Tensor:
        """A merged slice from the cached task vectors of ``key`` (TIES per tensor, see :meth:`_cache`)."""
        p32 = self._cache_p[start:start + count]
        acc = p32.clone()
        taus = [row[start:start + count] for row in self._cache_tau]
        ctx = SliceContext(key, start, self.tasks, self._thresholds, self._lambdas)
        self._combine(acc, taus, ctx, self.trim_at)
        return self._finish(key, start, count, acc, self.pre.tensors[key].dtype)

    def _combine(self, acc: Tensor, taus: list[Tensor], ctx: SliceContext, first: int | None) -> None:
        """acc += sum_t lambda_t part_t, the parts being ``taus`` after the steps from index ``first``; a last
        step with an ``accumulate`` method (:class:`~mergelab.core.kernels.ElectDisjoint`) adds them itself."""
        steps = self.steps[first or 0:]
        last = steps[-1] if steps and hasattr(steps[-1], "accumulate") else None
        for step in steps[:-1] if last is not None else steps:
            taus = step(taus, ctx)
        if last is not None:
            last.accumulate(acc, self.coefficients, taus, ctx)
            return
        for lam, part in zip(self.coefficients, taus):
            kernels.accumulate(acc, lam, part)

    def _cache(self, key: str) -> None:
        """Read ``key`` once: its float32 pretrained values and task vectors (the steps before the trim
        applied) into the cache, then each task's threshold from the cache."""
        n = numel(self.pre.tensors[key].shape)
        if self._cache_buf is None:
            self._cache_buf = torch.empty(TAU_CACHE_BYTES // 4)
        self._cache_p = self._cache_buf[:n]
        tau = self._cache_buf[n:n * (len(self.tasks) + 1)].view(len(self.tasks), n)
        self._cache_tau = list(tau.unbind(0))

        def fill(key: str, start: int, count: int) -> None:
            b = self._buffers()
            _, p32 = self._pre32(key, start, count, b)
            self._cache_p[start:start + count].copy_(p32)
            for row, v in zip(self._cache_tau, self._taus(key, start, count, p32, b, self.trim_at)):
                row[start:start + count].copy_(v)

        for _ in self._map(self._slices(key), fill):
            pass
        k = kernels.kept_count(n, self.steps[self.trim_at].density)
        stride = 1 if n <= SAMPLE_CACHED else -(-n // SAMPLE_CACHED)

        def select(i: int, *_: Any) -> Tensor:
            row = self._cache_tau[i]
            sel = kernels.SampledKthLargestAbs(n, k, stride, max_band=BAND_VALUES // len(self.tasks))
            sel.add_sample(row)
            sel.end_sample()
            if stride > 1:
                for c in row.split(self.select_chunk):
                    sel.add_band(c)
            v = sel.value()
            if sel.needs_fine:
                for c in row.split(self.select_chunk):
                    sel.add_fine(c)
                v = sel.value()
            return v if v is not None else kernels.kth_largest_abs([row], k)

        self._set_thresholds(tuple(self._map([(i, 0, 0) for i in range(len(self.tasks))], select)))

    def _set_thresholds(self, values: tuple[Tensor, ...]) -> None:
        self._thresholds = values
        self._lambdas = tuple(kernels.trim_lambda(v) for v in values)

    def _holdable(self, key: str) -> bool:
        """Whether :meth:`_hold` can read ``key``'s inputs into memory: file-backed sources only (an adapter
        forms its task vector from its factors), within the cache's bytes."""
        if not all(self._raw) or any(hasattr(s, "delta") for s in self.sources):
            return False
        n = numel(self.pre.tensors[key].shape)
        return sum(-(-n * itemsize(s.tensors[key].dtype) // 64) * 64 for s in self.sources) <= TAU_CACHE_BYTES

    def _hold(self, key: str) -> tuple[Source, dict[str, Source], list[Source]]:
        """Read ``key`` of every source into the cache (as :class:`HeldTensor` sources in their place);
        returns the sources to put back after the tensor."""
        n = numel(self.pre.tensors[key].shape)
        if self._cache_buf is None:
            self._cache_buf = torch.empty(TAU_CACHE_BYTES // 4)
        arena = self._cache_buf.view(torch.uint8)
        jobs = []
        at = 0
        for src in self.sources:
            size = n * itemsize(src.tensors[key].dtype)
            jobs.append((src, arena[at:at + size]))
            at += -(-size // 64) * 64

        def read(src: Source, buf: Tensor) -> HeldTensor:
            return HeldTensor(src, key, src.read(key, 0, n, buf))

        held = list(self._pool.map(read, *zip(*jobs)) if self._pool is not None else map(read, *zip(*jobs)))
        saved = (self.pre, self.experts, self.sources)
        self.pre, self.sources = held[0], held
        self.experts = dict(zip(self.tasks, held[1:]))
        return saved

    def _cacheable(self, key: str) -> bool:
        return (getattr(self.pre, "needs_buffer", True)
                and numel(self.pre.tensors[key].shape) * 4 * (len(self.tasks) + 1) <= TAU_CACHE_BYTES)

    def _finish(self, key: str, start: int, count: int, acc: Tensor, dtype: torch.dtype) -> Tensor:
        """The merged slice in the output dtype, after the finiteness check."""
        out = acc if dtype == torch.float32 else acc.to(dtype)
        if not bool(torch.isfinite(out.sum(dtype=torch.float32))) and not kernels.all_finite(out):
            self._explain_non_finite(key, start, count, out)
        return out

    def _merge_slice(self, key: str, start: int, count: int) -> Tensor:
        b = self._buffers()
        p, p32 = self._pre32(key, start, count, b)
        acc = p32.clone()
        if self._per_task:
            tau = b["tau"][0][:count]
            ctx = SliceContext(key, start, self.tasks, self._thresholds, self._lambdas)
            for i, lam in enumerate(self.coefficients):
                v = self._tau(i, key, start, count, p32, b, tau)
                for step in self.steps:
                    v = step.one(v, self.tasks[i], ctx)
                kernels.accumulate(acc, lam, v)
        else:
            taus = self._taus(key, start, count, p32, b, 0)
            self._combine(acc, taus, SliceContext(key, start, self.tasks, self._thresholds, self._lambdas), 0)
        return self._finish(key, start, count, acc, p.dtype)

    def _explain_non_finite(self, key: str, start: int, count: int, out: Tensor) -> None:
        if self.check_finite:
            for src in self.sources:
                x = src.read(key, start, count, torch.empty(count * 8, dtype=torch.uint8))
                if not kernels.all_finite(x):
                    raise non_finite_error(src.owner, key, self._count_non_finite(src, key), src.file_of(key))
        kernels.require_finite_result(key, out, self.label)

    def _count_non_finite(self, src: Source, key: str) -> int:
        n = numel(src.tensors[key].shape)
        bad = 0
        buf = torch.empty(self.chunk * 8, dtype=torch.uint8)
        for s in range(0, n, self.chunk):
            x = src.read(key, s, min(self.chunk, n - s), buf)
            bad += int((~torch.isfinite(x)).sum())
        return bad

    # -------------------------------------------------------------- passes

    def _slices(self, key: str, chunk: int | None = None) -> list[tuple[str, int, int]]:
        n = numel(self.pre.tensors[key].shape)
        c = chunk or self.chunk
        return [(key, s, min(c, n - s)) for s in range(0, n, c)]

    def _map(self, jobs: Iterable[tuple[str, int, int]], fn: Callable[[str, int, int], Any]) -> Iterator[Any]:
        """``fn(*job)`` on the workers, results in job order, at most ``threads + 1`` in flight."""
        if self._pool is None:
            for job in jobs:
                yield fn(*job)
            return
        window: deque = deque()
        for job in jobs:
            window.append(self._pool.submit(fn, *job))
            if len(window) > self.threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def _feed(self, keys: list[str], fn: Callable[[int, Tensor], None], every: int = 1) -> None:
        """One pass over ``keys`` (every ``every``-th slice of each): ``fn(task index, tau slice)`` with the
        steps before the trim applied."""
        def work(key: str, start: int, count: int) -> None:
            b = self._buffers()
            _, p32 = self._pre32(key, start, count, b)
            for i, v in enumerate(self._taus(key, start, count, p32, b, self.trim_at)):
                fn(i, v)

        for key in keys:
            for _ in self._map(self._slices(key, self.select_chunk)[::every], work):
                pass
            if len(keys) > 1 and every == 1:
                self.progress(1)

    def _select(self, keys: list[str]) -> tuple[Tensor, ...]:
        """Each task's exact k-th largest |tau| over ``keys`` (TIES per tensor: one key; global: all).

        Sampled band selection (:class:`~mergelab.core.kernels.SampledKthLargestAbs`): a sampling pass and a
        counting pass (a third where a band holds more than ``BAND_VALUES / T`` values), or a single
        pass for tensors of up to ``SAMPLE`` values; the radix selection
        (:class:`~mergelab.core.kernels.KthLargestAbs`, two more passes) only where a band missed.
        """
        n = sum(numel(self.pre.tensors[k].shape) for k in keys)
        k = kernels.kept_count(n, self.steps[self.trim_at].density)
        # the sample: every SAMPLE_SLICES-th slice of each tensor (all of a small model), strided within
        every = SAMPLE_SLICES if n > SAMPLE * SAMPLE_SLICES else 1
        seen = sum(c for key in keys for _, _, c in self._slices(key, self.select_chunk)[::every])
        stride = 1 if n <= SAMPLE else -(-seen // SAMPLE)
        sels = [kernels.SampledKthLargestAbs(n, k, stride, max_band=BAND_VALUES // len(self.tasks),
                                             clustered=every > 1) for _ in self.tasks]
        self._feed(keys, lambda i, v: sels[i].add_sample(v), every)
        for sel in sels:
            sel.end_sample()
        if stride > 1:
            self._feed(keys, lambda i, v: sels[i].add_band(v))
        values = [sel.value() for sel in sels]
        if any(sel.needs_fine for sel in sels):
            self._feed(keys, lambda i, v: sels[i].add_fine(v))
            values = [sel.value() for sel in sels]
        missed = [i for i, v in enumerate(values) if v is None]
        if missed:
            radix = {i: kernels.KthLargestAbs(k) for i in missed}
            self._feed(keys, lambda i, v: radix[i].add_coarse(v) if i in radix else None)
            for sel in radix.values():
                sel.end_coarse()
            self._feed(keys, lambda i, v: radix[i].add_fine(v) if i in radix else None)
            for i, sel in radix.items():
                values[i] = sel.value()
        return tuple(values)

    def passes(self) -> int:
        """How many times each floating tensor is read (3 with a global trim, for progress bars)."""
        return 3 if self.trim_at is not None and self.steps[self.trim_at].scope == "global" else 1

    def run(self, sink: Sink) -> None:
        torch_threads = torch.get_num_threads()
        if self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mergelab-merge")
            torch.set_num_threads(1)
        try:
            self._run(sink)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            torch.set_num_threads(torch_threads)

    def _run(self, sink: Sink) -> None:
        pre = self.pre.tensors
        floating = [k for k, info in pre.items() if info.dtype.is_floating_point and numel(info.shape)]
        scope = self.steps[self.trim_at].scope if self.trim_at is not None else None
        if scope == "global" and floating:
            self._set_thresholds(self._select(floating))
        for key, info in pre.items():
            sink.begin(key)
            if not info.dtype.is_floating_point:
                for k, s, c in self._slices(key):
                    sink.write(self.pre.read(k, s, c, torch.empty(c * itemsize(info.dtype), dtype=torch.uint8)).clone())
            elif numel(info.shape):
                merge = self._merge_slice
                saved = None
                cached = scope == "tensor" and self._cacheable(key)
                if cached:
                    self._cache(key)
                    merge = self._merge_cached
                elif scope == "tensor" and self._holdable(key):
                    saved = self._hold(key)
                try:
                    if scope == "tensor" and not cached:
                        self._set_thresholds(self._select([key]))
                    for out in self._map(self._slices(key), merge):
                        sink.write(out)
                finally:
                    if saved is not None:
                        self.pre, self.experts, self.sources = saved
            for src in self.sources:
                if hasattr(src, "release"):
                    src.release(key)
            self.progress(1)


def merge_state_dicts(form: SliceForm, pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]],
                      *, label: str, threads: int | None = None, chunk: int | None = None) -> dict[str, Tensor]:
    """The in-memory merge: ``form`` over state dicts (checked compatible by the caller), a new state dict.

    Peak memory: the inputs, the output, and a few slices per worker.
    """
    sink = StateDictSink()
    for key, t in pretrained.items():
        sink.allocate(key, t.dtype, tuple(t.shape))
    pre = StateDictSource(pretrained, "pretrained")
    srcs = {t: StateDictSource(sd, f"expert {t!r}") for t, sd in experts.items()}
    SliceMerger(pre, srcs, form, label=label, threads=threads, chunk=chunk).run(sink)
    return sink.tensors


__all__ = ["SliceMerger", "Sink", "Source", "StateDictSink", "StateDictSource", "merge_state_dicts"]
