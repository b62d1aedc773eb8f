"""Training-attention A/B helpers (no torch import): run attention_train and its backward in a fresh
interpreter, so that the QLORA_ATTN_* switches (read once per process) take effect, over cases
(B, T, Hq, Hkv, hd, mask kind) at several SIMD levels and compute dtypes; compare two runs bit for bit."""
import subprocess
import sys

import numpy as np

from qlora_native import _core, ops

SCRIPT = r"""
import ast
import sys
import numpy as np
from qlora_native import _core
g = _core.grad_ops
out = {}
levels, dtypes = sys.argv[2].split(","), sys.argv[3].split(",")
cases, seed_base = ast.literal_eval(sys.argv[4]), int(sys.argv[5])
for case, (B, T, Hq, Hkv, hd, kind) in enumerate(cases):
    rng = np.random.default_rng(seed_base + case)
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


def simd_levels():
    """The non-scalar SIMD levels this CPU runs."""
    return [lv for lv in ("generic", "avx2", "avx512") if lv in _core.supported_simd_levels()]


def compute_dtypes():
    """float32, and bfloat16 where the CPU has bf16 compute."""
    return ["float32"] + (["bfloat16"] if ops.bf16_compute_available("cpu") else [])


def run_attention(path, cases, seed_base, levels, dtypes, env):
    """Forward and backward outputs of every case / level / dtype under `env`, as np.load(path);
    case i draws its inputs from default_rng(seed_base + i)."""
    r = subprocess.run([sys.executable, "-c", SCRIPT, path, ",".join(levels), ",".join(dtypes), repr(list(cases)),
                        str(seed_base)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return np.load(path)


def assert_same_bits(a, b):
    """Two run_attention results hold the same arrays, bit for bit."""
    assert sorted(a.files) == sorted(b.files) and a.files
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
