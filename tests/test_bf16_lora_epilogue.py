"""compute_dtype="bfloat16" training with the LoRA matmuls in fp32 (the default): the LoRA expand
y += s·t·Bᵀ runs inside the NF4 base GEMM, on each output tile while it is in L1
(Backend::nf4_gemm_nt_many_expand_bf16), instead of a second pass over y. Same per-element fp32
operations in the same order as the separate expand, so the same bits: loss and every gradient equal
QLORA_BF16_LORA_EPILOGUE=0 or unset (the two calls; the fused path is opt-in, =1) exactly, grouped (q/k/v, gate/up) and per module, with
dropout, with checkpointing on and off, and with a bf16 shrink. The kernel-level check (ragged
shapes, ranks, K past a depth block, row super-blocks, threads) is cpp/tests/test_gemm_bf16_expand.cpp.
The tiny model's GEMMs are below the shared driver's 4 MFLOP floor, so QLORA_BF16_GEMM=shared
(same bits as the task driver, test_gemm_bf16_shared.py) lets the fused path run here."""
import numpy as np
import pytest

from helpers_bf16 import needs_bf16
from helpers_train import adapter_model, padded_batch, profiled_loss_and_grads, random_lora_b
from helpers_tiny import build_tiny

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=80)
CFG = dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"k_proj": 6, "gate_proj": 3})
OP = "nf4_gemm_nt_many_expand_bf16"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")), **SHAPE)


def _model(path, dropout=0.0):
    return random_lora_b(adapter_model(path, compute_dtype="bfloat16", dropout=dropout, lora=CFG))  # nonzero B


BATCH = padded_batch(np.random.default_rng(1), 80, B=3, T=12)  # M = 36: past the GEMV paths (M <= 16)


def _pass(m, monkeypatch, epilogue, group=True, ckpt=True, lora_bf16="0"):
    monkeypatch.setenv("QLORA_BF16_GEMM", "shared")
    if epilogue is None:
        monkeypatch.delenv("QLORA_BF16_LORA_EPILOGUE", raising=False)
    else:
        monkeypatch.setenv("QLORA_BF16_LORA_EPILOGUE", "1" if epilogue else "0")
    monkeypatch.setenv("QLORA_LORA_GROUP", "1" if group else "0")
    monkeypatch.setenv("QLORA_LORA_BF16", lora_bf16)
    m.gradient_checkpointing = ckpt
    ids, mask, labels = BATCH
    loss, grads, report = profiled_loss_and_grads(m, (ids, labels, mask))
    return loss, grads, sum(r["calls"] for r in report if r["op"] == OP)


def _same(a, b):
    la, ga, _ = a
    lb, gb, _ = b
    assert la == lb
    assert ga.keys() == gb.keys()
    for k in ga:
        assert np.array_equal(ga[k], gb[k]), k


@needs_bf16
@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("ckpt", [True, False])
def test_epilogue_same_bits(tiny, monkeypatch, group, ckpt):
    m = _model(tiny)
    on = _pass(m, monkeypatch, True, group, ckpt)
    off = _pass(m, monkeypatch, False, group, ckpt)
    # every projection of both layers: q/k/v and gate/up one call each when grouped, else one each;
    # o and down one each; the checkpointed backward recomputes a layer's forward up to the SwiGLU
    per_layer = (2 if group else 5) + 2
    assert on[2] >= 2 * per_layer and off[2] == 0, (on[2], off[2])
    _same(on, off)
    unset = _pass(m, monkeypatch, None, group, ckpt)  # the default: off
    assert unset[2] == 0
    _same(on, unset)
    assert np.isfinite(on[0]) and any(np.abs(g).max() > 0 for g in on[1].values())


@needs_bf16
def test_epilogue_with_dropout(tiny, monkeypatch):
    """lora_dropout: the shrink reads the dropped-out input, the base the plain one (not grouped)."""
    m = _model(tiny, dropout=0.1)
    m.train()
    state = m._core.lora_dropout_state("a")
    on = _pass(m, monkeypatch, True)
    m._core.lora_set_dropout_state("a", *state)  # the same masks again
    off = _pass(m, monkeypatch, False)
    assert on[2] > 0 and off[2] == 0
    _same(on, off)


@needs_bf16
def test_epilogue_bf16_shrink_and_bf16_expand(tiny, monkeypatch):
    """A bf16 shrink still fuses (the expand is fp32); a bf16 expand (QLORA_LORA_BF16 with expand)
    does not (its bf16 GEMM has another k order) and runs the two calls."""
    m = _model(tiny)
    on = _pass(m, monkeypatch, True, lora_bf16="shrink")
    off = _pass(m, monkeypatch, False, lora_bf16="shrink")
    assert on[2] > 0
    _same(on, off)
    fwd = _pass(m, monkeypatch, True, lora_bf16="forward")
    assert fwd[2] == 0
    _same(fwd, _pass(m, monkeypatch, False, lora_bf16="forward"))
