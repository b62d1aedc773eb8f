"""Fused NF4 GEMM (ops.nf4_gemm_nt / nf4_gemm_nn) and ops.nf4_dequantize on every backend.

Weights are random valid NF4 data (random nibbles, absmax codes, nested scales), so no quantizer
is needed. The reference decodes them independently in numpy (nibble order, block scales, double
quant: map[code] * nested[b // 256] + offset, all in float32) and multiplies in float64.
Error bound, elementwise (same derivation as test_ops_gemm.py, W = the decoded weight):
    |Y - Y_ref| <= (K + 4) * eps32 * (|alpha| * (|X| @ |W|ᵀ) + |beta| * |Y0|)
where the +4 also covers the one rounding of code * absmax inside the kernel.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from qlora_native import ops
from conftest import all_backends
from helpers_gemm import bound, check

EPS32 = float(np.finfo(np.float32).eps)
NF4_CODES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


def random_nf4(rng, rows, cols, blocksize, double_quant):
    n = rows * cols
    nb = -(-n // blocksize)
    w = SimpleNamespace(shape=(rows, cols), blocksize=blocksize, double_quant=double_quant,
                        packed=rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8))
    if n % 2:  # bitsandbytes pads the last low nibble with 0
        w.packed[-1] &= 0xF0
    if double_quant:
        w.absmax = rng.integers(0, 256, nb, dtype=np.uint8)
        w.nested_absmax = rng.uniform(0.02, 0.1, -(-nb // 256)).astype(np.float32)
        w.nested_map = np.sort(rng.uniform(-1.0, 1.0, 256)).astype(np.float32)
        w.offset = float(np.float32(rng.uniform(0.05, 0.2)))
    else:
        w.absmax = rng.uniform(0.01, 2.0, nb).astype(np.float32)
        w.nested_absmax = None
        w.nested_map = None
        w.offset = 0.0
    return w


def decode(w):
    """numpy float32 [rows, cols] decode of an NF4 weight (the independent reference)."""
    rows, cols = w.shape
    n = rows * cols
    q = np.empty(2 * w.packed.size, np.uint8)
    q[0::2] = w.packed >> 4  # first element of a pair: high nibble
    q[1::2] = w.packed & 0x0F
    if w.double_quant:
        nb = w.absmax.size
        absmax = w.nested_map[w.absmax] * w.nested_absmax[np.arange(nb) // 256] + np.float32(w.offset)
    else:
        absmax = w.absmax
    scale = np.repeat(absmax.astype(np.float32), w.blocksize)[:n]
    return (NF4_CODES[q[:n]] * scale).reshape(rows, cols)


# (rows, cols, blocksize): aligned rows, rows straddling blocks (cols % blocksize != 0), odd numel.
WEIGHTS_SMALL = [(7, 63, 32), (33, 64, 64), (40, 100, 64), (9, 300, 256), (65, 577, 32)]
# (40, 2500, 64): nt with K above the AVX-512 depth block (KC = 1024); nn with N = 2500 rows.
WEIGHTS_LARGE = [(192, 576, 64), (577, 96, 64), (130, 1000, 256), (256, 512, 32), (40, 2500, 64)]
MS = [1, 3, 4, 5, 7, 16, 65]


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_nf4_gemm_vs_float64(backend, layout, double_quant, rng):
    weights = WEIGHTS_SMALL + ([] if backend == "cpu:scalar" else WEIGHTS_LARGE)
    for rows, cols, bs in weights:
        w = random_nf4(rng, rows, cols, bs, double_quant)
        wd = decode(w).astype(np.float64)
        for M in MS if rows * cols < 50000 else [5, 300]:
            if layout == "nt":
                x = rng.standard_normal((M, cols), dtype=np.float32)
                got, ref, wk = ops.nf4_gemm_nt(x, w, backend=backend), x @ wd.T, wd.T
            else:
                x = rng.standard_normal((M, rows), dtype=np.float32)
                got, ref, wk = ops.nf4_gemm_nn(x, w, backend=backend), x @ wd, wd
            assert got.shape == ref.shape and got.dtype == np.float32
            check(got, ref, bound(x, wk))


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_nf4_gemm_alpha_beta_strides(backend, layout, rng):
    for (rows, cols, bs), M, alpha, beta, dq in [((40, 100, 64), 3, 0.5, -1.5, True),
                                                  ((70, 129, 32), 33, -2.0, 0.25, False),
                                                  ((64, 256, 256), 20, 1.0, 1.0, True)]:
        w = random_nf4(rng, rows, cols, bs, dq)
        wd = decode(w).astype(np.float64)
        K, N = (cols, rows) if layout == "nt" else (rows, cols)
        wk = wd.T if layout == "nt" else wd
        big_x = rng.standard_normal((M + 2, K + 9), dtype=np.float32)
        x = big_x[1:1 + M, 5:5 + K]
        big_y = rng.standard_normal((M + 1, N + 6), dtype=np.float32)
        y0 = big_y.copy()
        yv = big_y[1:, 3:3 + N]
        fn = ops.nf4_gemm_nt if layout == "nt" else ops.nf4_gemm_nn
        fn(x, w, yv, alpha=alpha, beta=beta, backend=backend)
        ref = alpha * (x.astype(np.float64) @ wk) + beta * y0[1:, 3:3 + N]
        check(yv, ref, bound(x, wk, alpha, beta, y0[1:, 3:3 + N]))
        mask = np.ones(big_y.shape, bool)
        mask[1:, 3:3 + N] = False
        assert np.array_equal(big_y[mask], y0[mask])
        # beta = 0 never reads the output.
        yv[...] = np.nan
        fn(x, w, yv, alpha=alpha, backend=backend)
        check(yv, alpha * (x.astype(np.float64) @ wk), bound(x, wk, alpha))


@pytest.mark.parametrize("backend", [b for b in all_backends() if b.id != "cpu:scalar"])
def test_nf4_gemm_vs_scalar(backend, rng):
    for (rows, cols, bs), dq in [((33, 65, 32), True), ((97, 200, 64), False), ((45, 768, 256), True)]:
        w = random_nf4(rng, rows, cols, bs, dq)
        wd = decode(w).astype(np.float64)
        for M in [2, 15, 29]:
            x = rng.standard_normal((M, cols), dtype=np.float32)
            want = ops.nf4_gemm_nt(x, w, backend="cpu:scalar").astype(np.float64)
            check(ops.nf4_gemm_nt(x, w, backend=backend), want, bound(x, wd.T))
            dy = rng.standard_normal((M, rows), dtype=np.float32)
            want = ops.nf4_gemm_nn(dy, w, backend="cpu:scalar").astype(np.float64)
            check(ops.nf4_gemm_nn(dy, w, backend=backend), want, bound(dy, wd))


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_nf4_dequantize(backend, double_quant, rng):
    for rows, cols, bs in [(7, 63, 32), (40, 100, 64), (9, 300, 256)]:
        w = random_nf4(rng, rows, cols, bs, double_quant)
        got = ops.nf4_dequantize(w, backend)
        assert got.shape == (rows, cols) and got.dtype == np.float32
        want = decode(w)
        np.testing.assert_allclose(got, want, rtol=2 * EPS32, atol=0)


def test_nf4_gemm_bad_inputs(rng):
    w = random_nf4(rng, 8, 64, 64, True)
    x = rng.standard_normal((5, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="columns"):
        ops.nf4_gemm_nt(x[:, :63], w)
    with pytest.raises(ValueError, match="columns"):
        ops.nf4_gemm_nn(x, w)  # dy must be [M, 8]
    with pytest.raises(ValueError, match="float32"):
        ops.nf4_gemm_nt(x.astype(np.float16), w)
    with pytest.raises(ValueError, match="shape"):
        ops.nf4_gemm_nt(x, w, np.empty((5, 9), np.float32))
    short = random_nf4(rng, 8, 64, 64, True)
    short.packed = short.packed[:-1]
    with pytest.raises(ValueError, match="packed"):
        ops.nf4_gemm_nt(x, short)
    bad_dtype = random_nf4(rng, 8, 64, 64, False)
    bad_dtype.absmax = bad_dtype.absmax.astype(np.float64)
    with pytest.raises(ValueError, match="absmax"):
        ops.nf4_gemm_nt(x, bad_dtype)
