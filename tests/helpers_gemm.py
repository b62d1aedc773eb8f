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
