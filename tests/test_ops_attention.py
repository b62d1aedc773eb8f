"""Inference KV-cache attention (Backend::attention, via grad_ops.attention_kv) on every CPU
backend against a numpy float64 reference: decode, chunked prefill and full prefill, GQA ratios
1/3/4, several head dims (odd ones included), left padding and masked holes, rows that see no
key (exact zeros), long contexts and thread-count invariance."""
import numpy as np
import pytest

import qlora_native
from qlora_native import _core

from conftest import all_backends, cpu_backends

g = _core.grad_ops
EPS32 = float(np.finfo(np.float32).eps)
LOG2E = 1.4426950408889634


def host_only(backend):
    if not backend.startswith("cpu"):
        pytest.skip("attention_kv takes numpy arrays: host backends only")


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def attn_kv_ref(q, kc, vc, mask, start, Hq, Hkv, scale):
    """float64 reference: out[B*T, Hq*hd] and dead[B, T, Hq] (query sees no key)."""
    B, _, S_cap, hd = kc.shape
    T = q.shape[0] // B
    G = Hq // Hkv
    q64 = q.astype(np.float64).reshape(B, T, Hq, hd)
    k64 = np.repeat(kc.astype(np.float64), G, axis=1)  # [B, Hq, S_cap, hd]: head h reads kv head h // G
    v64 = np.repeat(vc.astype(np.float64), G, axis=1)
    s = np.einsum("bthd,bhsd->bhts", q64, k64) * scale  # [B, Hq, T, S_cap]
    vis = (np.arange(S_cap)[None, :] <= (start + np.arange(T))[:, None])[None] & (mask[:, None, :] != 0)
    vis = np.broadcast_to(vis[:, None], s.shape)  # [B, Hq, T, S_cap]: causal and unmasked
    s = np.where(vis, s, -np.inf)
    m = s.max(-1, keepdims=True)
    dead = np.isneginf(m)
    p = np.where(vis, np.exp(s - np.where(dead, 0.0, m)), 0.0)
    den = p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bhsd->bthd", p, v64) / np.where(dead, 1.0, den).transpose(0, 2, 1, 3)
    # |scale * q . k| summed by magnitude, per visible (query, key): drives the score rounding error.
    a = np.einsum("bthd,bhsd->bhts", np.abs(q64), np.abs(k64)) * scale
    A = float(np.where(vis, a, 0.0).max())
    return o.reshape(B * T, Hq * hd), dead[..., 0].transpose(0, 2, 1), A


def tolerance(A, hd, n_keys, vmax):
    """Worst-case absolute fp32 error of one output element (in the units of v).
    Scores: the query is pre-scaled by fl(scale*log2 e) (2 roundings) and dotted over hd terms,
    so |d score| <= (hd + 2) eps A (A = max of scale * sum_i |q_i k_i| over visible pairs). The
    weight exp(s - max) then has relative error <= 2 (hd + 2) eps A (s and the max)
    + eps |s - max| (<= 2A) + 1 ulp (exp2: the SIMD polynomial is < 0.87 ulp over all fp32
    inputs in [-126, 0]; std::exp2 is better). Perturbing the weights of a weighted average by a
    relative e moves it by <= 2 e max|v|. The weighted V sum and the denominator over n keys in
    fp32 add <= (2n + 2) eps max|v| (normalization included). Linear worst-case bounds, so of
    order (hd * A + n) eps max|v|; no tuning constant."""
    e_w = 2 * (hd + 2) * A + 2 * A + 1
    return EPS32 * vmax * (2 * e_w + 2 * n_keys + 2)


def check(out, q, kc, vc, mask, start, Hq, Hkv, scale):
    ref, dead, A = attn_kv_ref(q, kc, vc, mask, start, Hq, Hkv, scale)
    assert out.shape == ref.shape and out.dtype == np.float32
    B, _, S_cap, hd = kc.shape
    T = q.shape[0] // B
    tol = tolerance(A, hd, start + T, float(np.abs(vc).max()))
    err = float(np.abs(out.astype(np.float64) - ref).max())
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"
    # A query with no visible key outputs exactly 0 (and the others are not all zero).
    o4 = out.reshape(B, T, Hq, hd)
    assert np.all(o4[dead] == 0)
    assert np.all(np.abs(o4[~dead]).max(-1) > 0)
    return dead


def make_mask(rng, B, S_cap, start, T):
    """[B, S_cap] int32 key mask: row 0 full, row 1 short left pad, row 2 long left pad (past the
    first prefill queries) plus random holes, row 3 (if any) all masked; slots past start+T random."""
    mask = np.ones((B, S_cap), np.int32)
    if B > 1:
        mask[1, : int(rng.integers(1, 6))] = 0
    if B > 2:
        mask[2, : min(S_cap, max(start + 1, 12)) - 1] = 0  # only slot >= pad-end visible: decode still sees keys
        holes = rng.random(S_cap) < 0.2
        mask[2, holes] = 0
    if B > 3:
        mask[3] = 0
    # The caller never reads slots past start+T as keys; random values there must not matter.
    mask[:, start + T :] = rng.integers(0, 2, size=(B, S_cap - start - T))
    return mask


MODES = {  # (S_cap, start, T)
    "decode": (50, 41, 1),
    "chunk": (60, 23, 7),
    "prefill": (45, 0, 45),
}


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("Hq,Hkv", [(3, 3), (9, 3), (8, 2)], ids=["gqa1", "gqa3", "gqa4"])
@pytest.mark.parametrize("hd", [64, 24, 80, 128, 20])
@pytest.mark.parametrize("mode", list(MODES))
def test_attention_kv_matches_reference(rng, backend, Hq, Hkv, hd, mode):
    host_only(backend)
    S_cap, start, T = MODES[mode]
    B = 4
    q = randn(rng, B * T, Hq * hd)
    kc, vc = randn(rng, B, Hkv, S_cap, hd), randn(rng, B, Hkv, S_cap, hd)
    mask = make_mask(rng, B, S_cap, start, T)
    scale = float(1.0 / np.sqrt(hd))
    out = g.attention_kv(q, kc, vc, mask, start=start, n_heads=Hq, n_kv_heads=Hkv, scale=scale, backend=backend)
    dead = check(out, q, kc, vc, mask, start, Hq, Hkv, scale)
    assert dead[3].all() and not dead[0].any()  # the all-masked row, the unpadded row
    if mode == "prefill":
        assert dead[2, 0].all()  # queries inside row 2's left padding see no key


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("start,T", [(699, 1), (650, 33), (0, 700)], ids=["decode", "chunk", "prefill"])
def test_attention_kv_long_context(rng, backend, start, T):
    host_only(backend)
    B, Hq, Hkv, hd, S_cap = 2, 9, 3, 64, 700
    q = randn(rng, B * T, Hq * hd)
    kc, vc = randn(rng, B, Hkv, S_cap, hd), randn(rng, B, Hkv, S_cap, hd)
    mask = make_mask(rng, B, S_cap, start, T)
    scale = float(1.0 / np.sqrt(hd))
    out = g.attention_kv(q, kc, vc, mask, start=start, n_heads=Hq, n_kv_heads=Hkv, scale=scale, backend=backend)
    check(out, q, kc, vc, mask, start, Hq, Hkv, scale)


@pytest.mark.parametrize("backend", all_backends())
def test_attention_kv_peaked_scores(rng, backend):
    # Large scores (softmax close to one-hot, big max subtraction): no overflow, still accurate.
    host_only(backend)
    B, Hq, Hkv, hd, S_cap, start, T = 2, 4, 2, 32, 80, 70, 3
    q = randn(rng, B * T, Hq * hd) * 4
    kc, vc = randn(rng, B, Hkv, S_cap, hd) * 4, randn(rng, B, Hkv, S_cap, hd)
    mask = make_mask(rng, B, S_cap, start, T)
    scale = float(1.0 / np.sqrt(hd))
    out = g.attention_kv(q, kc, vc, mask, start=start, n_heads=Hq, n_kv_heads=Hkv, scale=scale, backend=backend)
    check(out, q, kc, vc, mask, start, Hq, Hkv, scale)


@pytest.mark.parametrize("backend", cpu_backends())
def test_attention_kv_thread_count_invariant(rng, backend):
    B, Hq, Hkv, hd, S_cap = 3, 9, 3, 40, 150
    kc, vc = randn(rng, B, Hkv, S_cap, hd), randn(rng, B, Hkv, S_cap, hd)
    scale = float(1.0 / np.sqrt(hd))
    n0 = qlora_native.num_threads()
    for start, T in [(0, 140), (120, 1), (100, 9)]:
        q = randn(rng, B * T, Hq * hd)
        mask = make_mask(rng, B, S_cap, start, T)
        outs = []
        try:
            for n in (1, 3):
                qlora_native.set_num_threads(n)
                outs.append(g.attention_kv(q, kc, vc, mask, start=start, n_heads=Hq, n_kv_heads=Hkv, scale=scale,
                                           backend=backend))
        finally:
            qlora_native.set_num_threads(n0)
        np.testing.assert_array_equal(outs[0], outs[1])


def test_attention_kv_rejects_bad_input(rng):
    B, Hq, Hkv, hd, S_cap = 2, 4, 2, 8, 10
    q = randn(rng, B, Hq * hd)
    kc, vc = randn(rng, B, Hkv, S_cap, hd), randn(rng, B, Hkv, S_cap, hd)
    mask = np.ones((B, S_cap), np.int32)
    kw = dict(n_heads=Hq, n_kv_heads=Hkv, scale=0.3)
    g.attention_kv(q, kc, vc, mask, start=S_cap - 1, **kw)  # the last slot: fine
    with pytest.raises(ValueError, match="start"):
        g.attention_kv(q, kc, vc, mask, start=S_cap, **kw)
    with pytest.raises(ValueError, match="start"):
        g.attention_kv(q, kc, vc, mask, start=-1, **kw)
    with pytest.raises(ValueError, match="multiple"):
        g.attention_kv(q, kc, vc, mask, start=0, n_heads=3, n_kv_heads=2, scale=0.3)
    with pytest.raises(ValueError, match="float32"):
        g.attention_kv(q.astype(np.float64), kc, vc, mask, start=0, **kw)
    with pytest.raises(ValueError, match="key_mask"):
        g.attention_kv(q, kc, vc, mask[:, :-1], start=0, **kw)
    with pytest.raises(ValueError, match="v_cache"):
        g.attention_kv(q, kc, vc[:, :, :-1], mask, start=0, **kw)
    with pytest.raises(ValueError, match="q"):
        g.attention_kv(q[:, :-1], kc, vc, mask, start=0, **kw)
    bad = kc.copy()
    bad[1, 0, 3, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        g.attention_kv(q, bad, vc, mask, start=0, **kw)
