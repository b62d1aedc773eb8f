"""Kernels on numpy arrays: fp32 GEMM in three layouts and fused NF4 GEMM, on any backend.

Inputs are float32 2-D arrays whose last dimension is contiguous (row-strided views are fine: the
row stride becomes the leading dimension; host backends never copy them). Anything else raises
ValueError rather than being converted silently. ``out`` (optional) receives the result in place;
``beta != 0`` accumulates into it. ``backend`` is a name: "cpu", "cpu:scalar", "cpu:generic",
"cpu:avx2", "cpu:avx512", "cuda" (see ``qlora_native.available_backends()``).

An NF4 weight ``w`` is any object with the NF4 attribute protocol (``packed``, ``absmax``,
``nested_absmax``, ``nested_map``, ``offset``, ``shape``, ``blocksize``, ``double_quant``), e.g.
``qlora_native.nf4.NF4Tensor``; it is read in its packed form, never dequantized to a full copy.

``compute_dtype="bfloat16"`` (the five GEMMs): both operands rounded to bf16 (round-to-nearest-even,
NF4 decoded then rounded), fp32 accumulation; on AVX512-BF16 CPUs at the avx512 level (and as an
emulating reference on "cpu:scalar"). Elsewhere the fp32 kernels run (``bf16_compute_available``).
"""
from ._core import bf16_gemm_kernel as _bf16_gemm_kernel
from ._core import ops as _ops

__all__ = ["bf16_compute_available", "bf16_gemm_kernel", "gemm_nt", "gemm_nn", "gemm_tn", "nf4_gemm_nt", "nf4_gemm_nt_many", "nf4_gemm_nn", "nf4_dequantize", "q8_0_gemm_nt",
           "q8_0_rows"]


def bf16_compute_available(backend="cpu"):
    """True when compute_dtype="bfloat16" runs on bf16 units on `backend` (else fp32 runs)."""
    return _ops.bf16_compute_available(backend)


def bf16_gemm_kernel():
    """The micro-kernel the "cpu" backend's bf16 GEMMs run now (QLORA_AMX is read per call): "amx-bf16"
    (AMX tiles: CPU and OS allow them), "avx512-bf16", "amx-bf16-emulated" (QLORA_AMX=emulate: the AMX
    kernel on emulated tiles, slow, for tests), "scalar" (the reference level), or None (fp32 runs)."""
    return _bf16_gemm_kernel()


def gemm_nt(a, b, out=None, *, alpha=1.0, beta=0.0, backend="cpu", compute_dtype="float32"):
    """out[M, N] = alpha * a[M, K] @ b[N, K].T + beta * out   (Y = X·Wᵀ with W [out, in])."""
    return _ops.gemm_nt(a, b, out, alpha=alpha, beta=beta, backend=backend, compute_dtype=compute_dtype)


def gemm_nn(a, b, out=None, *, alpha=1.0, beta=0.0, backend="cpu", compute_dtype="float32"):
    """out[M, N] = alpha * a[M, K] @ b[K, N] + beta * out   (dX = dY·W)."""
    return _ops.gemm_nn(a, b, out, alpha=alpha, beta=beta, backend=backend, compute_dtype=compute_dtype)


def gemm_tn(a, b, out=None, *, alpha=1.0, beta=0.0, backend="cpu", compute_dtype="float32"):
    """out[M, N] = alpha * a[K, M].T @ b[K, N] + beta * out   (weight gradients, K = tokens)."""
    return _ops.gemm_tn(a, b, out, alpha=alpha, beta=beta, backend=backend, compute_dtype=compute_dtype)


def nf4_gemm_nt(x, w, out=None, *, alpha=1.0, beta=0.0, backend="cpu", compute_dtype="float32"):
    """out[M, out_f] = alpha * x[M, in_f] @ dequant(w).T + beta * out."""
    return _ops.nf4_gemm_nt(x, w, out, alpha=alpha, beta=beta, backend=backend, compute_dtype=compute_dtype)


def nf4_gemm_nt_many(x, ws, *, backend="cpu", compute_dtype="float32"):
    """[x @ dequant(w).T for w in ws] in one call (weights sharing the input, as q/k/v or gate/up
    of a layer: one job on the thread pool at decode; bfloat16: x rounded once for all); host backends."""
    return _ops.nf4_gemm_nt_many(x, list(ws), backend=backend, compute_dtype=compute_dtype)


def nf4_gemm_nn(dy, w, out=None, *, alpha=1.0, beta=0.0, backend="cpu", compute_dtype="float32"):
    """out[M, in_f] = alpha * dy[M, out_f] @ dequant(w) + beta * out."""
    return _ops.nf4_gemm_nn(dy, w, out, alpha=alpha, beta=beta, backend=backend, compute_dtype=compute_dtype)


def nf4_dequantize(w, backend="cpu"):
    """float32 [out_f, in_f] dequantized copy of an NF4 weight (tests, merging, export)."""
    return _ops.nf4_dequantize(w, backend)


def q8_0_gemm_nt(x, w_blocks, n, k, *, backend="cpu"):
    """float32 [M, n] = x[M, k] @ dequant(w).T for a GGUF Q8_0 weight [n, k] given as its raw blocks
    (uint8, n * k/32 * 34 bytes: fp16 scale + 32 int8 each); host backends."""
    return _ops.q8_0_gemm_nt(x, w_blocks, n, k, backend=backend)


def q8_0_rows(w_blocks, ids, n, k, *, backend="cpu"):
    """float32 [len(ids), k] = dequant(w)[ids] (embedding lookup) for a GGUF Q8_0 weight [n, k]; host backends."""
    return _ops.q8_0_rows(w_blocks, ids, n, k, backend=backend)
