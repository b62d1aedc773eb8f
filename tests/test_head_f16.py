"""head_format "f16" / "bf16" (issue 10): the embedding and the lm_head kept as 16-bit rows on the
device and read so by every pass (gather half_rows, lm_head half_gemm_nt, the loss gradient through
the lm_head half_gemm_nn). Ops on every backend against numpy float64 on the rounded table (the
table is rounded once; products accumulate in fp32), the model against the fp32 model holding the
same rounded tables, and the memory model. CUDA cases skip without a GPU."""
import json
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import _core
from qlora_native import memory_model as mm

from conftest import all_backends
from helpers_tiny import build_tiny
from helpers_train import adapter_model, assert_same_training, loss_and_grads, train_batch

HAVE_GPU = _core.cuda_device_count() > 0
NO_GPU = f"no CUDA GPU: {_core.cuda_device_summary()}"
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU))
EPS32 = float(np.finfo(np.float32).eps)
U = {"f16": 2.0 ** -11, "bf16": 2.0 ** -8}  # unit roundoff of one rounding to nearest
EPS_BF16 = 2.0 ** -8  # bf16 compute: each operand rounded once
SHAPE = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=80)
TABLES = ("model.embed_tokens.weight", "lm_head.weight")


def bf16_bits(x):
    """float32 -> bf16 bits, round to nearest even (torch's .to(torch.bfloat16) for finite values)."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def half_bits(x, fmt):
    x = np.ascontiguousarray(x, np.float32)
    return bf16_bits(x) if fmt == "bf16" else x.astype(np.float16).view(np.uint16)


def widen(bits, fmt):
    if fmt == "bf16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def rounded(x, fmt):
    return widen(half_bits(x, fmt), fmt)


def test_bf16_reference_matches_torch():
    """The bf16 rounding the tests use is torch's (the model's own rounding is compared to it below)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(4096).astype(np.float32) * np.float32(3.0)
    x[:4] = [1.00390625, 1.01171875, -2.0078125, 3.0e-39]  # ties to even, a subnormal
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits(x), want)


# ------------------------------------------------------------------ the ops, every backend
def _run(backend, op, arrays, ints, floats=None):
    return _core.backend_op(backend, op, arrays, ints, floats or {})


def _within(got, ref, tol, what):
    err = np.abs(got.astype(np.float64) - ref)
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst err {err.max():.3g}"


def _table(rng, N, K, fmt):
    W = rng.standard_normal((N, K)).astype(np.float32)
    W[0, 0] = 1e-6  # fp16: a subnormal
    bits = half_bits(W, fmt)
    return bits, widen(bits, fmt).astype(np.float64)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@pytest.mark.parametrize("M,N,K", [(1, 3, 1), (3, 37, 5), (8, 45, 70), (19, 70, 33), (2, 2100, 9)])
def test_op_half_rows_and_gemm(backend, rng, fmt, M, N, K):
    """half_rows is exact; half_gemm_nt, half_gemm_nn (the chunked default: N = 2100 > 2048 is two
    chunks) within fp32 accumulation bounds on the widened table; half_gemm_nt_bf16 within the bound of
    one bf16 rounding per operand. Ragged K (SIMD tails), M > 16 (the chunked CPU path), row strides
    beyond the row (padding must stay untouched), sentinels around every array (backend_op)."""
    bf = int(fmt == "bf16")
    bits, W = _table(rng, N, K, fmt)
    ids = rng.integers(0, N, size=M).astype(np.int32)
    ids[-1] = N - 1
    rows = _run(backend, "half_rows", {"W": bits, "ids": ids, "out": np.zeros((M, K), np.float32)},
                {"M": M, "K": K, "N": N, "bf16": bf})["out"]
    np.testing.assert_array_equal(rows, W[ids].astype(np.float32))

    ldx, ldy = K + 3, N + 5
    x = rng.standard_normal((M, ldx)).astype(np.float32)
    x64 = x[:, :K].astype(np.float64)
    ref, mag = x64 @ W.T, np.abs(x64) @ np.abs(W).T
    for op, tol in (("half_gemm_nt", (K + 8) * EPS32 * mag),
                    ("half_gemm_nt_bf16", (2 * EPS_BF16 + (K + 8) * EPS32) * mag)):
        y = _run(backend, op, {"X": x, "W": bits, "Y": np.full((M, ldy), 7.0, np.float32)},
                 {"M": M, "N": N, "K": K, "ldx": ldx, "ldy": ldy, "bf16": bf})["Y"]
        _within(y[:, :N], ref, tol + 1e-30, f"{op} {fmt}")
        assert np.all(y[:, N:] == 7.0), f"{op} wrote the padding between rows"

    lddy, lddx = N + 2, K + 4
    dy = rng.standard_normal((M, lddy)).astype(np.float32)
    dx0 = rng.standard_normal((M, lddx)).astype(np.float32)
    alpha, beta = 0.75, 0.5
    dy64 = dy[:, :N].astype(np.float64)
    ref = alpha * dy64 @ W + beta * dx0[:, :K]
    mag = abs(alpha) * np.abs(dy64) @ np.abs(W) + abs(beta) * np.abs(dx0[:, :K])
    for cb, tol in ((0, (N + 8) * EPS32 * mag), (1, (2 * EPS_BF16 + (N + 8) * EPS32) * mag)):
        dx = _run(backend, "half_gemm_nn", {"dY": dy, "W": bits, "dX": dx0},
                  {"M": M, "N": N, "K": K, "lddy": lddy, "lddx": lddx, "bf16": bf, "compute_bf16": cb},
                  {"alpha": alpha, "beta": beta})["dX"]
        _within(dx[:, :K], ref, tol + 1e-30, f"half_gemm_nn {fmt} compute_bf16={cb}")
        np.testing.assert_array_equal(dx[:, K:], dx0[:, K:])


def test_ops_listed():
    for b in ("cpu", "cpu:devsim"):
        ops = _core.backend_ops(b)
        assert "half_rows" in ops and "half_gemm_nt" in ops
    if _core.cuda_compiled():
        assert "half_rows" in _core.backend_ops("cuda") and "half_gemm_nt" in _core.backend_ops("cuda")


# ------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")), **SHAPE)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tied")), tie_word_embeddings=True, **SHAPE)


def _tensors(path):
    return {k: np.asarray(v) for k, v in qlora_native.io.load_safetensors(os.path.join(path, "model.safetensors")).items()}


def _with_rounded_tables(src, dst, fmt):
    """A copy of checkpoint src whose embedding / lm_head hold their 16-bit rounding (as fp32)."""
    os.makedirs(dst, exist_ok=True)
    ts = _tensors(src)
    for n in TABLES:
        if n in ts:
            ts[n] = rounded(ts[n], fmt)
    qlora_native.io.save_safetensors(os.path.join(dst, "model.safetensors"), ts)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return dst


@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@pytest.mark.parametrize("before_load", [False, True])
def test_tables_are_rounded_to_nearest_even(tiny, fmt, before_load):
    """The 16-bit tables hold numpy's fp16 / torch's bf16 rounding of the fp32 weights, whether
    converted after loading or rounded slab by slab as rows arrive; a checkpoint tensor already in the
    head's 16-bit dtype is kept bit for bit."""
    from qlora_native.config import ModelConfig

    ts = _tensors(tiny)
    if before_load:
        with open(os.path.join(tiny, "config.json")) as f:
            mc = ModelConfig.from_dict(json.load(f))
        core = _core.model.LlamaModel(mc.to_core(), "cpu", False, 64, True)
        core.set_head_half(fmt == "bf16")
        for name, shp in core.expected_tensors():
            x = np.ascontiguousarray(np.asarray(ts[name], np.float32))
            if name == "model.embed_tokens.weight":
                for r0 in range(0, x.shape[0], 7):  # slabs of 7 rows
                    core.load_tensor_rows(name, r0, np.ascontiguousarray(x[r0:r0 + 7]))
            elif name == "lm_head.weight":  # as a checkpoint in the head's own dtype
                core.load_tensor(name, half_bits(x, fmt), "BF16" if fmt == "bf16" else "F16", list(x.shape))
            else:
                core.load_tensor(name, x, "F32", list(x.shape))
        core.check_complete()
    else:
        m = qlora_native.Model.from_pretrained(tiny, backend="cpu", tokenizer=None)
        m.head_format = fmt
        assert m.head_format == fmt
        core = m._core
    assert core.head_half == fmt
    fp = core.memory_footprint()
    for n in TABLES:
        np.testing.assert_array_equal(np.asarray(core.get_tensor(n)).ravel(), rounded(ts[n], fmt).ravel(), err_msg=n)
    assert core.memory_footprint()["other_weights"] > fp["other_weights"]  # export widened a copy (kept)


def test_head_format_errors(tmp_path, tiny):
    m = qlora_native.Model.from_pretrained(tiny, backend="cpu", tokenizer=None)
    for bad in ("fp16", "BF16", "float16", 16, None):
        with pytest.raises(ValueError, match="head_format must be one of 'float32', 'bf16', 'f16', 'q8_0'"):
            m.head_format = bad
    with pytest.raises(ValueError, match="head_format must be one of"):
        mm.weight_bytes(mm.LLAMA3_8B, head_format="fp16")
    m.head_format = "bf16"
    m.head_format = "bf16"  # idempotent
    for other in ("f16", "q8_0", "float32"):
        with pytest.raises(ValueError, match="'bf16'"):
            m.head_format = other
    with pytest.raises(ValueError, match="cannot change"):
        m._core.set_head_q8_0()  # the core refuses too
    assert m.head_format == "bf16"
    h64 = build_tiny(str(tmp_path / "h64"), **(SHAPE | {"hidden_size": 64}))  # Q8_0 needs D % 32 == 0
    m2 = qlora_native.Model.from_pretrained(h64, backend="cpu", tokenizer=None)
    m2.head_format = "q8_0"
    with pytest.raises(ValueError, match="'q8_0'"):
        m2.head_format = "f16"
    with pytest.raises(ValueError, match="cannot change"):
        m2._core.set_head_half(False)
    # A weight beyond fp16's range: refused naming the tensor, and the model is unchanged.
    ts = _tensors(tiny)
    ts["lm_head.weight"] = ts["lm_head.weight"].copy()
    ts["lm_head.weight"][5, 3] = 70000.0
    big = _with_rounded_tables(tiny, str(tmp_path / "big"), "bf16")
    qlora_native.io.save_safetensors(os.path.join(big, "model.safetensors"), ts)
    m3 = qlora_native.Model.from_pretrained(big, backend="cpu", tokenizer=None)
    ids = np.array([[5, 6, 7]], np.int32)
    before = m3(ids)
    with pytest.raises(ValueError, match=r"lm_head.weight.*row 5.*range of head_format 'f16'"):
        m3.head_format = "f16"
    assert m3.head_format == "float32"
    np.testing.assert_array_equal(m3(ids), before)
    m3.head_format = "bf16"  # bf16 has fp32's range
    assert np.isfinite(m3(ids)).all()


@pytest.mark.parametrize("backend", ["cpu", "cpu:devsim", CUDA])
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@pytest.mark.parametrize("tied", [False, True])
def test_16bit_head_equals_fp32_on_rounded_tables(tmp_path, tiny, tiny_tied, backend, fmt, tied):
    """Logits, the loss and a training step's LoRA gradients with the 16-bit head equal those of the
    fp32 model whose tables hold the same rounded values within fp32 accumulation (the table is
    rounded once, the products accumulate in fp32), and differ from the unrounded fp32 model by no
    more than the rounding allows."""
    src = tiny_tied if tied else tiny
    ref = adapter_model(_with_rounded_tables(src, str(tmp_path / "r"), fmt), backend)
    h = adapter_model(src, backend, head_format=fmt)
    orig = adapter_model(src, backend)
    assert h.head_format == fmt and ref.head_format == "float32"
    ids, labels, mask = train_batch()
    lr, lh, lo = ref(ids, mask), h(ids, mask), orig(ids, mask)
    scale = float(np.abs(lr).max())
    np.testing.assert_allclose(lh, lr, rtol=0, atol=64 * EPS32 * scale)
    # Each weight of the tables moves by at most U relative: the logits by a few U of their scale.
    assert float(np.abs(lh - lo).max()) <= 8 * U[fmt] * scale
    l0, g0 = loss_and_grads(ref)
    l1, g1 = loss_and_grads(h)
    assert abs(l1 - l0) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys()
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-4, atol=1e-5 * float(np.abs(g0[k]).max()), err_msg=k)
    e0, e1 = ref.eval_loss(ids, labels, mask), h.eval_loss(ids, labels, mask)
    assert e1[1] == e0[1] and abs(e1[0] - e0[0]) <= 1e-5 * abs(e0[0])
    # Generation (the logits stay in backend memory, sampled there): greedy tokens as the reference's.
    prompt = ids[:1, :6]
    g0 = ref.generate(prompt, 8, eos_token_id=None)
    g1 = h.generate(prompt, 8, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g0))
    h.configure_optimizer(lr=1e-3)
    r = h.train_step([train_batch(1)], lr=1e-3, max_grad_norm=1.0)
    assert np.isfinite(r["loss"])


def test_bf16_compute_with_16bit_head(tiny):
    """compute_dtype bfloat16: the loss's lm_head GEMMs through half_gemm_nt_bf16 / half_gemm_nn (bf16)."""
    m = adapter_model(tiny, "cpu", head_format="bf16", compute_dtype="bfloat16")
    ref = adapter_model(_with_rounded_tables(tiny, os.path.join(os.path.dirname(tiny), "rb"), "bf16"), "cpu",
                        compute_dtype="bfloat16")
    l0, g0 = loss_and_grads(ref)
    l1, g1 = loss_and_grads(m)
    assert abs(l1 - l0) <= 1e-5 * abs(l0)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-3, atol=1e-4 * float(np.abs(g0[k]).max()), err_msg=k)


def test_devsim_equals_cpu_with_16bit_head(tiny):
    a = adapter_model(tiny, "cpu", head_format="f16", dropout=0.1)
    b = adapter_model(tiny, "cpu:devsim", head_format="f16", dropout=0.1)
    assert_same_training(a, b, 2)


# ------------------------------------------------------------------ memory
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@pytest.mark.parametrize("tied", [False, True])
def test_bytes_match_footprint_and_peak(tiny, tiny_tied, fmt, tied):
    """memory_model counts the 16-bit tables (2 bytes per weight) as LlamaModel::memory_footprint does,
    and the pass's peak (with the lm_head backward's widened chunk) exactly."""
    path = tiny_tied if tied else tiny
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    m = adapter_model(path, "cpu:devsim", head_format=fmt)
    fp = m.memory_footprint()
    wb = mm.weight_bytes(cfg, head_format=fmt)
    V, D = cfg["vocab_size"], cfg["hidden_size"]
    assert wb["embedding"] == 2 * V * D and wb["lm_head"] == (0 if tied else 2 * V * D)
    assert fp["other_weights"] == wb["other_weights"] + wb["embedding"] + wb["lm_head"]
    ids, labels, mask = train_batch(B=3, T=100)  # 300 rows: the loss runs two chunks
    m.zero_grad()
    m.forward_backward(ids, labels, mask)
    est = mm.activation_bytes(cfg, 3, 100, 4, head_format=fmt, device=True)
    assert m.last_train_peak_bytes == est["peak"], (m.last_train_peak_bytes, est)
    full = mm.train_step_bytes(mm.LLAMA3_8B, 1, 2048, head_format=fmt)
    f32 = mm.train_step_bytes(mm.LLAMA3_8B, 1, 2048)
    assert f32["embedding"] + f32["lm_head"] - full["embedding"] - full["lm_head"] == 2 * (2 * 128256 * 4096)  # 2 tables


# ------------------------------------------------------------------ head_format at load
@pytest.mark.parametrize("fmt", ["f16", "bf16", "q8_0"])
def test_head_format_at_load_never_holds_fp32_tables(tmp_path, fmt):
    """from_pretrained(head_format=...) applies it before the tables load: the same tables as setting it
    afterwards, and a lower device peak while loading (cpu:devsim's pool): f16 / bf16 by at least the two
    fp32 tables, which never reach the device."""
    V, D = 2000, 64
    path = build_tiny(str(tmp_path / "m"), **(SHAPE | {"vocab_size": V, "hidden_size": D}))
    peaks = {}
    for when in ("after", "at_load"):
        _core.release_cached_memory("cpu:devsim")
        _core.reset_peak_memory("cpu:devsim")
        base = _core.device_stats("cpu:devsim")["live_bytes"]
        if when == "at_load":
            m = qlora_native.Model.from_pretrained(path, backend="cpu:devsim", tokenizer=None, head_format=fmt)
        else:
            m = qlora_native.Model.from_pretrained(path, backend="cpu:devsim", tokenizer=None)
            m.head_format = fmt
        peaks[when] = _core.device_stats("cpu:devsim")["peak_live_bytes"] - base
        assert m.head_format == fmt
        fp = m.memory_footprint()["other_weights"]
        tables = [np.asarray(m._core.get_tensor(n)).copy() for n in TABLES]
        if when == "after":
            want_fp, want_tables = fp, tables
        del m
    assert fp == want_fp
    for a, b in zip(tables, want_tables):
        np.testing.assert_array_equal(a, b)
    if fmt == "q8_0":  # LlamaWeights::load quantizes a whole fp32 tensor on the device, one at a time
        assert peaks["at_load"] < peaks["after"], peaks
    else:  # rounded on the host: the two fp32 tables never reach the device
        assert peaks["at_load"] + 2 * 4 * V * D <= peaks["after"], peaks
    with pytest.raises(ValueError, match="head_format must be one of"):
        qlora_native.Model.from_pretrained(path, backend="cpu", tokenizer=None, head_format="fp16")


@pytest.mark.parametrize("stored", ["f16", "bf16"])
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
def test_gguf_16bit_tables(tmp_path, tiny, stored, fmt):
    """A GGUF whose token_embd / output are F16 or BF16: with head_format of the same dtype the rows are
    loaded as stored (bit for bit the file's), otherwise rounded from their exact fp32 values; logits
    equal the fp32 head's on the same values within fp32 accumulation."""
    gguf = pytest.importorskip("gguf")
    import warnings

    src = qlora_native.Model.from_pretrained(tiny, backend="cpu", tokenizer=None, quantize=None)
    out = str(tmp_path / f"m-{stored}.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer in the GGUF
        src.export_gguf(out, stored)
    raw = {t.name: t for t in gguf.GGUFReader(out).tensors}
    m = qlora_native.Model.from_pretrained(out, backend="cpu", tokenizer=None, quantize=None, head_format=fmt)
    ref = qlora_native.Model.from_pretrained(out, backend="cpu", tokenizer=None, quantize=None)
    assert m.head_format == fmt
    for gname, name in (("token_embd.weight", TABLES[0]), ("output.weight", TABLES[1])):
        t = raw[gname]
        assert t.tensor_type.name == stored.upper()
        bits = np.asarray(t.data).view(np.uint16).reshape(-1)
        got = np.asarray(m._core.get_tensor(name)).reshape(-1)
        want = widen(bits, stored) if fmt == stored else rounded(widen(bits, stored), fmt)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=name)
    ids = np.array([[3, 9, 27, 5]], np.int32)
    if fmt == stored:  # the same values as the fp32 model's: only the accumulation order differs
        lr = ref(ids)
        np.testing.assert_allclose(m(ids), lr, rtol=0, atol=64 * EPS32 * float(np.abs(lr).max()))
