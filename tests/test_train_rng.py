"""qlora_native._core.train.Philox: Philox4x32-10 known answers (Random123's kat_vectors), the
stream layout against an independent pure-Python implementation, reproducibility from a saved
state, thread-count independence, and distribution sanity with 6-sigma bounds."""
import json
import math

import numpy as np
import pytest

import qlora_native
from qlora_native import _core

train = _core.train
MASK = 0xFFFFFFFF


def py_philox(counter, key):
    """Philox4x32-10 from the paper (Salmon et al. 2011), written independently of the C++."""
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & MASK, (k[1] + 0xBB67AE85) & MASK]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k[1]) & MASK, p0 & MASK]
    return c


def py_stream(seed, first, n):
    """Outputs first..first+n-1: output k is word k % 4 of block k // 4 (key = the seed's halves)."""
    key = [seed & MASK, seed >> 32]
    out = []
    for k in range(first, first + n):
        b = k // 4
        out.append(py_philox([b & MASK, b >> 32, 0, 0], key)[k % 4])
    return out


KAT = [  # Random123 tests/kat_vectors, philox4x32 10 rounds
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([MASK] * 4, [MASK] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_known_answers(counter, key, want):
    assert list(train.philox4x32_10(counter, key)) == want
    assert py_philox(counter, key) == want


def test_stream_layout_matches_reference(rng):
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    r = train.Philox(seed)
    got = [r.next_u32() for _ in range(11)]
    assert got == py_stream(seed, 0, 11)
    assert r.state() == {"algorithm": "philox4x32-10", "seed": seed, "position": 11}
    lo, hi = py_stream(seed, 11, 2)
    assert r.next_u64() == (hi << 32) | lo
    u = r.random(9)  # 24-bit floats from the next 9 outputs
    np.testing.assert_array_equal(u, np.array([(x >> 8) * 2.0**-24 for x in py_stream(seed, 13, 9)], np.float32))
    b = r.bernoulli(6, 0.4)
    np.testing.assert_array_equal(b, np.array([x * 2.0**-32 < 0.4 for x in py_stream(seed, 22, 6)]))
    z = r.normal(3, 0.5, 2.0)  # Box-Muller, cos branch, two outputs per value
    xs = py_stream(seed, 28, 6)
    want = [0.5 + 2.0 * math.sqrt(-2 * math.log((xs[2 * i] + 1.0) * 2.0**-32)) * math.cos(2 * math.pi * xs[2 * i + 1] * 2.0**-32)
            for i in range(3)]
    np.testing.assert_allclose(z, np.array(want, np.float32), rtol=2e-7, atol=1e-6)
    assert r.state()["position"] == 34


def test_reproducible_from_saved_state(rng):
    r = train.Philox(int(rng.integers(0, 2**63)))
    r.random(int(rng.integers(1, 1000)))  # somewhere mid-stream, not on a block boundary
    r.next_u32()
    saved = json.loads(json.dumps(r.state()))  # the state is plain JSON
    first = (r.random(1000), r.normal(777), r.permutation(300), r.bernoulli(500, 0.3), r.below(10**12), r.uniform(5, -2.0, 3.0))
    other = train.Philox(12345)
    other.set_state({k: np.uint64(v) if k != "algorithm" else v for k, v in saved.items()})  # numpy ints too
    again = (other.random(1000), other.normal(777), other.permutation(300), other.bernoulli(500, 0.3), other.below(10**12),
             other.uniform(5, -2.0, 3.0))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert other.state() == r.state()


def test_split_fills_equal_one_fill_and_threads_do_not_matter(rng):
    seed = int(rng.integers(0, 2**63))
    n = 200_000  # above the threading threshold
    old = qlora_native.num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            qlora_native.set_num_threads(threads)
            r = train.Philox(seed)
            outs.append((r.random(n), r.normal(n), r.bernoulli(n, 0.9)))
    finally:
        qlora_native.set_num_threads(old)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            np.testing.assert_array_equal(a, b)
    r = train.Philox(seed)
    k = int(rng.integers(1, n))
    np.testing.assert_array_equal(np.concatenate([r.random(k), r.random(n - k)]), outs[0][0])
    np.testing.assert_array_equal(np.concatenate([r.normal(k), r.normal(n - k)]), outs[0][1])


def test_distributions(rng):
    r = train.Philox(int(rng.integers(0, 2**63)))
    n = 200_000
    u = r.random(n)
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    z = r.normal(n, 1.5, 0.5)
    assert np.all(np.isfinite(z))
    assert abs(z.mean() - 1.5) < 6 * 0.5 / math.sqrt(n)
    assert abs(z.std() - 0.5) < 6 * 0.5 / math.sqrt(2 * n)
    p = 0.1
    b = r.bernoulli(n, p)
    assert b.dtype == np.bool_ and abs(b.mean() - p) < 6 * math.sqrt(p * (1 - p) / n)
    assert not r.bernoulli(1000, 0.0).any() and r.bernoulli(1000, 1.0).all()
    perm = r.permutation(1000)
    assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(1000))
    assert not np.array_equal(perm, np.arange(1000))
    draws = [r.below(7) for _ in range(7000)]
    counts = np.bincount(draws, minlength=7)
    assert len(counts) == 7 and np.all(np.abs(counts - 1000) < 6 * math.sqrt(1000 * 6 / 7))
    # different seeds, different streams
    assert not np.array_equal(train.Philox(1).random(16), train.Philox(2).random(16))


def test_bad_inputs():
    r = train.Philox(3)
    for bad in ({"seed": 1}, {"position": 0}, {"seed": -1, "position": 0}, {"seed": 2**64, "position": 0},
                {"seed": 1, "position": 1.5}, {"seed": 1, "position": 0, "algorithm": "mt19937"}):
        with pytest.raises(ValueError):
            r.set_state(bad)
    assert r.state()["position"] == 0 and r.state()["seed"] == 3
    with pytest.raises(ValueError, match="p must be in"):
        r.bernoulli(3, 1.5)
    with pytest.raises(ValueError, match="p must be in"):
        r.bernoulli(3, float("nan"))
    with pytest.raises(ValueError, match="std"):
        r.normal(3, 0.0, -1.0)
    with pytest.raises(ValueError):
        r.random(-1)
    with pytest.raises(ValueError):
        r.below(0)
    with pytest.raises(ValueError):
        r.uniform(3, 1.0, 0.0)
