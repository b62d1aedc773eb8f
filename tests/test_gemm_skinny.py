"""Issue 15: GEMMs with N <= the micro-tile width (the rank-16 LoRA factors) run a half-width
micro-kernel that reads A in place (no packed A panel). Each output is the same FMA chain as in
the packed full-width path, so a column block of a wide product must equal the skinny product
bit for bit, at every SIMD level, for the nt / nn / tn layouts, ragged M and beta != 0."""
from __future__ import annotations

import numpy as np
import pytest

import qlora_native
from qlora_native import ops

LEVELS = [b for b in qlora_native.available_backends() if b.startswith("cpu:") and b != "cpu:scalar"]


@pytest.mark.parametrize("backend", LEVELS)
@pytest.mark.parametrize("M,K", [(1024, 576), (37, 1536), (5, 33)])
@pytest.mark.parametrize("n", [16, 7, 1])
def test_skinny_equals_wide_column_block(backend, M, K, n):
    rng = np.random.default_rng(M * 7 + K + n)
    W = 48  # wide: two or more micro-panels, the packed-A path
    a = rng.standard_normal((M, K)).astype(np.float32)
    bt = rng.standard_normal((W, K)).astype(np.float32)  # nt: [N, K]
    wide = np.asarray(ops.gemm_nt(a, bt, backend=backend))
    np.testing.assert_array_equal(np.asarray(ops.gemm_nt(a, bt[:n].copy(), backend=backend)), wide[:, :n])
    bn = np.ascontiguousarray(bt.T)  # nn: [K, N]
    wide = np.asarray(ops.gemm_nn(a, bn, backend=backend))
    np.testing.assert_array_equal(np.asarray(ops.gemm_nn(a, np.ascontiguousarray(bn[:, :n]), backend=backend)),
                                  wide[:, :n])
    at = np.ascontiguousarray(a.T)  # tn: A stored [K, M]
    wide = np.asarray(ops.gemm_tn(at, bn, backend=backend))
    np.testing.assert_array_equal(np.asarray(ops.gemm_tn(at, np.ascontiguousarray(bn[:, :n]), backend=backend)),
                                  wide[:, :n])
    # beta != 0 (LoRA's dB += ...): the skinny path reads and scales C like the wide one.
    c0 = rng.standard_normal((M, W)).astype(np.float32)
    cw, cs = c0.copy(), np.ascontiguousarray(c0[:, :n])
    ops.gemm_nt(a, bt, out=cw, alpha=0.5, beta=0.75, backend=backend)
    ops.gemm_nt(a, bt[:n].copy(), out=cs, alpha=0.5, beta=0.75, backend=backend)
    np.testing.assert_array_equal(cs, cw[:, :n])
    # and against float64
    ref = a.astype(np.float64) @ bt[:n].astype(np.float64).T
    got = np.asarray(ops.gemm_nt(a, bt[:n].copy(), backend=backend))
    bound = 2 * (K + 2) * np.finfo(np.float32).eps * (np.abs(a) @ np.abs(bt[:n]).T) + 1e-30
    assert np.all(np.abs(got - ref) <= bound)


@pytest.mark.skipif("cpu:avx512" not in LEVELS, reason="no AVX-512 on this CPU")
@pytest.mark.parametrize("M,N,K", [(1024, 48, 576), (37, 33, 1100), (17, 40, 5), (100, 47, 33), (23, 48, 16)])
def test_skinny48_equals_blocked(monkeypatch, M, N, K):
    """32 < N <= 48 at AVX-512 (the grouped q/k/v LoRA shrink) runs 8 x 48 tiles reading A in place:
    the blocked way's FMA chains and depth blocks, so QLORA_GEMM_SKINNY48=0 gives the same bits."""
    rng = np.random.default_rng(M + N * 3 + K)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((N, K)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    got = {}
    for on in ("1", "0"):
        monkeypatch.setenv("QLORA_GEMM_SKINNY48", on)
        for beta in (0.0, 0.75):
            c = c0.copy()
            ops.gemm_nt(a, b, out=c, alpha=0.5, beta=beta, backend="cpu:avx512")
            got[on, beta] = c
    eps = float(np.finfo(np.float32).eps)
    for beta in (0.0, 0.75):
        np.testing.assert_array_equal(got["1", beta], got["0", beta])
        ref = 0.5 * (a.astype(np.float64) @ b.astype(np.float64).T) + beta * c0
        bound = (K + 4) * eps * (0.5 * np.abs(a) @ np.abs(b).T + beta * np.abs(c0)) + 1e-30
        assert np.all(np.abs(got["1", beta] - ref) <= bound)
