"""compute_dtype="bfloat16" for inference: model(...) logits and generation compute in the model's
compute dtype (base projections and the lm_head through the *_bf16 GEMMs) and keep the KV cache in it
(Backend::kv_write_bf16 / attention_kv_bf16: bf16 storage, exact widening on read, fp32 softmax).
The default stays float32 on the CPU and is bfloat16 on CUDA sm_80+.

Bounds (u = 2^-8, bf16's unit roundoff), following tests/test_bf16.py:
  - ops: kv_write_bf16 stores exactly the RNE rounding of its input (bit for bit); attention over a
    bf16 cache equals, bit for bit, attention over an fp32 cache holding the widened values (the
    widening is exact and the arithmetic is the fp32 kernel's), and the float64 softmax within the
    fp32 attention bound.
  - logits vs float64 (transformers on the NF4-decoded weights): per layer the deepest path rounds
    both operands of q/k/v (2u), K and V in the cache (u), o (2u), gate/up (2u), down (2u): 9u per
    layer, plus 2u for the lm_head; a factor 2 for cancellation in sums: tol = 2 (9 L + 2) u,
    relative to the largest logit.
  - decode over the bf16 cache vs a full-sequence forward in bf16 mode: both round the same K/V and
    the same activations; only the fp32 accumulation order of the GEMMs (M-dependent kernels) differs,
    which may move a bf16 rounding downstream by one step: bound 4u relative to the largest logit.
"""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import qlora_native
from qlora_native import _core, ops

from helpers_model import make_checkpoint

EPS32 = float(np.finfo(np.float32).eps)
U = 2.0 ** -8
HAVE_BF16 = ops.bf16_compute_available("cpu")
needs_bf16 = pytest.mark.skipif(not HAVE_BF16, reason="no AVX512-BF16 on this CPU (fp32 fallback tested instead)")


def _bf16_bits(x):
    """numpy RNE rounding of float32 to bf16 bit patterns (uint16), the CPU rule (cpu/gemm_bf16.cpp
    bf16_round): denormals to signed zero, NaN quieted."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    r = np.where((b & 0x7F800000) == 0, b & 0x80000000, r)
    r = np.where((b & 0x7FFFFFFF) > 0x7F800000, (b | 0x00400000) & 0xFFFF0000, r)
    return (r >> 16).astype(np.uint16)


def _widen(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _op_backends():
    avail = set(qlora_native.available_backends())
    out = [b for b in ("cpu:scalar", "cpu:generic", "cpu:avx2", "cpu:avx512") if b in avail]
    return out + ["cpu:devsim", "cuda"]


def _skip_unavailable(backend):
    if backend == "cuda" and "cuda" not in qlora_native.available_backends():
        pytest.skip("no CUDA GPU here (never run on a GPU)")


# ------------------------------------------------------------------ ops


@pytest.mark.parametrize("backend", _op_backends())
def test_kv_write_bf16_rounds_exactly(backend, rng):
    _skip_unavailable(backend)
    B, T, H, hd, S, start, ldx = 2, 3, 2, 20, 7, 2, 45
    x = rng.standard_normal((B * T, ldx)).astype(np.float32)
    special = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -9), 3.4e38, np.inf, -np.inf, 1e-39, -1e-40, 0.0,
                        -0.0, 2 ** -126 * 1.00390625, 65504.0, np.nan], np.float32)
    x[0, :special.size] = special
    cache = np.full(B * H * S * hd, 0x1234, np.uint16)
    got = _core.backend_op(backend, "kv_write_bf16", {"x": x, "cache": cache},
                           dict(B=B, T=T, H=H, hd=hd, ldx=ldx, S_cap=S, start=start), {})["cache"]
    want = cache.reshape(B, H, S, hd).copy()
    xs = x[:, :H * hd].reshape(B, T, H, hd)
    for t in range(T):
        want[:, :, start + t, :] = _bf16_bits(xs[:, t])
    got = got.reshape(B, H, S, hd)
    nan = np.isnan(_widen(want))
    assert np.array_equal(got[~nan], want[~nan]) and np.isnan(_widen(got[nan])).all()
    # slots outside [start, start + T) untouched; rounding really happens (not truncation)
    assert _widen(_bf16_bits(np.float32(1 + 3 * 2 ** -8))) == np.float32(1 + 4 * 2 ** -8)


def _attention_ref(q, K, V, mask, start, T, Hq, Hkv, hd, scale):
    """float64 causal GQA attention over caches K, V [B, Hkv, S, hd] (float64)."""
    B = mask.shape[0]
    out = np.zeros((B * T, Hq * hd))
    G = Hq // Hkv
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                vis = [s for s in range(start + t + 1) if mask[b, s]]
                if not vis:
                    continue
                qv = q[b * T + t, h * hd:(h + 1) * hd].astype(np.float64)
                sc = np.array([qv @ K[b, h // G, s] for s in vis]) * scale
                p = np.exp(sc - sc.max())
                p /= p.sum()
                out[b * T + t, h * hd:(h + 1) * hd] = p @ V[b, h // G][vis]
    return out


ATT_CASES = [  # B, T, Hq, Hkv, hd, start, S_cap
    (2, 1, 4, 2, 64, 37, 40),    # decode, GQA
    (1, 1, 2, 2, 17, 5, 8),      # head_dim tails
    (2, 3, 6, 2, 80, 30, 34),    # short chunk, AVX-512 masked tail (80 = 64 + 16)
    (2, 20, 4, 1, 64, 4, 26),    # prefill (CUDA: the flash kernel), MQA
    (1, 18, 2, 1, 128, 0, 18),   # prefill from an empty cache
    (1, 17, 2, 2, 36, 3, 21),    # flash kernel with hd % 8 != 0 (no vector loads)
]


@pytest.mark.parametrize("backend", _op_backends())
def test_attention_kv_bf16(backend, rng):
    _skip_unavailable(backend)
    for B, T, Hq, Hkv, hd, start, S in ATT_CASES:
        ldq = Hq * hd + 3
        q = rng.standard_normal((B * T, ldq)).astype(np.float32)
        kf = rng.standard_normal((B, Hkv, S, hd)).astype(np.float32) * 2
        vf = rng.standard_normal((B, Hkv, S, hd)).astype(np.float32)
        kb, vb = _bf16_bits(kf), _bf16_bits(vf)
        mask = np.ones((B, S), np.int32)
        mask[0, 1:3] = 0  # holes
        if B > 1:
            mask[1, :start + 1] = 0  # row 1's first query sees no key: zeros
        scale = float(1 / np.sqrt(hd))
        ints = dict(B=B, T=T, Hq=Hq, Hkv=Hkv, hd=hd, ldq=ldq, S_cap=S, start=start, ldo=Hq * hd)
        out0 = np.full((B * T, Hq * hd), np.nan, np.float32)
        got = _core.backend_op(backend, "attention_kv_bf16",
                               {"q": q, "k_cache": kb.ravel(), "v_cache": vb.ravel(), "key_mask": mask.ravel(),
                                "out": out0}, ints, {"scale": scale})["out"]
        # exact widening: the same as the fp32 op over fp32 caches holding the widened values
        same = _core.backend_op(backend, "attention",
                                {"q": q, "k_cache": _widen(kb).ravel(), "v_cache": _widen(vb).ravel(),
                                 "key_mask": mask.ravel(), "out": out0}, ints, {"scale": scale})["out"]
        assert np.array_equal(got, same), (backend, B, T, hd)
        ref = _attention_ref(q, _widen(kb).astype(np.float64), _widen(vb).astype(np.float64), mask, start, T, Hq,
                             Hkv, hd, scale)
        bound = (4 * np.sqrt(start + T) + 4 * np.sqrt(hd) + 16) * EPS32 * np.abs(vf).max() + 1e-7
        assert np.abs(got - ref).max() <= bound, (backend, float(np.abs(got - ref).max()), bound)
        # the bf16 cache really differs from the fp32 one (rounding of K and V)
        full = _attention_ref(q, kf.astype(np.float64), vf.astype(np.float64), mask, start, T, Hq, Hkv, hd, scale)
        assert np.abs(got - full).max() > 10 * bound
        if B > 1:
            assert not got[T:T + 1].any()


def test_bf16_kv_ops_listed():
    for be in ("cpu", "cpu:scalar", "cpu:devsim"):
        assert {"kv_write_bf16", "attention_kv_bf16"} <= set(_core.backend_ops(be))
    if "cuda" in qlora_native.available_backends():
        assert {"kv_write_bf16", "attention_kv_bf16"} <= set(_core.backend_ops("cuda"))


# ------------------------------------------------------------------ the model


TINY = dict(hidden=64, inter=128, heads=4, kv_heads=2, vocab=100, layers=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(11)
    path, cfg, state = make_checkpoint(tmp_path_factory.mktemp("tiny16"), rng, **TINY)
    return str(path), cfg, state


def _load(path, backend="cpu", cd=None):
    return qlora_native.Model.from_pretrained(path, quantize="nf4", backend=backend, tokenizer=None, compute_dtype=cd)


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_default_stays_float32_on_cpu(tiny, rng):
    """The CPU default is float32 and switching bf16 on and back off leaves fp32 results bit-identical."""
    path, cfg, _ = tiny
    m = _load(path)
    assert m.compute_dtype == "float32" and not m._core.compute_bf16
    ids = rng.integers(3, cfg["vocab_size"], (2, 9))
    l0 = m(ids)
    g0 = m.generate([list(map(int, ids[0]))], 6, eos_token_id=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m.compute_dtype = "bfloat16"
    m.compute_dtype = "float32"
    assert np.array_equal(m(ids), l0)
    assert m.generate([list(map(int, ids[0]))], 6, eos_token_id=None) == g0


@needs_bf16
@pytest.mark.parametrize("backend", ["cpu", "cpu:scalar", "cpu:devsim"])
def test_bf16_logits_vs_float64(tiny, backend):
    """model(...) in bf16 mode vs transformers float64 on the NF4-decoded weights, within the
    bf16-derived bound; fp32 mode stays fp32-close; bf16 mode really differs from fp32 mode."""
    pytest.importorskip("torch")
    from helpers_model import dequantize_nf4_numpy, reference_logits, reference_model

    path, cfg, state = tiny
    m = _load(path, backend, "bfloat16")
    assert m.compute_dtype == "bfloat16"
    state = dict(state)  # the float64 weights the engine computes with: NF4 decoded
    for layer in range(cfg["num_hidden_layers"]):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{proj}"
            state[name + ".weight"] = dequantize_nf4_numpy(m.nf4_weight(name)).astype(np.float64)
    ids = np.random.default_rng(3).integers(3, cfg["vocab_size"], (2, 13))
    ref = reference_logits(reference_model(cfg, state), ids)
    L = cfg["num_hidden_layers"]
    tol = 2 * (9 * L + 2) * U
    l16 = m(ids)
    err16 = _rel(l16, ref)
    assert err16 < tol, (err16, tol)
    m.compute_dtype = "float32"
    l32 = m(ids)
    err32 = _rel(l32, ref)
    assert err32 < 1e-4
    assert _rel(l16, np.asarray(l32, np.float64)) > 20 * err32  # bf16 really used (the old code: 0)


@needs_bf16
def test_bf16_backends_agree(tiny, rng):
    """cpu:devsim (the device paths of the model: uploads, staged logits) equals cpu bit for bit in bf16
    mode; the cpu:scalar oracle (emulated rounding, double sums) is within 4u."""
    path, cfg, _ = tiny
    ids = rng.integers(3, cfg["vocab_size"], (3, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    cpu, dev, orc = (_load(path, be, "bfloat16") for be in ("cpu", "cpu:devsim", "cpu:scalar"))
    lc, ld, lo = (np.asarray(x(ids, attention_mask=mask), np.float64) for x in (cpu, dev, orc))
    assert np.array_equal(lc, ld)
    keep = mask.astype(bool)
    assert _rel(lc[keep], lo[keep]) < 4 * U
    prompts = [list(map(int, ids[0])), list(map(int, ids[1, 4:]))]
    assert cpu.generate(prompts, 8, eos_token_id=None) == dev.generate(prompts, 8, eos_token_id=None)


@needs_bf16
@pytest.mark.parametrize("backend", ["cpu", "cpu:scalar", "cpu:devsim"])
def test_bf16_decode_matches_full_forward(tiny, rng, backend):
    """Greedy generation over the bf16 KV cache vs one full-sequence forward in bf16 mode: each step's
    logits (prefill, then one token at a time through GenerationContext.feed) within 4u of the
    forward's at the same position, and the greedy tokens are the forward's argmax wherever the top
    two logits are further apart than that bound."""
    path, cfg, _ = tiny
    m = _load(path, backend, "bfloat16")
    B, P, N = 2, 7, 10
    prompt = rng.integers(3, cfg["vocab_size"], (B, P)).astype(np.int32)
    ctx = m._core.new_context(B, P + N, None, None)
    steps = [ctx.feed(prompt)]
    toks = [np.argmax(steps[-1], axis=-1).astype(np.int32)]
    for _ in range(N - 1):
        steps.append(ctx.feed(toks[-1][:, None]))
        toks.append(np.argmax(steps[-1], axis=-1).astype(np.int32))
    ctx.close()
    seq = np.concatenate([prompt, np.stack(toks[:-1], axis=1)], axis=1)
    full = np.asarray(m(seq), np.float64)  # [B, P + N - 1, V]
    scale = np.abs(full).max()
    for i, lg in enumerate(steps):
        pos = P - 1 + i
        assert np.abs(lg - full[:, pos]).max() <= 4 * U * scale, (i, float(np.abs(lg - full[:, pos]).max() / scale))
        top2 = np.sort(full[:, pos], axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 8 * U * scale
        assert np.array_equal(toks[i][clear], np.argmax(full[:, pos], axis=-1)[clear])
    # Model.generate takes the same path (its tokens are the greedy ones above)
    gen = m.generate([list(map(int, r)) for r in prompt], N, eos_token_id=None)
    assert gen == [list(map(int, c)) for c in np.stack(toks, axis=1)]


@needs_bf16
@pytest.mark.parametrize("backend", ["cpu", "cpu:devsim"])
def test_bf16_kv_cache_halves_memory(tiny, backend):
    """A context's KV cache is stored in the compute dtype fixed at its creation: K/V bytes halve."""
    path, cfg, _ = tiny
    m = _load(path, backend, "float32")
    B, cap = 3, 50
    ctx32 = m._core.new_context(B, cap, None, None)
    b32 = m._core.memory_footprint()["kv_cache"]
    m.compute_dtype = "bfloat16"
    ctx16 = m._core.new_context(B, cap, None, None)
    b16 = m._core.memory_footprint()["kv_cache"] - b32
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = 2 * cfg["num_hidden_layers"] * B * cfg["num_key_value_heads"] * cap * hd  # K and V elements
    mask = 4 * B * cap  # the device key mask (int32 [B, cap])
    assert b32 == 4 * kv + mask and b16 == 2 * kv + mask, (b32, b16, kv)
    # the open fp32 context keeps its dtype after the switch: its logits are fp32 mode's
    ids = np.full((B, 2), 5, np.int32)
    l32 = ctx32.feed(ids)
    m.compute_dtype = "float32"
    ref = m._core.new_context(B, cap, None, None).feed(ids)
    assert np.array_equal(l32, ref)
    assert not np.array_equal(ctx16.feed(ids), ref)
    ctx32.close()
    ctx16.close()


FALLBACK = r"""
import sys, warnings, numpy as np
import qlora_native
path = sys.argv[2]
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    m = qlora_native.Model.from_pretrained(path, compute_dtype="bfloat16", tokenizer=None)
assert m.compute_dtype == "float32"
ids = np.random.default_rng(1).integers(3, 100, (2, 9))
l16 = m(ids)
g16 = m.generate([list(map(int, ids[0]))], 5, eos_token_id=None)
m._core.compute_bf16 = False
assert np.array_equal(m(ids), l16)  # the fallback is exactly fp32 mode, KV cache included
assert m.generate([list(map(int, ids[0]))], 5, eos_token_id=None) == g16
print("ok")
"""


def test_inference_fallback_without_bf16_units(tiny):
    """QLORA_SIMD=avx2 hides AVX512-BF16: bf16 asked for, fp32 inference (fp32 KV cache) runs."""
    path, _, _ = tiny
    env = dict(os.environ, QLORA_SIMD="avx2")
    r = subprocess.run([sys.executable, "-c", FALLBACK, "", path], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


# ------------------------------------------------------------------ CUDA (skip without a GPU)


def _cc_major():
    if "cuda" not in qlora_native.available_backends():
        return 0
    return 8 if ops.bf16_compute_available("cuda") else 7


needs_bf16_gpu = pytest.mark.skipif(_cc_major() < 8, reason="needs an sm_80+ CUDA GPU (never run on a GPU)")


@needs_bf16_gpu
def test_cuda_defaults_to_bf16_and_matches_cpu_bf16(tiny, rng):
    """On sm_80+ a CUDA model starts in bfloat16 (bf16 KV cache); its logits are within the bf16 bound
    of the CPU's bf16 mode, decode agrees with its own full forward, fp32 mode stays available."""
    path, cfg, _ = tiny
    gpu = _load(path, "cuda")
    assert gpu.compute_dtype == "bfloat16"
    ids = rng.integers(3, cfg["vocab_size"], (2, 20))  # T >= 16: the flash kernel over the bf16 cache
    cpu = _load(path, "cpu:scalar", "bfloat16")
    lg, lc = np.asarray(gpu(ids), np.float64), np.asarray(cpu(ids), np.float64)
    assert _rel(lg, lc) < 4 * U
    prompt = ids[:, :6].astype(np.int32)
    ctx = gpu._core.new_context(2, 12, None, None)
    steps = [ctx.feed(prompt)]
    toks = [np.argmax(steps[-1], axis=-1).astype(np.int32)]
    for _ in range(5):
        steps.append(ctx.feed(toks[-1][:, None]))
        toks.append(np.argmax(steps[-1], axis=-1).astype(np.int32))
    seq = np.concatenate([prompt, np.stack(toks[:-1], axis=1)], axis=1)
    full = np.asarray(gpu(seq), np.float64)
    for i, lgs in enumerate(steps):
        assert np.abs(lgs - full[:, 5 + i]).max() <= 4 * U * np.abs(full).max()
    gpu.compute_dtype = "float32"
    assert _rel(gpu(ids), np.asarray(_load(path, "cpu")(ids), np.float64)) < 1e-4
