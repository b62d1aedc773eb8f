"""Issue 15: gemm_tn with at most 48 output rows (or columns) against at least 128 of the other, the
rank-r LoRA gradients dA = dtᵀ·x and dB = dyᵀ·t, runs a few-row kernel (AVX-512: 8 x 32 tiles, both
operands in place, or over 64 x 64 chunks of the wide one copied contiguous where its rows are >= 4 KiB
apart; AVX2: 6 x 16 tiles over such chunks, dB only at >= 4 KiB). Its FMA
chains are those of the blocked way, so results must equal QLORA_GEMM_TN_SMALL=0
bit for bit: ops.gemm_tn on partial tiles, several depth blocks, alpha/beta, and a whole training
step (grouped and ungrouped LoRA, whose strided factor slices take the kernel); and within an fp32
bound of float64."""
import os
import subprocess
import sys

import numpy as np
import pytest

from qlora_native import _core

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = [pytest.param(lv, marks=pytest.mark.skipif(lv not in _core.supported_simd_levels(), reason=f"no {lv} on this CPU"))
          for lv in ("avx512", "avx2")]

SHAPES = [(16, 576, 1024), (5, 200, 37), (48, 130, 300), (576, 16, 1024), (200, 3, 2500), (130, 48, 64),
          (17, 129, 1), (16, 1536, 1100), (7, 100, 200),
          # wide operand rows >= 4 KiB apart: the chunk-copying kernels (AVX-512 both ways, AVX2 transposed too)
          (1536, 16, 1024), (37, 1030, 130), (1030, 37, 70), (48, 1100, 64), (3, 1024, 65)]  # (M, N, K): out[M, N] = alpha * a[K, M]ᵀ b[K, N] + beta * out

SCRIPT = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from qlora_native import ops
shapes = eval(sys.argv[3])
out = {}
for n, (M, N, K) in enumerate(shapes):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((K, M)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    for beta in (0.0, 1.3):
        c = c0.copy()
        ops.gemm_tn(a, b, c, alpha=0.7, beta=beta, backend="cpu:" + sys.argv[5])
        out[f"ops_{n}_{beta}"] = c
# a training step of a model whose projections are wide enough (>= 128) for the kernel
import qlora_native
from helpers_tiny import build_tiny
d = build_tiny(sys.argv[4], hidden_size=160, intermediate_size=320, num_attention_heads=5, num_key_value_heads=1)
for group in ("1", "0"):
    import os
    os.environ["QLORA_LORA_GROUP"] = group
    m = qlora_native.Model.from_pretrained(d, quantize="nf4", tokenizer=None, backend="cpu:" + sys.argv[5])
    m.add_adapter("a", qlora_native.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
                  seed=0)
    m.set_active_adapter("a")
    m.configure_optimizer(lr=1e-2)
    m.train()
    ids = np.random.default_rng(5).integers(0, 64, (2, 80)).astype(np.int32)
    for step in range(2):  # the second step has nonzero B, so every gradient is nonzero
        m.zero_grad()
        m.forward_backward(ids, ids, np.ones_like(ids))
        for k, v in m.get_adapter_gradients("a").items():
            out[f"train{group}_{step}_{k}"] = np.array(v)
        m.optimizer_step()
np.savez(sys.argv[1], **out)
"""


def _run(path, tmp, on, level):
    env = dict(os.environ)
    env.pop("QLORA_GEMM_TN_SMALL", None)
    if not on:
        env["QLORA_GEMM_TN_SMALL"] = "0"
    r = subprocess.run([sys.executable, "-c", SCRIPT, path, HERE, repr(SHAPES), tmp, level], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return np.load(path)


@pytest.mark.parametrize("level", LEVELS)
def test_tn_small_bit_identical_and_accurate(tmp_path, level):
    a = _run(str(tmp_path / "on.npz"), str(tmp_path / "m1"), True, level)
    b = _run(str(tmp_path / "off.npz"), str(tmp_path / "m2"), False, level)
    assert sorted(a.files) == sorted(b.files)
    assert any(k.startswith("train1_") for k in a.files) and any(k.startswith("train0_") for k in a.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    eps = float(np.finfo(np.float32).eps)
    for n, (M, N, K) in enumerate(SHAPES):
        rng = np.random.default_rng(n)
        x = rng.standard_normal((K, M))
        y = rng.standard_normal((K, N))
        c0 = rng.standard_normal((M, N)).astype(np.float32).astype(np.float64)
        x, y = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
        for beta in (0.0, 1.3):
            ref = 0.7 * x.T @ y + beta * c0
            bound = (K + 8) * eps * (0.7 * np.abs(x).T @ np.abs(y) + beta * np.abs(c0)) + 1e-30
            assert np.all(np.abs(a[f"ops_{n}_{beta}"] - ref) <= bound), (M, N, K, beta)
