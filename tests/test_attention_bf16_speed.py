"""Speed switches of the bf16 training attention on AVX512-BF16 (cpu/ops_attention_train_bf16.cpp),
each read per call and each bit-identical to its off path (so the float64 bounds of
test_attention_bf16.py carry over unchanged):
  QLORA_ATTN_BF16_HALF=0     tiles whose last panel has <= 16 columns compute all 32
  QLORA_ATTN_BF16_DELTA=0    the backward's delta in a pass of its own instead of in its tasks
  QLORA_ATTN_BF16_SCRATCH=0  zero-filled task scratch"""
import numpy as np
import pytest

from qlora_native import _core, ops
from test_grad_ops import make_mask, randn

g = _core.grad_ops
needs_bf16 = pytest.mark.skipif(not ops.bf16_compute_available("cpu"), reason="no AVX512-BF16 on this CPU")
SWITCHES = ["QLORA_ATTN_BF16_HALF", "QLORA_ATTN_BF16_DELTA", "QLORA_ATTN_BF16_SCRATCH"]
CASES = [  # B, T, Hq, Hkv, hd, mask: partial blocks and panels (hd 20 / 80), odd T, padding
    (3, 70, 4, 2, 20, "left"),
    (2, 131, 6, 2, 64, "right"),
    (2, 45, 3, 3, 80, "left"),
]


def run(q, k, v, mask, Hq, Hkv, scale, dout):
    kw = dict(n_heads=Hq, n_kv_heads=Hkv, scale=scale, backend="cpu:avx512", compute_dtype="bfloat16")
    out, lse = g.attention_train(q, k, v, mask, **kw)
    return (out, lse) + tuple(g.attention_train_backward(q, k, v, mask, out, lse, dout, **kw))


@needs_bf16
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[1]}-hd{c[4]}" for c in CASES])
def test_attention_bf16_switches_bit_identical(rng, monkeypatch, case):
    monkeypatch.setenv("QLORA_ATTN_BACKWARD", "fused")  # the packed backward (the only one they touch)
    B, T, Hq, Hkv, hd, kind = case
    q, k, v = randn(rng, B * T, Hq * hd), randn(rng, B * T, Hkv * hd), randn(rng, B * T, Hkv * hd)
    mask, dout = make_mask(kind, B, T, rng), randn(rng, B * T, Hq * hd)
    scale = float(1.0 / np.sqrt(hd))
    base = run(q, k, v, mask, Hq, Hkv, scale, dout)
    for off in [[s] for s in SWITCHES] + [SWITCHES]:
        for s in off:
            monkeypatch.setenv(s, "0")
        got = run(q, k, v, mask, Hq, Hkv, scale, dout)
        for s in off:
            monkeypatch.delenv(s)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, base):
            assert np.array_equal(a, b), (off, name)

