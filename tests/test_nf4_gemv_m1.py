"""The M = 1 NF4 decode GEMV kernel at AVX-512 (cpu/nf4_gemv_avx512.cpp rows_1: vpmovzxbd + one
shift per 32 weights, its own X order, software prefetch of the row stream), against float64 and
against the general kernel it replaced for M = 1 (QLORA_NF4_GEMV_M1=0): rows starting mid-block
(heads), blocksize 32 (two blocks per step), blocks larger than a row, tails, alpha/beta, and a
row's bits independent of the thread count. The env switch and the prefetch override
(QLORA_NF4_GEMV_PF) are read per call. Rows go in pairs (rows_avx512_m1_pairs: each X vector loaded
once for two rows, each row's FMA order unchanged) where the blocksize is >= 64 and divides K:
QLORA_NF4_GEMV_M1_PAIRS=0 runs them one at a time, with the same bits. Where X[K] exceeds half the
L1d the groups are four rows (rows_avx512_m1_quads: then a pair, then an odd row);
QLORA_NF4_GEMV_M1_QUADS=1 / 0 forces fours / pairs at every K, with the same bits."""
import os

import numpy as np
import pytest

import qlora_native
from test_ops_nf4_gemv import EPS32, check_close, dequant_ref, random_nf4

try:
    from qlora_native import ops
except ImportError:
    ops = None
pytestmark = pytest.mark.skipif(ops is None or not hasattr(ops, "nf4_gemm_nt"), reason="ops.nf4_gemm_nt not built")

# (rows, cols, blocksize): K % 32 == 0 (the SIMD path). Row starts mid-block where rows * cols is
# not a multiple of the blocksize: 96 cols at bs 64 gives heads of 32; 160 at bs 128 heads of
# 32/64/96; bs 32 runs two blocks a step plus a last odd block; bs 4096 > K spans rows.
SHAPES = [(7, 32, 32), (9, 96, 32), (33, 96, 64), (37, 160, 128), (5, 224, 256), (11, 4096, 4096),
          (13, 1056, 64), (3, 576, 64), (17, 288, 256)]


def _run(x, w, env, alpha=1.0, beta=0.0, y0=None):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        out = None if y0 is None else y0.copy()
        return np.asarray(ops.nf4_gemm_nt(x, w, out, alpha=alpha, beta=beta) if out is not None
                          else ops.nf4_gemm_nt(x, w, alpha=alpha))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("rows,cols,blocksize", SHAPES, ids=[f"{r}x{c}-bs{b}" for r, c, b in SHAPES])
@pytest.mark.parametrize("env", [{}, {"QLORA_NF4_GEMV_M1": "0"}, {"QLORA_NF4_GEMV_PF": "0,0"},
                                 {"QLORA_NF4_GEMV_PF": "64,128"}, {"QLORA_NF4_GEMV_PF": "junk"},
                                 {"QLORA_NF4_GEMV_M1_PAIRS": "0"}, {"QLORA_NF4_GEMV_M1_QUADS": "0"},
                                 {"QLORA_NF4_GEMV_M1_QUADS": "1"}],
                         ids=["m1", "general", "nopf", "shortpf", "badpf", "singlerows", "pairs", "quads"])
def test_m1_vs_float64(rng, double_quant, rows, cols, blocksize, env):
    w = random_nf4(rng, rows, cols, blocksize, double_quant)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    wd = dequant_ref(w).astype(np.float64)
    x64 = x.astype(np.float64)
    mag = np.abs(x64) @ np.abs(wd).T
    got = _run(x, w, env)
    check_close(got, x64 @ wd.T, 2.0 * (cols + 4) * EPS32 * mag + 1e-30, f"M=1 {env} vs float64")
    # alpha / beta (beta != 0 reads Y)
    y0 = rng.standard_normal((1, rows)).astype(np.float32)
    got = _run(x, w, env, alpha=-1.25, beta=0.5, y0=y0)
    ref = -1.25 * (x64 @ wd.T) + 0.5 * y0.astype(np.float64)
    check_close(got, ref, 2.0 * (cols + 6) * EPS32 * (1.25 * mag + 0.5 * np.abs(y0)) + 1e-30, f"M=1 {env} alpha/beta")


def test_m1_kernel_is_the_default_and_differs_from_the_general_one(rng):
    """The switch really selects another kernel (another summation order): at K = 4096 some rows
    differ in the last bits; both stay within the float64 bound (test_m1_vs_float64)."""
    if qlora_native.simd_level() != "avx512":
        pytest.skip("the M = 1 kernel is the AVX-512 level's")
    w = random_nf4(rng, 64, 4096, 64, True)
    x = rng.standard_normal((1, 4096)).astype(np.float32)
    a, b = _run(x, w, {}), _run(x, w, {"QLORA_NF4_GEMV_M1": "0"})
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, _run(x, w, {"QLORA_NF4_GEMV_PF": "0,0"}))  # prefetch: same bits


def test_m1_rows_do_not_depend_on_the_thread_count(rng):
    """Enough rows for several tasks (1024 rows of K = 256 per task at M = 1), odd row count."""
    w = random_nf4(rng, 3001, 256, 64, True)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    before = qlora_native.num_threads()
    out = {}
    try:
        for t in (1, 2, 3):
            qlora_native.set_num_threads(t)
            out[t] = _run(x, w, {})
    finally:
        qlora_native.set_num_threads(before)
    np.testing.assert_array_equal(out[1], out[2])
    np.testing.assert_array_equal(out[1], out[3])


@pytest.mark.parametrize("rows,cols,blocksize", [(1, 64, 64), (2, 128, 64), (7, 576, 64), (33, 1536, 128),
                                                 (9, 96, 32), (5, 192, 4096), (6, 11008, 64), (1024, 512, 64),
                                                 (3, 256, 64), (4, 64, 64), (47, 11008, 64), (70, 4096, 128)])
def test_row_pairs_keep_the_single_row_bits(rng, rows, cols, blocksize):
    """Groups of four and pairs (then a pair and an odd last row; the double-quant sub-ranges, 22 rows
    at K = 11008, end groups early; bs 32 and K % bs != 0 fall back to single rows) give the bits of
    the single-row kernel, at 1 and 2 threads, with beta, and in the bf16 contract's fp32-FMA form."""
    w = random_nf4(rng, rows, cols, blocksize, True)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    y0 = rng.standard_normal((1, rows)).astype(np.float32)
    before = qlora_native.num_threads()
    try:
        for t in (1, 2):
            qlora_native.set_num_threads(t)
            for env in ({}, {"QLORA_BF16_GEMV_FP32": "1"}):
                cd = "bfloat16" if env else "float32"
                def run(pairs, quads="1"):
                    e = dict(env, QLORA_NF4_GEMV_M1_PAIRS=pairs, QLORA_NF4_GEMV_M1_QUADS=quads)
                    old = {k: os.environ.get(k) for k in e}
                    os.environ.update(e)
                    try:
                        return (np.asarray(ops.nf4_gemm_nt(x, w, compute_dtype=cd)),
                                np.asarray(ops.nf4_gemm_nt(x, w, y0.copy(), alpha=0.5, beta=-2.0, compute_dtype=cd)))
                    finally:
                        for k, v in old.items():
                            if v is None:
                                os.environ.pop(k, None)
                            else:
                                os.environ[k] = v
                a, b, c, d = run("1"), run("0"), run("1", quads="0"), run("1", quads="")
                for other in (b, c, d):
                    np.testing.assert_array_equal(a[0], other[0])
                    np.testing.assert_array_equal(a[1], other[1])
    finally:
        qlora_native.set_num_threads(before)
