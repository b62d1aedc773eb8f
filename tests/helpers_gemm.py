"""The fp32 GEMM bound of the kernel tests (derived in test_ops_gemm.py's docstring) and its check."""
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def bound(a_mk, b_kn, alpha=1.0, beta=0.0, c0=None):
    """Elementwise (K + 4) eps32 (|alpha| |A| @ |B| + |beta| |C0|) for A [M, K], B [K, N]."""
    K = a_mk.shape[1]
    mag = abs(alpha) * (np.abs(a_mk.astype(np.float64)) @ np.abs(b_kn.astype(np.float64)))
    if beta != 0.0:
        mag = mag + abs(beta) * np.abs(c0.astype(np.float64))
    return (K + 4) * EPS32 * mag + np.finfo(np.float32).tiny


def check(got, ref, tol):
    """|got - ref| <= tol everywhere; the message names the worst element."""
    err = np.abs(got.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"max excess at {worst}: err {err[worst]:.3g} > bound {tol[worst]:.3g}"


def switch_keeps_bits(rng, monkeypatch, env, backend, layout, shapes):
    """An A/B switch of the fp32 GEMM driver (env "0" = the old way) leaves C = 0.5 A·B + C0 bit-identical
    and within the fp32 bound of float64 for every shape [M, N, K] (nt: B given as [N, K]); skips a SIMD
    level this CPU lacks."""
    import pytest
    from qlora_native import ops

    try:
        ops.gemm_nt(np.ones((1, 1), np.float32), np.ones((1, 1), np.float32), backend=backend)
    except ValueError:
        pytest.skip(f"{backend} not available on this CPU")
    fn = ops.gemm_nt if layout == "nt" else ops.gemm_nn
    for M, N, K in shapes:
        a = rng.standard_normal((M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if layout == "nt" else (K, N)).astype(np.float32)
        c0 = rng.standard_normal((M, N)).astype(np.float32)
        outs = []
        for on in ("0", "1"):
            monkeypatch.setenv(env, on)
            c = c0.copy()
            fn(a, b, c, alpha=0.5, beta=1.0, backend=backend)
            outs.append(c)
        assert np.array_equal(outs[0], outs[1]), f"{backend} {layout} {M}x{N}x{K}: {env} changed bits"
        B = b.T if layout == "nt" else b
        check(outs[1], 0.5 * (a.astype(np.float64) @ B.astype(np.float64)) + c0, bound(a, B, 0.5, 1.0, c0))
