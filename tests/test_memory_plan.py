"""The training pass's allocation plan has one front door (cpp/src/model/train_memory.cpp): train_pass
allocates its buffers from it and memory_model.activation_bytes reports it through
_core.train.memory_plan, with no arithmetic of its own. And the checkpointed backward skips the last
layer's recompute (its forward's intermediates are still in place), bit for bit."""
import json
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import _core
from qlora_native import memory_model as mm

from helpers_tiny import build_tiny
from helpers_train import adapter_model, train_batch

# QD != D (head_dim given), GQA, I not a multiple of D: every size expression is its own.
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
             vocab_size=80, num_hidden_layers=3)
BF16 = qlora_native.ops.bf16_compute_available("cpu")
PARTS = ("checkpoints", "layer_activations", "lora_scratch", "dropout", "final_norm", "backward_scratch",
         "cross_entropy", "peak")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("plan")), **SHAPE)


def _cfg(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_activation_bytes_are_the_engine_plan(monkeypatch):
    """activation_bytes returns the C++ plan's numbers, whatever they are: changing the plan (here a
    stand-in with arbitrary values) is the only way its numbers change."""
    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {k: 1000 + i for i, k in enumerate(PARTS + ("offload_host",))}

    monkeypatch.setattr(_core.train, "memory_plan", fake)
    got = mm.activation_bytes(mm.LLAMA3_8B, 2, 512, 8, offload=True, dropout=True, head_format="q8_0",
                              device=False, compute_dtype="bfloat16")
    assert got == {k: 1000 + i for i, k in enumerate(PARTS)}
    assert seen == dict(hidden_size=4096, intermediate_size=14336, vocab_size=128256, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, batch=2, seq=512, r=8,
                        backward=True, checkpointing=True, offload=True, dropout=True, compute_dtype="bfloat16",
                        head_format="q8_0", device=False, f32_from_q8_0=False, activation_memory_budget=0.0)
    t = mm.train_step_bytes(mm.LLAMA3_8B, 1, 2048)
    assert t["activations_peak"] == 1000 + PARTS.index("peak")


CASES = [  # backend, head, checkpointing, offload, dropout, compute, lora
    ("cpu", "float32", True, False, False, "float32", None),
    ("cpu", "q8_0", True, True, True, "float32", dict(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"])),
    ("cpu", "bf16", False, False, True, "float32", None),
    ("cpu:devsim", "f16", True, False, False, "float32", dict(r=2, lora_alpha=4, target_modules=["v_proj"])),
    ("cpu:devsim", "q8_0", False, False, False, "float32", None),
    ("cpu:devsim", "float32", True, True, False, "float32", None),
    pytest.param("cpu", "q8_0", True, False, True, "bfloat16", None,
                 marks=pytest.mark.skipif(not BF16, reason="no AVX512-BF16")),
    pytest.param("cpu:devsim", "bf16", True, True, False, "bfloat16", dict(r=6, lora_alpha=6, target_modules="all-linear"),
                 marks=pytest.mark.skipif(not BF16, reason="no AVX512-BF16")),
]


@pytest.mark.parametrize("backend,head,ckpt,offload,dropout,compute,lora", CASES)
def test_plan_equals_engine_peak(tiny, backend, head, ckpt, offload, dropout, compute, lora):
    """The plan (through memory_model and the raw binding) is exactly the pass's peak_train_bytes."""
    m = adapter_model(tiny, backend, head_format=head, dropout=0.1 if dropout else 0.0, compute_dtype=compute,
                      lora=lora)
    m.gradient_checkpointing = ckpt
    m.offload_checkpoints = offload
    ids, labels, mask = train_batch(B=3, T=100)  # 300 rows: the loss runs two chunks
    m.zero_grad()
    m.forward_backward(ids, labels, mask)
    r = (lora or {}).get("r", 4)
    est = mm.activation_bytes(_cfg(tiny), 3, 100, r, checkpointing=ckpt, offload=offload, dropout=dropout,
                              head_format=head, device=backend != "cpu", compute_dtype=compute)
    assert m.last_train_peak_bytes == est["peak"], (m.last_train_peak_bytes, est)
    raw = _core.train.memory_plan(hidden_size=64, intermediate_size=96, vocab_size=80, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, batch=3, seq=100, r=r,
                                  checkpointing=ckpt, offload=offload, dropout=dropout, compute_dtype=compute,
                                  head_format=head, device=backend != "cpu")
    assert {k: raw[k] for k in PARTS} == est
    assert raw["offload_host"] == (3 * 300 * 64 * 4 if ckpt and offload else 0)


def test_plan_parts():
    """The parts of the 8B plan, each from its shapes (a second statement of the rule, by part)."""
    M, D, I, V, L, QD, KD, r = 2048, 4096, 14336, 128256, 32, 4096, 1024, 16
    p = mm.activation_bytes(mm.LLAMA3_8B, 1, M, r, head_format="q8_0", dropout=True)
    assert p["checkpoints"] == 4 * (L + 1) * M * D
    assert p["layer_activations"] == 4 * (M * (3 * D + 2 * QD + 2 * KD + 3 * I) + 32 * M)
    assert p["lora_scratch"] == 2 * 4 * M * r and p["dropout"] == 2 * 4 * M * I
    assert p["backward_scratch"] == 4 * M * (I + D + 2 * QD + 2 * KD)
    # logits, losses, labels on the device, gathered labelled rows + a zero row, their indices, the Q8_0 chunk
    assert p["cross_entropy"] == 4 * 256 * V + 4 * 256 + 4 * 256 + 4 * 257 * D + 4 * 256 + 4 * 2048 * D + 4 * 2048
    base = sum(p[k] for k in ("checkpoints", "layer_activations", "lora_scratch", "dropout", "final_norm"))
    assert p["peak"] == base + max(p["cross_entropy"], p["backward_scratch"])
    assert mm.activation_bytes(mm.LLAMA3_8B, 1, M, r, offload=True)["checkpoints"] == 2 * 4 * M * D


@pytest.mark.parametrize("bad,msg", [
    (dict(batch=0), "batch"), (dict(seq=2.5), "seq"), (dict(r=-1), "r"), (dict(head_format="int4"), "head_format"),
    (dict(compute_dtype="float16"), "compute_dtype"), (dict(cfg={"hidden_size": 64}), "missing field 'num_attention_heads'"),
    (dict(cfg=dict(SHAPE, hidden_size=0)), "hidden_size"),
])
def test_bad_input_raises_value_error(bad, msg):
    kw = dict(cfg=SHAPE, batch=1, seq=8, r=4)
    kw.update(bad)
    cfg, batch, seq, r = kw.pop("cfg"), kw.pop("batch"), kw.pop("seq"), kw.pop("r")
    with pytest.raises(ValueError, match=msg):
        mm.activation_bytes(cfg, batch, seq, r, **kw)


def test_head_formats_are_the_engines():
    assert mm.HEAD_FORMATS == tuple(_core.train.HEAD_FORMATS) == ("float32", "bf16", "f16", "q8_0")


# ------------------------------------------------------------------ the last layer's recompute
def _attention_calls():
    return sum(r["calls"] for r in _core.profile_report() if r["op"] == "attention_train")


@pytest.mark.parametrize("skip", ["1", "0"])
def test_last_layer_recompute_skipped(tiny, monkeypatch, skip):
    """With checkpointing the backward recomputes layers L-1 .. 1 only (L-1 + L attention calls a
    step); QLORA_SKIP_LAST_RECOMPUTE=0 recomputes all L."""
    monkeypatch.setenv("QLORA_SKIP_LAST_RECOMPUTE", skip)
    m = adapter_model(tiny, "cpu")
    m.gradient_checkpointing = True
    ids, labels, mask = train_batch()
    was = _core.profile_enabled()
    _core.profile_enable(True)
    try:
        _core.profile_reset()
        m.zero_grad()
        m.forward_backward(ids, labels, mask)
        calls = _attention_calls()
    finally:
        _core.profile_enable(was)
        _core.profile_reset()
    L = SHAPE["num_hidden_layers"]
    assert calls == (2 * L - 1 if skip == "1" else 2 * L)


def _loss_grads(path, backend, compute, dropout, offload, steps=2):
    m = adapter_model(path, backend, compute_dtype=compute, dropout=dropout)
    m.gradient_checkpointing = True
    m.offload_checkpoints = offload
    out = []
    for s in range(steps):  # the second pass: another dropout mask (micro_step)
        ids, labels, mask = train_batch(seed=s, B=2, T=20)
        m.zero_grad()
        loss = m.forward_backward(ids, labels, mask)
        out.append((loss, {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()}))
    return out


@pytest.mark.parametrize("backend", ["cpu", "cpu:devsim"])
@pytest.mark.parametrize("compute", ["float32", pytest.param("bfloat16", marks=pytest.mark.skipif(
    not BF16, reason="no AVX512-BF16"))])
@pytest.mark.parametrize("dropout,offload", [(0.0, False), (0.1, False), (0.1, True), (0.0, True)])
def test_skip_is_bit_identical(tiny, monkeypatch, backend, compute, dropout, offload):
    """Loss and every LoRA gradient are the same bits with and without the last layer's recompute."""
    monkeypatch.setenv("QLORA_SKIP_LAST_RECOMPUTE", "0")
    ref = _loss_grads(tiny, backend, compute, dropout, offload)
    monkeypatch.delenv("QLORA_SKIP_LAST_RECOMPUTE")
    got = _loss_grads(tiny, backend, compute, dropout, offload)
    for (l0, g0), (l1, g1) in zip(ref, got):
        assert l0 == l1
        assert g0.keys() == g1.keys() and g0
        for k in g0:
            np.testing.assert_array_equal(g0[k], g1[k], err_msg=k)
