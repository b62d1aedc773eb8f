"""Issue 15: the training attention forwards prefetch each task's output rows when the task starts
(cpu/ops_attention_train_shared.hpp prefetch_rows; QLORA_ATTN_FWD_PF=0, read per call, turns it off).
On the bf16 AMX path the P.v tile stores into uncached output rows had stalled the next ldtilecfg.

A prefetch changes no arithmetic, so out and lse must be the same bits with and without it: bf16 on
real AMX tiles, emulated tiles and the AVX512-BF16 tiles (QLORA_AMX unset / emulate / 0), fp32 at
AVX-512 and AVX2 (the fp32 panels' path), on partial blocks and tiles, padding, GQA, odd T, and the
training shape (T = 256, hd = 64, 9 / 3 heads). The forward is also run twice per way (the
checkpointed recompute calls it again and the backward relies on identical lse).
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


def _both_ways(monkeypatch, case, inputs, backend, dtype):
    q, k, v, mask, scale = inputs
    kw = dict(n_heads=case[2], n_kv_heads=case[3], scale=scale, backend=backend, compute_dtype=dtype)
    res = {}
    for pf in ("1", "0"):
        monkeypatch.setenv("QLORA_ATTN_FWD_PF", pf)
        res[pf] = [g.attention_train(q, k, v, mask, **kw) for _ in range(2)]
    monkeypatch.delenv("QLORA_ATTN_FWD_PF")
    base = res["0"][0]
    for pf, runs in res.items():
        for i, (out, lse) in enumerate(runs):
            assert np.array_equal(out, base[0]), (pf, i, "out")
            assert np.array_equal(lse, base[1]), (pf, i, "lse")
    assert np.isfinite(base[0]).all()


@pytest.mark.skipif(not ops.bf16_compute_available("cpu"), reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("amx", [None, "emulate", "0"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fwd_prefetch_bf16_bit_identical(rng, monkeypatch, case, amx):
    if amx is None:
        monkeypatch.delenv("QLORA_AMX", raising=False)
    else:
        monkeypatch.setenv("QLORA_AMX", amx)
    _both_ways(monkeypatch, case, _inputs(rng, case), "cpu:avx512", "bfloat16")


@pytest.mark.parametrize("level", [lv for lv in ("avx2", "avx512") if lv in _core.supported_simd_levels()])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fwd_prefetch_fp32_bit_identical(rng, monkeypatch, case, level):
    _both_ways(monkeypatch, case, _inputs(rng, case), f"cpu:{level}", "float32")
