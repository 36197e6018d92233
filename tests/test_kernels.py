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


def _ties_disjoint_reference(acc, lams, taus):
    """TIES Eq. 1-3 entry by entry: gamma = sgn(sum_t tau_t); the tasks agreeing with it (nonzero, same
    sign) contribute lambda_t tau_t, divided by how many agree (at least 1)."""
    out = acc.clone()
    for j in range(acc.numel()):
        col = [float(t[j]) for t in taus]
        s = sum(col)
        gamma = (s > 0) - (s < 0)
        agree = [i for i, x in enumerate(col) if x != 0 and ((x > 0) - (x < 0)) == gamma]
        out[j] += sum(lams[i] * col[i] for i in agree) / max(1, len(agree))
    return out


def test_elect_disjoint_accumulate_is_the_ties_formula():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(300, generator=g) * (torch.rand(300, generator=g) > 0.4) for _ in range(4)]
    taus[0][:5] = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0])  # hand cases: a zero sum elects nothing
    taus[1][:5] = torch.tensor([-1.0, 1.0, 0.0, 2.0, 0.0])
    taus[2][:5] = 0.0
    taus[3][:5] = torch.tensor([0.0, 0.0, 0.0, -1.0, 3.0])
    acc = torch.randn(300, generator=g)
    lams = [0.5, -1.25, 2.0, 1.0]
    ref = _ties_disjoint_reference(acc, lams, taus)
    got = kernels.ElectDisjoint().accumulate(acc.clone(), lams, [t.clone() for t in taus], None)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # entry 3: tasks 0, 1 agree with + (sum 3): (0.5 * 2 - 1.25 * 2) / 2 added
    assert abs(float(got[3] - acc[3]) - (0.5 * 2.0 - 1.25 * 2.0) / 2) < 1e-6
    assert torch.equal(got[:3], acc[:3])  # sums 0, 0, 0: sign 0, nothing agrees
    # the same as the per-task parts (``__call__``) summed by the engine's accumulation
    parts = kernels.ElectDisjoint()([t.clone() for t in taus], None)
    torch.testing.assert_close(got, acc + sum(lam * p for lam, p in zip(lams, parts)), rtol=1e-6, atol=1e-6)
