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


def _same_bits_inputs(rng, n):
    """Rows of n values with the exp's edge cases spread through them: both sides of the short
    form's |x| <= 87 range, the overflow / underflow clamps (88.72, -104), denormal results."""
    x = randn(rng, 4, n, std=3.0)
    edge = np.array([87.0, -87.0, 87.01, -87.01, 88.7, 88.73, -100.0, -103.9, -104.0, -120.0, 95.0,
                     0.0, -0.0], np.float32)
    x[1, : min(n, edge.size)] = edge[: min(n, edge.size)]
    x[2] *= 40.0  # most vectors of this row take the wide form
    return x


@pytest.mark.skipif(not {"cpu:avx2", "cpu:avx512"} <= set(cpu_backends()), reason="needs cpu:avx2 and cpu:avx512")
@pytest.mark.parametrize("n", [1, 7, 9, 16, 17, 31, 33, 576, 577, 1003])
def test_avx2_row_kernels_give_the_avx512_bits(rng, n):
    """The AVX2 row kernels compute what the AVX-512 ones do, in the same order: the same exp (one
    normal 2^n for |x| <= 87, two halves beyond), double sums in 4 x 4 lanes folded as the AVX-512
    kernels' 2 x 8 lanes and their horizontal add. So RMSNorm (forward, backward), SwiGLU (forward,
    backward) and the cross-entropy loss / gradient agree bit for bit, tails and edge inputs
    included (before, the AVX2 sums ran in 2 x 4 lanes: RMSNorm and the loss differed in the last bits)."""
    from helpers_ops import run
    x, w, dy = _same_bits_inputs(rng, n), randn(rng, n), randn(rng, 4, n)
    fin = x
    up, dout = randn(rng, 4, n), randn(rng, 4, n)
    labels = rng.integers(0, n, 4).astype(np.int32)
    out = {}
    for b in ("cpu:avx2", "cpu:avx512"):
        r = {}
        r["rmsnorm"] = run(b, "rmsnorm", {"x": fin, "w": w, "out": np.zeros_like(fin)}, {"M": 4, "D": n},
                           {"eps": 1e-5})["out"]
        r["rmsnorm_backward"] = g.rmsnorm_backward(fin, w, dy, eps=1e-5, backend=b)
        r["swiglu"] = run(b, "swiglu", {"gate": x, "up": up, "out": np.zeros_like(x)},
                          {"M": 4, "N": n, "ldg": n, "ldu": n, "ldo": n})["out"]
        r["dgate"], r["dup"] = g.swiglu_backward(x, up, dout, backend=b)
        ce = run(b, "cross_entropy_rows", {"logits": fin.copy(), "labels": labels, "loss": np.zeros(4, np.float32)},
                 {"M": 4, "V": n, "ldl": n, "want_grad": 1}, {"grad_scale": 0.25})
        r["ce_loss"], r["ce_grad"] = ce["loss"], ce["logits"]
        out[b] = r
    for k, v in out["cpu:avx2"].items():
        np.testing.assert_array_equal(v, out["cpu:avx512"][k], err_msg=k)
