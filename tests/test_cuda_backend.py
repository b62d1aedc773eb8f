"""The CUDA backend: fp32 GEMMs and fused NF4 GEMM/GEMV/dequantize against numpy float64.

Without a GPU (or without a CUDA build) every kernel test skips with the reason, and one test
checks that asking for "cuda" fails with a ValueError that says why.

Tolerances are rigorous bounds for fp32 accumulation: |got - ref| <= (K + 8) * eps32 * ref_abs,
where ref_abs = |alpha| * |A|·|B| + |beta| * |C0| (float64) bounds every rounding of a length-K
dot product (gamma_K = K * eps32 / 2 per term), the +8 covering NF4 decode and alpha/beta
roundings. A wrong element or a missed term is O(1) relative and fails it.
"""
import os
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import _core
from qlora_native import ops as ops_mod
from qlora_native.cli import main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers_ops import HARNESS_BACKENDS, lora_case  # noqa: E402
from helpers_ops import be as _be, run as _run, within as _within  # noqa: E402,F401

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



# ------------------------------------------------------------------ bf16 compute (tensor cores, sm_80+)
# compute_dtype="bfloat16": both operands rounded to bf16 (RNE; NF4 decoded in fp32, then rounded),
# mma.sync bf16 with fp32 accumulation. Bounds, elementwise, u = 2^-8 (bf16 unit roundoff):
#   tight, vs float64 on the rounded operands r(A) @ r(B): only the accumulation differs. Tensor
#   cores add with truncation (at most 1 ulp a step, not 1/2), hence 2 * (K + 8) * eps32;
#   loose, vs float64 on the exact operands A @ B: plus the two roundings, (2u + u^2) |A| @ |B|.
# The NF4 operand's rounded reference is r() of CUDA's own fp32 dequantization, which uses the very
# decode expression of the GEMM's dequant stage: a failure of the tight bound alone points at the
# GEMM's decode or fragment layout, of both at an accumulation error.
U_BF16 = 2.0 ** -8


def _bf16(x):
    """numpy RNE rounding of float32 values to bf16, as float64 (normal values: no flushing needed)."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32).astype(np.float64)


def _cc_major():
    import re

    m = re.search(r"sm_(\d+)", _core.cuda_device_summary())
    return int(m.group(1)) // 10 if m else 0


needs_bf16_gpu = pytest.mark.skipif(not HAVE_GPU or _cc_major() < 8,
                                    reason=f"no sm_80+ CUDA GPU: {_core.cuda_device_summary()}")


def _check_bf16(got, a, b, K, alpha=1.0, beta=0.0, c0=None, b_rounded=None):
    """got vs alpha * a @ b + beta * c0 (a [M, K], b [K, N]) under the tight and loose bounds."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    rb = _bf16(b) if b_rounded is None else b_rounded
    exact, rounded = alpha * (a64 @ b64), alpha * (_bf16(a) @ rb)
    scale = abs(alpha) * (np.abs(a64) @ np.abs(b64))
    if beta:
        exact = exact + beta * c0.astype(np.float64)
        rounded = rounded + beta * c0.astype(np.float64)
        scale = scale + abs(beta) * np.abs(c0.astype(np.float64))
    acc = 2 * (K + 8) * EPS32 * scale + 1e-30
    err = np.abs(got.astype(np.float64) - rounded)
    assert np.all(err <= acc), f"tight bound: worst ratio {float(np.max(err / acc)):.3g}"
    assert np.all(np.abs(got.astype(np.float64) - exact) <= (2 * U_BF16 + U_BF16 ** 2) * scale + acc), "loose bound"


@pytest.mark.skipif(not HAVE_GPU, reason=f"no CUDA GPU: {_core.cuda_device_summary()}")
def test_bf16_compute_available_matches_arch(ops):
    """bf16 tensor cores exist from sm_80; below, compute_dtype="bfloat16" runs the fp32 kernels."""
    assert ops.bf16_compute_available("cuda") == (_cc_major() >= 8)
    if _cc_major() < 8:  # the Backend contract: the fp32 ops run instead, bit for bit
        a = np.random.default_rng(0).standard_normal((70, 33)).astype(np.float32)
        assert np.array_equal(ops.gemm_nt(a, a, backend="cuda", compute_dtype="bfloat16"), ops.gemm_nt(a, a, backend="cuda"))


# Ragged shapes on every tile edge (64 / 128 tiles, k steps of 32), K not a multiple of 4 (element
# loaders), K = 0, and a grid large enough for the 128 x 128 tiles on a 132-SM GPU.
BF16_SHAPES = [(1, 1, 1), (3, 5, 7), (17, 9, 40), (64, 64, 64), (65, 129, 33), (300, 200, 1000), (1600, 1500, 96),
               (5, 6, 0)]


@needs_bf16_gpu
@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
@pytest.mark.parametrize("M,N,K", BF16_SHAPES)
def test_gemm_bf16_tensor_cores(ops, rng, layout, M, N, K):
    a, b = _operands(rng, layout, M, N, K)
    fn = getattr(ops, f"gemm_{layout}")
    A = a if layout != "tn" else a.T
    B = b.T if layout == "nt" else b
    _check_bf16(fn(a, b, backend="cuda", compute_dtype="bfloat16"), A, B, K)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    got = fn(a, b, c0.copy(), alpha=-0.75, beta=0.5, backend="cuda", compute_dtype="bfloat16")
    _check_bf16(got, A, B, K, -0.75, 0.5, c0)


@needs_bf16_gpu
@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
def test_gemm_bf16_strided_views(ops, rng, layout):
    """Leading dimensions larger than a row and odd offsets (unaligned rows: element loaders; an odd ldc:
    scalar epilogue stores)."""
    M, N, K = 70, 45, 36
    a_shape = (K, M) if layout == "tn" else (M, K)
    b_shape = (N, K) if layout == "nt" else (K, N)
    a = rng.standard_normal((a_shape[0], a_shape[1] + 5)).astype(np.float32)[:, 3:3 + a_shape[1]]
    b = rng.standard_normal((b_shape[0], b_shape[1] + 2)).astype(np.float32)[:, 1:1 + b_shape[1]]
    c0 = rng.standard_normal((M, N + 7)).astype(np.float32)[:, 2:2 + N]
    out = c0.copy()
    got = getattr(ops, f"gemm_{layout}")(a, b, out, alpha=1.5, beta=-2.0, backend="cuda", compute_dtype="bfloat16")
    _check_bf16(got, a if layout != "tn" else a.T, b.T if layout == "nt" else b, K, 1.5, -2.0, c0)


@needs_bf16_gpu
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.7, -1.25)])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("shape", NF4_SHAPES, ids=_nf4_id)
@pytest.mark.parametrize("M", [1, 5, 64, 300])
@pytest.mark.parametrize("op", ["nt", "nn"])
def test_nf4_gemm_bf16_tensor_cores(ops, rng, op, M, shape, double_quant, alpha, beta):
    """NF4 decoded in the tile's dequant stage: cols % 8 == 0 shapes take the packed-word loader,
    the others (53, 130, 300 columns) and dX = dY·W the element loader."""
    rows, cols, bs = shape
    w = Nf4Weight(rng, rows, cols, bs, double_quant)
    K = cols if op == "nt" else rows
    x = rng.standard_normal((M, K)).astype(np.float32)
    c0 = rng.standard_normal((M, cols if op == "nn" else rows)).astype(np.float32)
    fn = ops.nf4_gemm_nt if op == "nt" else ops.nf4_gemm_nn
    got = fn(x, w, c0.copy() if beta else None, alpha=alpha, beta=beta, backend="cuda", compute_dtype="bfloat16")
    wd = w.dequantize64()
    w_rounded = _bf16(ops.nf4_dequantize(w, backend="cuda"))
    B, RB = (wd.T, w_rounded.T) if op == "nt" else (wd, w_rounded)
    _check_bf16(got, x, B, K, alpha, beta, c0 if beta else None, b_rounded=RB)
    # the CPU's bf16 oracle (emulated rounding, double sums): both within the loose bound of the exact product
    ref = fn(x, w, c0.copy() if beta else None, alpha=alpha, beta=beta, backend="cpu:scalar", compute_dtype="bfloat16")
    scale = abs(alpha) * (np.abs(x.astype(np.float64)) @ np.abs(B)) + (abs(beta) * np.abs(c0) if beta else 0.0)
    assert np.all(np.abs(got - ref.astype(np.float64)) <= 2 * (2 * U_BF16 + U_BF16 ** 2 + 2 * (K + 8) * EPS32) * scale + 1e-30)


@needs_bf16_gpu
def test_bf16_training_pass_cuda(tmp_path, rng):
    """End to end: loss and LoRA gradients of the tiny NF4 model in bf16 mode on CUDA (tensor-core base
    GEMMs forward and back) vs the CPU in fp32, under test_bf16's bf16-derived bound (2u * 2 (L + 1) * 2,
    global relative); the CUDA fp32 pass stays fp32-close, and bf16 mode really differs from it."""
    from helpers_bf16 import LORA, TINY, U, engine_pass, global_rel, max_rel
    from helpers_train import padded_batch
    from test_lora_model import build, random_adapter

    need = ("attention_train", "attention_train_backward", "rmsnorm_backward", "swiglu_backward")
    missing = [op for op in need if op not in _core.backend_ops("cuda")]
    if missing:
        pytest.skip(f"CUDA training ops missing: {missing}")
    cpu, cfg, _ = build(tmp_path, rng, **TINY)
    _, state = random_adapter(cpu, "a", rng, **LORA)
    ids, mask, labels = padded_batch(rng, cfg["vocab_size"], B=3, T=16)
    loss32, g32 = engine_pass(cpu, ids, mask, labels)

    gpu = qlora_native.Model.from_pretrained(cpu.name_or_path, quantize="nf4", backend="cuda", tokenizer=None,
                                             compute_dtype="float32")  # CUDA's default is bf16 on sm_80+
    gpu.add_adapter("a", qlora_native.LoraConfig(lora_dropout=0.0, **LORA))
    gpu.set_adapter_state_dict("a", state)
    gpu.set_active_adapter("a")
    loss_f, g_f = engine_pass(gpu, ids, mask, labels)
    gpu.compute_dtype = "bfloat16"
    assert gpu.compute_dtype == "bfloat16"
    loss16, g16 = engine_pass(gpu, ids, mask, labels)
    tol = 2 * U * 2 * (cfg["num_hidden_layers"] + 1) * 2
    assert abs(loss16 - loss32) < U * abs(loss32)
    assert global_rel(g16, g32) < tol and max_rel(g16, g32) < 2 * tol
    assert abs(loss_f - loss32) < 1e-4 * abs(loss32) and global_rel(g_f, g32) < 1e-3
    assert global_rel(g16, g32) > 10 * global_rel(g_f, g32)  # bf16 really used


# ------------------------------------------------------------------ op harness (every backend op)
# The pattern of ggml's test-backend-ops: each transformer op runs through _core.backend_op on
# every backend (arrays copied into guarded buffers; a write outside an output raises) and is
# compared with a numpy float64 reference under a bound derived from fp32 rounding. The CPU
# levels run everywhere (the harness itself is tested in CI); "cuda" skips without a GPU.

# HARNESS_BACKENDS, _be, _run, _within: tests/helpers_ops.py.


def _q8_0_weight(rng, N, K):
    """GGUF Q8_0 bytes [N, K/32 * 34] and their float64 dequantization."""
    nb = K // 32
    d = rng.uniform(0.001, 0.05, size=(N, nb)).astype(np.float16)
    d[0, 0] = np.float16(6e-8)  # a subnormal scale
    q = rng.integers(-128, 128, size=(N, nb, 32), dtype=np.int8)
    blocks = np.empty((N, nb, 34), np.uint8)
    blocks[:, :, :2] = d.view(np.uint8).reshape(N, nb, 2)
    blocks[:, :, 2:] = q.view(np.uint8)
    deq = (d.astype(np.float64)[:, :, None] * q.astype(np.float64)).reshape(N, K)
    return blocks.reshape(-1), deq


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
@pytest.mark.parametrize("M,D,V", [(1, 7, 5), (13, 64, 300)])
def test_op_embedding(backend, rng, M, D, V):
    table = rng.standard_normal((V, D)).astype(np.float32)
    ids = rng.integers(0, V, size=M).astype(np.int32)
    ids[-1] = V - 1
    out = _run(_be(backend), "embedding", {"table": table, "ids": ids, "out": np.zeros((M, D), np.float32)},
               {"M": M, "D": D, "V": V})["out"]
    np.testing.assert_array_equal(out, table[ids])


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
@pytest.mark.parametrize("M,N,K", [(1, 3, 32), (5, 37, 96), (19, 70, 160)])
def test_op_q8_0(backend, rng, M, N, K):
    wb, deq = _q8_0_weight(rng, N, K)
    ids = rng.integers(0, N, size=M).astype(np.int32)
    rows = _run(_be(backend), "q8_0_rows", {"W": wb, "ids": ids, "out": np.zeros((M, K), np.float32)},
                {"M": M, "K": K, "N": N})["out"]
    np.testing.assert_array_equal(rows, deq[ids].astype(np.float32))  # exact in fp32
    ldx, ldy = K + 3, N + 5  # row strides beyond the row
    x = rng.standard_normal((M, ldx)).astype(np.float32)
    y0 = np.full((M, ldy), 7.0, np.float32)
    y = _run(backend, "q8_0_gemm_nt", {"X": x, "W": wb, "Y": y0},
             {"M": M, "N": N, "K": K, "ldx": ldx, "ldy": ldy})["Y"]
    x64 = x[:, :K].astype(np.float64)
    _within(y[:, :N], x64 @ deq.T, (K + 8) * EPS32 * (np.abs(x64) @ np.abs(deq).T) + 1e-30, "q8_0_gemm_nt")
    assert np.all(y[:, N:] == 7.0), "q8_0_gemm_nt wrote the padding between rows"


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
@pytest.mark.parametrize("M,D", [(1, 5), (9, 576), (3, 1500)])
def test_op_rmsnorm(backend, rng, M, D):
    x = (rng.standard_normal((M, D)) * 3).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    eps = 1e-5
    out = _run(_be(backend), "rmsnorm", {"x": x, "w": w, "out": np.zeros_like(x)}, {"M": M, "D": D},
               {"eps": eps})["out"]
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + np.float32(eps)) * w
    _within(out, ref, (D + 8) * EPS32 * np.abs(ref) + 1e-30, "rmsnorm")


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
def test_op_adds(backend, rng):
    n = 1037
    x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    got = _run(_be(backend), "add_inplace", {"x": x, "y": y}, {"n": n})["y"]
    np.testing.assert_array_equal(got, x + y)  # one fp32 rounding, as numpy
    M, N, ldy = 7, 33, 40
    yb = rng.standard_normal((M, ldy)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    got = _run(backend, "add_bias", {"bias": bias, "y": yb}, {"M": M, "N": N, "ldy": ldy})["y"]
    np.testing.assert_array_equal(got[:, :N], yb[:, :N] + bias)
    np.testing.assert_array_equal(got[:, N:], yb[:, N:])


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True], ids=["rope", "rope_backward"])
def test_op_rope(backend, rng, inverse):
    M, H, hd, ldx = 6, 3, 10, 37
    x = rng.standard_normal((M, ldx)).astype(np.float32)
    pos = np.array([0, 1, 5, 100, 4095, 131071], np.int32)[:M]
    inv = (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    got = _run(_be(backend), "rope_backward" if inverse else "rope", {"x": x, "pos": pos, "inv_freq": inv},
               {"M": M, "n_heads": H, "head_dim": hd, "ldx": ldx})["x"]
    ang = (pos.astype(np.float32)[:, None] * inv[None, :]).astype(np.float64)  # fp32 product, as the op
    co, sn = np.cos(ang), np.sin(ang) * (-1 if inverse else 1)
    v = x[:, :H * hd].reshape(M, H, hd).astype(np.float64)
    x1, x2 = v[:, :, :hd // 2], v[:, :, hd // 2:]
    ref = np.concatenate([x1 * co[:, None] - x2 * sn[:, None], x2 * co[:, None] + x1 * sn[:, None]], axis=2)
    mag = np.concatenate([np.abs(x1) + np.abs(x2)] * 2, axis=2)
    _within(got[:, :H * hd].reshape(M, H, hd), ref, 8 * EPS32 * mag + 1e-30, "rope")
    np.testing.assert_array_equal(got[:, H * hd:], x[:, H * hd:])


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
def test_op_swiglu(backend, rng):
    M, N, ld = 5, 300, 303
    g = (rng.standard_normal((M, ld)) * 3).astype(np.float32)
    u = rng.standard_normal((M, ld)).astype(np.float32)
    out = _run(_be(backend), "swiglu", {"gate": g, "up": u, "out": np.zeros((M, ld), np.float32)},
               {"M": M, "N": N, "ldg": ld, "ldu": ld, "ldo": ld})["out"]
    g64, u64 = g[:, :N].astype(np.float64), u[:, :N].astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * u64
    # fast-math exp on the GPU: a few ulp plus ~1.2 ulp per unit of |g|
    _within(out[:, :N], ref, (16 + 2 * np.abs(g64)) * EPS32 * np.abs(ref) + 1e-30, "swiglu")
    assert np.all(out[:, N:] == 0)


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
def test_op_kv_write(backend, rng):
    B, T, H, hd, S, start = 2, 3, 2, 5, 9, 4
    ldx = H * hd + 2
    x = rng.standard_normal((B * T, ldx)).astype(np.float32)
    cache = rng.standard_normal((B, H, S, hd)).astype(np.float32)
    got = _run(_be(backend), "kv_write", {"x": x, "cache": cache},
               {"B": B, "T": T, "H": H, "hd": hd, "ldx": ldx, "S_cap": S, "start": start})["cache"]
    ref = cache.copy()
    ref[:, :, start:start + T, :] = x[:, :H * hd].reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(got, ref)


def _attention_ref(q, kc, vc, mask, start, Hq, Hkv, scale):
    B, _, S, hd = kc.shape
    T = q.shape[0] // B
    out = np.zeros((B * T, Hq * hd))
    bound = np.zeros_like(out)
    for b in range(B):
        for t in range(T):
            vis = np.nonzero(mask[b, :start + t + 1])[0]
            for h in range(Hq):
                if vis.size == 0:
                    continue
                kh = h // (Hq // Hkv)
                qv = q[b * T + t, h * hd:(h + 1) * hd].astype(np.float64)
                s = scale * (kc[b, kh, vis].astype(np.float64) @ qv)
                p = np.exp(s - s.max())
                p /= p.sum()
                v = vc[b, kh, vis].astype(np.float64)
                out[b * T + t, h * hd:(h + 1) * hd] = p @ v
                # softmax of |s| up to a few units: fp32 exp/sums (fast-math exp: ~1.2 ulp per unit)
                k = vis.size + hd + 16 + 2 * float(np.abs(s - s.max()).max())
                bound[b * T + t, h * hd:(h + 1) * hd] = 4 * k * EPS32 * (p @ np.abs(v)) + 1e-30
    return out, bound


ATTN_CASES = [  # B, T, Hq, Hkv, hd, S_cap, start[, left padding of row 0 (default 2)]
    (1, 1, 4, 2, 8, 16, 9),      # decode, GQA 2
    (2, 1, 6, 2, 64, 40, 33),    # decode, batch, GQA 3
    (2, 7, 4, 4, 17, 12, 3),     # chunked prefill, MHA, odd head_dim
    # T >= 16: CUDA's flash-tiled kernel (64 / 128 / 256 head-dim tiles, ragged query-row and key tiles)
    (1, 20, 8, 1, 128, 20, 0),   # full prefill, MQA: 160 rows, 5 row tiles of 32
    (2, 19, 6, 2, 64, 40, 5),    # GQA 3, rows of a tile span several queries, 2 key tiles
    (1, 33, 4, 4, 96, 40, 2),    # hd 96 in the 128 tile (zero-padded dims)
    (1, 17, 4, 1, 256, 24, 3),   # hd 256 (16-key tiles), GQA 4
    (2, 40, 3, 1, 17, 45, 4, 37),  # odd hd (4-byte copies), row 0 padded past a whole key tile
]


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c)))
def test_op_attention(backend, rng, case):
    B, T, Hq, Hkv, hd, S, start, *pad = case
    ldq = Hq * hd + 3
    q = rng.standard_normal((B * T, ldq)).astype(np.float32)
    kc = rng.standard_normal((B, Hkv, S, hd)).astype(np.float32)
    vc = rng.standard_normal((B, Hkv, S, hd)).astype(np.float32)
    mask = np.ones((B, S), np.int32)
    mask[0, :(pad[0] if pad else 2)] = 0  # left padding of row 0: its first queries see no key when start is small
    if S > 6:
        mask[-1, 5] = 0  # a hole
    scale = 1.0 / np.sqrt(hd)
    out = _run(_be(backend), "attention",
               {"q": q, "k_cache": kc, "v_cache": vc, "key_mask": mask,
                "out": np.full((B * T, ldq), 3.0, np.float32)},
               {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "hd": hd, "ldq": ldq, "S_cap": S, "start": start, "ldo": ldq},
               {"scale": scale})["out"]
    ref, bound = _attention_ref(q, kc, vc, mask, start, Hq, Hkv, np.float32(scale))
    _within(out[:, :Hq * hd], ref, bound, "attention")
    assert np.all(out[:, Hq * hd:] == 3.0)


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
@pytest.mark.parametrize("want_grad", [False, True])
def test_op_cross_entropy(backend, rng, want_grad):
    M, V, ldl = 5, 1003, 1010
    logits = (rng.standard_normal((M, ldl)) * 4).astype(np.float32)
    labels = rng.integers(0, V, size=M).astype(np.int32)
    labels[2] = -100
    gs = 0.25
    res = _run(_be(backend), "cross_entropy_rows", {"logits": logits, "labels": labels, "loss": np.zeros(M, np.float32)},
               {"M": M, "V": V, "ldl": ldl, "want_grad": int(want_grad)}, {"grad_scale": gs})
    l64 = logits[:, :V].astype(np.float64)
    mx = l64.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(l64 - mx).sum(axis=1))
    ref = np.where(labels == -100, 0.0, lse - l64[np.arange(M), np.maximum(labels, 0)])
    _within(res["loss"], ref, 64 * EPS32 * (np.abs(lse) + np.abs(l64).max(axis=1)), "cross_entropy loss")
    g = res["logits"]
    if want_grad:
        p = np.exp(l64 - lse[:, None])
        gref = gs * p
        gref[np.arange(M), np.maximum(labels, 0)] -= gs
        gref[labels == -100] = 0.0
        tol = gs * (4 + 2 * (np.abs(lse)[:, None] + np.abs(l64))) * EPS32 * p + EPS32 * np.abs(gref) + 1e-30
        _within(g[:, :V], gref, tol, "cross_entropy grad")
    else:
        np.testing.assert_array_equal(g, logits)
    np.testing.assert_array_equal(g[:, V:], logits[:, V:])


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
@pytest.mark.parametrize("many", [False, True], ids=["lora_segments", "lora_segments_many"])
def test_op_lora_segments(backend, rng, many):
    """Mixed-adapter LoRA terms: segments of different ranks and alphas, rows no segment covers."""
    M = 9
    segs = [(0, 3, 4, 0.5), (3, 2, 1, -2.0), (6, 3, 8, 1.25)]  # rows 5 stays base-only
    problems = [(40, 24, segs), (40, 8, segs)] if many else [(40, 24, segs)]
    arrays, ints, floats, refs = lora_case(rng, problems, M, pad=(1, 2))
    res = _run(_be(backend), "lora_segments_many" if many else "lora_segments", arrays, ints, floats)
    for p, _, out, ref, bound, y, _ in refs:
        got = res[f"y_{p}"]
        _within(got[:, :out], ref, (40 + 8 + 8) * 2 * EPS32 * bound + 1e-30, f"lora problem {p}")
        np.testing.assert_array_equal(got[:, out:], y[:, out:])


@pytest.mark.parametrize("backend", HARNESS_BACKENDS)
def test_op_gemm_nt_bf16(backend, rng):
    """gemm_nt_bf16 between sentinels (the tensor-core epilogue's paired stores on ragged edges): the
    bf16 bounds where the backend has bf16 compute, fp32 rounding where it runs the fp32 kernel."""
    be = _be(backend)
    M, N, K, lda, ldb, ldc = 70, 37, 45, 47, 45, 38
    a = rng.standard_normal((M, lda)).astype(np.float32)
    b = rng.standard_normal((N, ldb)).astype(np.float32)
    c0 = rng.standard_normal((M, ldc)).astype(np.float32)
    got = _run(be, "gemm_nt_bf16", {"A": a, "B": b, "C": c0.copy()},
               {"M": M, "N": N, "K": K, "lda": lda, "ldb": ldb, "ldc": ldc}, {"alpha": 0.5, "beta": -1.0})["C"]
    assert np.array_equal(got[:, N:], c0[:, N:])  # padding columns untouched
    A, B = a[:, :K], b[:, :K]
    if ops_mod.bf16_compute_available(be):
        _check_bf16(got[:, :N], A, B.T, K, 0.5, -1.0, c0[:, :N])
    else:
        exact = 0.5 * (A.astype(np.float64) @ B.T.astype(np.float64)) - c0[:, :N]
        bound = 0.5 * (np.abs(A.astype(np.float64)) @ np.abs(B.T.astype(np.float64))) + np.abs(c0[:, :N])
        _within(got[:, :N], exact, (K + 8) * EPS32 * bound + 1e-30, "gemm_nt_bf16 (fp32 kernel)")


def test_op_harness_refuses_bad_calls():
    """Shape arguments larger than the arrays and unknown ops are ValueErrors, never stray accesses."""
    t = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="smaller than the shape arguments"):
        _run("cpu", "embedding", {"table": t, "ids": np.zeros(3, np.int32), "out": t}, {"M": 3, "D": 4, "V": 100})
    with pytest.raises(ValueError, match="missing int 'V'"):
        _run("cpu", "embedding", {"table": t, "ids": np.zeros(3, np.int32), "out": t}, {"M": 3, "D": 4})
    with pytest.raises(ValueError, match="no harness case"):
        _run("cpu", "gemm_tn_bf16", {})


# ------------------------------------------------------------------ capability table


def test_backend_ops_table(capsys):
    """cpu implements every op; the CUDA table is known without a GPU and `info` prints both."""
    all_ops = _core.all_backend_ops()
    assert _core.backend_ops("cpu") == all_ops and len(set(all_ops)) == len(all_ops)
    for op in ("embedding", "attention", "rmsnorm", "q8_0_gemm_nt", "lora_segments_many", "host_output"):
        assert op in all_ops
    devsim = _core.backend_ops("cpu:devsim")  # mirrors the CUDA table (a CPU build knows it too)
    assert "embedding" in devsim and "attention_train" in devsim and "cpu:devsim" not in _core.available_backends()
    if _core.cuda_compiled():
        assert _core.backend_ops("cuda") == devsim
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"ops cpu        : {len(all_ops)} of {len(all_ops)}: " in out
    if _core.cuda_compiled():
        cuda_ops = _core.backend_ops("cuda")
        # every op a forward pass / generation needs
        for op in ("embedding", "q8_0_rows", "q8_0_gemm_nt", "rmsnorm", "add_inplace", "add_bias", "rope", "swiglu",
                   "kv_write", "attention", "gemm_nt", "nf4_gemm_nt", "nf4_gemm_nt_many", "lora_segments_many",
                   "host_output"):
            assert op in cuda_ops
        assert f"ops cuda       : {len(cuda_ops)} of {len(all_ops)}: " in out
        # the ops CUDA lacks are named, and only when there are any
        missing = [op for op in all_ops if op not in cuda_ops]
        assert ("; not: " in out) == bool(missing)
    else:
        assert "ops cuda       : none (not compiled)" in out


# ------------------------------------------------------------------ end to end: tiny model cuda vs cpu


@pytest.mark.parametrize("device", ["cpu:devsim", "cuda"])
@pytest.mark.parametrize("quantize", ["nf4", None])
def test_tiny_model_device_matches_cpu(tmp_path, rng, quantize, device):
    """Logits of a tiny random Llama (GQA, biases off) on a device backend vs the CPU backend, fp32
    compute: fp32 rounding differences only; greedy generation token-identical. "cpu:devsim" runs
    the CPU kernels behind a device face (host_memory() false, CUDA's op table), so the device
    paths of the model (uploads, staged logits, downloads) run in CI without a GPU."""
    from helpers_model import make_checkpoint

    _be(device)
    path, cfg, _ = make_checkpoint(tmp_path, rng, vocab=97, hidden=64, inter=96, layers=2, heads=4, kv_heads=2)
    cpu = qlora_native.Model.from_pretrained(path, quantize=quantize, backend="cpu", tokenizer=None)
    gpu = qlora_native.Model.from_pretrained(path, quantize=quantize, backend=device, tokenizer=None,
                                             compute_dtype="float32")  # CUDA's default is bf16 on sm_80+
    ids = rng.integers(1, 97, size=(2, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    lc = np.asarray(cpu(ids, attention_mask=mask), np.float64)
    lg = np.asarray(gpu(ids, attention_mask=mask), np.float64)
    scale = np.abs(lc).max()
    assert np.abs(lg - lc)[mask.astype(bool)].max() <= 2e-4 * scale, f"{device} logits differ from cpu"
    prompts = [list(map(int, ids[0])), list(map(int, ids[1, 3:]))]
    assert gpu.generate(prompts, 12, eos_token_id=None) == cpu.generate(prompts, 12, eos_token_id=None)
