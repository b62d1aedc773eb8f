"""NF4 GEMV (decode path, small M) through qlora_native.ops.nf4_gemm_nt.

M = 1..NF4_GEMV_MAX_M runs one cpu::nf4_gemv_nt call; up to 2 * NF4_GEMV_MAX_M it runs in row
groups, and 2 * NF4_GEMV_MAX_M + 1 crosses over to the blocked NF4 GEMM. Weights are random valid NF4 arrays (random nibbles, block scales, nested scales; no
quantizer needed). The oracle is numpy float64 on a dequantization written here from the byte
format; results are also compared with cpu:scalar. Tolerance: the fp32 worst case
|err| <= gamma_K * sum_k |x_k w_k| (gamma_K ~ K * eps32) plus the rounding of alpha/beta; a single
wrong weight or block scale exceeds it by orders of magnitude.
"""
from types import SimpleNamespace

import numpy as np
import pytest

import qlora_native
from conftest import all_backends

try:
    from qlora_native import ops
except ImportError:
    ops = None
pytestmark = pytest.mark.skipif(ops is None or not hasattr(ops, "nf4_gemm_nt"),
                                reason="qlora_native.ops.nf4_gemm_nt is not built yet")

NF4_GEMV_MAX_M = 8  # mirrors cpu::kNf4GemvMaxM (cpp/src/cpu/nf4_gemv.hpp)
EPS32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff 2^-24

NF4_CODES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


def random_nf4(rng, rows, cols, blocksize, double_quant, default_map=False):
    """A valid NF4 weight object (attribute protocol) with random content."""
    n = rows * cols
    nb = -(-n // blocksize)
    w = SimpleNamespace(shape=(rows, cols), blocksize=blocksize, double_quant=double_quant,
                        packed=rng.integers(0, 256, size=(n + 1) // 2, dtype=np.uint8),
                        nested_absmax=None, nested_map=None, offset=0.0)
    if double_quant:
        w.absmax = rng.integers(0, 256, size=nb, dtype=np.uint8)
        w.nested_absmax = rng.uniform(0.05, 0.2, size=-(-nb // 256)).astype(np.float32)
        if not default_map:
            w.nested_map = np.sort(rng.uniform(-1.0, 1.0, size=256)).astype(np.float32)
        w.offset = float(np.float32(rng.uniform(0.2, 0.5)))
    else:
        w.absmax = rng.uniform(0.05, 2.0, size=nb).astype(np.float32)
    return w


def _dynamic_map():
    from qlora_native import nf4
    return np.asarray(nf4.dynamic_map(), dtype=np.float32)


def dequant_ref(w):
    """float32 [rows, cols] from the byte format: code[nibble] * absmax[j // blocksize] (fp32 ops)."""
    rows, cols = w.shape
    n = rows * cols
    nib = np.empty(2 * w.packed.size, dtype=np.uint8)
    nib[0::2] = w.packed >> 4  # first element of a pair in the high nibble
    nib[1::2] = w.packed & 0x0F
    nib = nib[:n]
    if w.double_quant:
        nmap = w.nested_map if w.nested_map is not None else _dynamic_map()
        nested = np.repeat(w.nested_absmax, 256)[: w.absmax.size]
        absmax = nmap[w.absmax] * nested + np.float32(w.offset)  # float32 ops, as in the format
    else:
        absmax = w.absmax
    assert absmax.dtype == np.float32
    scale = np.repeat(absmax, w.blocksize)[:n]
    return (NF4_CODES[nib] * scale).reshape(rows, cols)


def check_close(got, ref, bound, what):
    err = np.abs(got.astype(np.float64) - ref)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} outside tolerance; worst at {i}: "
                             f"got {got[i]!r}, ref {ref[i]!r}, err {err[i]:.3g} > bound {bound[i]:.3g}")


def run_case(rng, backend, M, rows, cols, blocksize, double_quant, alpha=1.0, beta=0.0, default_map=False):
    w = random_nf4(rng, rows, cols, blocksize, double_quant, default_map)
    wd = dequant_ref(w).astype(np.float64)
    # Row-strided X (leading dimension > cols) and a strided out exercise ldx / ldy.
    xbuf = rng.standard_normal((M, cols + 3)).astype(np.float32)
    x = xbuf[:, :cols]
    y0 = rng.standard_normal((M, rows)).astype(np.float32)
    obuf = np.full((M, rows + 2), np.nan if beta == 0.0 else 7.0, dtype=np.float32)
    out = obuf[:, :rows]
    if beta != 0.0:
        out[...] = y0
    got = ops.nf4_gemm_nt(x, w, out, alpha=alpha, beta=beta, backend=backend)
    got = np.asarray(got)
    assert got.shape == (M, rows) and got.dtype == np.float32
    assert np.all(obuf[:, rows:] == 7.0) or beta == 0.0, "wrote outside out"

    x64 = x.astype(np.float64)
    dot = x64 @ wd.T
    ref = alpha * dot + (beta * y0.astype(np.float64) if beta != 0.0 else 0.0)
    mag = np.abs(x64) @ np.abs(wd).T  # sum_k |x_k w_k|
    bound = (2.0 * (cols + 4) * EPS32 * abs(alpha) * mag
             + 4.0 * EPS32 * (np.abs(ref) + (abs(beta) * np.abs(y0) if beta != 0.0 else 0.0)) + 1e-30)
    what = f"{backend} M={M} W=[{rows},{cols}] bs={blocksize} dq={double_quant} alpha={alpha} beta={beta}"
    check_close(got, ref, bound, what + " vs float64")
    if backend != "cpu:scalar":
        out_s = np.full((M, rows), np.nan, dtype=np.float32)
        if beta != 0.0:
            out_s[...] = y0
        scal = ops.nf4_gemm_nt(x, w, out_s, alpha=alpha, beta=beta, backend="cpu:scalar")
        check_close(got, np.asarray(scal, dtype=np.float64), 2 * bound, what + " vs cpu:scalar")


# (rows, cols, blocksize): ragged sizes (odd element counts, rows starting mid-byte), blocks that
# straddle rows, SIMD-friendly K (multiples of 16/32) with straddling blocks, one block per row.
SHAPES = [
    (1, 1, 64), (7, 1, 32), (1, 7, 64), (7, 7, 32), (63, 65, 64), (65, 63, 128),
    (577, 7, 64), (3, 577, 256), (33, 96, 64), (37, 160, 256), (64, 576, 64),
    (19, 1536, 1024), (5, 4096, 4096), (9, 48, 32),
]


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("M", list(range(1, NF4_GEMV_MAX_M + 2)) + [2 * NF4_GEMV_MAX_M, 2 * NF4_GEMV_MAX_M + 1])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("rows,cols,blocksize", SHAPES, ids=[f"{r}x{c}-bs{b}" for r, c, b in SHAPES])
def test_nf4_gemv_shapes(rng, backend, M, double_quant, rows, cols, blocksize):
    run_case(rng, backend, M, rows, cols, blocksize, double_quant)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("M", [1, 3, NF4_GEMV_MAX_M])
@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (-1.25, -0.75), (2.0, 0.0)])
def test_nf4_gemv_alpha_beta(rng, backend, M, alpha, beta):
    run_case(rng, backend, M, 129, 576, 64, True, alpha=alpha, beta=beta)
    run_case(rng, backend, M, 31, 65, 32, False, alpha=alpha, beta=beta)
    # X beyond 24 KiB at M = 8 (K = 1536): the AVX-512 kernel sums column chunks into Y.
    run_case(rng, backend, M, 65, 1536, 64, True, alpha=alpha, beta=beta)


@pytest.mark.parametrize("backend", all_backends())
def test_nf4_gemv_default_nested_map(rng, backend):
    """nested_map None means bitsandbytes' dynamic map."""
    run_case(rng, backend, 1, 50, 256, 64, True, default_map=True)


@pytest.mark.parametrize("backend", all_backends())
def test_nf4_gemv_many_rows(rng, backend):
    """Enough rows to be split over threads (several tasks), every row checked."""
    run_case(rng, backend, 2, 2500, 128, 64, True)


def test_nf4_gemv_levels_agree_exactly_on_decode(rng):
    """Single-column weights make every output one product: all CPU levels must give the same
    fp32 value (decode, block scale and double-quant scale are exact fp32 ops everywhere)."""
    w = random_nf4(rng, 300, 1, 64, True)
    x = rng.standard_normal((1, 1)).astype(np.float32)
    ref = (x[0, 0] * dequant_ref(w)[:, 0]).astype(np.float32)
    for b in [b for b in qlora_native.available_backends() if b.startswith("cpu")]:
        got = np.asarray(ops.nf4_gemm_nt(x, w, backend=b))[0]
        np.testing.assert_array_equal(got, ref, err_msg=b)


@pytest.mark.parametrize("M", [1, 4, 5, 8])
def test_nf4_gemv_levels_agree_exactly_on_simd_scales(rng, M):
    """K = 64 (the SIMD kernels' path, whose block scales are decoded by SIMD code at AVX-512) and
    one nonzero column of X per row: every output is one product x * w, exact at every level.
    700 rows x 1 block: many 16-block runs under one nested scale, heads and tails between them."""
    w = random_nf4(rng, 700, 64, 64, True)
    col = int(rng.integers(0, 64))
    x = np.zeros((M, 64), np.float32)
    x[:, col] = rng.standard_normal(M).astype(np.float32) + 2.0
    ref = (x[:, col:col + 1] * dequant_ref(w)[:, col][None, :]).astype(np.float32)
    for b in [b for b in qlora_native.available_backends() if b.startswith("cpu")]:
        got = np.asarray(ops.nf4_gemm_nt(x, w, backend=b))
        np.testing.assert_array_equal(got, ref, err_msg=b)


@pytest.mark.parametrize("backend", [b for b in qlora_native.available_backends() if b.startswith("cpu")])
@pytest.mark.parametrize("M", [1, 3, 8, 11, 17])
def test_nf4_gemm_nt_many_equals_single_calls(rng, backend, M):
    """Projections sharing an input (q/k/v, gate/up) run as one job: each output must be exactly
    what a single nf4_gemm_nt gives (same kernel and row pairing per row, whatever the split),
    and match float64. Odd row counts, a straddling blocksize and a non-SIMD K included."""
    for cols, shapes in [(576, [(577, 64), (192, 64), (193, 64)]), (96, [(33, 32), (64, 64)]), (40, [(7, 64), (9, 64)])]:
        ws = [random_nf4(rng, rows, cols, bs, True) for rows, bs in shapes]
        x = rng.standard_normal((M, cols)).astype(np.float32)
        outs = ops.nf4_gemm_nt_many(x, ws, backend=backend)
        for w, got in zip(ws, outs):
            np.testing.assert_array_equal(got, ops.nf4_gemm_nt(x, w, backend=backend))
            wd = dequant_ref(w).astype(np.float64)
            bound = 2.0 * (cols + 4) * EPS32 * (np.abs(x.astype(np.float64)) @ np.abs(wd).T) + 1e-30
            check_close(np.asarray(got), x.astype(np.float64) @ wd.T, bound, f"{backend} many M={M} K={cols}")
    with pytest.raises(ValueError, match="column"):
        ops.nf4_gemm_nt_many(np.ones((2, 64), np.float32), [random_nf4(rng, 8, 64, 64, True), random_nf4(rng, 8, 32, 32, True)],
                             backend=backend)
