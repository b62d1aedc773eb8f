"""GGUF Q8_0 kernels (ops.q8_0_gemm_nt, ops.q8_0_rows) against a float64 numpy reference.

A Q8_0 row of K weights is K/32 blocks of 34 bytes {fp16 scale d, int8 q[32]}; weight = float(d) *
float(q), exact in fp32. So the dequantized weights are exact and the GEMM error is that of a K-term
fp32 dot product: |y - y_ref| <= (K + 4) * eps32 * (|x| @ |w|.T), as in test_ops_gemm.py.
"""
import numpy as np
import pytest

import qlora_native
from qlora_native import ops

from conftest import cpu_backends

EPS32 = float(np.finfo(np.float32).eps)
CPU = [pytest.param(b, id=b) for b in cpu_backends()]


def make_q8_0(rng, n, k):
    """Random Q8_0 blocks for an [n, k] weight: (raw uint8 bytes, float64 [n, k] dequantization)."""
    nb = k // 32
    q = rng.integers(-128, 128, size=(n, nb, 32), dtype=np.int8)
    q.reshape(-1)[:2] = [-128, 127]  # both ends of int8 always present
    # Scales over fp16's range: subnormal (< 6.1e-5) to large, either sign, a few exact zeros.
    mag = 10.0 ** rng.uniform(-7.0, 3.0, size=(n, nb))
    d = (mag * rng.choice([-1.0, 1.0], size=(n, nb))).astype(np.float16)
    d.reshape(-1)[0] = np.float16(6e-8)  # the smallest subnormal
    d.reshape(-1)[-1] = np.float16(60000.0)
    if d.size > 4:
        d.reshape(-1)[2] = 0
    raw = np.concatenate([d.view(np.uint8).reshape(n, nb, 2), q.view(np.uint8)], axis=2).reshape(-1)
    w = (d.astype(np.float64)[:, :, None] * q.astype(np.float64)).reshape(n, k)
    return np.ascontiguousarray(raw), w


def check_gemm(y, x, w, what):
    ref = x.astype(np.float64) @ w.T
    tol = (x.shape[1] + 4) * EPS32 * (np.abs(x.astype(np.float64)) @ np.abs(w).T)
    err = np.abs(y.astype(np.float64) - ref)
    assert y.dtype == np.float32 and y.shape == ref.shape, what
    assert np.all(np.isfinite(y)), what
    assert np.all(err <= tol), f"{what}: max err/tol {np.max(err / np.maximum(tol, 1e-300)):.3g}"


def test_dequantization_matches_gguf(rng):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    n, k = 33, 576
    raw, w = make_q8_0(rng, n, k)
    ref = dequantize(raw.reshape(n, -1), gguf.GGMLQuantizationType.Q8_0)
    assert ref.shape == (n, k)
    assert np.array_equal(ref.astype(np.float64), w)  # the numpy reference is gguf's, bit for bit
    for backend in cpu_backends():
        got = ops.q8_0_rows(raw, np.arange(n), n, k, backend=backend)
        assert np.array_equal(got, ref), backend


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("K", [32, 64, 576, 1536])
@pytest.mark.parametrize("N", [1, 7, 33, 300, 2500])
def test_q8_0_gemm_nt_vs_float64(backend, N, K, rng):
    raw, w = make_q8_0(rng, N, K)
    for M in [*range(1, 10), 16, 17, 40]:
        x = rng.standard_normal((M, K)).astype(np.float32)
        check_gemm(ops.q8_0_gemm_nt(x, raw, N, K, backend=backend), x, w, f"M={M} N={N} K={K} {backend}")


@pytest.mark.parametrize("backend", [b for b in CPU if b.values[0] != "cpu:scalar"])
def test_q8_0_gemm_nt_is_gemm_nt_over_the_table(backend, threads, rng):
    """M > 16 decodes the rows into the fp32 GEMM's panels: the bits of gemm_nt over the dequantized
    table (fp32-exact), for N spanning several column blocks with a ragged end and K over one depth block."""
    for N, K in [(2500, 576), (1031, 1056)]:
        raw, w = make_q8_0(rng, N, K)
        x = rng.standard_normal((40, K)).astype(np.float32)
        table = w.astype(np.float32)
        assert np.array_equal(table.astype(np.float64), w)
        want = ops.gemm_nt(x, table, backend=backend)
        assert np.array_equal(ops.q8_0_gemm_nt(x, raw, N, K, backend=backend), want), (N, K, backend)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("M", [1, 5, 17])
def test_q8_0_gemm_nt_strided_x(backend, M, rng):
    N, K = 300, 576
    raw, w = make_q8_0(rng, N, K)
    big = rng.standard_normal((M, K + 40)).astype(np.float32)
    x = big[:, 8 : 8 + K]  # row stride K + 40
    check_gemm(ops.q8_0_gemm_nt(x, raw, N, K, backend=backend), np.ascontiguousarray(x), w, f"M={M} strided")


@pytest.mark.parametrize("backend", CPU)
def test_q8_0_gemm_nt_empty_m(backend, rng):
    raw, _ = make_q8_0(rng, 7, 64)
    y = ops.q8_0_gemm_nt(np.zeros((0, 64), np.float32), raw, 7, 64, backend=backend)
    assert y.shape == (0, 7) and y.dtype == np.float32


@pytest.mark.parametrize("backend", CPU)
def test_q8_0_rows_exact(backend, rng):
    n, k = 300, 576
    raw, w = make_q8_0(rng, n, k)
    for ids in [np.array([0, n - 1, 5, 5, 123], np.int32), rng.integers(0, n, size=40), np.zeros(0, np.int64)]:
        got = ops.q8_0_rows(raw, ids, n, k, backend=backend)
        assert got.dtype == np.float32 and got.shape == (len(ids), k)
        assert np.array_equal(got, w[ids].astype(np.float32))  # exact: the dequantization is exact in fp32


def test_q8_0_threads_bit_identical(rng):
    N, K = 2500, 576
    raw, _ = make_q8_0(rng, N, K)
    n0 = qlora_native.num_threads()
    try:
        for backend in cpu_backends():
            for M in [1, 3, 8, 16, 17, 40]:
                x = rng.standard_normal((M, K)).astype(np.float32)
                qlora_native.set_num_threads(1)
                y1 = ops.q8_0_gemm_nt(x, raw, N, K, backend=backend)
                qlora_native.set_num_threads(3)
                y3 = ops.q8_0_gemm_nt(x, raw, N, K, backend=backend)
                assert np.array_equal(y1, y3), f"{backend} M={M}"
    finally:
        qlora_native.set_num_threads(n0)


def test_q8_0_bad_inputs(rng):
    n, k = 7, 64
    raw, _ = make_q8_0(rng, n, k)
    x = rng.standard_normal((2, k)).astype(np.float32)
    bad_gemm = [
        (x, raw, n, 48),  # k not a multiple of 32
        (x[:, :0], raw[:0], n, 0),  # k = 0
        (x, raw, 0, k),  # n = 0
        (x, raw[:-1], n, k),  # truncated blocks
        (x, np.concatenate([raw, raw[:34]]), n, k),  # one block too many
        (x, raw.view(np.int8), n, k),  # wrong dtype
        (x, np.repeat(raw, 2)[::2], n, k),  # non-contiguous (same bytes)
        (x[:, :32].copy(), raw, n, k),  # x columns != k
        (x.astype(np.float64), raw, n, k),  # x dtype
        (x[0], raw, n, k),  # x 1-D
        ([[1.0] * k], raw, n, k),  # not an array
    ]
    for args in bad_gemm:
        with pytest.raises(ValueError):
            ops.q8_0_gemm_nt(*args)
    bad_rows = [
        (raw, np.array([0, n]), n, k),  # id == n
        (raw, np.array([-1]), n, k),  # negative id
        (raw, np.array([0.0]), n, k),  # float ids
        (raw, np.array([[0]]), n, k),  # 2-D ids
        (raw, np.array([0]), n, 40),  # bad k
        (raw[:-34], np.array([0]), n, k),  # truncated
    ]
    for args in bad_rows:
        with pytest.raises(ValueError):
            ops.q8_0_rows(*args)
