"""The CUDA backend: fp32 GEMMs and fused NF4 GEMM/GEMV/dequantize against numpy float64.

Without a GPU (or without a CUDA build) every kernel test skips with the reason, and one test
checks that asking for "cuda" fails with a ValueError that says why.

Tolerances are rigorous bounds for fp32 accumulation: |got - ref| <= (K + 8) * eps32 * ref_abs,
where ref_abs = |alpha| * |A|·|B| + |beta| * |C0| (float64) bounds every rounding of a length-K
dot product (gamma_K = K * eps32 / 2 per term), the +8 covering NF4 decode and alpha/beta
roundings. A wrong element or a missed term is O(1) relative and fails it.
"""
import numpy as np
import pytest

import qlora_native
from qlora_native import _core
from qlora_native.cli import main

EPS32 = float(np.finfo(np.float32).eps)
HAVE_GPU = _core.cuda_device_count() > 0
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason=f"no CUDA GPU: {_core.cuda_device_summary()}")

# bitsandbytes' NF4 code values (shared/reference/nf4-format.md), index = nibble.
NF4_CODES = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)


@pytest.fixture
def ops():
    try:
        from qlora_native import ops as mod
    except ImportError as e:  # pragma: no cover - the ops module is part of the package
        pytest.skip(f"qlora_native.ops unavailable: {e}")
    return mod


# ------------------------------------------------------------------ no GPU: clear errors


@pytest.mark.skipif(HAVE_GPU, reason="a GPU is visible: the no-GPU path does not apply")
def test_cuda_unavailable_says_why(capsys, ops):
    summary = _core.cuda_device_summary()
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"backend '{name}' unavailable") as e:
            _core.check_backend(name)
        msg = str(e.value)
        if _core.cuda_compiled():
            assert summary in msg and "GPU" in msg  # e.g. "no usable GPU (CUDA driver ...)"
        else:
            assert "without CUDA" in msg
    assert "cuda" not in _core.available_backends()
    a = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="unavailable"):
        ops.gemm_nt(a, a, backend="cuda")

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    cuda_line = next(line for line in out.splitlines() if line.startswith("CUDA backend"))
    assert cuda_line.rstrip().endswith("not compiled") != _core.cuda_compiled()
    assert summary in out or "no NVIDIA driver found" in out  # info names a missing driver plainly


@needs_gpu
def test_cuda_backend_resolves():
    assert "cuda" in _core.available_backends()
    assert _core.check_backend("cuda") == "cuda"
    with pytest.raises(ValueError, match="no such device"):
        _core.check_backend(f"cuda:{_core.cuda_device_count()}")


# ------------------------------------------------------------------ fp32 GEMM


def _operands(rng, layout, M, N, K):
    a_shape = (K, M) if layout == "tn" else (M, K)
    b_shape = (N, K) if layout == "nt" else (K, N)
    return (rng.standard_normal(a_shape).astype(np.float32), rng.standard_normal(b_shape).astype(np.float32))


def _ref64(layout, a, b):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if layout == "nt":
        return a64 @ b64.T
    if layout == "nn":
        return a64 @ b64
    return a64.T @ b64


def _assert_bound(got, exact, bound, factor):
    """|got - exact| <= factor * eps32 * bound elementwise (short message on failure)."""
    err = np.abs(got.astype(np.float64) - exact)
    tol = factor * EPS32 * bound + 1e-30
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"max excess at {worst}: err {err[worst]:.3g} > tol {tol[worst]:.3g}"


def _check_gemm(ops, layout, a, b, alpha, beta, c0, K):
    fn = getattr(ops, f"gemm_{layout}")
    out = None if c0 is None else c0.copy()
    got = fn(a, b, out, alpha=alpha, beta=beta, backend="cuda")
    exact = alpha * _ref64(layout, a, b)
    bound = abs(alpha) * _ref64(layout, np.abs(a), np.abs(b))
    if beta != 0.0:
        exact = exact + beta * c0.astype(np.float64)
        bound = bound + abs(beta) * np.abs(c0.astype(np.float64))
    assert got.shape == exact.shape and got.dtype == np.float32
    _assert_bound(got, exact, bound, K + 8)
    if out is not None:
        assert got is out or np.shares_memory(got, out)


# Ragged shapes (partial tiles on every edge), M = 1 / 3 / 64 / 300, and a grid large enough
# for the 128x128 tiles on a 132-SM GPU (13 x 12 blocks).
GEMM_SHAPES = [(1, 1, 1), (1, 37, 300), (3, 5, 7), (64, 64, 64), (300, 129, 77), (65, 200, 1000), (1600, 1500, 24)]


@needs_gpu
@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 0.75)])
def test_gemm(ops, rng, layout, M, N, K, alpha, beta):
    a, b = _operands(rng, layout, M, N, K)
    c0 = rng.standard_normal((M, N)).astype(np.float32) if beta else None
    _check_gemm(ops, layout, a, b, alpha, beta, c0, K)


@needs_gpu
@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
def test_gemm_strided_views(ops, rng, layout):
    """Row-strided views: leading dimensions larger than the row length, odd offsets."""
    M, N, K = 70, 45, 33
    a_shape = (K, M) if layout == "tn" else (M, K)
    b_shape = (N, K) if layout == "nt" else (K, N)
    a = rng.standard_normal((a_shape[0], a_shape[1] + 5)).astype(np.float32)[:, 3:3 + a_shape[1]]
    b = rng.standard_normal((b_shape[0], b_shape[1] + 2)).astype(np.float32)[:, 1:1 + b_shape[1]]
    c0 = rng.standard_normal((M, N + 7)).astype(np.float32)[:, 2:2 + N]
    _check_gemm(ops, layout, a, b, 1.5, -2.0, c0, K)


# ------------------------------------------------------------------ NF4


class Nf4Weight:
    """A random NF4 weight in bitsandbytes layout (the NF4 attribute protocol), built in numpy."""

    def __init__(self, rng, rows, cols, blocksize, double_quant, explicit_map=True):
        n = rows * cols
        nb = -(-n // blocksize)
        self.shape = (rows, cols)
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.packed = rng.integers(0, 256, size=(n + 1) // 2, dtype=np.uint8)
        if n % 2:
            self.packed[-1] &= 0xF0  # the pad nibble is 0, as bitsandbytes writes it
        if double_quant:
            self.absmax = rng.integers(0, 256, size=nb, dtype=np.uint8)
            self.nested_absmax = rng.uniform(0.01, 0.05, size=-(-nb // 256)).astype(np.float32)
            # A random sorted map, not bitsandbytes' own: the kernels must read the map they are given.
            self.nested_map = np.sort(rng.uniform(-1, 1, size=256)).astype(np.float32) if explicit_map else None
            self.offset = float(np.float32(rng.uniform(0.05, 0.08)))
        else:
            self.absmax = rng.uniform(0.01, 0.1, size=nb).astype(np.float32)
            self.nested_absmax = None
            self.nested_map = None
            self.offset = 0.0

    def _decode64(self, absolute):
        rows, cols = self.shape
        n = rows * cols
        nib = np.empty(2 * self.packed.size, dtype=np.uint8)
        nib[0::2] = self.packed >> 4  # first element of a pair in the high nibble
        nib[1::2] = self.packed & 0x0F
        codes = NF4_CODES.astype(np.float64)[nib[:n]]
        if self.double_quant:
            mapped = self.nested_map.astype(np.float64)[self.absmax]
            nested = np.repeat(self.nested_absmax.astype(np.float64), 256)[: self.absmax.size]
            scale = np.abs(mapped) * nested + abs(self.offset) if absolute else mapped * nested + self.offset
        else:
            scale = self.absmax.astype(np.float64)
        w = codes * np.repeat(scale, self.blocksize)[:n]
        return (np.abs(w) if absolute else w).reshape(rows, cols)

    def dequantize64(self):
        """float64 [rows, cols] from the stored components (the independent reference)."""
        return self._decode64(False)

    def dequantize_abs64(self):
        """|code| * (|map[c]| * nested + |offset|): magnitude for error bounds, immune to cancellation."""
        return self._decode64(True)


# (rows, cols, blocksize): blocks straddling rows (200 % 64 != 0), odd cols (rows start mid-byte),
# > 256 blocks (several nested blocks), one row, the largest blocksize.
NF4_SHAPES = [(96, 200, 64), (37, 53, 32), (130, 300, 128), (300, 130, 64), (1, 1000, 32), (7, 4096, 4096)]
NF4_M = [1, 3, 4, 5, 64, 300]  # <= 4: GEMV kernels; larger: tiled kernel


def _nf4_id(p):
    return "x".join(map(str, p)) if isinstance(p, tuple) else None


@needs_gpu
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("shape", NF4_SHAPES, ids=_nf4_id)
def test_nf4_dequantize(ops, rng, shape, double_quant):
    rows, cols, bs = shape
    w = Nf4Weight(rng, rows, cols, bs, double_quant)
    got = ops.nf4_dequantize(w, backend="cuda")
    ref = w.dequantize64()
    assert got.shape == (rows, cols) and got.dtype == np.float32
    _assert_bound(got, ref, w.dequantize_abs64(), 4)  # decode: <= 3 fp32 roundings


@needs_gpu
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.7, -1.25)])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("shape", NF4_SHAPES, ids=_nf4_id)
@pytest.mark.parametrize("M", NF4_M)
@pytest.mark.parametrize("op", ["nt", "nn"])
def test_nf4_gemm(ops, rng, op, M, shape, double_quant, alpha, beta):
    rows, cols, bs = shape
    w = Nf4Weight(rng, rows, cols, bs, double_quant)
    K, N = (cols, rows) if op == "nt" else (rows, cols)
    x = rng.standard_normal((M, K)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32) if beta else None
    fn = ops.nf4_gemm_nt if op == "nt" else ops.nf4_gemm_nn
    got = fn(x, w, None if c0 is None else c0.copy(), alpha=alpha, beta=beta, backend="cuda")

    wd, wa = w.dequantize64(), w.dequantize_abs64()
    x64 = x.astype(np.float64)
    exact = alpha * (x64 @ (wd.T if op == "nt" else wd))
    bound = abs(alpha) * (np.abs(x64) @ (wa.T if op == "nt" else wa))
    if beta:
        exact += beta * c0.astype(np.float64)
        bound += abs(beta) * np.abs(c0.astype(np.float64))
    assert got.shape == (M, N) and got.dtype == np.float32
    _assert_bound(got, exact, bound, K + 8)


@needs_gpu
@pytest.mark.parametrize("M", [2, 70])
def test_nf4_default_map_matches_cpu_oracle(ops, rng, M):
    """nested_map=None (bitsandbytes' dynamic map, supplied by the binding): same as cpu:scalar."""
    w = Nf4Weight(rng, 45, 77, 64, True, explicit_map=False)
    x = rng.standard_normal((M, 77)).astype(np.float32)
    ref_w = ops.nf4_dequantize(w, backend="cpu:scalar").astype(np.float64)
    np.testing.assert_allclose(ops.nf4_dequantize(w, backend="cuda"), ref_w, rtol=4 * EPS32, atol=0)
    got = ops.nf4_gemm_nt(x, w, backend="cuda")
    x64 = x.astype(np.float64)
    _assert_bound(got, x64 @ ref_w.T, np.abs(x64) @ np.abs(ref_w).T, 77 + 8)

