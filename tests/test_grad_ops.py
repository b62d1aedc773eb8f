"""Backward kernels for LoRA training (qlora_native._core.grad_ops): RMSNorm, RoPE and SwiGLU
gradients, and the training attention (forward with logsumexp + backward), against numpy float64
references written here (analytic formulas) and central finite differences of those references."""
import numpy as np
import pytest

import qlora_native
from qlora_native import _core

from conftest import cpu_backends

g = _core.grad_ops
EPS32 = float(np.finfo(np.float32).eps)


def assert_grad_close(ours, ref, K, name, c=8.0, mag=None):
    """fp32 result vs float64 reference: |err| <= c * sqrt(K) * eps32 * magnitude, where K is the
    reduction length behind each element and magnitude the reference's largest entry (or `mag`)."""
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    scale = float(np.abs(ref).max()) if mag is None else float(mag)
    tol = c * np.sqrt(K) * EPS32 * scale
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (scale {scale:.3g})"


def fd_grad(f, x, h=1e-6):
    """Central finite differences of the float64 scalar function f at x (float64)."""
    x = x.astype(np.float64).copy()
    out = np.empty_like(x)
    flat, of = x.reshape(-1), out.reshape(-1)
    for i in range(flat.size):
        x0 = flat[i]
        flat[i] = x0 + h
        fp = f(x)
        flat[i] = x0 - h
        fm = f(x)
        flat[i] = x0
        of[i] = (fp - fm) / (2 * h)
    return out


def randn(rng, *shape, std=1.0):
    return (rng.standard_normal(shape) * std).astype(np.float32)


# ----------------------------------------------------------------------------- float64 references


def rmsnorm_ref(x, w, eps):
    x = x.astype(np.float64)
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * r * w


def rmsnorm_bwd_ref(x, w, eps, dy):
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    D = x.shape[-1]
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return r * w * dy - x * r**3 / D * (w * dy * x).sum(-1, keepdims=True)


def rope_angles(pos, inv_freq):
    # As the engine (and transformers): angle = float32(pos) * inv_freq in fp32.
    return pos.astype(np.float32)[:, None] * inv_freq[None, :]


def rope_ref(x, pos, inv_freq, H, sign=1.0):
    a = rope_angles(pos, inv_freq).astype(np.float64)
    c, s = np.cos(a)[:, None, :], sign * np.sin(a)[:, None, :]
    M = x.shape[0]
    half = inv_freq.shape[0]
    xv = x.astype(np.float64).reshape(M, H, 2 * half)
    x1, x2 = xv[..., :half], xv[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).reshape(M, -1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu_bwd_ref(gt, up, dout):
    gt, up, dout = (a.astype(np.float64) for a in (gt, up, dout))
    s = 1.0 / (1.0 + np.exp(-gt))
    return dout * up * s * (1 + gt * (1 - s)), dout * gt * s


def attn_ref(q, k, v, mask, Hq, Hkv, scale):
    """Returns out [B*T, Hq*hd], lse [B, Hq, T], and P [B, Hq, T, T] (float64)."""
    B, T = mask.shape
    hd = q.shape[1] // Hq
    grp = Hq // Hkv
    q4 = q.astype(np.float64).reshape(B, T, Hq, hd).transpose(0, 2, 1, 3)
    k4 = np.repeat(k.astype(np.float64).reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3), grp, axis=1)  # head h -> h // grp
    v4 = np.repeat(v.astype(np.float64).reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3), grp, axis=1)
    S = scale * q4 @ k4.transpose(0, 1, 3, 2)  # [B, Hq, T, T]
    vis = np.tril(np.ones((T, T), bool))[None, None] & (mask[:, None, None, :] != 0)
    has = vis.any(-1)  # [B, Hq, T]
    mx = np.where(has, np.where(vis, S, -np.inf).max(-1), 0.0)
    e = np.where(vis, np.exp(S - mx[..., None]), 0.0)
    den = e.sum(-1)
    P = e / np.where(has, den, 1.0)[..., None]
    O = P @ v4
    lse = np.where(has, mx + np.log(np.where(has, den, 1.0)), -np.inf)
    return O.transpose(0, 2, 1, 3).reshape(B * T, Hq * hd), lse, P


def attn_bwd_ref(q, k, v, mask, Hq, Hkv, scale, dout):
    B, T = mask.shape
    hd = q.shape[1] // Hq
    grp = Hq // Hkv
    O, _, P = attn_ref(q, k, v, mask, Hq, Hkv, scale)
    heads = lambda a, H: a.astype(np.float64).reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # noqa: E731
    q4, dO4, O4 = heads(q, Hq), heads(dout, Hq), heads(O, Hq)
    k4 = np.repeat(heads(k, Hkv), grp, axis=1)
    v4 = np.repeat(heads(v, Hkv), grp, axis=1)
    dV = P.transpose(0, 1, 3, 2) @ dO4
    dP = dO4 @ v4.transpose(0, 1, 3, 2)
    dS = P * (dP - (dO4 * O4).sum(-1, keepdims=True))
    dQ = scale * dS @ k4
    dK = scale * dS.transpose(0, 1, 3, 2) @ q4
    flat = lambda a, H: a.transpose(0, 2, 1, 3).reshape(B * T, H * hd)  # noqa: E731
    kv_sum = lambda a: a.reshape(B, Hkv, grp, T, hd).sum(2)  # noqa: E731
    return flat(dQ, Hq), flat(kv_sum(dK), Hkv), flat(kv_sum(dV), Hkv)


def make_mask(kind, B, T, rng):
    m = np.ones((B, T), np.int32)
    for b in range(B):
        n_pad = 0 if b == 0 else int(rng.integers(1, T - 1))
        if kind == "left":
            m[b, :n_pad] = 0
        elif kind == "right":
            m[b, T - n_pad:] = 0
    return m


# ----------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("M,D", [(1, 8), (7, 96), (33, 130)])
def test_rmsnorm_backward_matches_reference(rng, M, D):
    x, dy = randn(rng, M, D), randn(rng, M, D)
    w = (1.0 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    eps = 1e-5
    dx = g.rmsnorm_backward(x, w, dy, eps=eps)
    assert dx.dtype == np.float32 and dx.shape == (M, D)
    assert_grad_close(dx, rmsnorm_bwd_ref(x, w, eps, dy), D, "dx")


def test_rmsnorm_backward_finite_differences(rng):
    M, D, eps = 3, 6, 1e-2
    x, dy = randn(rng, M, D), randn(rng, M, D)
    w = (1.0 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    fd = fd_grad(lambda xx: float((rmsnorm_ref(xx, w.astype(np.float64), eps) * dy).sum()), x)
    assert_grad_close(g.rmsnorm_backward(x, w, dy, eps=eps), fd, D, "dx vs finite differences")


# ----------------------------------------------------------------------------- RoPE


def rope_inputs(rng, M, H, hd):
    pos = rng.integers(0, 4096, M).astype(np.int32)
    inv_freq = (10000.0 ** (-np.arange(0, hd, 2) / hd)).astype(np.float32)
    return randn(rng, M, H * hd), pos, inv_freq


@pytest.mark.parametrize("M,H,hd", [(1, 1, 2), (9, 3, 16), (20, 4, 64)])
def test_rope_backward_is_inverse_rotation(rng, M, H, hd):
    dy, pos, inv_freq = rope_inputs(rng, M, H, hd)
    dx = g.rope_backward(dy, pos, inv_freq, n_heads=H)
    assert_grad_close(dx, rope_ref(dy, pos, inv_freq, H, sign=-1.0), 2, "dx")
    # The transpose of an orthogonal rotation is its inverse: rotating dx forward gives dy back.
    assert_grad_close(rope_ref(dx, pos, inv_freq, H), dy.astype(np.float64), 4, "rope(rope_backward(dy))")


def test_rope_backward_pairs_with_engine_rope(rng):
    M, H, hd = 12, 3, 32
    x, pos, inv_freq = rope_inputs(rng, M, H, hd)
    y = g.rope_forward(x, pos, inv_freq, n_heads=H)  # the model's forward op
    assert_grad_close(y, rope_ref(x, pos, inv_freq, H), 2, "engine rope vs reference")
    assert_grad_close(g.rope_backward(y, pos, inv_freq, n_heads=H), x.astype(np.float64), 4, "rope_backward(rope(x))")


def test_rope_backward_finite_differences(rng):
    M, H, hd = 4, 2, 6
    x, pos, inv_freq = rope_inputs(rng, M, H, hd)
    dy = randn(rng, M, H * hd)
    fd = fd_grad(lambda xx: float((rope_ref(xx, pos, inv_freq, H) * dy).sum()), x)
    assert_grad_close(g.rope_backward(dy, pos, inv_freq, n_heads=H), fd, 2, "dx vs finite differences")


# ----------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("backend", [b for b in qlora_native.available_backends() if b.startswith("cpu")])
@pytest.mark.parametrize("M,N", [(1, 5), (3, 16), (13, 200), (8, 1536)])
def test_swiglu_forward_matches_reference(rng, backend, M, N):
    """silu(gate) * up at every CPU level (SIMD exp at AVX2 / AVX-512) against float64, over gates
    from -120 to 120 (exp under- and overflow in fp32) and typical ones. Error bound: a few ulp of
    exp (2) and of the product and division (3) relative to |out| (the 1 / (1 + e) factor only
    damps exp's error); the fp32 inputs are exact in float64."""
    gt = randn(rng, M, N, std=3.0)
    gt.flat[: min(gt.size, 6)] = np.array([-120.0, -90.0, -30.0, 30.0, 90.0, 120.0], np.float32)[: min(gt.size, 6)]
    up = randn(rng, M, N)
    got = g.swiglu(gt, up, backend=backend).astype(np.float64)
    g64, u64 = gt.astype(np.float64), up.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = g64 * u64 / (1.0 + np.exp(-g64))
    # Where exp(-gate) exceeds fp32's range (gate < -88.7) fp32 gives 0 for a true value below
    # |gate * up| / FLT_MAX: that much absolute slack.
    bound = 8 * float(np.finfo(np.float32).eps) * np.abs(ref) + np.abs(g64 * u64) / float(np.finfo(np.float32).max)
    bad = np.abs(got - ref) > bound
    assert not bad.any(), (backend, gt[bad][:5], got[bad][:5], ref[bad][:5])


@pytest.mark.parametrize("M,N", [(1, 5), (13, 200)])
def test_swiglu_backward_matches_reference(rng, M, N):
    gt, up, dout = randn(rng, M, N, std=3.0), randn(rng, M, N), randn(rng, M, N)
    dg, du = g.swiglu_backward(gt, up, dout)
    rg, ru = swiglu_bwd_ref(gt, up, dout)
    assert_grad_close(dg, rg, 4, "dgate")
    assert_grad_close(du, ru, 4, "dup")


def test_swiglu_backward_finite_differences(rng):
    gt, up, dout = randn(rng, 3, 7, std=3.0), randn(rng, 3, 7), randn(rng, 3, 7)
    up64, g64 = up.astype(np.float64), gt.astype(np.float64)
    fd_g = fd_grad(lambda a: float((silu(a) * up64 * dout).sum()), gt)
    fd_u = fd_grad(lambda a: float((silu(g64) * a * dout).sum()), up)
    dg, du = g.swiglu_backward(gt, up, dout)
    assert_grad_close(dg, fd_g, 4, "dgate vs finite differences")
    assert_grad_close(du, fd_u, 4, "dup vs finite differences")


# ----------------------------------------------------------------------------- training attention


def attn_inputs(rng, B, T, Hq, Hkv, hd, kind):
    q, k, v = randn(rng, B * T, Hq * hd), randn(rng, B * T, Hkv * hd), randn(rng, B * T, Hkv * hd)
    return q, k, v, make_mask(kind, B, T, rng), float(1.0 / np.sqrt(hd))


@pytest.mark.parametrize("backend", cpu_backends())  # the tile products use that level's GEMMs
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (6, 2), (3, 1)], ids=["gqa1", "gqa2", "gqa3", "mqa3"])
@pytest.mark.parametrize("kind", ["none", "left", "right"])
def test_attention_train_forward_and_backward(rng, backend, Hq, Hkv, kind):
    # T = 70: two 64-row tiles and a partial one; hd = 20: not a multiple of 8
    check_attention_train(rng, backend, 3, 70, Hq, Hkv, 20, kind)


def check_attention_train(rng, backend, B, T, Hq, Hkv, hd, kind):
    """attention_train / attention_train_backward on `backend` vs the float64 references (fp32 bounds),
    and the padding rules: a query with no visible key outputs 0 and gets gradient 0; masked keys get none."""
    q, k, v, mask, scale = attn_inputs(rng, B, T, Hq, Hkv, hd, kind)
    out, lse = g.attention_train(q, k, v, mask, n_heads=Hq, n_kv_heads=Hkv, scale=scale, backend=backend)
    r_out, r_lse, _ = attn_ref(q, k, v, mask, Hq, Hkv, scale)
    assert_grad_close(out, r_out, T * hd, "out")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(r_lse))
    fin = np.isfinite(r_lse)
    assert_grad_close(lse[fin], r_lse[fin], hd, "lse", mag=max(1.0, float(np.abs(r_lse[fin]).max())))

    dout = randn(rng, B * T, Hq * hd)
    dq, dk, dv = g.attention_train_backward(q, k, v, mask, out, lse, dout, n_heads=Hq, n_kv_heads=Hkv, scale=scale,
                                            backend=backend)
    r_dq, r_dk, r_dv = attn_bwd_ref(q, k, v, mask, Hq, Hkv, scale, dout)
    K = T * hd * (Hq // Hkv)
    assert_grad_close(dq, r_dq, K, "dq")
    assert_grad_close(dk, r_dk, K, "dk")
    assert_grad_close(dv, r_dv, K, "dv")
    none_visible = np.isneginf(lse).transpose(0, 2, 1).reshape(B * T, Hq)  # [B*T, Hq]
    if kind == "left":
        assert none_visible.any()
    rows = none_visible.any(1)
    assert np.all(out[rows] == 0) and np.all(dq[rows] == 0)
    masked_keys = mask.reshape(-1) == 0
    assert np.all(dk[masked_keys] == 0) and np.all(dv[masked_keys] == 0)


@pytest.mark.parametrize("Hq,Hkv,kind", [(4, 2, "left"), (6, 2, "right"), (3, 3, "none")])
def test_attention_train_matches_inference_attention(rng, Hq, Hkv, kind):
    # Same semantics as the model's KV-cache attention (start = 0, cache = the sequence).
    B, T, hd = 2, 40, 24
    q, k, v, mask, scale = attn_inputs(rng, B, T, Hq, Hkv, hd, kind)
    out, _ = g.attention_train(q, k, v, mask, n_heads=Hq, n_kv_heads=Hkv, scale=scale)
    ref = g.attention_cached(q, k, v, mask, n_heads=Hq, n_kv_heads=Hkv, scale=scale)
    assert_grad_close(out, ref.astype(np.float64), T * hd, "attention_train vs attention")
    np.testing.assert_array_equal(out == 0, ref == 0)


@pytest.mark.parametrize("Hq,Hkv,kind", [(2, 2, "left"), (4, 2, "right"), (3, 1, "left")])
def test_attention_train_backward_finite_differences(rng, Hq, Hkv, kind):
    B, T, hd = 2, 5, 4
    q, k, v, mask, scale = attn_inputs(rng, B, T, Hq, Hkv, hd, kind)
    dout = randn(rng, B * T, Hq * hd)
    out, lse = g.attention_train(q, k, v, mask, n_heads=Hq, n_kv_heads=Hkv, scale=scale)
    dq, dk, dv = g.attention_train_backward(q, k, v, mask, out, lse, dout, n_heads=Hq, n_kv_heads=Hkv, scale=scale)
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))

    def loss(qq, kk, vv):
        return float((attn_ref(qq, kk, vv, mask, Hq, Hkv, scale)[0] * dout).sum())

    K = T * hd * (Hq // Hkv)
    assert_grad_close(dq, fd_grad(lambda a: loss(a, k64, v64), q), K, "dq vs finite differences")
    assert_grad_close(dk, fd_grad(lambda a: loss(q64, a, v64), k), K, "dk vs finite differences")
    assert_grad_close(dv, fd_grad(lambda a: loss(q64, k64, a), v), K, "dv vs finite differences")


def test_attention_train_thread_count_invariant(rng):
    B, T, Hq, Hkv, hd = 2, 150, 4, 2, 8
    q, k, v, mask, scale = attn_inputs(rng, B, T, Hq, Hkv, hd, "left")
    dout = randn(rng, B * T, Hq * hd)
    n0 = qlora_native.num_threads()
    results = []
    try:
        for n in (1, 3):
            qlora_native.set_num_threads(n)
            out, lse = g.attention_train(q, k, v, mask, n_heads=Hq, n_kv_heads=Hkv, scale=scale)
            grads = g.attention_train_backward(q, k, v, mask, out, lse, dout, n_heads=Hq, n_kv_heads=Hkv, scale=scale)
            results.append((out, lse, *grads))
    finally:
        qlora_native.set_num_threads(n0)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)  # each row is computed by the same code whatever the split


# ----------------------------------------------------------------------------- bad input


def test_grad_ops_reject_bad_input(rng):
    x, w, dy = randn(rng, 4, 8), randn(rng, 8), randn(rng, 4, 8)
    with pytest.raises(ValueError, match="float32"):
        g.rmsnorm_backward(x.astype(np.float64), w, dy, eps=1e-5)
    with pytest.raises(ValueError, match="shape"):
        g.rmsnorm_backward(x, w[:7], dy, eps=1e-5)
    bad = dy.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        g.rmsnorm_backward(x, w, bad, eps=1e-5)
    pos = np.arange(4, dtype=np.int32)
    with pytest.raises(ValueError, match="int32"):
        g.rope_backward(dy, pos.astype(np.int64), np.ones(4, np.float32), n_heads=1)
    with pytest.raises(ValueError, match="columns"):
        g.rope_backward(dy, pos, np.ones(3, np.float32), n_heads=1)
    with pytest.raises(ValueError, match="shape"):
        g.swiglu_backward(x, x[:3], dy)
    q, k, v, mask, scale = attn_inputs(rng, 2, 4, 3, 2, 4, "none")
    with pytest.raises(ValueError, match="multiple"):
        g.attention_train(q, k, v, mask, n_heads=3, n_kv_heads=2, scale=scale)
    q, k, v, mask, scale = attn_inputs(rng, 2, 4, 4, 2, 4, "none")
    with pytest.raises(ValueError, match="shape"):
        g.attention_train(q, k[:-1], v, mask, n_heads=4, n_kv_heads=2, scale=scale)
    out, lse = g.attention_train(q, k, v, mask, n_heads=4, n_kv_heads=2, scale=scale)
    with pytest.raises(ValueError, match="shape"):
        g.attention_train_backward(q, k, v, mask, out, lse[:, :2], out, n_heads=4, n_kv_heads=2, scale=scale)
