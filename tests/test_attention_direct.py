"""Issue 15: the training attention's in-place operand kernels (cpu/attention_train_kernels*.cpp,
QLORA_ATTN_DIRECT): queries read in place by the fp32 scores micro-kernel, the softmax weights and
score gradients converted once per block to bf16 rows / row pairs that the vdpbf16ps kernel reads
in place (no A panel packed per tile), and delta = rowsum(dout * out) 16 rows per vector (AVX2: 8).

- They keep every rounding and every fp32 chain of the packing way, so QLORA_ATTN_DIRECT=0 must give
  the same bits at every SIMD level, fp32 and bf16 compute, forward and both backward ways, on shapes
  with partial tiles (odd T, hd not a multiple of 16 or 32), padding and GQA.
- Against float64: the bf16 bounds of test_attention_bf16 (derived there from bf16 rounding) at
  ragged T, GQA and several head dims, on the default (direct) path.
"""
import os

import numpy as np
import pytest

from qlora_native import _core, ops

from helpers_attention import assert_same_bits, compute_dtypes, run_attention, simd_levels
from test_attention_bf16 import check_vs_float64, float64_case

g = _core.grad_ops
HAVE_BF16 = ops.bf16_compute_available("cpu")

SHAPES = [  # B, T, Hq, Hkv, hd, mask kind
    (2, 150, 6, 2, 20, "left"),
    (1, 71, 3, 1, 64, "right"),
    (2, 45, 4, 4, 48, "none"),
    (1, 130, 2, 1, 80, "left"),
    (1, 17, 2, 2, 16, "none"),
]


def _run(path, levels, dtypes, backward, direct):
    env = dict(os.environ, QLORA_ATTN_BACKWARD=backward)
    env.pop("QLORA_ATTN_DIRECT", None)
    env.pop("QLORA_ATTN_PANELS", None)
    env["QLORA_ATTN_AMX"] = "0"  # the AMX tiles run only on the direct way (test_attention_bf16_amx.py)
    if not direct:
        env["QLORA_ATTN_DIRECT"] = "0"
    return run_attention(path, SHAPES, 100, levels, dtypes, env)


@pytest.mark.parametrize("backward", ["fused", "split"])
def test_direct_bit_identical_to_packing(tmp_path, backward):
    levels, dtypes = simd_levels(), compute_dtypes()
    a = _run(str(tmp_path / "on.npz"), levels, dtypes, backward, True)
    b = _run(str(tmp_path / "off.npz"), levels, dtypes, backward, False)
    assert_same_bits(a, b)


@pytest.mark.skipif(not HAVE_BF16, reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("case", SHAPES, ids=[f"T{c[1]}-hd{c[4]}-{c[2]}x{c[3]}-{c[5]}" for c in SHAPES])
def test_direct_bf16_vs_float64(rng, monkeypatch, case):
    monkeypatch.setenv("QLORA_ATTN_BACKWARD", "fused")  # the packed bf16 backward
    (q, k, v, mask, scale, dout), refs, bnds = float64_case(rng, case)
    Hq, Hkv = case[2], case[3]
    kw = dict(n_heads=Hq, n_kv_heads=Hkv, scale=scale, backend="cpu:avx512", compute_dtype="bfloat16")
    out, lse = g.attention_train(q, k, v, mask, **kw)
    dq, dk, dv = g.attention_train_backward(q, k, v, mask, refs[0].astype(np.float32), refs[1].astype(np.float32),
                                            dout, **kw)
    check_vs_float64("", (out, lse, dq, dk, dv), refs, bnds)
