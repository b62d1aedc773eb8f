"""bf16 test helpers: RNE rounding as the hardware does, and the bf16 GEMM bound (no torch import).

U = 2^-8 is bf16's unit roundoff bound per rounded operand; EPS32 float32's machine epsilon."""
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
U = 2.0 ** -8


def bf16(x):
    """numpy RNE rounding to bf16 (denormals flushed, as the hardware), returned as float64."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    r = np.where((b & 0x7F800000) == 0, b & 0x80000000, r).astype(np.uint32)
    return r.view(np.float32).astype(np.float64)


def check(c, a, b, K, alpha=1.0, beta=0.0, c0=None):
    """c vs alpha * a @ b + beta * c0 (a [M, K], b [K, N], fp32): within (K + 4) eps32 |a|·|b| of the
    product of the bf16-rounded operands (fp32 accumulation), and 2u + u^2 more of the exact one."""
    exact = alpha * (a.astype(np.float64) @ b.astype(np.float64))
    rounded = alpha * (bf16(a) @ bf16(b))
    scale = abs(alpha) * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    if c0 is not None and beta != 0.0:
        exact = exact + beta * c0.astype(np.float64)
        rounded = rounded + beta * c0.astype(np.float64)
        scale = scale + abs(beta) * np.abs(c0.astype(np.float64))
    acc = (K + 4) * EPS32 * scale + 1e-30
    assert np.all(np.abs(c - rounded) <= acc), float(np.max(np.abs(c - rounded) / acc))
    assert np.all(np.abs(c - exact) <= (2 * U + U * U) * scale + acc)


def strided(rng, rows, cols, pad=3):
    """A float32 [rows, cols] view with row stride cols + pad (not contiguous)."""
    return rng.standard_normal((rows, cols + pad)).astype(np.float32)[:, :cols]
