"""SIMD row kernels of the training ops (cpu/rowops_kernels*.cpp: vector exp for the softmax /
cross-entropy / SwiGLU backward, double-lane sums for RMSNorm) and the two ways of the training
attention backward (fused 5-GEMM per (b, KV head), split 7-GEMM), at every CPU level, against the
float64 references of test_grad_ops.py with the same precision-derived bounds."""
import numpy as np
import pytest

import qlora_native
from conftest import cpu_backends
from qlora_native import _core
from test_grad_ops import assert_grad_close, check_attention_train, randn, rmsnorm_bwd_ref, swiglu_bwd_ref

g = _core.grad_ops
SIMD = [b for b in cpu_backends() if b in ("cpu:avx2", "cpu:avx512")]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("way", ["fused", "split"])
@pytest.mark.parametrize("Hq,Hkv,kind", [(4, 2, "left"), (3, 1, "right"), (2, 2, "none")])
def test_attention_backward_both_ways(rng, monkeypatch, backend, way, Hq, Hkv, kind):
    monkeypatch.setenv("QLORA_ATTN_BACKWARD", way)
    check_attention_train(rng, backend, 2, 140, Hq, Hkv, 24, kind)  # three query / key blocks, the last partial


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("M,N", [(3, 37), (5, 128), (2, 1000)])
def test_swiglu_backward_every_level(rng, backend, M, N):
    gt, up, dout = randn(rng, M, N, std=3.0), randn(rng, M, N), randn(rng, M, N)
    gt.flat[:4] = [-120.0, -90.0, 90.0, 120.0]  # exp over- and underflow
    dg, du = g.swiglu_backward(gt, up, dout, backend=backend)
    rg, ru = swiglu_bwd_ref(gt, up, dout)
    assert_grad_close(dg, rg, 4, "dgate")
    assert_grad_close(du, ru, 4, "dup")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("M,D", [(3, 7), (4, 64), (2, 577)])
def test_rmsnorm_backward_every_level(rng, backend, M, D):
    x, w, dy = randn(rng, M, D), randn(rng, D), randn(rng, M, D)
    dx = g.rmsnorm_backward(x, w, dy, eps=1e-5, backend=backend)
    assert_grad_close(dx, rmsnorm_bwd_ref(x, w, 1e-5, dy), D, "dx")


def _op_seconds(fn, op, reps=5):
    """Best of `reps` of the engine's own timer for `op` (QLORA_PROFILE hooks): the kernel alone,
    without the binding's array conversions and allocations."""
    best = float("inf")
    for _ in range(reps):
        _core.profile_reset()
        fn()
        best = min(best, sum(r["seconds"] for r in _core.profile_report() if r["op"] == op))
    return best


@pytest.mark.skipif(not SIMD or "cpu:generic" not in cpu_backends(), reason="needs a SIMD level and cpu:generic")
def test_simd_row_kernels_beat_the_reference_loops(rng):
    """The SIMD levels run the exp-bound row ops through vector kernels, the generic level through
    std::exp loops. On one thread, best of 5 (so machine load hardly enters): measured 6-10x on a
    Zen 4, asserted 2x. Before the kernels every level ran the same loops (ratio ~1)."""
    best = SIMD[-1]
    h, E = randn(rng, 32, 4), randn(rng, 32768, 4)
    labels = rng.integers(0, 32768, 32).astype(np.int32)
    gt, up, dout = randn(rng, 64, 4096, std=3.0), randn(rng, 64, 4096), randn(rng, 64, 4096)
    n0, p0 = qlora_native.num_threads(), _core.profile_enabled()
    _core.profile_enable(True)
    qlora_native.set_num_threads(1)
    try:
        ce = {b: _op_seconds(lambda b=b: g.lm_cross_entropy(h, E, labels, backend=b), "cross_entropy_rows")
              for b in ("cpu:generic", best)}
        sw = {b: _op_seconds(lambda b=b: g.swiglu_backward(gt, up, dout, backend=b), "swiglu_backward")
              for b in ("cpu:generic", best)}
    finally:
        qlora_native.set_num_threads(n0)
        _core.profile_enable(p0)
        _core.profile_reset()
    assert ce["cpu:generic"] >= 2 * ce[best], ce
    assert sw["cpu:generic"] >= 2 * sw[best], sw
