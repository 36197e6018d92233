"""Unlabeled adaptation inputs: texts only, tokenized once, sampled in seeded batches.

Test-time adaptation (AdaMerging, SyMerge) reads the test *inputs* and never their labels. The code
path enforces it: every adaptation function takes ``{task: sequence of str}``; a
:class:`~mergelab.pools.data.tasks.TaskData` (which carries labels) is refused with an
:class:`~mergelab.core.errors.InputError` so that labels cannot leak in by accident.

Tokenizing is done once per text (:class:`TokenCache`): a batch is rows of the cached tensors, cut to
the longest sequence in the batch, which is exactly what tokenizing the batch with ``padding=True``
gives (same ids, same truncation at ``max_length``), without re-running the tokenizer every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mergelab.core.errors import InputError


def _labeled(obj) -> bool:
    """A task data object (inputs with labels, e.g. :class:`~mergelab.pools.data.tasks.TaskData`), not bare inputs."""
    # never touch ``labels`` itself (the tests guard it): a sequence-less object with inputs is task data
    return not isinstance(obj, (str, Mapping, Sequence)) and hasattr(obj, "texts")


def check_texts(texts: Mapping[str, Sequence[str]], tasks: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{task: [str, ...]}`` checked: texts only (no labeled task objects), non-empty, every task present."""
    if _labeled(texts) or not isinstance(texts, Mapping):
        raise InputError("adaptation texts must be a mapping task -> sequence of texts (unlabeled inputs)")
    out: dict[str, list[str]] = {}
    for task, seq in texts.items():
        if _labeled(seq):
            raise InputError(
                f"adaptation texts[{task!r}] is a labeled TaskData; pass its texts only (task.texts): "
                "test-time adaptation never reads labels"
            )
        if isinstance(seq, str) or not isinstance(seq, Sequence):
            raise InputError(f"adaptation texts[{task!r}] must be a sequence of strings, got {type(seq).__name__}")
        seq = list(seq)
        if not seq:
            raise InputError(f"adaptation texts[{task!r}] is empty")
        # texts for text families; text pairs, images or tensors for others: one kind per task
        kind = str if isinstance(seq[0], str) else type(seq[0])
        bad = next((i for i, x in enumerate(seq) if not isinstance(x, kind) or isinstance(x, (bool, int, float))), None)
        if bad is not None:
            raise InputError(f"adaptation texts[{task!r}][{bad}] is {type(seq[bad]).__name__}, expected "
                             f"{kind.__name__} like the first input (texts, text pairs, images or tensors)")
        out[task] = seq
    if tasks is not None:
        missing = [t for t in tasks if t not in out]
        if missing:
            raise InputError(f"no adaptation texts for task(s) {missing}; texts given for {sorted(out)}")
        out = {t: out[t] for t in tasks}
    return out


class TokenCache:
    """The texts of one task tokenized once (padded to the longest, truncated at ``max_length``)."""

    def __init__(self, family, texts: Sequence[str]) -> None:
        self.n = len(texts)
        self.family = family
        # the family encodes (texts: tokenized and padded to max_length, with their lengths); None: the
        # family encodes each batch when it is drawn (images: all pixels at once would not fit a GPU)
        encoded = family.encode_all(list(texts))
        self.inputs = list(texts) if encoded is None else None
        self.tensors, lengths = (None, None) if encoded is None else encoded
        self.padded = lengths is not None
        self.lengths = lengths if lengths is not None else torch.ones(self.n, dtype=torch.long, device=family.device)

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: Tensor | Sequence[int]) -> dict[str, Tensor]:
        idx_t = torch.as_tensor(idx, dtype=torch.long, device=self.lengths.device)
        if self.tensors is None:
            return self.family.tokenize([self.inputs[i] for i in idx_t.tolist()])
        if not self.padded:
            return {k: v[idx_t] for k, v in self.tensors.items()}
        width = int(self.lengths[idx_t].max())
        return {k: v[idx_t, :width] for k, v in self.tensors.items()}


class Cycler:
    """Seeded batches of indices 0..n-1; every index at most once per pass, then a fresh pass.

    With ``lengths`` (e.g. the texts' character counts), each pass is *length-bucketed*: a random
    permutation is cut into chunks of ``bucket`` batches, each chunk is sorted by length and cut into
    batches, and the batches are visited in random order. Every sample is seen at most once per pass and
    each batch is a random draw from a stratum of similar lengths, and pads to a shorter longest
    sequence: on text5's test texts (batches of 32 or 16, 200 batches per task) the padded tokens fell
    by 21%, and compute is proportional to them. A pass drops the incomplete batch at the end of a
    chunk; those samples come up again in later passes.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator,
                 lengths: Sequence[int] | None = None, bucket: int = 8) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        if lengths is not None and len(lengths) != n:
            raise InputError(f"{len(lengths)} lengths for {n} samples")
        self.n, self.batch_size, self.gen = n, min(batch_size, n), generator
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths), dtype=torch.long)
        # a chunk covers at most half the samples, so that which samples share a batch stays random
        self.bucket = max(1, min(int(bucket), n // (2 * self.batch_size)))
        self.batches: list[Tensor] = []

    def _new_pass(self) -> None:
        perm = torch.randperm(self.n, generator=self.gen)
        b = self.batch_size
        if self.lengths is None:
            self.batches = [perm[i:i + b] for i in range(0, self.n - b + 1, b)]
            return
        batches: list[Tensor] = []
        chunk = b * self.bucket
        for start in range(0, self.n, chunk):
            part = perm[start:start + chunk]
            part = part[torch.argsort(self.lengths[part], stable=True)]
            batches += [part[i:i + b] for i in range(0, len(part), b) if len(part[i:i + b]) == b]
        if not batches:  # fewer samples than one batch after bucketing
            batches = [perm[:b]]
        order = torch.randperm(len(batches), generator=self.gen).tolist()
        self.batches = [batches[i] for i in order]

    def next(self) -> Tensor:
        if not self.batches:
            self._new_pass()
        return self.batches.pop(0)


def keys_on_path(family, params: Mapping[str, Tensor], probe_texts: Sequence[str]) -> list[str]:
    """The keys of ``params`` that influence ``family.features`` (found with one backward pass).

    With mean pooling the BERT pooler is never used: it gets no coefficient (its gradient would be
    undefined, not zero).
    """
    leaves = {k: v.detach().to(torch.float32).requires_grad_(True) for k, v in params.items()}
    batch = family.tokenize(list(probe_texts))
    with torch.enable_grad():
        out = family.features(batch, leaves)
        grads = torch.autograd.grad(out.square().sum(), list(leaves.values()), allow_unused=True)
    return [k for k, g in zip(leaves, grads) if g is not None]


@contextlib.contextmanager
def frozen_module(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, the module's own parameters do not require grad (restored afterwards).

    Adaptation passes its own tensors to ``functional_call``; the module's parameters fill in the rest
    (embeddings...) and must not collect gradients (a wasted 30k x 384 embedding gradient per step).
    """
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
