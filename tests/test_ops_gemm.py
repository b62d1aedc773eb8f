"""fp32 GEMM kernels (ops.gemm_nt / gemm_nn / gemm_tn) on every backend.

Reference: numpy float64 on the same float32 inputs. Error bound, elementwise:
    |C - C_ref| <= (K + 4) * eps32 * (|alpha| * (|A| @ |B|) + |beta| * |C0|)
i.e. the classic worst-case bound for a K-term fp32 dot product (K * u, u = eps32 / 2) plus a few
roundings for alpha, beta and the per-depth-block accumulation into C, with a factor 2 of margin.
Any indexing or packing bug produces errors of the order of |A| @ |B| itself, far above it.
"""
import numpy as np
import pytest

from qlora_native import _core, ops
from conftest import all_backends
from helpers_gemm import bound, check

SHAPES_SMALL = [(1, 1, 1), (1, 7, 63), (7, 63, 65), (63, 65, 7), (17, 33, 129), (65, 577, 63), (577, 63, 65)]
# (40, 70, 2500): K above the AVX-512 depth block (KC = 1024), so C accumulates over 3 depth blocks.
SHAPES_LARGE = [(16, 576, 576), (257, 192, 576), (300, 129, 1000), (31, 1536, 577), (40, 70, 2500)]


def operands(rng, layout, M, N, K):
    """(a, b, reference a@b in float64 as [M, K] and [K, N] matrices)"""
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    if layout == "nt":
        return a, np.ascontiguousarray(b.T), a, b
    if layout == "nn":
        return a, b, a, b
    return np.ascontiguousarray(a.T), b, a, b


def run(layout, *args, **kw):
    return {"nt": ops.gemm_nt, "nn": ops.gemm_nn, "tn": ops.gemm_tn}[layout](*args, **kw)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
def test_gemm_vs_float64(backend, layout, rng):
    shapes = SHAPES_SMALL + ([] if backend == "cpu:scalar" else SHAPES_LARGE)
    for M, N, K in shapes:
        a, b, a_mk, b_kn = operands(rng, layout, M, N, K)
        got = run(layout, a, b, backend=backend)
        assert got.shape == (M, N) and got.dtype == np.float32
        ref = a_mk.astype(np.float64) @ b_kn.astype(np.float64)
        check(got, ref, bound(a_mk, b_kn))


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
def test_gemm_alpha_beta_and_strides(backend, layout, rng):
    """alpha/beta, inputs and output as row-strided views into larger arrays (ld > width)."""
    for (M, N, K), alpha, beta in [((7, 63, 65), 0.5, -1.5), ((65, 70, 129), -2.0, 0.25), ((33, 40, 17), 1.0, 1.0)]:
        a, b, a_mk, b_kn = operands(rng, layout, M, N, K)
        big_a = rng.standard_normal((a.shape[0] + 2, a.shape[1] + 5), dtype=np.float32)
        big_b = rng.standard_normal((b.shape[0] + 1, b.shape[1] + 3), dtype=np.float32)
        big_a[1:1 + a.shape[0], 2:2 + a.shape[1]] = a
        big_b[:b.shape[0], 3:3 + b.shape[1]] = b
        av, bv = big_a[1:1 + a.shape[0], 2:2 + a.shape[1]], big_b[:b.shape[0], 3:3 + b.shape[1]]
        big_c = rng.standard_normal((M + 3, N + 7), dtype=np.float32)
        c0 = big_c.copy()
        cv = big_c[2:2 + M, 4:4 + N]
        res = run(layout, av, bv, cv, alpha=alpha, beta=beta, backend=backend)
        assert np.shares_memory(res, big_c)
        ref = alpha * (a_mk.astype(np.float64) @ b_kn.astype(np.float64)) + beta * c0[2:2 + M, 4:4 + N]
        check(cv, ref, bound(a_mk, b_kn, alpha, beta, c0[2:2 + M, 4:4 + N]))
        # Nothing outside the output view was touched.
        mask = np.ones(big_c.shape, bool)
        mask[2:2 + M, 4:4 + N] = False
        assert np.array_equal(big_c[mask], c0[mask])


@pytest.mark.parametrize("backend", all_backends())
def test_gemm_beta_zero_ignores_out(backend, rng):
    """beta = 0 must not read C: NaN in out does not leak into the result."""
    M, N, K = 20, 50, 70
    for layout in ["nt", "nn", "tn"]:
        a, b, a_mk, b_kn = operands(rng, layout, M, N, K)
        out = np.full((M, N), np.nan, np.float32)
        run(layout, a, b, out, backend=backend)
        check(out, a_mk.astype(np.float64) @ b_kn.astype(np.float64), bound(a_mk, b_kn))


@pytest.mark.parametrize("backend", [b for b in all_backends() if b.id != "cpu:scalar"])
@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
def test_gemm_vs_scalar(backend, layout, rng):
    """Each optimized level against the scalar oracle on ragged shapes that hit every edge tile."""
    for M, N, K in [(15, 33, 17), (29, 65, 385), (43, 97, 31)]:
        a, b, a_mk, b_kn = operands(rng, layout, M, N, K)
        got = run(layout, a, b, backend=backend)
        want = run(layout, a, b, backend="cpu:scalar")
        check(got, want.astype(np.float64), bound(a_mk, b_kn))


def test_gemm_threads_deterministic(rng):
    """The result does not depend on the thread count (tasks split M and N, never K)."""
    import qlora_native

    a = rng.standard_normal((300, 700), dtype=np.float32)
    b = rng.standard_normal((500, 700), dtype=np.float32)
    n0 = qlora_native.num_threads()
    try:
        qlora_native.set_num_threads(1)
        one = ops.gemm_nt(a, b)
        qlora_native.set_num_threads(3)
        three = ops.gemm_nt(a, b)
    finally:
        qlora_native.set_num_threads(n0)
    assert np.array_equal(one, three)


def test_gemm_empty_dims(rng):
    a = np.zeros((0, 5), np.float32)
    assert ops.gemm_nt(a, rng.standard_normal((3, 5), dtype=np.float32)).shape == (0, 3)
    # K = 0: C = beta * C.
    out = rng.standard_normal((4, 3), dtype=np.float32)
    c0 = out.copy()
    ops.gemm_nn(np.zeros((4, 0), np.float32), np.zeros((0, 3), np.float32), out, beta=0.5)
    np.testing.assert_array_equal(out, np.float32(0.5) * c0)


def test_gemm_bad_inputs(rng):
    a = rng.standard_normal((4, 6), dtype=np.float32)
    b = rng.standard_normal((5, 6), dtype=np.float32)
    cases = [
        (lambda: ops.gemm_nt(a.astype(np.float64), b), "float32"),
        (lambda: ops.gemm_nt(a.tolist(), b), "numpy"),
        (lambda: ops.gemm_nt(a[0], b), "2-D"),
        (lambda: ops.gemm_nt(np.asfortranarray(a), b), "contiguous last"),
        (lambda: ops.gemm_nt(rng.standard_normal((4, 12), dtype=np.float32)[:, ::2], b), "contiguous last"),
        (lambda: ops.gemm_nt(a, b[:, :5]), "inner dimensions"),
        (lambda: ops.gemm_nn(a, b), "inner dimensions"),
        (lambda: ops.gemm_nt(a, b, np.empty((4, 4), np.float32)), "shape"),
        (lambda: ops.gemm_nt(a, b, np.empty((4, 5), np.float64)), "float32"),
        (lambda: ops.gemm_nt(a, b, beta=1.0), "out"),
        (lambda: ops.gemm_nt(a, b, backend="tpu"), "unknown backend"),
    ]
    ro = np.empty((4, 5), np.float32)
    ro.flags.writeable = False
    cases.append((lambda: ops.gemm_nt(a, b, ro), "read-only"))
    sq = rng.standard_normal((6, 6), dtype=np.float32)
    cases.append((lambda: ops.gemm_nn(sq, sq[:, :], sq), "share memory"))
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


@pytest.mark.parametrize("backend", [b for b in _core.available_backends() if b.startswith("cpu:")])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 15), (33, 17), (130, 47), (577, 65), (3000, 576)])
def test_gemm_nt_small_m_gemv_path(rng, backend, M, N, K):
    """M <= 16 takes the unpacked GEMV path (decode-time lm_head) in row groups; same contract as the GEMM."""
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((N, K)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    for alpha, beta in [(1.0, 0.0), (0.5, -1.5)]:
        out = c0.copy() if beta else np.full((M, N), np.nan, np.float32)
        ops.gemm_nt(a, b, out, alpha=alpha, beta=beta, backend=backend)
        ref = alpha * (a.astype(np.float64) @ b.astype(np.float64).T) + beta * c0.astype(np.float64)
        bound = (K + 4) * np.finfo(np.float32).eps * (abs(alpha) * np.abs(a) @ np.abs(b).T + abs(beta) * np.abs(c0))
        assert np.all(np.abs(out - ref) <= bound + 1e-30)
