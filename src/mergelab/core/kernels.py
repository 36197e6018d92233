"""Per-tensor arithmetic of the static methods, shared by the in-memory and the streamed merges.

Every function here is elementwise over its tensor arguments, or (for :class:`KthLargestAbs`) exact
over a stream of chunks, so applying it to whole tensors or to consecutive slices of them gives
bit-identical results. The dict-level transforms in :mod:`mergelab.methods.transforms` and
:func:`mergelab.core.statedict.combine` call these on whole tensors; :mod:`mergelab.methods.streaming` calls the
same functions on slices read from safetensors files. That is what makes a streamed merge equal
the in-memory one (``torch.equal``), without a second implementation of any method.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from mergelab.core.errors import InputError

# Slices of this many elements keep the per-slice temporaries of a merge in the CPU caches.
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
    scratch: Tensor | None = None
    for lam, vec in terms:
        grad = acc.requires_grad or vec.requires_grad or (isinstance(lam, Tensor) and lam.requires_grad)
        if grad:
            acc = acc + lam * vec
            continue
        scratch = vec * lam if scratch is None or scratch.shape != vec.shape else torch.mul(vec, lam, out=scratch)
        acc.add_(scratch)
    return acc


# ---------------------------------------------------------------- TIES (Yadav et al., NeurIPS 2023)


def kept_count(numel: int, density: float) -> int:
    """k = round(density * n), at least 1: how many magnitudes TIES keeps."""
    return max(1, min(numel, int(round(density * numel))))


def trim(v: Tensor, threshold: Tensor) -> Tensor:
    """TIES step 1: keep entries with |v| >= threshold (ties kept), zero the rest.

    ``hardshrink`` keeps |v| > lambda; with lambda the float32 just below the threshold that is exactly
    |v| >= threshold, in one vectorised pass (a boolean mask and ``where`` cost several times more).
    """
    below = torch.nextafter(threshold.to(torch.float32), torch.tensor(-1.0))
    return torch.nn.functional.hardshrink(v, float(below))


def elect_sign(vectors: Sequence[Tensor]) -> Tensor:
    """TIES step 2: per entry, the sign of the sum over tasks (the sign with the larger mass)."""
    return torch.sign(sum(vectors))


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
    global threshold over a model that is never in memory at once.
    """

    _SHIFT = 16

    def __init__(self, k: int):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self._coarse = torch.zeros(1 << 15, dtype=torch.int64)
        self._fine = torch.zeros(1 << self._SHIFT, dtype=torch.int64)
        self._bin: int | None = None
        self._need = 0
        self._lock = threading.Lock()  # slices may be added from several threads

    @staticmethod
    def _bits(x: Tensor) -> Tensor:
        return x.detach().reshape(-1).to(torch.float32).abs().view(torch.int32)

    def add_coarse(self, x: Tensor) -> None:
        for c in self._bits(x).split(CHUNK):
            h = torch.bincount(c >> self._SHIFT, minlength=self._coarse.numel())
            with self._lock:
                self._coarse += h

    def end_coarse(self) -> None:
        at_or_above = self._coarse.flip(0).cumsum(0).flip(0)  # [b]: how many values fall in bins >= b
        if int(at_or_above[0]) < self.k:
            raise ValueError(f"asked for the {self.k}-th largest of {int(at_or_above[0])} values")
        self._bin = int((at_or_above >= self.k).nonzero().max())
        above = int(at_or_above[self._bin + 1]) if self._bin + 1 < at_or_above.numel() else 0
        self._need = self.k - above

    def add_fine(self, x: Tensor) -> None:
        if self._bin is None:
            raise RuntimeError("add_fine before end_coarse")
        low = (1 << self._SHIFT) - 1
        for c in self._bits(x).split(CHUNK):
            sel = c[(c >> self._SHIFT) == self._bin] & low
            if sel.numel():
                h = torch.bincount(sel, minlength=self._fine.numel())
                with self._lock:
                    self._fine += h

    def value(self) -> Tensor:
        """The k-th largest magnitude as a 0-d float32 tensor."""
        at_or_above = self._fine.flip(0).cumsum(0).flip(0)
        low = int((at_or_above >= self._need).nonzero().max())
        return torch.tensor([(self._bin << self._SHIFT) | low], dtype=torch.int32).view(torch.float32)[0]


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


def dare_seed(seed: int, task: str, key: str) -> int:
    """The seed of the random mask of one (task, tensor): independent of the order tensors are visited in."""
    digest = hashlib.blake2b(f"{seed}\x00{task}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_generator(seed: int, task: str, key: str, start: int = 0) -> np.random.Generator:
    """The mask generator of one (task, tensor), positioned at element ``start`` (even).

    PCG64 draws one 64-bit word per two float32 values and can jump ahead in O(log n), so any slice of
    a tensor's mask can be drawn on its own and equals the same slice of the whole tensor's mask.
    """
    if start % 2:
        raise ValueError("a DARE slice must start at an even element")
    bits = np.random.PCG64(dare_seed(seed, task, key))
    if start:
        bits.advance(start // 2)
    return np.random.Generator(bits)


def drop(v: Tensor, drop_rate: float, generator: np.random.Generator) -> Tensor:
    """Drop each entry with probability ``drop_rate``, rescale survivors by 1 / (1 - drop_rate).

    The uniform draws come from ``generator`` in the tensor's element order, so consecutive slices drawn
    from one generator equal one whole draw.
    """
    u = torch.from_numpy(generator.random(v.numel(), dtype=np.float32)).reshape(v.shape).to(v.device)
    # sign(u - p) + 1, capped at 1, is 1 exactly where u >= p, else 0 (float ops only, no boolean mask);
    # times 1 / (1 - p) it is the rescaled keep mask.
    scale = u.sub_(drop_rate).sign_().add_(1.0).clamp_(max=1.0).mul_(1.0 / (1.0 - drop_rate))
    return v * scale.to(v.dtype)
