"""The checkpointed backward keeps the recompute's LoRA t = x·Aᵀ (q/k/v and gate/up grouped, o per
module) in the layer's dead output checkpoint instead of recomputing it in the LoRA backward
(QLORA_LORA_KEEP_T, default on, "0" off, read per pass). The forward and the backward shrink are the
same GEMM on the same x, so loss and every gradient equal the switch-off path bit for bit; the LoRA
backward runs fewer shrinks. Not kept (the backward recomputes): without checkpointing, with dropout,
when QLORA_LORA_BF16 rounds one shrink and not the other, the last layer (no recompute)."""
import numpy as np
import pytest

from helpers_bf16 import needs_bf16
from helpers_train import adapter_model, padded_batch, profiled_loss_and_grads, random_lora_b
from helpers_tiny import build_tiny

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=80)
CFG = dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"k_proj": 6, "gate_proj": 3})
BATCH = padded_batch(np.random.default_rng(1), 80, B=3, T=12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")), **SHAPE)


def _model(path, dtype, dropout=0.0):
    return random_lora_b(adapter_model(path, compute_dtype=dtype, dropout=dropout, lora=CFG))  # nonzero B


def _pass(m, monkeypatch, keep, group=True, ckpt=True, lora_bf16="0"):
    monkeypatch.setenv("QLORA_LORA_KEEP_T", "1" if keep else "0")
    monkeypatch.setenv("QLORA_LORA_GROUP", "1" if group else "0")
    monkeypatch.setenv("QLORA_LORA_BF16", lora_bf16)
    m.gradient_checkpointing = ckpt
    ids, mask, labels = BATCH
    loss, grads, report = profiled_loss_and_grads(m, (ids, labels, mask))
    return loss, grads, sum(r["calls"] for r in report if r["part"] == "lora_bwd" and r["op"].startswith("gemm_nt"))


def _check(m, monkeypatch, saved, fresh=None, **kw):
    lo, go, so = _pass(m, monkeypatch, True, **kw)
    lf, gf, sf = _pass(fresh() if fresh else m, monkeypatch, False, **kw)
    assert lo == lf
    assert go.keys() == gf.keys()
    for k in go:
        assert np.array_equal(go[k], gf[k]), k
    assert sf - so == saved, (so, sf)


def _dtype_params():
    return [pytest.param("float32"), pytest.param("bfloat16", marks=needs_bf16)]


@pytest.mark.parametrize("dtype", _dtype_params())
@pytest.mark.parametrize("group", [True, False])
def test_keep_t_same_bits(tiny, monkeypatch, dtype, group):
    m = _model(tiny, dtype)
    # two layers, the last one not recomputed: layer 0's q/k/v (one grouped shrink, or per module
    # not kept), o, gate/up (grouped) skip their backward shrink
    _check(m, monkeypatch, 3 if group else 1, group=group)


@pytest.mark.parametrize("dtype", _dtype_params())
def test_keep_t_off_without_checkpointing(tiny, monkeypatch, dtype):
    _check(_model(tiny, dtype), monkeypatch, 0, ckpt=False)


def test_keep_t_off_with_dropout(tiny, monkeypatch):
    # a fresh model for the second pass: the masks are keyed by the micro step
    _check(_model(tiny, "float32", dropout=0.1), monkeypatch, 0, fresh=lambda: _model(tiny, "float32", dropout=0.1))


@needs_bf16
@pytest.mark.parametrize("lora_bf16,saved", [("1", 3), ("shrink", 0), ("bwd_shrink", 0)])
def test_keep_t_bf16_shrinks(tiny, monkeypatch, lora_bf16, saved):
    # kept only where the forward and the backward shrink are the same GEMM
    _check(_model(tiny, "bfloat16"), monkeypatch, saved, lora_bf16=lora_bf16)


@pytest.mark.parametrize("dtype", _dtype_params())
def test_keep_t_offloaded_checkpoints(tiny, monkeypatch, dtype):
    m = _model(tiny, dtype)
    m.offload_checkpoints = True  # x_out is the second device slot there
    try:
        _check(m, monkeypatch, 3)
    finally:
        m.offload_checkpoints = False


@pytest.mark.parametrize("dtype", _dtype_params())
def test_keep_t_every_layer_recomputed(tiny, monkeypatch, dtype):
    monkeypatch.setenv("QLORA_SKIP_LAST_RECOMPUTE", "0")  # the last layer's output checkpoint holds its t
    _check(_model(tiny, dtype), monkeypatch, 6)
