"""bf16-compute NF4 GEMV for decode (cpu/nf4_gemv_bf16*.cpp): compute_dtype="bfloat16" with
M <= 8 on AVX512-BF16 CPUs, K % 64 == 0 and blocksize >= 64 (else the bf16 GEMM driver runs).

Contract (as the bf16 GEMM, cpu/gemm_bf16.hpp): Y = alpha * sum_k r(X[i,k]) * r(w[n,k]) + beta * Y,
r = RNE to bf16, w = code * absmax in fp32. A product of two bf16 values has at most 16 significant
bits, so it is exact in fp32; what remains are the fp32 additions of the K products (any order,
any tree: at most K - 1 roundings on the path of each term, |error| <= (K - 1) u32 sum |r(x) r(w)|
to first order, u32 = 2^-24), the final alpha * dot (+ beta * y): within (K + 4) * eps32 * |x| @ |w|
of the float64 sum of the rounded operands (helpers_bf16.check, eps32 = 2 u32: a factor 2 of slack).
A layout or rounding mistake (a wrong nibble, a wrong table entry, X not rounded) is far outside
that bound at these K: one operand's rounding alone is up to 2^-9 relative.
"""
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import ops

from helpers_bf16 import check, strided
from test_ops_nf4_gemm import decode, random_nf4

pytestmark = pytest.mark.skipif(not ops.bf16_compute_available("cpu") or qlora_native.simd_level() != "avx512",
                                reason="the bf16 GEMV runs on AVX512-BF16 CPUs only")


@pytest.fixture
def rng():
    return np.random.default_rng(1515)


# Every test runs both kernels of the contract: the vdpbf16ps one (default) and the fp32-FMA variant
# (QLORA_BF16_GEMV_FP32=1: X and each block's scaled table rounded to bf16, exact products summed by
# the fp32 kernels; nf4_gemv.hpp nf4_gemv_nt_many_bf16_fp32).
@pytest.fixture(autouse=True, params=["dpbf16", "fp32fma"])
def variant(request):
    old = os.environ.get("QLORA_BF16_GEMV_FP32")
    os.environ["QLORA_BF16_GEMV_FP32"] = "1" if request.param == "fp32fma" else "0"
    yield request.param
    if old is None:
        os.environ.pop("QLORA_BF16_GEMV_FP32", None)
    else:
        os.environ["QLORA_BF16_GEMV_FP32"] = old


def test_the_variants_differ_and_unset_picks_by_m(rng):
    """The switch selects another kernel (another summation order: some of 64 rows at K = 4096 differ
    in the last bits); unset runs the fp32-FMA variant at M = 1 on AMX-BF16 CPUs and the vdpbf16ps
    kernel otherwise (M >= 2, or no AMX)."""
    w = random_nf4(rng, 64, 4096, 64, True)
    with open("/proc/cpuinfo") as f:  # cpu::cpu_has_amx_bf16 (CPUID): the kernel choice does not need the OS's leave
        amx = "amx_bf16" in f.read().split()
    for M in (1, 2):
        x = rng.standard_normal((M, 4096)).astype(np.float32)
        os.environ["QLORA_BF16_GEMV_FP32"] = "0"
        a = run(x, w)
        os.environ["QLORA_BF16_GEMV_FP32"] = "1"
        b = run(x, w)
        del os.environ["QLORA_BF16_GEMV_FP32"]
        assert not np.array_equal(a, b), M
        np.testing.assert_array_equal(run(x, w), b if (M == 1 and amx) else a)
        check(b, x, decode(w).T, 4096)

def run(x, w, **kw):
    return ops.nf4_gemm_nt(x, w, backend="cpu", compute_dtype="bfloat16", **kw)


def gemm_path(fn):
    """fn() with QLORA_BF16_GEMV=0 (the bf16 GEMM driver instead of the GEMV)."""
    old = os.environ.get("QLORA_BF16_GEMV")
    os.environ["QLORA_BF16_GEMV"] = "0"
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["QLORA_BF16_GEMV"]
        else:
            os.environ["QLORA_BF16_GEMV"] = old


# (N, K, blocksize, double_quant): odd N (the single-row kernel for the last row), blocks that
# straddle rows (K % blocksize != 0: tables change mid-row, differently for the two rows of a
# pair), a block longer than a row, SmolLM2-like shapes, fp32 absmax.
SHAPES = [(1, 64, 64, True), (7, 64, 64, True), (33, 576, 64, True), (64, 576, 128, True), (37, 320, 256, False),
          (9, 192, 4096, True), (192, 576, 64, True), (24, 1536, 64, False), (5, 4096, 64, True)]


@pytest.mark.parametrize("M", range(1, 9))
def test_bound_vs_float64_of_rounded_operands(rng, M):
    for N, K, bs, dq in SHAPES:
        w = random_nf4(rng, N, K, bs, dq)
        W = decode(w)
        x = strided(rng, M, K)
        check(run(x, w), x, W.T, K)
        y0 = rng.standard_normal((M, N)).astype(np.float32)
        out = y0.copy()
        run(x, w, out=out, alpha=-0.5, beta=0.75)
        check(out, x, W.T, K, -0.5, 0.75, y0)


def test_the_gemv_runs_and_the_switch_restores_the_gemm(rng):
    """Summation orders differ (GEMV: per row, 16-lane accumulators; GEMM: k panels), so over 64
    rows of K = 4096 some result differs in its last bits: the GEMV really takes M <= 8, the
    switch really sends it back, and M = 9 is the GEMM's either way. Both meet the bound."""
    w = random_nf4(rng, 64, 4096, 64, True)
    W = decode(w)
    for M in (1, 8, 9):
        x = rng.standard_normal((M, 4096)).astype(np.float32)
        a, b = run(x, w), gemm_path(lambda: run(x, w))
        check(a, x, W.T, 4096)
        check(b, x, W.T, 4096)
        assert np.array_equal(a, b) == (M == 9), M


def test_fallback_shapes_match_the_gemm_bitwise(rng):
    """K % 64 != 0 or blocksize 32: the bf16 GEMM driver, exactly as with the GEMV switched off."""
    for N, K, bs in [(9, 96, 64), (10, 67, 64), (12, 128, 32)]:
        w = random_nf4(rng, N, K, bs, True)
        x = rng.standard_normal((3, K)).astype(np.float32)
        a = run(x, w)
        assert np.array_equal(a, gemm_path(lambda: run(x, w)))
        check(a, x, decode(w).T, K)


def test_rows_do_not_depend_on_the_thread_count(rng):
    """Even row chunks: a row's pair (2j, 2j + 1) and summation order are fixed by K and M."""
    before = qlora_native.num_threads()
    w = random_nf4(rng, 1537, 576, 64, True)  # odd N; enough rows for several tasks
    w2 = random_nf4(rng, 2048, 128, 64, True)
    outs = {}
    try:
        for t in (1, 2, 3, 5):
            qlora_native.set_num_threads(t)
            for M in (1, 4, 7):
                x = np.random.default_rng(M).standard_normal((M, 576)).astype(np.float32)
                x2 = np.random.default_rng(M).standard_normal((M, 128)).astype(np.float32)
                outs.setdefault(M, []).append((run(x, w), run(x2, w2)))
    finally:
        qlora_native.set_num_threads(before)
    for M, res in outs.items():
        for a, b in res[1:]:
            assert np.array_equal(a, res[0][0]) and np.array_equal(b, res[0][1]), M


def test_special_values(rng):
    """Rounding of X is the kernels' (ties to even, denormals flushed): x values at bf16 ties against
    a weight whose elements are all exactly representable."""
    w = random_nf4(rng, 2, 64, 64, False)
    w.absmax[:] = 1.0  # table = r(codes): the products are r(x) * r(code)
    W = decode(w)
    x = np.zeros((1, 64), np.float32)
    x[0, 5] = 1 + 2 ** -8       # tie: rounds to 1
    x[0, 6] = 1 + 3 * 2 ** -8   # tie: rounds to 1 + 2^-6 (even)
    x[0, 7] = 1e-39             # denormal: flushed
    got = run(x, w)
    from helpers_bf16 import bf16
    want = bf16(x) @ bf16(W.T)
    assert np.allclose(got, want, rtol=2 ** -20, atol=0)
    x[0, 9] = np.nan
    assert np.isnan(run(x, w)).all()


@pytest.mark.parametrize("M,K", [(1, 576), (1, 11008), (3, 4096)])
def test_x_is_rounded_bitwise_as_bf16(rng, M, K):
    """X is rounded to bf16 (RNE, denormals to signed zero) before the products, in every column
    (the fp32-FMA variant rounds it by vcvtneps2bf16 since 2026-12-07, the scalar loop before): X given
    already rounded (numpy, helpers_bf16.bf16) gives the same bits, with a quarter of the columns exact
    ties and random low halves elsewhere (truncation or ties away from zero change the sums); X of
    denormals only gives zeros (unflushed, denormal x tiny weights stay nonzero in fp32)."""
    from helpers_bf16 import bf16
    w = random_nf4(rng, 37, K, 64, True)
    x = rng.standard_normal((M, K)).astype(np.float32)
    b = x.view(np.uint32)
    ties = rng.random((M, K)) < 0.25
    b[ties] = (b[ties] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    np.testing.assert_array_equal(run(x, w), run(bf16(x).astype(np.float32), w))
    d = (rng.integers(1, 1 << 23, (M, K), dtype=np.uint32) | (rng.integers(0, 2, (M, K), dtype=np.uint32) << 31))
    got = np.asarray(run(d.view(np.float32), w))
    np.testing.assert_array_equal(got, np.zeros_like(got))


@pytest.mark.parametrize("pf", ["0,0", "64,128", "1048576,4194304", "junk", "-1,5"])
def test_prefetch_override_keeps_the_bits(rng, pf):
    """QLORA_NF4_GEMV_PF (prefetch distances for A/B runs, read per call) moves only prefetches:
    same bits for any distance, bad values ignored (the defaults), far distances past the weight's
    end harmless (prefetches do not fault)."""
    w = random_nf4(rng, 33, 576, 64, True)
    x = rng.standard_normal((1, 576)).astype(np.float32)
    ref = run(x, w)
    old = os.environ.get("QLORA_NF4_GEMV_PF")
    os.environ["QLORA_NF4_GEMV_PF"] = pf
    try:
        got = run(x, w)
    finally:
        if old is None:
            del os.environ["QLORA_NF4_GEMV_PF"]
        else:
            os.environ["QLORA_NF4_GEMV_PF"] = old
    np.testing.assert_array_equal(got, ref)
