"""Issue 15: the fp32 training attention's one-pass SIMD row ops and in-place dK / dV products
(cpu/attention_train_kernels*.cpp probs_dscores_* / scale_fill_*, ops_attention_train.cpp t_times and
the forward's tile-at-a-time loop; QLORA_ATTN_FUSE=0 turns them off).

- They keep every rounding and every fp32 chain of the scalar row ops and gemm_tn, so QLORA_ATTN_FUSE=0
  must give the same bits at every SIMD level, forward and both backward ways, on shapes with partial
  tiles, padding (left / right masks), GQA, and the training shape (T = 256, hd = 64, 9 / 3 heads).
- Against float64 at hd = 64 (the panels' path) with the fp32 bounds of test_grad_ops.
"""
import os

import pytest

from helpers_attention import assert_same_bits, run_attention, simd_levels
from test_grad_ops import check_attention_train
from conftest import cpu_backends

SHAPES = [  # B, T, Hq, Hkv, hd, mask kind
    (1, 256, 9, 3, 64, "none"),
    (2, 200, 6, 2, 64, "left"),
    (2, 150, 6, 2, 20, "right"),
    (1, 71, 3, 1, 64, "right"),
    (2, 45, 4, 4, 48, "none"),
    (1, 130, 2, 1, 80, "left"),
]


def _run(path, backward, fuse):
    env = dict(os.environ, QLORA_ATTN_BACKWARD=backward)
    for key in ("QLORA_ATTN_DIRECT", "QLORA_ATTN_PANELS", "QLORA_ATTN_FUSE"):
        env.pop(key, None)
    if not fuse:
        env["QLORA_ATTN_FUSE"] = "0"
    return run_attention(path, SHAPES, 300, simd_levels(), ["float32"], env)


@pytest.mark.parametrize("backward", ["fused", "split"])
def test_fuse_bit_identical(tmp_path, backward):
    a = _run(str(tmp_path / "on.npz"), backward, True)
    b = _run(str(tmp_path / "off.npz"), backward, False)
    assert_same_bits(a, b)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("T,kind", [(256, "left"), (131, "right")])
def test_fp32_hd64_vs_float64(rng, backend, T, kind):
    check_attention_train(rng, backend, 2, T, 6, 2, 64, kind)
