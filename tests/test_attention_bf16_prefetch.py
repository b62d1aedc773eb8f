"""Issue 15: the bf16 training attention prefetches the rows its tiles store into: the forward each
task's output rows when the task starts, the fused backward each block's dq rows
(cpu/ops_attention_train_shared.hpp prefetch_rows; QLORA_ATTN_FWD_PF=0 / QLORA_ATTN_BWD_PF=0, read per
call, turn them off). On AMX the tile stores into uncached rows had stalled the next ldtilecfg.

A prefetch changes no arithmetic, so out, lse, dq, dk, dv must be the same bits with and without it,
on real AMX tiles, emulated tiles and the AVX512-BF16 tiles (QLORA_AMX unset / emulate / 0), on
partial blocks and tiles, padding, GQA, odd T, and the training shape (T = 256, hd = 64, 9 / 3 heads).
The forward is run twice per way (the checkpointed recompute calls it again; the backward relies on
identical lse).
"""
import numpy as np
import pytest

from qlora_native import _core, ops
from test_grad_ops import make_mask, randn

g = _core.grad_ops
CASES = [  # B, T, Hq, Hkv, hd, mask kind
    (1, 256, 9, 3, 64, "none"),
    (2, 131, 6, 2, 64, "right"),
    (3, 70, 4, 2, 20, "left"),
    (1, 45, 3, 3, 80, "none"),
]
IDS = [f"T{c[1]}-hd{c[4]}-{c[2]}x{c[3]}-{c[5]}" for c in CASES]


def _inputs(rng, case):
    B, T, Hq, Hkv, hd, kind = case
    q, k, v = randn(rng, B * T, Hq * hd), randn(rng, B * T, Hkv * hd), randn(rng, B * T, Hkv * hd)
    return q, k, v, make_mask(kind, B, T, rng), float(1.0 / np.sqrt(hd))


def _both_ways(monkeypatch, case, inputs):
    q, k, v, mask, scale = inputs
    kw = dict(n_heads=case[2], n_kv_heads=case[3], scale=scale, backend="cpu:avx512", compute_dtype="bfloat16")
    monkeypatch.setenv("QLORA_ATTN_BACKWARD", "fused")  # the packed backward (the one with the dq prefetch)
    dout = randn(np.random.default_rng(7), *q.shape)
    res = {}
    for pf in ("1", "0"):
        monkeypatch.setenv("QLORA_ATTN_FWD_PF", pf)
        monkeypatch.setenv("QLORA_ATTN_BWD_PF", pf)
        runs = [g.attention_train(q, k, v, mask, **kw) for _ in range(2)]
        out, lse = runs[0]
        res[pf] = [r for r in runs] + [g.attention_train_backward(q, k, v, mask, out, lse, dout, **kw)]
    for key in ("QLORA_ATTN_FWD_PF", "QLORA_ATTN_BWD_PF"):
        monkeypatch.delenv(key)
    base = res["0"]
    for pf, got in res.items():
        for i in range(2):
            assert np.array_equal(got[i][0], base[0][0]), (pf, i, "out")
            assert np.array_equal(got[i][1], base[0][1]), (pf, i, "lse")
        for name, a, b in zip(("dq", "dk", "dv"), got[2], base[2]):
            assert np.array_equal(a, b), (pf, name)
    assert np.isfinite(base[0][0]).all() and all(np.isfinite(x).all() for x in base[2])


@pytest.mark.skipif(not ops.bf16_compute_available("cpu"), reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("amx", [None, "emulate", "0"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prefetch_bf16_bit_identical(rng, monkeypatch, case, amx):
    if amx is None:
        monkeypatch.delenv("QLORA_AMX", raising=False)
    else:
        monkeypatch.setenv("QLORA_AMX", amx)
    _both_ways(monkeypatch, case, _inputs(rng, case))
