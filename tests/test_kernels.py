"""The per-slice kernels of mergelab.core.kernels against references written out here."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from mergelab.core import kernels

M64 = (1 << 64) - 1


def _splitmix64(key: int, i: int) -> int:
    """SplitMix64 of key + (i + 1) * golden, in Python integers (Steele et al., OOPSLA 2014)."""
    z = ((i + 1) * 0x9E3779B97F4A7C15 + key) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _reference_keep(seed: int, task: str, key: str, rate: float, n: int) -> list[bool]:
    """docs/streaming.md's rule, entry by entry: byte i of the PCG64 stream (word i // 8, little-endian)
    against the top byte of floor(rate * 2^64); on equality, the hash's top 56 bits against the rest."""
    whole = int(Fraction(rate) * 2**64)
    top, rest = whole >> 56, whole & ((1 << 56) - 1)
    words = np.random.PCG64(kernels.dare_seed(seed, task, key)).random_raw((n + 7) // 8)
    stream = b"".join(int(w).to_bytes(8, "little") for w in words)
    hkey = kernels.dare_seed(seed, task, key) ^ 0x5DA5E
    keep = []
    for i in range(n):
        b = stream[i]
        keep.append(b > top or (b == top and (_splitmix64(hkey, i) >> 8) >= rest))
    return keep


@pytest.mark.parametrize("rate", [0.9, 0.5 + 1 / 512, 0.3, 1 / 3])
def test_dare_mask_is_the_documented_rule(rate):
    n = 4099
    ref = _reference_keep(7, "task", "w", rate, n)
    assert kernels.dare_keep_mask(7, "task", "w", rate, 0, n).tolist() == ref
    # any slice starting at a multiple of 8 is the same slice of the whole mask
    for start, count in [(8, 100), (4000, 99), (2048, 2051)]:
        assert kernels.dare_keep_mask(7, "task", "w", rate, start, count).tolist() == ref[start:start + count]
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.dare_keep_mask(7, "task", "w", rate, 4, 10)


def test_dare_mask_drops_with_the_exact_rate_ties_included():
    # rate 0.5 + 1/512: top byte 128, and the entries whose byte is 128 are dropped half the time
    rate, n = 0.5 + 1 / 512, 1 << 20
    keep = kernels.dare_keep_mask(3, "a", "k", rate, 0, n)
    dropped = 1.0 - keep.mean()
    assert abs(dropped - rate) < 4 * (rate * (1 - rate) / n) ** 0.5
    words = np.random.PCG64(kernels.dare_seed(3, "a", "k")).random_raw(n // 8)
    tied = np.frombuffer(words.astype("<u8").tobytes(), dtype=np.uint8) == 128
    share = 1.0 - keep[tied].mean()
    assert tied.sum() > 3000 and abs(share - 0.5) < 4 * (0.25 / tied.sum()) ** 0.5


def test_drop_rescales_the_kept_entries_of_the_mask():
    v = torch.randn(3, 333)
    out = kernels.drop(v, 0.6, 11, "t", "key")
    keep = torch.tensor(_reference_keep(11, "t", "key", 0.6, v.numel())).reshape(v.shape)
    torch.testing.assert_close(out, torch.where(keep, v * (1 / 0.4), torch.zeros(())), rtol=0, atol=0)
    assert torch.equal(kernels.drop(v, 0.0, 11, "t", "key"), v)
