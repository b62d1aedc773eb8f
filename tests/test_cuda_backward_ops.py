"""Training ops in the op harness (issue 11): RMSNorm / SwiGLU backward, the training attention and
its backward (from the stored logsumexp), and LoRA dropout, on every backend against a numpy
float64 reference; and the device code path of a training pass (cpu:devsim: host_memory() false,
exactly the CUDA op table) against the CPU backend.

Each op runs through _core.backend_op (arrays in guarded backend buffers: a write outside an output
raises). "cuda" skips without a GPU. Tolerances are fp32 bounds: eps32 times a term count times
the magnitude the result is built from (sums of |terms|), so a wrong element or a missed term
(an O(1) relative error) fails; dropout is exact (the same Philox mask, the same two roundings).
"""
import os
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import _core

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers_ops import EPS32  # noqa: E402
from helpers_ops import HARNESS_BACKENDS as BACKENDS  # noqa: E402
from helpers_ops import be as _be, run as _run, within as _within  # noqa: E402,F401

TRAIN_OPS = ["rmsnorm_backward", "rope_backward", "swiglu_backward", "attention_train", "attention_train_backward",
             "cross_entropy_rows", "lora_dropout", "lora_dropout_backward"]


def _strided(rng, rows, cols, ld, scale=1.0):
    """[rows, ld] float32 with the payload in [:, :cols] (the rest is padding the op must not touch)."""
    a = (rng.standard_normal((rows, ld)) * scale).astype(np.float32)
    return a, a[:, :cols].astype(np.float64)


# ------------------------------------------------------------------ table


def test_training_ops_in_tables():
    """cpu and cpu:devsim (= the CUDA table) have every training op; a CUDA build's table too."""
    for op in TRAIN_OPS:
        assert op in _core.all_backend_ops()
        assert op in _core.backend_ops("cpu") and op in _core.backend_ops("cpu:devsim"), op
    if _core.cuda_compiled():
        assert _core.backend_ops("cuda") == _core.backend_ops("cpu:devsim")


# ------------------------------------------------------------------ RMSNorm backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,D", [(1, 7), (13, 64), (5, 1000)])
def test_op_rmsnorm_backward(backend, rng, M, D):
    x = rng.standard_normal((M, D)).astype(np.float32)
    x[0] *= 1e-3  # a small row: eps matters
    w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    dy = rng.standard_normal((M, D)).astype(np.float32)
    eps = 1e-5
    got = _run(_be(backend), "rmsnorm_backward", {"x": x, "w": w, "dy": dy, "dx": np.zeros((M, D), np.float32)},
               {"M": M, "D": D}, {"eps": eps})["dx"]
    x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    r = 1.0 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + np.float64(np.float32(eps)))
    c = (w64 * g64 * x64).mean(axis=1, keepdims=True) * r ** 3
    ref = r * w64 * g64 - c * x64
    mag = r * np.abs(w64 * g64) + (np.abs(w64 * g64 * x64).mean(axis=1, keepdims=True) * r ** 3) * np.abs(x64)
    _within(got, ref, 32 * EPS32 * mag + 1e-30, "rmsnorm_backward")


# ------------------------------------------------------------------ SwiGLU backward


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_swiglu_backward(backend, rng):
    M, N = 9, 131
    gate, g = _strided(rng, M, N, N + 3, 2.0)
    up, u = _strided(rng, M, N, N + 1)
    dout, d = _strided(rng, M, N, N + 5)
    gate[0, :4] = [0.0, -30.0, 30.0, 88.0]  # sigmoid's flat ends
    g[0, :4] = gate[0, :4]
    dgate0 = np.full((M, N + 2), 7.0, np.float32)
    dup0 = np.full((M, N + 4), 7.0, np.float32)
    res = _run(_be(backend), "swiglu_backward", {"gate": gate, "up": up, "dout": dout, "dgate": dgate0, "dup": dup0},
               {"M": M, "N": N, "ldg": N + 3, "ldu": N + 1, "ldd": N + 5, "lddg": N + 2, "lddu": N + 4})
    s = 1.0 / (1.0 + np.exp(-g))
    ref_du = d * g * s
    ref_dg = d * u * s * (1.0 + g * (1.0 - s))
    # exp within a few ulp (fast-math exp on the GPU: ~2 + 1.2|g| ulp); every term is bounded by (1 + |g|)
    tol_du = 64 * EPS32 * np.abs(d) * (1.0 + np.abs(g)) + 1e-30
    tol_dg = 64 * EPS32 * np.abs(d * u) * (1.0 + np.abs(g)) + 1e-30
    _within(res["dup"][:, :N], ref_du, tol_du, "swiglu_backward dup")
    _within(res["dgate"][:, :N], ref_dg, tol_dg, "swiglu_backward dgate")
    assert (res["dup"][:, N:] == 7.0).all() and (res["dgate"][:, N:] == 7.0).all(), "padding columns written"


# ------------------------------------------------------------------ training attention


def _attn_case(rng, B, T, Hq, Hkv, hd, pad):
    """q/k/v with row strides wider than the heads, key mask with left padding (row 1) and a masked
    key in the middle (row 0)."""
    ldq, ldk, ldv = Hq * hd + 3, Hkv * hd + 1, Hkv * hd + 2
    q = rng.standard_normal((B * T, ldq)).astype(np.float32)
    k = rng.standard_normal((B * T, ldk)).astype(np.float32)
    v = rng.standard_normal((B * T, ldv)).astype(np.float32)
    km = np.ones((B, T), np.int32)
    if B > 1 and pad:
        km[1, :pad] = 0  # queries 0..pad-1 of row 1 see no key: out 0, lse -inf, gradient 0
    if T > 4:
        km[0, T // 2] = 0
    return q, k, v, km, (ldq, ldk, ldv)


def _attn_ref(q, k, v, km, B, T, Hq, Hkv, hd, scale):
    """float64: out [B*T, Hq*hd], lse [B, Hq, T], P [B, Hq, T, T], |score| sums Sabs [B, Hq, T, T]."""
    g = Hq // Hkv
    Q = q[:, :Hq * hd].astype(np.float64).reshape(B, T, Hq, hd)
    K = k[:, :Hkv * hd].astype(np.float64).reshape(B, T, Hkv, hd)
    V = v[:, :Hkv * hd].astype(np.float64).reshape(B, T, Hkv, hd)
    out = np.zeros((B, T, Hq, hd))
    lse = np.full((B, Hq, T), -np.inf)
    P = np.zeros((B, Hq, T, T))
    Sabs = np.zeros((B, Hq, T, T))
    vis = np.tril(np.ones((T, T), bool))
    for b in range(B):
        vb = vis & (km[b] != 0)[None, :]
        for h in range(Hq):
            kh = h // g
            S = scale * Q[b, :, h] @ K[b, :, kh].T
            Sabs[b, h] = scale * np.abs(Q[b, :, h]) @ np.abs(K[b, :, kh]).T
            S = np.where(vb, S, -np.inf)
            mx = S.max(axis=1, keepdims=True)
            has = np.isfinite(mx[:, 0])
            e = np.where(vb, np.exp(S - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
            den = e.sum(axis=1)
            lse[b, h, has] = mx[has, 0] + np.log(den[has])
            P[b, h, has] = e[has] / den[has, None]
            out[b, :, h] = P[b, h] @ V[b, :, kh]
    return out.reshape(B * T, Hq * hd), lse, P, Sabs


ATTN_CASES = [  # B, T, Hq, Hkv, hd, left padding of row 1
    (2, 37, 4, 2, 16, 3),
    (1, 1, 2, 1, 8, 0),
    (2, 20, 6, 2, 40, 20),  # row 1 fully padded; hd not a multiple of 32
    (1, 70, 2, 2, 128, 0),
]


def _attn_rel(Sabs, T, hd):
    """Relative fp32 error allowance per (b, h, t): term counts plus the score roundings an exp amplifies."""
    return EPS32 * (4 * (T + hd) + 64 + 4 * hd * Sabs.max(axis=3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}T{}Hq{}Hkv{}hd{}pad{}".format(*c))
def test_op_attention_train(backend, rng, case):
    B, T, Hq, Hkv, hd, pad = case
    q, k, v, km, (ldq, ldk, ldv) = _attn_case(rng, B, T, Hq, Hkv, hd, pad)
    scale = 1.0 / np.sqrt(hd)
    ldo = Hq * hd + 4
    res = _run(_be(backend), "attention_train",
               {"q": q, "k": k, "v": v, "key_mask": km, "out": np.full((B * T, ldo), 5.0, np.float32),
                "lse": np.zeros(B * Hq * T, np.float32)},
               {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "hd": hd, "ldq": ldq, "ldk": ldk, "ldv": ldv, "ldo": ldo},
               {"scale": float(scale)})
    out, lse, P, Sabs = _attn_ref(q, k, v, km, B, T, Hq, Hkv, hd, np.float64(np.float32(scale)))
    rel = _attn_rel(Sabs, T, hd)  # [B, Hq, T]
    g = Hq // Hkv
    V = np.abs(v[:, :Hkv * hd].astype(np.float64)).reshape(B, T, Hkv, hd)
    mag = np.stack([np.stack([P[b, h] @ V[b, :, h // g] for h in range(Hq)], axis=1) for b in range(B)])
    tol = (rel.transpose(0, 2, 1)[..., None] * mag).reshape(B * T, Hq * hd) + 1e-30
    _within(res["out"][:, :Hq * hd], out, tol, "attention_train out")
    assert (res["out"][:, Hq * hd:] == 5.0).all(), "padding columns of out written"
    got_lse = res["lse"].reshape(B, Hq, T)
    none = np.isneginf(lse)
    assert np.array_equal(np.isneginf(got_lse), none), "lse = -inf exactly where a query sees no key"
    _within(got_lse[~none], lse[~none], (rel * (1.0 + np.abs(lse)))[~none], "attention_train lse")
    if none.any():
        rows = np.repeat(none.transpose(0, 2, 1)[..., None], hd, axis=3).reshape(B * T, Hq * hd)
        assert (res["out"][:, :Hq * hd][rows] == 0.0).all(), "a query with no visible key must get 0"


# Backward-only shapes for the CUDA tiled kernels' edges (tiles: 64-dim heads 64 keys x 16 rows
# (dK/dV) and 16 keys x 64 rows (dQ); 128-dim heads 32 x 16 and 16 x 32; rows are (query, group
# head) pairs): T not a multiple of any tile, GQA groups of 3 and 4 (Llama-3's 32/8 ratio), hd at
# and below a tile's head width, a fully padded batch row, and hd > 128 (the untiled kernels).
ATTN_BWD_CASES = ATTN_CASES + [
    (2, 83, 8, 2, 64, 5),
    (1, 50, 8, 2, 128, 0),
    (2, 33, 3, 1, 96, 33),
    (1, 19, 2, 1, 160, 0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ATTN_BWD_CASES, ids=lambda c: "B{}T{}Hq{}Hkv{}hd{}pad{}".format(*c))
def test_op_attention_train_backward(backend, rng, case):
    _check_attention_backward(_be(backend), rng, case)


@pytest.mark.parametrize("path", ["tiled", "reference"])
@pytest.mark.parametrize("case", ATTN_BWD_CASES, ids=lambda c: "B{}T{}Hq{}Hkv{}hd{}pad{}".format(*c))
def test_op_attention_train_backward_cuda_paths(monkeypatch, rng, case, path):
    """Both CUDA backward paths against float64: the tiled kernels (default for head_dim <= 128)
    and the untiled reference kernels (QLORA_CUDA_ATTN_BACKWARD=reference, read at each call)."""
    _be("cuda")
    if path == "reference":
        monkeypatch.setenv("QLORA_CUDA_ATTN_BACKWARD", "reference")
    else:
        monkeypatch.delenv("QLORA_CUDA_ATTN_BACKWARD", raising=False)
    _check_attention_backward("cuda", rng, case)


def _bwd_inputs(rng, B, T, Hq, Hkv, hd, pad, backend):
    """Inputs of attention_train_backward with out/lse from `backend`'s own forward (contiguous rows)."""
    q, k, v, km, _ = _attn_case(rng, B, T, Hq, Hkv, hd, pad)
    q, k, v = (np.ascontiguousarray(x[:, :w]) for x, w in ((q, Hq * hd), (k, Hkv * hd), (v, Hkv * hd)))
    scale = float(np.float32(1.0 / np.sqrt(hd)))
    ints = {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "hd": hd, "ldq": Hq * hd, "ldk": Hkv * hd, "ldv": Hkv * hd,
            "ldo": Hq * hd}
    fwd = _run(backend, "attention_train", {"q": q, "k": k, "v": v, "key_mask": km,
                                            "out": np.zeros((B * T, Hq * hd), np.float32),
                                            "lse": np.zeros(B * Hq * T, np.float32)}, ints, {"scale": scale})
    dout = rng.standard_normal((B * T, Hq * hd)).astype(np.float32)
    arrays = {"q": q, "k": k, "v": v, "key_mask": km, "out": fwd["out"], "lse": fwd["lse"], "dout": dout,
              "dq": np.zeros((B * T, Hq * hd), np.float32), "dk": np.zeros((B * T, Hkv * hd), np.float32),
              "dv": np.zeros((B * T, Hkv * hd), np.float32)}
    ints.update(lddo=Hq * hd, lddq=Hq * hd, lddk=Hkv * hd, lddv=Hkv * hd)
    return arrays, ints, {"scale": scale}


def test_op_attention_train_backward_cuda_deterministic(monkeypatch, rng):
    """The tiled kernels (no atomics, fixed summation order) give the same bits on every run."""
    _be("cuda")
    monkeypatch.delenv("QLORA_CUDA_ATTN_BACKWARD", raising=False)
    arrays, ints, floats = _bwd_inputs(rng, 2, 150, 8, 2, 128, 7, "cuda")
    first = _run("cuda", "attention_train_backward", arrays, ints, floats)
    for _ in range(2):
        again = _run("cuda", "attention_train_backward", arrays, ints, floats)
        for name in ("dq", "dk", "dv"):
            np.testing.assert_array_equal(again[name], first[name], err_msg=name)


@pytest.mark.parametrize("B", [1, 2])
def test_op_attention_train_backward_cuda_llama8b_shape(monkeypatch, rng, B):
    """The Llama-3-8B bench shape (head_dim 128, 32 query / 8 KV heads, seq 2048; a compile-time
    assertion keeps it on the tiled path): the tiled kernels against the untiled reference kernels on
    the same inputs. Both fp32 in different summation orders over <= 2048 keys; a wrong tile or
    mask is an O(1) difference."""
    _be("cuda")
    T, Hq, Hkv, hd = 2048, 32, 8, 128
    arrays, ints, floats = _bwd_inputs(rng, B, T, Hq, Hkv, hd, 100, "cuda")
    monkeypatch.delenv("QLORA_CUDA_ATTN_BACKWARD", raising=False)
    tiled = _run("cuda", "attention_train_backward", arrays, ints, floats)
    monkeypatch.setenv("QLORA_CUDA_ATTN_BACKWARD", "reference")
    ref = _run("cuda", "attention_train_backward", arrays, ints, floats)
    for name in ("dq", "dk", "dv"):
        a, b = tiled[name].astype(np.float64), ref[name].astype(np.float64)
        assert np.isfinite(a).all(), name
        tol = 1e-4 * np.abs(b).max() + 1e-3 * np.abs(b)
        worst = np.abs(a - b).max()
        assert (np.abs(a - b) <= tol).all(), f"{name}: worst {worst:.3g} (max |ref| {np.abs(b).max():.3g})"


# bf16 compute (Backend::attention_train_backward_bf16; the harness's int bf16=1): the CUDA tiled
# kernels run dO·Vᵀ, Pᵀ·dO, dSᵀ·Q and dS·K on bf16 tensor cores (sm_80+), fp32 elsewhere. Checked
# against float64 with test_attention_bf16's elementwise bf16 bounds (an fp32 result meets them too).
BF16_BWD_CASES = [  # B, T, Hq, Hkv, hd, mask kind (test_grad_ops.make_mask)
    (2, 83, 8, 2, 64, "left"),
    (1, 97, 8, 2, 128, "none"),
    (2, 45, 3, 1, 80, "right"),
    (1, 19, 2, 1, 160, "none"),  # hd > 128: the untiled fp32 kernels (the contract's fallback)
]


def _bf16_bwd_case(rng, case):
    from test_attention_bf16 import bounds
    from test_grad_ops import attn_bwd_ref, attn_ref, make_mask, randn

    B, T, Hq, Hkv, hd, kind = case
    q, k, v = randn(rng, B * T, Hq * hd), randn(rng, B * T, Hkv * hd), randn(rng, B * T, Hkv * hd)
    mask = make_mask(kind, B, T, rng)
    scale = float(np.float32(1.0 / np.sqrt(hd)))
    dout = randn(rng, B * T, Hq * hd)
    r_out, r_lse, _ = attn_ref(q, k, v, mask, Hq, Hkv, scale)
    arrays = {"q": q, "k": k, "v": v, "key_mask": mask, "out": r_out.astype(np.float32),
              "lse": r_lse.astype(np.float32).reshape(-1), "dout": dout,
              "dq": np.zeros((B * T, Hq * hd), np.float32), "dk": np.zeros((B * T, Hkv * hd), np.float32),
              "dv": np.zeros((B * T, Hkv * hd), np.float32)}
    ints = {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "hd": hd, "ldq": Hq * hd, "ldk": Hkv * hd, "ldv": Hkv * hd,
            "ldo": Hq * hd, "lddo": Hq * hd, "lddq": Hq * hd, "lddk": Hkv * hd, "lddv": Hkv * hd, "bf16": 1}
    refs = attn_bwd_ref(q, k, v, mask, Hq, Hkv, scale, dout)
    return arrays, ints, {"scale": scale}, refs, bounds(q, k, v, mask, Hq, Hkv, scale, dout)[2:]


def test_op_attention_train_backward_bf16_flag(rng):
    """The harness's bf16=1 runs attention_train_backward_bf16: on cpu:scalar (the bf16 oracle) the
    grad_ops bf16 result bit for bit, within the bf16 bounds, and not the fp32 result."""
    arrays, ints, floats, refs, bnds = _bf16_bwd_case(rng, (2, 30, 4, 2, 32, "left"))
    got = _run("cpu:scalar", "attention_train_backward", arrays, ints, floats)
    fp32 = _run("cpu:scalar", "attention_train_backward", arrays, {**ints, "bf16": 0}, floats)
    B, T, Hq, Hkv, hd = (ints[n] for n in ("B", "T", "Hq", "Hkv", "hd"))
    want = _core.grad_ops.attention_train_backward(
        arrays["q"], arrays["k"], arrays["v"], arrays["key_mask"], arrays["out"], arrays["lse"].reshape(B, Hq, T),
        arrays["dout"], n_heads=Hq, n_kv_heads=Hkv, scale=floats["scale"], backend="cpu:scalar",
        compute_dtype="bfloat16")
    for name, w, ref, bound in zip(("dq", "dk", "dv"), want, refs, bnds):
        np.testing.assert_array_equal(got[name], w, err_msg=name)
        assert not np.array_equal(got[name], fp32[name]), name
        assert (np.abs(got[name] - ref) <= bound).all(), name


@pytest.mark.parametrize("path", ["tc", "simt"])
@pytest.mark.parametrize("case", BF16_BWD_CASES, ids=lambda c: "B{}T{}Hq{}Hkv{}hd{}{}".format(*c))
def test_op_attention_train_backward_bf16_cuda(monkeypatch, rng, case, path):
    """CUDA bf16 compute within the bf16 bounds of float64: the tensor-core tiled kernels (default on
    sm_80+; fp32 below) and QLORA_CUDA_ATTN_BACKWARD=simt (the fp32 tiled kernels)."""
    _be("cuda")
    if path == "simt":
        monkeypatch.setenv("QLORA_CUDA_ATTN_BACKWARD", "simt")
    else:
        monkeypatch.delenv("QLORA_CUDA_ATTN_BACKWARD", raising=False)
    arrays, ints, floats, refs, bnds = _bf16_bwd_case(rng, case)
    res = _run("cuda", "attention_train_backward", arrays, ints, floats)
    for name, ref, bound in zip(("dq", "dk", "dv"), refs, bnds):
        err = np.abs(res[name].astype(np.float64) - ref)
        assert (err <= bound).all(), f"{name}: worst error / bound {float((err / (bound + 1e-300)).max()):.3g}"


def test_op_attention_train_backward_bf16_cuda_deterministic(monkeypatch, rng):
    """The tensor-core kernels, too, give the same bits on every run."""
    _be("cuda")
    monkeypatch.delenv("QLORA_CUDA_ATTN_BACKWARD", raising=False)
    arrays, ints, floats, _, _ = _bf16_bwd_case(rng, (2, 150, 8, 2, 128, "left"))
    first = _run("cuda", "attention_train_backward", arrays, ints, floats)
    again = _run("cuda", "attention_train_backward", arrays, ints, floats)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_array_equal(again[name], first[name], err_msg=name)


def _check_attention_backward(backend, rng, case):
    B, T, Hq, Hkv, hd, pad = case
    q, k, v, km, (ldq, ldk, ldv) = _attn_case(rng, B, T, Hq, Hkv, hd, pad)
    scale32 = np.float32(1.0 / np.sqrt(hd))
    out64, lse64, _, Sabs = _attn_ref(q, k, v, km, B, T, Hq, Hkv, hd, np.float64(scale32))
    ldo, lddo, lddq, lddk, lddv = Hq * hd + 1, Hq * hd + 2, Hq * hd + 3, Hkv * hd + 4, Hkv * hd + 5
    out = np.zeros((B * T, ldo), np.float32)
    out[:, :Hq * hd] = out64
    lse = lse64.astype(np.float32).reshape(-1)
    dout = rng.standard_normal((B * T, lddo)).astype(np.float32)
    res = _run(backend, "attention_train_backward",
               {"q": q, "k": k, "v": v, "key_mask": km, "out": out, "lse": lse, "dout": dout,
                "dq": np.full((B * T, lddq), 5.0, np.float32), "dk": np.full((B * T, lddk), 5.0, np.float32),
                "dv": np.full((B * T, lddv), 5.0, np.float32)},
               {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "hd": hd, "ldq": ldq, "ldk": ldk, "ldv": ldv, "ldo": ldo,
                "lddo": lddo, "lddq": lddq, "lddk": lddk, "lddv": lddv},
               {"scale": float(scale32)})
    # float64 reference from the fp32 inputs the op saw (P from the fp32 lse, delta from the fp32 out).
    s = np.float64(scale32)
    g = Hq // Hkv
    Q = q[:, :Hq * hd].astype(np.float64).reshape(B, T, Hq, hd)
    K = k[:, :Hkv * hd].astype(np.float64).reshape(B, T, Hkv, hd)
    V = v[:, :Hkv * hd].astype(np.float64).reshape(B, T, Hkv, hd)
    O = out[:, :Hq * hd].astype(np.float64).reshape(B, T, Hq, hd)
    G = dout[:, :Hq * hd].astype(np.float64).reshape(B, T, Hq, hd)
    L = lse.astype(np.float64).reshape(B, Hq, T)
    rel = _attn_rel(Sabs, T, hd)
    dq, dk, dv = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    aq, ak, av = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)  # magnitudes (sums of |terms|)
    vis = np.tril(np.ones((T, T), bool))
    for b in range(B):
        vb = vis & (km[b] != 0)[None, :]
        for h in range(Hq):
            kh = h // g
            fin = np.isfinite(L[b, h])
            ok = vb & fin[:, None]
            S = s * Q[b, :, h] @ K[b, :, kh].T
            P = np.where(ok, np.exp(np.where(ok, S, 0.0) - np.where(fin, L[b, h], 0.0)[:, None]), 0.0)
            delta = (G[b, :, h] * O[b, :, h]).sum(axis=1)
            dP = G[b, :, h] @ V[b, :, kh].T
            dS = P * (dP - delta[:, None]) * s
            r = rel[b, h][:, None]  # per query row
            dSa = P * (np.abs(G[b, :, h]) @ np.abs(V[b, :, kh]).T + np.abs(G[b, :, h] * O[b, :, h]).sum(axis=1)[:, None]) * s
            dq[b, :, h] = dS @ K[b, :, kh]
            aq[b, :, h] = (r * dSa) @ np.abs(K[b, :, kh])
            dk[b, :, kh] += dS.T @ Q[b, :, h]
            ak[b, :, kh] += (r * dSa).T @ np.abs(Q[b, :, h])
            dv[b, :, kh] += P.T @ G[b, :, h]
            av[b, :, kh] += (r * P).T @ np.abs(G[b, :, h])
    for name, ref, mag, width, ld in (("dq", dq, aq, Hq * hd, lddq), ("dk", dk, ak, Hkv * hd, lddk),
                                      ("dv", dv, av, Hkv * hd, lddv)):
        got = res[name]
        _within(got[:, :width], ref.reshape(B * T, width), mag.reshape(B * T, width) + 1e-30,
                f"attention_train_backward {name}")
        assert (got[:, width:] == 5.0).all(), f"padding columns of {name} written"


# ------------------------------------------------------------------ LoRA dropout


def _keep_mask(seed, offset, p, n):
    """The host Philox (train/rng.cpp): outputs offset .. offset+n-1 of the stream of `seed`."""
    r = _core.train.Philox(seed)
    r.set_state({"algorithm": "philox4x32-10", "seed": seed, "position": offset})
    return np.asarray(r.bernoulli(n, 1.0 - float(np.float32(p)))).astype(bool)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,offset,p", [(0, 0, 0.1), (0xDEADBEEF12345678, 3, 0.5), (7, 1001, 0.05)])
def test_op_lora_dropout(backend, rng, seed, offset, p):
    """Forward and backward take the mask the host Philox gives for (seed, offset), bit for bit:
    a seed gives the same masks on every backend."""
    M, n_in, ld = 7, 45, 50
    x = rng.standard_normal((M, ld)).astype(np.float32)
    x[0, :4] = [1e-39, -3e-41, 1e-45, 0.0]  # subnormals survive (no flush-to-zero on any backend)
    keep = _keep_mask(seed, offset, p, M * n_in).reshape(M, n_in)
    assert 0 < keep.sum() < keep.size
    s = np.float32(1.0) / (np.float32(1.0) - np.float32(p))
    ints = {"M": M, "in": n_in, "ld": ld, "seed_lo": seed & 0xFFFFFFFF, "seed_hi": seed >> 32, "offset": offset}
    be = _be(backend)
    got = _run(be, "lora_dropout", {"x": x, "out": np.full((M, n_in), 9.0, np.float32)}, ints, {"p": p})["out"]
    want = np.where(keep, x[:, :n_in] * s, np.float32(0.0)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    g = rng.standard_normal((M, n_in)).astype(np.float32)
    dx0 = rng.standard_normal((M, ld)).astype(np.float32)
    g[0, :3] = [1e-39, -2e-40, 5e-45]
    dx0[0, :3] = [1e-40, 3e-39, 0.0]
    got = _run(be, "lora_dropout_backward", {"g": g, "dx": dx0}, ints, {"p": p})["dx"]
    want = dx0.copy()
    want[:, :n_in] = np.where(keep, dx0[:, :n_in] + g * s, dx0[:, :n_in])
    np.testing.assert_array_equal(got, want)


def test_lora_dropout_offset_is_a_stream_position():
    """offset k gives the mask of elements k.. of the offset-0 stream (data-parallel shards)."""
    M, n_in = 4, 33
    x = np.ones((M + 2, n_in), np.float32)
    base = dict(seed_lo=11, seed_hi=0, offset=0)
    full = _run("cpu", "lora_dropout", {"x": x, "out": np.zeros((M + 2, n_in), np.float32)},
                {"M": M + 2, "in": n_in, "ld": n_in, **base}, {"p": 0.3})["out"]
    part = _run("cpu:devsim", "lora_dropout", {"x": x[2:], "out": np.zeros((M, n_in), np.float32)},
                {"M": M, "in": n_in, "ld": n_in, **base, "offset": 2 * n_in}, {"p": 0.3})["out"]
    np.testing.assert_array_equal(part, full[2:])


def test_harness_refuses_bad_training_calls():
    """Bad shape or parameter arguments are ValueErrors before any backend work."""
    x = np.zeros((2, 4), np.float32)
    ints = {"M": 2, "in": 4, "ld": 4, "seed_lo": 1, "seed_hi": 0, "offset": 0}
    for p in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
            _run("cpu:devsim", "lora_dropout", {"x": x, "out": x.copy()}, ints, {"p": p})
    q = np.zeros((3, 12), np.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        _run("cpu", "attention_train", {"q": q, "k": q, "v": q, "key_mask": np.ones(3, np.int32), "out": q,
                                        "lse": np.zeros(9, np.float32)},
             {"B": 1, "T": 3, "Hq": 3, "Hkv": 2, "hd": 4, "ldq": 12, "ldk": 12, "ldv": 12, "ldo": 12}, {"scale": 1.0})
    with pytest.raises(ValueError, match="smaller than the shape arguments"):
        _run("cpu", "rmsnorm_backward", {"x": x, "w": np.ones(4, np.float32), "dy": x, "dx": x},
             {"M": 3, "D": 4}, {"eps": 1e-5})


# ------------------------------------------------------------------ the device path of training


@pytest.mark.parametrize("device", ["cpu:devsim", "cuda"])
@pytest.mark.parametrize("quantize", ["nf4", None])
def test_device_training_matches_cpu(tmp_path, rng, quantize, device):
    """Three training passes (forward_backward with LoRA dropout on all seven projections, fp32
    compute) on a device backend vs the CPU backend, the adapters updated identically in between
    (an SGD step from the CPU's gradients applied to both). cpu:devsim — the CUDA op table behind a
    device face, so every device path of the training pass runs in CI — runs the same kernels:
    equal up to summation order (1e-6). CUDA: its own kernels, the same dropout masks (one Philox
    stream): fp32 rounding differences only; a wrong mask or kernel is an O(1) difference."""
    from helpers_model import make_checkpoint

    _be(device)
    tight = device == "cpu:devsim"
    path, cfg, _ = make_checkpoint(tmp_path, rng, vocab=97, hidden=64, inter=96, layers=2, heads=4, kv_heads=2)
    lc = qlora_native.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear",
                                 init_lora_weights=False)
    models = {}
    for be in ("cpu", device):
        m = qlora_native.Model.from_pretrained(path, quantize=quantize, backend=be, tokenizer=None)
        m.add_adapter("a", lc, seed=1234)
        m.train()
        models[be] = m
    ids = rng.integers(1, 97, size=(2, 13)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    labels = np.where(mask != 0, ids, -100)
    for step in range(3):
        losses, grads = {}, {}
        for be, m in models.items():
            m.zero_grad()
            losses[be] = m.forward_backward(ids, labels, attention_mask=mask)
            grads[be] = m.get_adapter_gradients("a")
        assert np.isfinite(losses["cpu"])
        assert abs(losses[device] - losses["cpu"]) <= (1e-6 if tight else 1e-4) * abs(losses["cpu"]), (step, losses)
        for name, gc in grads["cpu"].items():
            gd = grads[device][name]
            scale = float(np.abs(gc).max()) + 1e-30
            assert np.abs(gd - gc).max() <= (1e-5 if tight else 2e-3) * scale, f"step {step} {name}"
        for m in models.values():  # the same SGD step on both, from the CPU's gradients
            sd = m.get_adapter_state_dict("a")
            m.set_adapter_state_dict("a", {k: w - 0.5 * grads["cpu"][k] for k, w in sd.items()})


@pytest.mark.parametrize("device", ["cpu:devsim", "cuda"])
def test_device_train_steps_with_dropout_match_cpu(tmp_path, rng, device):
    """Whole optimizer steps with LoRA dropout (train_step: forward_backward, global-norm clipping,
    AdamW) on a device backend vs the CPU backend: cpu:devsim bit-identical (the same kernels, the
    same Philox masks through the dropout ops); cuda (fp32) within fp32 rounding growth."""
    from helpers_model import make_checkpoint

    _be(device)
    path, cfg, _ = make_checkpoint(tmp_path, rng, vocab=97, hidden=64, inter=96, layers=2, heads=4, kv_heads=2)
    ids = rng.integers(1, 97, size=(2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    runs = {}
    for be in ("cpu", device):
        m = qlora_native.Model.from_pretrained(path, quantize="nf4", backend=be, tokenizer=None)
        m.add_adapter("a", qlora_native.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear"),
                      seed=5)
        m.train()
        m.configure_optimizer(lr=1e-2)
        steps = [m.train_step([(ids, ids, mask)], max_grad_norm=1.0) for _ in range(3)]
        assert all(s["stepped"] for s in steps)
        runs[be] = ([(s["loss"], s["grad_norm"]) for s in steps], m.get_adapter_state_dict("a"))
    (lc, sc), (ld, sd) = runs["cpu"], runs[device]
    if device == "cpu:devsim":
        assert ld == lc
        for k in sc:
            np.testing.assert_array_equal(sd[k], sc[k], err_msg=k)
    else:
        for (a, na), (b, nb) in zip(lc, ld):
            assert abs(a - b) <= 1e-3 * abs(a) and abs(na - nb) <= 1e-3 * na
