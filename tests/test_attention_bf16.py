"""Training attention in bf16 compute (grad_ops.attention_train / attention_train_backward with
compute_dtype="bfloat16", the model's attention in compute_dtype="bfloat16").

The tile products P.v, dout.v^T, dS.k, dS^T.q and P^T.dout round both operands to bf16 (RNE) and
accumulate in fp32; the scores S = scale q.k^T, softmax, lse, delta and the outputs stay fp32 (bf16
scores would err by u |S| absolutely, a relative error of P after the softmax). Bounds, first order
in u = 2^-8 (bf16 unit roundoff), rho = 2u + u^2 (a product of two rounded operands), per element,
against float64 on the exact inputs:
  S = scale q.k (fp32):  |dS_ts| <= ES_ts = (hd + 8) eps32 * scale * |q_t|.|k_s|
  forward P = softmax:   |dP_ts| <= P_ts * 2 max_s' ES_ts'       (the normalisation moves every P)
  out = r(P).r(v):       |d out| <= |dP|.|v| + rho * P.|v|
  lse:                   |d lse_t| <= max_s ES_ts
  backward (exact out / lse given): P = exp(S - lse): |dP| <= P * ES;  dP~ = r(dO).r(v): rho |dO|.|v|
  dS = scale P (dP~ - delta):  |d dS| <= scale (|dP| |dP~ - delta| + P rho |dO|.|v|)
  dq = r(dS).r(k): |d dS|.|k| + rho |dS|.|k|;  dk = r(dS)^T.r(q) summed over the group; dv = r(P)^T.r(dO)
plus fp32 accumulation ((n + 8) eps32 times the same magnitudes) and a factor 1.25 for the second
order. The AVX512-BF16 kernels (packed K/V panels, cpu:avx512) and the general bf16 GEMM way
(QLORA_ATTN_BACKWARD=split) must also agree closely with the emulating oracle (cpu:scalar): they round
the same values the same way and differ only in summation order (see the test for the bound).
"""
import numpy as np
import pytest

import qlora_native
from qlora_native import _core, ops

from test_grad_ops import attn_bwd_ref, attn_ref, make_mask, randn

g = _core.grad_ops
EPS32 = float(np.finfo(np.float32).eps)
U = 2.0 ** -8
RHO = 2 * U + U * U
HAVE_BF16 = ops.bf16_compute_available("cpu")
BF16_BACKENDS = ["cpu:scalar"] + (["cpu:avx512"] if HAVE_BF16 else [])
needs_bf16 = pytest.mark.skipif(not HAVE_BF16, reason="no AVX512-BF16 on this CPU")


def heads(a, B, T, H, hd):
    return a.astype(np.float64).reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # [B, H, T, hd]


def flat(a):
    B, H, T, hd = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B * T, H * hd)


def bounds(q, k, v, mask, Hq, Hkv, scale, dout):
    """Elementwise error bounds (see the module docstring) for out, lse, dq, dk, dv."""
    B, T = mask.shape
    hd = q.shape[1] // Hq
    grp = Hq // Hkv
    q4, dO4 = heads(q, B, T, Hq, hd), heads(dout, B, T, Hq, hd)
    k4 = np.repeat(heads(k, B, T, Hkv, hd), grp, axis=1)
    v4 = np.repeat(heads(v, B, T, Hkv, hd), grp, axis=1)
    O, lse, P = attn_ref(q, k, v, mask, Hq, Hkv, scale)
    O4 = heads(O, B, T, Hq, hd)
    vis = np.tril(np.ones((T, T), bool))[None, None] & (mask[:, None, None, :] != 0)
    ES = np.where(vis, (hd + 8) * EPS32 * abs(scale) * (np.abs(q4) @ np.abs(k4).transpose(0, 1, 3, 2)), 0.0)
    esmax = ES.max(-1, keepdims=True)
    fp = lambda n, mag: (n + 8) * EPS32 * mag  # noqa: E731  fp32 accumulation
    c = 1.25
    # forward
    dPf = P * 2 * esmax
    b_out = c * (dPf @ np.abs(v4) + RHO * P @ np.abs(v4)) + fp(T, P @ np.abs(v4))
    b_lse = c * esmax[..., 0] + fp(hd, 1.0 + np.abs(np.where(np.isfinite(lse), lse, 0.0)))
    # backward
    dP = dO4 @ v4.transpose(0, 1, 3, 2)
    delta = (dO4 * O4).sum(-1, keepdims=True)
    dS = P * (dP - delta) * scale
    ED = RHO * (np.abs(dO4) @ np.abs(v4).transpose(0, 1, 3, 2))
    ddS = abs(scale) * (P * ES * np.abs(dP - delta) + P * ED) + fp(hd, abs(scale) * P * (np.abs(dO4) @ np.abs(v4).transpose(0, 1, 3, 2)))
    ak4, aq4 = np.abs(k4), np.abs(q4)
    b_dq = c * (ddS @ ak4 + RHO * np.abs(dS) @ ak4) + fp(T, np.abs(dS) @ ak4)
    kv_sum = lambda a: a.reshape(B, Hkv, grp, T, hd).sum(2)  # noqa: E731
    b_dk = kv_sum(c * (ddS.transpose(0, 1, 3, 2) @ aq4 + RHO * np.abs(dS).transpose(0, 1, 3, 2) @ aq4)
                  + fp(T * grp, np.abs(dS).transpose(0, 1, 3, 2) @ aq4))
    aO = np.abs(dO4)
    b_dv = kv_sum(c * ((P * ES).transpose(0, 1, 3, 2) @ aO + RHO * P.transpose(0, 1, 3, 2) @ aO)
                  + fp(T * grp, P.transpose(0, 1, 3, 2) @ aO))
    return flat(b_out), b_lse, flat(b_dq), flat(b_dk), flat(b_dv)


def within(name, got, want, bound):
    err = np.abs(np.asarray(got, np.float64) - want)
    ratio = err / (bound + 1e-300)
    assert np.all(err <= bound), f"{name}: worst error / bound = {float(ratio.max()):.3g}"
    return float(ratio.max())


def float64_case(rng, case):
    """Random inputs of case (B, T, Hq, Hkv, hd, mask kind): ((q, k, v, mask, scale, dout), the float64
    references (out, lse, dq, dk, dv) on them, the bounds above for each)."""
    B, T, Hq, Hkv, hd, kind = case
    q, k, v = randn(rng, B * T, Hq * hd), randn(rng, B * T, Hkv * hd), randn(rng, B * T, Hkv * hd)
    mask = make_mask(kind, B, T, rng)
    scale = float(1.0 / np.sqrt(hd))
    dout = randn(rng, B * T, Hq * hd)
    r_out, r_lse, _ = attn_ref(q, k, v, mask, Hq, Hkv, scale)
    refs = (r_out, r_lse) + tuple(attn_bwd_ref(q, k, v, mask, Hq, Hkv, scale, dout))
    return (q, k, v, mask, scale, dout), refs, bounds(q, k, v, mask, Hq, Hkv, scale, dout)


def check_vs_float64(tag, got, refs, bnds):
    """out, lse, dq, dk, dv within their bounds; lse is -inf exactly where the reference's is."""
    fin = np.isfinite(refs[1])
    np.testing.assert_array_equal(np.isneginf(got[1]), ~fin)
    for name, x, want, b in zip(("out", "lse", "dq", "dk", "dv"), got, refs, bnds):
        if name == "lse":
            x, want, b = x[fin], want[fin], b[fin]
        within(f"{tag}{name}", x, want, b)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))


CASES = [  # B, T, Hq, Hkv, hd, mask kind: T spans several 64-query blocks and a partial one (odd T: a
    (3, 70, 4, 2, 20, "left"),     # padded pair); hd 20 / 80: partial 32-column panels
    (2, 131, 6, 2, 64, "right"),  # SmolLM2's head dim
    (1, 97, 2, 1, 128, "none"),   # Llama's
    (2, 45, 3, 3, 80, "left"),
]


def run(backend, q, k, v, mask, Hq, Hkv, scale, dout, out_ref, lse_ref, cd="bfloat16"):
    out, lse = g.attention_train(q, k, v, mask, n_heads=Hq, n_kv_heads=Hkv, scale=scale, backend=backend,
                                 compute_dtype=cd)
    grads = g.attention_train_backward(q, k, v, mask, out_ref, lse_ref, dout, n_heads=Hq, n_kv_heads=Hkv,
                                       scale=scale, backend=backend, compute_dtype=cd)
    return (out, lse) + tuple(grads)


@pytest.mark.parametrize("backward", ["fused", "split"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[1]}-hd{c[4]}-{c[2]}x{c[3]}-{c[5]}" for c in CASES])
def test_attention_bf16_vs_float64_and_oracle(rng, monkeypatch, case, backward):
    monkeypatch.setenv("QLORA_ATTN_BACKWARD", backward)
    B, T, Hq, Hkv = case[:4]
    (q, k, v, mask, scale, dout), refs, bnds = float64_case(rng, case)
    r_out, r_lse, r_dq, r_dk, r_dv = refs
    out_in, lse_in = r_out.astype(np.float32), r_lse.astype(np.float32)  # the backward alone
    fin = np.isfinite(r_lse)
    res = {}
    for be in BF16_BACKENDS:
        out, lse, dq, dk, dv = res[be] = run(be, q, k, v, mask, Hq, Hkv, scale, dout, out_in, lse_in)
        check_vs_float64(f"{be} ", res[be], refs, bnds)
        # padding semantics as in fp32: no visible key -> out 0, dq 0; masked keys get no gradient
        none = np.isneginf(lse).transpose(0, 2, 1).reshape(B * T, Hq).any(1)
        assert np.all(out[none] == 0) and np.all(dq[none] == 0)
        assert np.all(dk[mask.reshape(-1) == 0] == 0) and np.all(dv[mask.reshape(-1) == 0] == 0)
    for be in BF16_BACKENDS:
        f32 = run(be, q, k, v, mask, Hq, Hkv, scale, dout, out_in, lse_in, cd="float32")
        # the scores stay fp32: lse is the fp32 mode's, bit for bit
        np.testing.assert_array_equal(res[be][1], f32[1])
        # the other products really are bf16: far from the fp32 mode's error
        for got, want32, want in zip(res[be][::2] + res[be][3:4], f32[::2] + f32[3:4], (r_out, r_dq, r_dv, r_dk)):
            assert rel(got, want) > 10 * rel(want32, want)
    if "cpu:avx512" in res:
        # kernels vs the oracle: the same roundings of values that differ only by fp32 summation order
        # and the SIMD exp (2 ulp), so now and then a bf16 rounding of P or dS (after the cancellation
        # in dP - delta) goes the other way. A flipped rounding moves that operand by one bf16 ulp
        # (<= 2u relative), so however many flip, the products differ by <= 2u relative (plus fp32
        # summation noise): bound 2u. Typically ~4e-5; CI seed 1245663613 gave 3.4e-4 on dv. A wrong
        # tile or panel would be off by O(1).
        for name, a, o in zip(("out", "lse", "dq", "dk", "dv"), res["cpu:avx512"], res["cpu:scalar"]):
            if name == "lse":
                a, o = a[fin], o[fin]
            assert rel(a, o.astype(np.float64)) < 2 * U, (name, rel(a, o.astype(np.float64)))


def test_attention_bf16_rejects_bad_compute_dtype(rng):
    q = randn(rng, 4, 8)
    mask = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="compute_dtype"):
        g.attention_train(q, q, q, mask, n_heads=1, n_kv_heads=1, scale=0.5, compute_dtype="bf16")
    out, lse = g.attention_train(q, q, q, mask, n_heads=1, n_kv_heads=1, scale=0.5)
    with pytest.raises(ValueError, match="compute_dtype"):
        g.attention_train_backward(q, q, q, mask, out, lse, q, n_heads=1, n_kv_heads=1, scale=0.5,
                                   compute_dtype="float16")


def test_attention_fp32_levels_ignore_bf16_without_units(rng):
    """Levels without bf16 units compute attention in fp32: bit-identical to compute_dtype="float32"."""
    B, T, Hq, Hkv, hd = 2, 40, 4, 2, 16
    q, k, v = randn(rng, B * T, Hq * hd), randn(rng, B * T, Hkv * hd), randn(rng, B * T, Hkv * hd)
    mask = make_mask("left", B, T, rng)
    dout = randn(rng, B * T, Hq * hd)
    for be in [b for b in ("cpu:generic", "cpu:avx2") if b in qlora_native.available_backends()]:
        out, lse = g.attention_train(q, k, v, mask, n_heads=Hq, n_kv_heads=Hkv, scale=0.25, backend=be)
        a = run(be, q, k, v, mask, Hq, Hkv, 0.25, dout, out, lse)
        b = run(be, q, k, v, mask, Hq, Hkv, 0.25, dout, out, lse, cd="float32")
        for x, y in zip(a, b):
            assert np.array_equal(x, y), be
