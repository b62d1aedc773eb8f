"""Issue 15: the training attention's fp32 products from K and V packed once per (batch, KV head)
into the GEMM panels, each query tile running only over the keys it sees (causal). They must give
the results of the per-block GEMMs (QLORA_ATTN_PANELS=0) bit for bit, at every SIMD level, on
shapes with partial tiles, padding, GQA and a last query block short enough for the GEMV route;
fp32 and bf16 compute (whose scores are fp32 products too); forward and the fused backward."""
import os
import subprocess
import sys

import numpy as np
import pytest

from qlora_native import _core, ops

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = r"""
import sys
import numpy as np
from qlora_native import _core
g = _core.grad_ops
out = {}
levels = sys.argv[2].split(",")
dtypes = sys.argv[3].split(",")
for case, (B, T, Hq, Hkv, hd, kind) in enumerate([(2, 150, 4, 2, 20, "left"), (1, 70, 3, 1, 64, "right"),
                                                   (2, 200, 6, 2, 32, "none"), (1, 12, 2, 2, 16, "none")]):
    rng = np.random.default_rng(case)
    q = rng.standard_normal((B * T, Hq * hd)).astype(np.float32)
    k = rng.standard_normal((B * T, Hkv * hd)).astype(np.float32)
    v = rng.standard_normal((B * T, Hkv * hd)).astype(np.float32)
    dout = rng.standard_normal((B * T, Hq * hd)).astype(np.float32)
    mask = np.ones((B, T), np.int32)
    if kind == "left":
        mask[-1, :T // 3] = 0
    elif kind == "right":
        mask[-1, T - T // 4:] = 0
    for lv in levels:
        for dt in dtypes:
            kw = dict(n_heads=Hq, n_kv_heads=Hkv, scale=float(hd) ** -0.5, backend="cpu:" + lv, compute_dtype=dt)
            o, lse = g.attention_train(q, k, v, mask, **kw)
            dq, dk, dv = g.attention_train_backward(q, k, v, mask, o, lse, dout, **kw)
            for name, a in (("out", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
                out[f"{case}_{lv}_{dt}_{name}"] = np.asarray(a)
np.savez(sys.argv[1], **out)
"""


def _run(path, levels, dtypes, panels):
    env = dict(os.environ, QLORA_ATTN_BACKWARD="fused")  # the backward way the panels serve, on any machine
    env.pop("QLORA_ATTN_PANELS", None)
    if not panels:
        env["QLORA_ATTN_PANELS"] = "0"
    r = subprocess.run([sys.executable, "-c", SCRIPT, path, ",".join(levels), ",".join(dtypes)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return np.load(path)


def test_panels_bit_identical_to_block_gemms(tmp_path):
    levels = [lv for lv in ("generic", "avx2", "avx512") if lv in _core.supported_simd_levels()]
    dtypes = ["float32"] + (["bfloat16"] if ops.bf16_compute_available("cpu") else [])
    a = _run(str(tmp_path / "on.npz"), levels, dtypes, True)
    b = _run(str(tmp_path / "off.npz"), levels, dtypes, False)
    assert sorted(a.files) == sorted(b.files) and a.files
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
