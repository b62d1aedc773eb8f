"""NF4 + double-quant codec against a numpy reference of the rules (shared/reference/nf4-format.md)
and the NF4Tensor Python API. bitsandbytes parity lives in test_nf4_bnb.py."""
import math

import ml_dtypes
import numpy as np
import pytest

import qlora_native
from qlora_native import _core, nf4

BF16 = np.dtype(ml_dtypes.bfloat16)
LEVELS = _core.supported_simd_levels()  # scalar, generic, and the SIMD levels this CPU has

# The 16 NF4 codes as float32 (the spec's table, written independently of the C++ one).
CODES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
THR = (CODES[:-1] + CODES[1:]) / np.float32(2)  # float32 midpoints, as bitsandbytes computes them


# ---------------------------------------------------------------- numpy reference of the rules
def _scale(v, m):
    """y = v * (1/m) in float32; 2^64 rescale when 1/m overflows; m == 0 gives y = 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = np.float32(1) / m
        pre = np.where(np.isinf(r) & (m > 0), np.float32(2.0 ** 64), np.float32(1)).astype(np.float32)
        r = np.where(pre != 1, np.float32(1) / (m * pre), r).astype(np.float32)
        y = (v * pre[:, None]) * r[:, None]
    return np.where((m == 0)[:, None], np.float32(0), y).astype(np.float32)


def ref_quantize(x32, blocksize, double_quant):
    """Returns (packed, absmax, nested_absmax, offset) as the rules define them."""
    x = np.asarray(x32, dtype=np.float32).reshape(-1)
    n = x.size
    nb = -(-n // blocksize)
    X = np.zeros(nb * blocksize, np.float32)
    X[:n] = x
    X = X.reshape(nb, blocksize)
    absmax = np.abs(X).max(axis=1)
    y = _scale(X, absmax)
    q = (y[..., None] > THR).sum(-1).reshape(-1)[:n].astype(np.uint8)  # ties -> lower code
    if n % 2:
        q = np.append(q, np.uint8(7))  # pad nibble: the code of 0.0
    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
    if not double_quant:
        return packed, absmax, None, None
    offset = np.float32(math.fsum(absmax.astype(np.float64)) / nb)
    v = absmax - offset
    nn = -(-nb // 256)
    V = np.zeros(nn * 256, np.float32)
    V[:nb] = v
    V = V.reshape(nn, 256)
    nested = np.abs(V).max(axis=1)
    y2 = _scale(V, nested).reshape(-1)[:nb]
    dmap = nf4.dynamic_map().astype(np.float64)
    mids = (dmap[:-1] + dmap[1:]) / 2  # exact in float64
    codes = np.searchsorted(mids, y2.astype(np.float64), side="left").astype(np.uint8)  # ties -> lower
    return packed, codes, nested, offset


def ref_decode_absmax(t):
    if not t.double_quant:
        return t.absmax
    nested = np.repeat(t.nested_absmax, 256)[: t.absmax.size]
    return (t.nested_map[t.absmax] * nested).astype(np.float32) + np.float32(t.offset)


def weights(rng, n, zero_blocks_of=None):
    """Normal values with per-row magnitudes spread over decades, some exact zeros."""
    x = rng.standard_normal(n) * np.exp(rng.uniform(-3, 3, size=n) if n < 64 else
                                        np.repeat(rng.uniform(-3, 3, size=-(-n // 64)), 64)[:n])
    x[rng.random(n) < 0.01] = 0.0
    x = x.astype(np.float32)
    if zero_blocks_of and n >= 3 * zero_blocks_of:
        b = rng.integers(0, n // zero_blocks_of)
        x[b * zero_blocks_of:(b + 1) * zero_blocks_of] = 0.0
    return x


def assert_matches_reference(t, x32, blocksize, double_quant):
    packed, absmax, nested, offset = ref_quantize(x32, blocksize, double_quant)
    np.testing.assert_array_equal(t.packed, packed)
    np.testing.assert_array_equal(t.absmax, absmax)
    if double_quant:
        np.testing.assert_array_equal(t.nested_absmax, nested)
        assert np.float32(t.offset) == offset
    else:
        assert t.nested_absmax is None and t.nested_map is None


# ---------------------------------------------------------------- tables
def test_code_tables():
    np.testing.assert_array_equal(nf4.nf4_codes(), CODES)
    m = nf4.dynamic_map()
    assert m.dtype == np.float32 and m.shape == (256,)
    assert np.all(np.diff(m) > 0) and m[127] == 0.0 and m[255] == 1.0
    assert m[0] == np.float32(-0.99296874) and m[128] == np.float32(5.5000004e-07)


# ---------------------------------------------------------------- exactness vs the reference
SIZES = [1, 2, 31, 63, 64, 65, 1001, 64 * 256, 64 * 256 + 1, 64 * 700 + 37, 300_001]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_reference_blocksize64(rng, level, n, double_quant):
    x = weights(rng, n, zero_blocks_of=64)
    t = nf4.quantize(x, 64, double_quant, level=level)
    assert_matches_reference(t, x, 64, double_quant)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
def test_reference_blocksizes(rng, level, blocksize):
    n = int(rng.integers(1, 3 * 256 * blocksize // 64)) * 64 + int(rng.integers(0, blocksize))
    x = weights(rng, n, zero_blocks_of=blocksize)
    for dq in (True, False):
        t = nf4.quantize(x.reshape(1, -1), blocksize, dq, level=level)
        assert_matches_reference(t, x, blocksize, dq)
        # Decoding at this level equals the scalar oracle and code * decoded absmax exactly.
        ref = (CODES[_nibbles(t.packed, n)] * np.repeat(ref_decode_absmax(t), blocksize)[:n]).reshape(t.shape)
        np.testing.assert_array_equal(t.dequantize(level=level), ref)


def _nibbles(packed, n):
    q = np.empty(packed.size * 2, np.uint8)
    q[0::2], q[1::2] = packed >> 4, packed & 0x0F
    return q[:n]


def test_midpoint_ties_go_to_lower_code(rng):
    # Block absmax 1.0 so y == x: an element exactly on a float32 midpoint gets the lower code.
    for level in LEVELS:
        x = np.zeros(64, np.float32)
        x[0] = 1.0
        x[1:16] = THR
        x[16:31] = np.nextafter(THR, np.float32(2))  # just above: the upper code
        t = nf4.quantize(x, 64, False, level=level)
        q = _nibbles(t.packed, 64)
        np.testing.assert_array_equal(q[1:16], np.arange(15))
        np.testing.assert_array_equal(q[16:31], np.arange(1, 16))


def test_zero_blocks_and_pad_nibble(rng):
    x = rng.standard_normal(64 * 5 + 3).astype(np.float32)
    x[64:192] = 0.0  # blocks 1 and 2
    x[320:] = 0.0    # partial last block of 3 elements (odd n: pad nibble)
    for level in LEVELS:
        t = nf4.quantize(x, 64, True, level=level)
        assert np.all(t.packed[32:96] == 0x77) and np.all(t.packed[160:] == 0x77)
        d = t.dequantize()
        assert np.all(d[64:192] == 0.0) and np.all(d[320:] == 0.0)  # exactly 0 despite decoded absmax != 0
    all_zero = nf4.quantize(np.zeros(100, np.float32))
    assert np.all(all_zero.packed == 0x77) and np.all(all_zero.dequantize() == 0)


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e-39, 1e-44])
def test_huge_tiny_subnormal(rng, scale):
    x = (rng.standard_normal(64 * 9 + 5) * scale).astype(np.float32)
    if scale < 1e-38:
        assert np.all(np.abs(x) < np.finfo(np.float32).tiny)  # subnormal blocks
    for level in LEVELS:
        for dq in (True, False):
            t = nf4.quantize(x, 64, dq, level=level)
            assert_matches_reference(t, x, 64, dq)
            if not dq:  # subnormal blocks keep their resolution (2^64 rescale)
                assert_roundtrip_bound(t, x)


def test_extreme_magnitudes_in_one_tensor(rng):
    x = rng.standard_normal(64 * 600).astype(np.float32)
    x[:64] = x[:64] / np.abs(x[:64]).max() * np.float32(3e38)  # near FLT_MAX: the mean stays finite
    x[64:128] *= np.float32(1e-42)
    t = nf4.quantize(x)
    assert_matches_reference(t, x, 64, True)
    assert np.all(np.isfinite(t.dequantize()))


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs(rng, level, dtype):
    npdt = np.float16 if dtype == "float16" else BF16
    x = weights(rng, 5003).astype(npdt).reshape(1, 5003)
    x[0, :7] = np.array([0, -0.0, 6e-8, 1e-7, -3e-6, 65504, -0.5], dtype=npdt)  # f16 subnormals, max
    t = nf4.quantize(x, 64, True, level=level)
    assert t.dtype == dtype and t.shape == (1, 5003)
    assert_matches_reference(t, x.astype(np.float32), 64, True)
    # raw bits through src_dtype give the same bytes
    t2 = nf4.quantize(x.view(np.uint16), 64, True, src_dtype=dtype, level=level)
    np.testing.assert_array_equal(t2.packed, t.packed)
    np.testing.assert_array_equal(t2.absmax, t.absmax)
    assert t2.dtype == dtype
    d32 = t.dequantize()
    assert t.dequantize(npdt).dtype == npdt
    np.testing.assert_array_equal(t.dequantize(npdt), d32.astype(npdt))


def test_dtype_errors(rng):
    with pytest.raises(ValueError, match="float64"):
        nf4.quantize(rng.standard_normal(64))
    with pytest.raises(ValueError, match="src_dtype='bfloat16'"):
        nf4.quantize(np.zeros(64, np.uint16))
    with pytest.raises(ValueError, match="does not match"):
        nf4.quantize(np.zeros(64, np.float32), src_dtype="bfloat16")
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(np.zeros((0, 4), np.float32))
    for bs in (16, 48, 8192, 64.5, True):
        with pytest.raises(ValueError, match="blocksize"):
            nf4.quantize(np.ones(64, np.float32), bs)
    with pytest.raises(ValueError, match="blocksize"):
        _core.nf4.quantize(np.ones(64, np.float32), "float32", 96, True)
    with pytest.raises(ValueError, match="unsupported dtype"):
        nf4.quantize(np.ones(64, np.float32)).dequantize(np.int8)


def test_non_contiguous_input(rng):
    x = weights(rng, 64 * 40).reshape(40, 64)
    t = nf4.quantize(x.T)  # transposed view: quantized in the view's row-major order
    assert t.shape == (64, 40)
    assert_matches_reference(t, np.ascontiguousarray(x.T), 64, True)


# ---------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(rng, level, bad):
    n = 64 * 50 + 7
    for pos in (0, int(rng.integers(1, n - 1)), n - 1):  # first, random, inside the partial block
        for dtype in (np.float32, np.float16, BF16):
            x = rng.standard_normal(n).astype(dtype)
            x[pos] = bad
            with pytest.raises(ValueError, match="NaN or infinity"):
                nf4.quantize(x, 64, True, level=level)


# ---------------------------------------------------------------- round trip
def assert_roundtrip_bound(t, x):
    """|x - deq| <= max half gap of the codes * absmax + |absmax - decoded absmax| (+ rounding)."""
    x = x.reshape(-1).astype(np.float64)
    d = t.dequantize().reshape(-1).astype(np.float64)
    _, true_absmax, _, _ = ref_quantize(x.astype(np.float32), t.blocksize, False)
    a = np.repeat(true_absmax.astype(np.float64), t.blocksize)[: x.size]
    a_dec = np.repeat(ref_decode_absmax(t).astype(np.float64), t.blocksize)[: x.size]
    half_gap = float(np.max(np.diff(CODES.astype(np.float64)))) / 2
    eps = float(np.finfo(np.float32).eps)
    bound = half_gap * a * (1 + 4 * eps) + np.abs(a - a_dec) + 2 * eps * np.abs(a_dec) + 1e-45
    assert np.all(np.abs(x - d) <= bound)


def test_roundtrip_error_bound(rng):
    x = weights(rng, 64 * 1000 + 11)
    for dq in (True, False):
        t = nf4.quantize(x, 64, dq)
        assert_roundtrip_bound(t, x)
    # double quant: the decoded absmax is within half a map step of the nested absmax
    t = nf4.quantize(x, 64, True)
    _, true_absmax, _, _ = ref_quantize(x, 64, False)
    steps = np.max(np.diff(nf4.dynamic_map().astype(np.float64))) / 2
    nested = np.repeat(t.nested_absmax, 256)[: true_absmax.size].astype(np.float64)
    err = np.abs(ref_decode_absmax(t).astype(np.float64) - true_absmax)
    assert np.all(err <= steps * nested * (1 + 1e-6) + 4 * np.spacing(true_absmax))
    # relative RMS error of NF4 on normal data is ~10%
    g = rng.standard_normal(64 * 4096).astype(np.float32)
    d = nf4.quantize(g).dequantize()
    assert 0.05 < np.sqrt(np.mean((d - g) ** 2) / np.mean(g ** 2)) < 0.15


def test_threads_do_not_change_bytes(rng):
    x = weights(rng, 64 * 3000 + 9)
    ref = nf4.quantize(x)
    old = qlora_native.num_threads()
    try:
        qlora_native.set_num_threads(1)
        one = nf4.quantize(x)
    finally:
        qlora_native.set_num_threads(old)
    for a, b in [(ref.packed, one.packed), (ref.absmax, one.absmax), (ref.nested_absmax, one.nested_absmax)]:
        np.testing.assert_array_equal(a, b)
    assert ref.offset == one.offset
