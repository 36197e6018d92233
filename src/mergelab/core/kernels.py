"""Per-tensor arithmetic of the static methods, shared by the in-memory and the streamed merges.

Every function here is elementwise over its tensor arguments, or (for :class:`KthLargestAbs`) exact
over a stream of chunks, so applying it to whole tensors or to consecutive slices of them gives
bit-identical results. The dict-level transforms in :mod:`mergelab.methods.transforms` and
:func:`mergelab.core.statedict.combine` call these on whole tensors; :mod:`mergelab.methods.streaming` calls the
same functions on slices read from safetensors files. That is what makes a streamed merge equal
the in-memory one (``torch.equal``), without a second implementation of any method.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from mergelab.core.errors import InputError

# Elements per slice of a merge whose steps read every task's slice at once (TIES): T task vectors of
# 512 KB each stay within the L3 cache. A form that forms and adds the task vectors one at a time
# (Task Arithmetic, averaging, DARE) and TIES' threshold passes take slices twice this size, which halves
# the per-slice Python and numpy calls (DARE's merge: a quarter less CPU); the A/B is in docs/performance.md.
CHUNK = 1 << 17


def task_vector(expert: Tensor, pre: Tensor) -> Tensor:
    """tau = theta_t - theta_0 in float32 (Ilharco et al., ICLR 2023, Sec. 2)."""
    return expert.detach().to(torch.float32) - pre.detach().to(torch.float32)


def combine_tensor(base: Tensor, terms: Iterable[tuple[float | Tensor, Tensor]]) -> Tensor:
    """theta_0 + sum_t lambda_t tau_t for one tensor, accumulated in float32 in the order of ``terms``.

    Without gradients the sum is formed in place (``acc += lambda * tau`` through one scratch tensor),
    which rounds exactly like ``acc = acc + lambda * tau``; with a coefficient or vector that requires
    grad it is formed out of place so that autograd sees it.
    """
    acc = base.detach().to(torch.float32, copy=True)
    for lam, vec in terms:
        grad = acc.requires_grad or vec.requires_grad or (isinstance(lam, Tensor) and lam.requires_grad)
        if grad:
            acc = acc + lam * vec
            continue
        accumulate(acc, lam, vec)
    return acc


def combine_stacked(base: Tensor, coefficients: Tensor, stacked: Tensor) -> Tensor:
    """theta_0 + sum_t lambda_t tau_t for one tensor with the task vectors stacked ``[T, *shape]`` and the
    coefficients a ``[T]`` tensor: one ``tensordot``, differentiable in the coefficients.

    :func:`combine_tensor`'s formula in the form test-time adaptation needs (AdaMerging, SyMerge): a
    loop of T scaled adds builds twice the autograd graph and measured 2.2x slower forward + backward.
    """
    return base + torch.tensordot(coefficients, stacked, dims=1)


_F32_MAX = float(torch.finfo(torch.float32).max)


def accumulate(acc: Tensor, lam: float | Tensor, vec: Tensor) -> Tensor:
    """``acc += lam * vec`` in place, in one pass for a number ``lam`` (``add_(vec, alpha=lam)``).

    The one accumulation step of every static merge, in memory and streamed, so both round alike.
    """
    if isinstance(lam, Tensor) or not abs(lam) <= _F32_MAX:  # alpha must fit the dtype: 1e39 overflows to inf
        return acc.add_(vec * lam)
    return acc.add_(vec, alpha=float(lam))


# ---------------------------------------------------------------- TIES (Yadav et al., NeurIPS 2023)


def kept_count(numel: int, density: float) -> int:
    """k = floor(density * n), at least 1: how many magnitudes TIES keeps.

    The floor is the count the reference implementations start from: mergekit's ``magnitude``
    sparsification keeps exactly ``int(density * n)`` entries (ties broken by sort order); the TIES
    authors' ``topk_values_mask`` takes ``int(density * n)`` too but keeps the entries at or above the
    ``kthvalue(n - int(density * n))``, one more, and the ties. (Rounding instead made per-tensor TIES keep one
    more entry than mergekit wherever density * n has a fractional part of one half or more.) Where the
    floor is 0 (a tensor with fewer than 1 / density entries) one entry is kept: mergekit refuses such a
    tensor, and the authors' code keeps the largest one too. Entries tied with the k-th largest
    magnitude are kept as well (see :func:`trim`), as in the authors' code, so with ties more than k
    survive; they are common even in float32, where e - p takes values on the spacing of p's floats.
    """
    return max(1, min(numel, int(density * numel)))


def trim(v: Tensor, threshold: Tensor) -> Tensor:
    """TIES step 1: keep entries with |v| >= threshold (ties kept), zero the rest.

    ``hardshrink`` keeps |v| > lambda; with lambda the float32 just below the threshold that is exactly
    |v| >= threshold, in one vectorised pass (a boolean mask and ``where`` cost several times more).
    """
    return torch.nn.functional.hardshrink(v, trim_lambda(threshold))


def trim_lambda(threshold: Tensor | float) -> float:
    """The float32 just below ``threshold``: hardshrink's lambda for :func:`trim`."""
    t = torch.as_tensor(threshold, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(-1.0)))


def elect_sign(vectors: Sequence[Tensor]) -> Tensor:
    """TIES step 2: per entry, the sign of the sum over tasks (the sign with the larger mass)."""
    return torch.sign(sum(vectors))


def elect_sign_(vectors: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """:func:`elect_sign` summed into ``out`` (a scratch tensor), same result."""
    out = torch.zeros_like(vectors[0]) if out is None else out.zero_()
    for v in vectors:  # 0 + v_0 + v_1 + ..., as Python's sum() adds them
        out.add_(v)
    return out.sign_()


def disjoint_parts_(vectors: Sequence[Tensor], sign: Tensor, scratch: Tensor | None = None) -> list[Tensor]:
    """:func:`disjoint_parts` in place: each vector becomes its part (same arithmetic, no new tensors).

    ``sign`` becomes the count max(1, sum_s a_s).
    """
    a = torch.empty_like(sign) if scratch is None else scratch
    count = torch.zeros_like(sign)
    for v in vectors:
        torch.sign(v, out=a).mul_(sign).clamp_(min=0.0)
        v.mul_(a)
        count.add_(a)
    count.clamp_(min=1.0)
    for v in vectors:
        v.div_(count)
    return list(vectors)


def agreeing(v: Tensor, sign: Tensor) -> Tensor:
    """The entries of ``v`` whose sign is the elected ``sign`` (others 0): v * max(0, sign(v) * sign).

    TIES steps 1-2 without step 3's division (AdaMerging++'s per-task vectors)."""
    return v * (torch.sign(v) * sign).clamp_(min=0.0)


def disjoint_parts(vectors: Sequence[Tensor], sign: Tensor) -> list[Tensor]:
    """TIES step 3 as per-task parts: tau_t * a_t / max(1, sum_s a_s), a_t = agrees with ``sign`` and nonzero.

    a_t = max(0, sign(tau_t) * sign) is 1 exactly where tau_t is nonzero with the elected sign, else 0:
    float arithmetic only, which vectorises better than boolean masks.
    """
    agree = [(torch.sign(v) * sign).clamp_(min=0.0) for v in vectors]
    count = torch.clamp(sum(agree), min=1.0)
    return [(v * a).div_(count) for a, v in zip(agree, vectors)]


def all_finite(x: Tensor) -> bool:
    """True if ``x`` has no NaN or Inf (max |x| propagates NaN and is Inf if any entry is)."""
    return x.numel() == 0 or bool(torch.isfinite(x.detach().abs().amax()))


def require_finite_result(key: str, merged: Tensor, merge: str) -> None:
    """Refuse a merged tensor with NaN or Inf: the inputs were checked finite, so the parameters
    overflowed float32 (a huge scaling) or the output dtype (float16 tops out at 65504)."""
    if not all_finite(merged):
        raise InputError(
            f"{merge} produced non-finite values in key {key!r} "
            f"(overflow of {merged.dtype}); the coefficients scale the task vectors beyond what the "
            "dtype can hold: use smaller values"
        )


class KthLargestAbs:
    """The exact k-th largest |x| over values seen in chunks: radix selection on the float32 bits.

    For non-negative floats the int32 bit pattern is ordered like the value. Pass 1
    (:meth:`add_coarse` over every chunk) histograms the top 15 bits; that fixes the bin holding the
    k-th largest value and how many values lie above it. Pass 2 (:meth:`add_fine` over the same chunks)
    histograms the low 16 bits of the values in that bin, which fixes the value exactly. Memory is two
    small histograms, whatever the number of values: this is how the streamed merge computes TIES'
    global threshold over a model that is never in memory at once. The histograms are numpy's
    ``bincount`` (about 4x faster than ``torch.bincount`` on one core, measured in docs/performance.md).
    """

    _SHIFT = 16

    def __init__(self, k: int):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self._coarse = np.zeros(1 << 15, dtype=np.int64)
        self._fine = np.zeros(1 << self._SHIFT, dtype=np.int64)
        self._bin: int | None = None
        self._need = 0
        self._lock = threading.Lock()  # slices may be added from several threads

    @staticmethod
    def _bits(x: Tensor) -> np.ndarray:
        x = x.detach().reshape(-1)
        a = x.abs() if x.dtype == torch.float32 else x.to(torch.float32).abs_()
        return a.view(torch.int32).numpy()

    def add_coarse(self, x: Tensor) -> None:
        b = self._bits(x)
        for i in range(0, b.size, CHUNK):
            h = np.bincount(b[i:i + CHUNK] >> self._SHIFT, minlength=self._coarse.size)
            with self._lock:
                self._coarse += h

    def end_coarse(self) -> None:
        at_or_above = np.cumsum(self._coarse[::-1])[::-1]  # [b]: how many values fall in bins >= b
        if int(at_or_above[0]) < self.k:
            raise ValueError(f"asked for the {self.k}-th largest of {int(at_or_above[0])} values")
        self._bin = int(np.flatnonzero(at_or_above >= self.k).max())
        above = int(at_or_above[self._bin + 1]) if self._bin + 1 < at_or_above.size else 0
        self._need = self.k - above

    def add_fine(self, x: Tensor) -> None:
        if self._bin is None:
            raise RuntimeError("add_fine before end_coarse")
        low = (1 << self._SHIFT) - 1
        b = self._bits(x)
        for i in range(0, b.size, CHUNK):
            c = b[i:i + CHUNK]
            sel = c[(c >> self._SHIFT) == self._bin] & low
            if sel.size:
                h = np.bincount(sel, minlength=self._fine.size)
                with self._lock:
                    self._fine += h

    def value(self) -> Tensor:
        """The k-th largest magnitude as a 0-d float32 tensor."""
        at_or_above = np.cumsum(self._fine[::-1])[::-1]
        low = int(np.flatnonzero(at_or_above >= self._need).max())
        return torch.tensor([(self._bin << self._SHIFT) | low], dtype=torch.int32).view(torch.float32)[0]


class SampledKthLargestAbs:
    """The exact k-th largest |x| over ``n`` values seen in chunks, with comparisons instead of histograms.

    Pass 1 (:meth:`add_sample`) keeps every ``stride``-th magnitude of each chunk; from that sample,
    :meth:`end_sample` picks a band [lo, hi] that holds the k-th largest with a wide margin (six
    binomial standard deviations of the sample's rank, plus 0.2% of it when the sample comes from some
    slices only, ``clustered``). Pass 2 (:meth:`add_band`) counts the values above hi and keeps the
    values inside the band, and a histogram of them (65,536 bins over the band's float bits). Then:

    - the band held at most ``max_band`` values: the k-th largest is selected exactly among them
      (``np.partition``), two passes in all;
    - more (a large model, or many ties): the histogram names the bin that holds it, and pass 3
      (:meth:`add_fine`, wanted when :attr:`needs_fine`) histograms that bin's values, one bin per
      float bit pattern (at most 2^15), which fixes the value exactly;
    - the band missed (an unrepresentative sample): :meth:`value` is None, and the caller runs the
      radix selection (:class:`KthLargestAbs`). The result is always exact.

    When ``stride`` is 1 pass 1 keeps every value and selects exactly at once (small tensors). Memory
    is the sample, the kept band (at most ``max_band`` values) and two histograms, however many values
    tie (bfloat16 task vectors take few distinct values).

    Comparisons, a partial sort and a histogram of the band alone run at a fraction of the cost of a
    histogram of every value (numpy's ``bincount`` scatters into 32k bins; docs/performance.md has
    the profile), which is what makes TIES' thresholds cheap.
    """

    _BINS = 1 << 16

    def __init__(self, n: int, k: int, stride: int, max_band: int = 1 << 22, clustered: bool = False):
        if not 1 <= k <= n:
            raise ValueError(f"asked for the {k}-th largest of {n} values")
        self.n, self.k, self.stride, self.max_band = n, k, max(1, int(stride)), max_band
        self.clustered = clustered  # the sample comes from some slices only: widen the band
        self._sample: list[np.ndarray] = []
        self._band: list[np.ndarray] = []
        self._band_size = 0
        self._above = 0
        self._lo = self._hi = self._shift = 0
        self._hist: np.ndarray | None = None
        self._value: Tensor | None = None
        self._failed = False
        self._fine: tuple[int, int, int] | None = None  # (lo bits, hi bits, rank from the top) of pass 3
        self._lock = threading.Lock()

    @staticmethod
    def _abs(x: Tensor) -> np.ndarray:
        x = x.detach().reshape(-1)
        return (x.abs() if x.dtype == torch.float32 else x.to(torch.float32).abs_()).numpy()

    @property
    def needs_fine(self) -> bool:
        """True when :meth:`value` wants pass 3 (:meth:`add_fine`) first."""
        return self._fine is not None and self._value is None

    def add_sample(self, x: Tensor) -> None:
        x = x.detach().reshape(-1)[:: self.stride]
        a = self._abs(x).copy() if self.stride > 1 else self._abs(x)
        with self._lock:
            self._sample.append(a)

    def end_sample(self) -> None:
        s = np.concatenate(self._sample) if self._sample else np.zeros(0, np.float32)
        self._sample = []
        if self.stride == 1:
            if s.size != self.n:
                raise RuntimeError(f"saw {s.size} of {self.n} values")
            self._set(np.partition(s, s.size - self.k)[s.size - self.k])
            return
        m = s.size
        q = self.k / self.n
        pos = q * m  # the k-th largest sits near the pos-th largest of the sample
        margin = 6.0 * math.sqrt(max(m * q * (1.0 - q), 1.0)) + (0.002 * m if self.clustered else 0.0) + 2.0
        top, bottom = int(pos - margin), int(math.ceil(pos + margin))  # ranks from the largest, 0-based
        ranks = [m - 1 - r for r in (top, bottom) if 0 <= r < m]  # ascending positions
        part = np.partition(s, ranks) if ranks else s
        hi = float(part[m - 1 - top]) if 0 <= top < m else math.inf
        lo = float(part[m - 1 - bottom]) if 0 <= bottom < m else 0.0
        # compared as int32 bit patterns (ordered like non-negative floats): hi as bits, the band as one
        # unsigned comparison of (bits - lo_bits) against its width
        self._hi = int(np.float32(hi).view(np.int32)) if hi != math.inf else 0x7F800000
        self._lo = int(np.float32(lo).view(np.int32))
        width = self._hi - self._lo
        self._shift = max(0, width.bit_length() - 16)
        self._hist = np.zeros((width >> self._shift) + 1, dtype=np.int64)

    def add_band(self, x: Tensor) -> None:
        if self._value is not None or self._failed:
            return
        b = self._abs(x).view(np.int32)
        above = int(np.count_nonzero(b > self._hi))
        band = b[(b - np.int32(self._lo)).view(np.uint32) <= np.uint32(self._hi - self._lo)]
        h = np.bincount((band - np.int32(self._lo)) >> self._shift, minlength=self._hist.size) if band.size else None
        with self._lock:
            self._above += above
            if h is not None:
                self._hist += h
            self._band_size += band.size
            if self._band_size > self.max_band:
                self._band = []
            else:
                self._band.append(band.copy())

    def add_fine(self, x: Tensor) -> None:
        """Pass 3: histogram, one bin per bit pattern, the values of the band's bin that holds the k-th
        largest (at most 2^15 patterns: exact, whatever the number of tied values)."""
        if not self.needs_fine:
            return
        lo, hi, _ = self._fine
        b = self._abs(x).view(np.int32)
        sel = b[(b - np.int32(lo)).view(np.uint32) <= np.uint32(hi - lo)]
        if sel.size:
            h = np.bincount(sel - np.int32(lo), minlength=hi - lo + 1)
            with self._lock:
                self._fine_hist += h

    def _set(self, v) -> None:
        self._value = torch.tensor(float(v), dtype=torch.float32)

    @staticmethod
    def _kth(bits: list[np.ndarray], r: int) -> float:
        band = np.concatenate(bits)
        return float(np.partition(band, band.size - r)[band.size - r:band.size - r + 1].view(np.float32)[0])

    def value(self) -> Tensor | None:
        """The k-th largest magnitude (0-d float32); None if the band missed it (run the radix selection)
        or while :attr:`needs_fine`."""
        if self._value is not None or self._failed or self.stride == 1:
            return self._value
        if self._fine is not None:  # after pass 3
            lo, _, r = self._fine
            at_or_above = np.cumsum(self._fine_hist[::-1])[::-1]
            if int(at_or_above[0]) < r:
                raise RuntimeError(f"pass 3 saw {int(at_or_above[0])} values for rank {r}")
            j = int(np.flatnonzero(at_or_above >= r).max())
            self._set(np.array([lo + j], dtype=np.int32).view(np.float32)[0])
            return self._value
        r = self.k - self._above  # rank of the k-th largest inside the band, from the top
        if not 1 <= r <= self._band_size:
            self._failed = True
            self._band = []
            return None
        if self._band_size <= self.max_band:
            self._set(self._kth(self._band, r))
            self._band = []
            return self._value
        self._band = []
        at_or_above = np.cumsum(self._hist[::-1])[::-1]  # values in bins >= j
        j = int(np.flatnonzero(at_or_above >= r).max())
        above_bin = int(at_or_above[j + 1]) if j + 1 < at_or_above.size else 0
        lo = self._lo + (j << self._shift)
        self._fine = (lo, min(self._hi, lo + (1 << self._shift) - 1), r - above_bin)
        self._fine_hist = np.zeros(self._fine[1] - lo + 1, dtype=np.int64)
        return None


def kth_largest_abs(tensors: Sequence[Tensor], k: int) -> Tensor:
    """The exact k-th largest magnitude over all entries of ``tensors`` (two passes of :class:`KthLargestAbs`)."""
    sel = KthLargestAbs(k)
    for t in tensors:
        sel.add_coarse(t)
    sel.end_coarse()
    for t in tensors:
        sel.add_fine(t)
    return sel.value()


# ---------------------------------------------------------------- DARE (Yu et al., ICML 2024, Eq. 2)


# The mask of one (task, tensor) is drawn from its own PCG64 stream, one byte per entry (eight entries
# per 64-bit word, little-endian bytes), and an entry whose byte equals the drop threshold's top byte
# (1 in 256) is settled by 56 more bits from a counter-based hash of its index. A slice starting at a
# multiple of DARE_ALIGN draws its words after a jump of start / 8 words, so any slice equals the same
# slice of the whole tensor's mask.
DARE_ALIGN = 8
_M64 = (1 << 64) - 1
_REST_BITS = 56


@functools.lru_cache(maxsize=1 << 16)
def dare_seed(seed: int, task: str, key: str) -> int:
    """The seed of the random mask of one (task, tensor): independent of the order tensors are visited in."""
    digest = hashlib.blake2b(f"{seed}\x00{task}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=1 << 16)
def _dare_state(seed: int, task: str, key: str) -> dict:
    return np.random.PCG64(dare_seed(seed, task, key)).state


@functools.lru_cache(maxsize=256)
def dare_threshold(drop_rate: float) -> tuple[int, int]:
    """``(top, rest)``: floor(drop_rate * 2^64) split into its top byte and its low 56 bits.

    An entry is dropped when its byte is below ``top``, or equals it and its 56 hash bits are below
    ``rest``: with probability floor(drop_rate * 2^64) / 2^64, ``drop_rate`` to within 2^-64.
    """
    whole = math.floor(Fraction(drop_rate) * (1 << 64))
    return whole >> _REST_BITS, whole & ((1 << _REST_BITS) - 1)


def splitmix64(key: int, index: np.ndarray) -> np.ndarray:
    """SplitMix64 (Steele, Lea and Flood, OOPSLA 2014) of ``key + (index + 1) * golden``: 64 hash bits per
    index, a counter-based draw (any index on its own). uint64 arithmetic wraps, as the algorithm wants."""
    z = (index.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key & _M64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


_local = threading.local()


def dare_keep_mask(seed: int, task: str, key: str, drop_rate: float, start: int, count: int) -> np.ndarray:
    """DARE's keep mask (Yu et al., ICML 2024, Eq. 2) of entries ``start .. start + count`` of one (task,
    tensor): a bool array, False with probability ``drop_rate`` (to within 2^-64), independently per entry.

    Byte i of the (task, tensor)'s PCG64 stream (word i // 8, byte i % 8, little-endian) is compared with
    the threshold's top byte (:func:`dare_threshold`); where they are equal, bits 8-63 of
    ``splitmix64(dare_seed ^ 0x5DA5E, i)`` against its low 56 bits. ``start`` must be a multiple of
    :data:`DARE_ALIGN`; then the slice's mask is the same slice of the whole tensor's, on any thread.
    """
    if start % DARE_ALIGN:
        raise ValueError(f"a DARE slice must start at a multiple of {DARE_ALIGN}")
    top, rest = dare_threshold(drop_rate)
    bits = getattr(_local, "pcg", None)
    if bits is None:
        bits = _local.pcg = np.random.PCG64(0)
    bits.state = _dare_state(seed, task, key)
    if start:
        bits.advance(start // DARE_ALIGN)
    u = bits.random_raw(-(-count // DARE_ALIGN)).astype("<u8", copy=False).view(np.uint8)[:count]
    keep = u >= np.uint8(top)  # top < 256: drop_rate < 1
    if rest:
        tied = np.flatnonzero(u == np.uint8(top))
        if tied.size:
            h = splitmix64(dare_seed(seed, task, key) ^ 0x5DA5E, tied + start)
            keep[tied[(h >> np.uint64(64 - _REST_BITS)) < np.uint64(rest)]] = False
    return keep


def drop(v: Tensor, drop_rate: float, seed: int, task: str, key: str) -> Tensor:
    """DARE on a whole tensor: drop each entry with probability ``drop_rate``, rescale survivors by
    1 / (1 - drop_rate) (Yu et al., ICML 2024, Eq. 2), with the mask of :func:`dare_keep_mask`."""
    return drop_(v.clone(), drop_rate, seed, task, key)


def drop_(v: Tensor, drop_rate: float, seed: int, task: str, key: str, start: int = 0) -> Tensor:
    """:func:`drop` in place on ``v``, the flattened elements ``start ..`` of tensor ``key``."""
    if drop_rate == 0.0:
        return v
    keep = dare_keep_mask(seed, task, key, drop_rate, start, v.numel())
    # times the mask as uint8 0/1 (a bool operand takes a slower type-promotion path, about 4x here)
    keep_u8 = torch.from_numpy(keep.view(np.uint8)).reshape(v.shape).to(v.device)
    return v.mul_(keep_u8).mul_(1.0 / (1.0 - drop_rate))


# ---------------------------------------------------------------- per-tensor forms of static methods


@dataclass(frozen=True)
class SliceContext:
    """Where a slice lies: elements ``start .. start + n`` of the flattened tensor ``key``, the tasks
    in the order of the task vectors, and each task's TIES threshold when the form trims."""

    key: str
    start: int
    tasks: tuple[str, ...]
    thresholds: tuple[Tensor, ...] | None = None
    trim_lambdas: tuple[float, ...] | None = None  # trim_lambda of each threshold, computed once


@dataclass(frozen=True)
class Drop:
    """DARE's drop and rescale (Yu et al., ICML 2024, Eq. 2), on the mask of :func:`dare_keep_mask`."""

    rate: float
    seed: int = 0

    def __call__(self, taus: list[Tensor], ctx: SliceContext) -> list[Tensor]:
        return [self.one(v, t, ctx) for v, t in zip(taus, ctx.tasks)]

    def one(self, v: Tensor, task: str, ctx: SliceContext) -> Tensor:
        """The step on one task's vector alone (it reads no other task's): the engine then forms and adds
        the task vectors one at a time, in one buffer."""
        return v if self.rate == 0.0 else drop_(v, self.rate, self.seed, task, ctx.key, ctx.start)


@dataclass(frozen=True)
class Trim:
    """TIES step 1 (Yadav et al., NeurIPS 2023): keep each task's top ``density`` magnitudes, ranked over
    the whole task vector (``scope="global"``, the paper) or within each tensor (``"tensor"``). The
    merge computes the thresholds (:class:`KthLargestAbs`) over the task vectors as the steps before
    this one leave them, then trims each slice."""

    density: float
    scope: str = "global"

    def __call__(self, taus: list[Tensor], ctx: SliceContext) -> list[Tensor]:
        if ctx.thresholds is None:
            return taus
        lambdas = ctx.trim_lambdas or tuple(trim_lambda(t) for t in ctx.thresholds)
        return [torch.nn.functional.hardshrink(v, lam) for v, lam in zip(taus, lambdas)]


@dataclass(frozen=True)
class ElectDisjoint:
    """TIES steps 2 and 3: elect the sign, split the disjoint mean into per-task parts (in place).

    As a form's last step the merge calls :meth:`accumulate` instead, which adds the weighted disjoint
    mean to the merged slice in fewer passes."""

    def __call__(self, taus: list[Tensor], ctx: SliceContext) -> list[Tensor]:
        sign = elect_sign_(taus)
        return disjoint_parts_(taus, sign)

    def accumulate(self, acc: Tensor, coefficients: Sequence[float], taus: list[Tensor], ctx: SliceContext) -> Tensor:
        """acc += sum_t lambda_t tau_t a_t / max(1, sum_s a_s), a_t = tau_t nonzero with the elected sign
        (Yadav et al., NeurIPS 2023, Eq. 1-3 with per-task coefficients), the ``taus`` overwritten.

        Formed as gamma * (sum_t lambda_t |tau_t| a_t) / count: per task one product with the sign, a
        ``relu``, a ``sign`` for the count and one scaled add (five passes where :meth:`__call__` and
        the engine's sum take seven); the same value up to float rounding, computed alike in memory and
        streamed.
        """
        sign = elect_sign_(taus)
        mag = torch.zeros_like(acc)
        count = torch.zeros_like(acc)
        one = torch.empty_like(acc)
        for lam, v in zip(coefficients, taus):
            torch.mul(v, sign, out=v).relu_()  # |tau_t| where it agrees with the elected sign, else 0
            count.add_(torch.sign(v, out=one))
            accumulate(mag, lam, v)
        return acc.add_(mag.mul_(sign).div_(count.clamp_(min=1.0)))


@dataclass(frozen=True)
class SliceForm:
    """A static method as per-tensor arithmetic: theta = theta_0 + sum_t coefficients[t] * part_t, where
    the parts are the task vectors (float32) after ``steps``, applied in order to each slice.

    A step is a callable ``(taus, ctx) -> taus`` that is elementwise (so slices of any size give the
    whole tensor's result) and may work in place on the tensors it gets; :class:`Trim` is the one step
    that needs a pass over the data first (its thresholds), and a form has at most one. A registered
    method declares its form with ``register(name, stream=...)`` (:mod:`mergelab.methods.registry`);
    the in-memory and the streamed merges both run it (:mod:`mergelab.methods.streaming.engine`).
    """

    coefficients: Mapping[str, float]
    steps: tuple[Callable[[list[Tensor], SliceContext], list[Tensor]], ...] = ()

    def __post_init__(self) -> None:
        if sum(isinstance(s, Trim) for s in self.steps) > 1:
            raise ValueError("a slice form may trim once")
        for s in self.steps:
            if isinstance(s, Trim) and s.scope not in ("global", "tensor"):
                raise InputError(f"parameter 'scope' must be 'global' or 'tensor', got {s.scope!r}")

    @property
    def trim_at(self) -> int | None:
        """Index of the :class:`Trim` step that needs thresholds (density < 1), or None."""
        for i, s in enumerate(self.steps):
            if isinstance(s, Trim) and s.density < 1.0:
                return i
        return None
