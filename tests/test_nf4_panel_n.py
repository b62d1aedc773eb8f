"""Issue 15: at AVX2, ops.nf4_gemm_nn decodes each [kc, 16] B panel in one call, two weight rows a
step (QLORA_NF4_PANEL_N=0 goes back to one nf4_decode call and one scale fill per row). The decoded
values are the same fp32 products code * absmax, so results must equal the row-by-row way bit for
bit; with dY = I the GEMM returns the decoded weight itself, which must equal an independent numpy
decode exactly (the FMA chain adds only exact zeros)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from qlora_native import _core

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif("avx2" not in _core.supported_simd_levels(), reason="no AVX2 on this CPU")

# (K rows, N cols, blocksize, M): N % 16 == 0 takes the panel kernel (N = 48: a last partial NC
# block; K odd: the single-row tail; K = 1100: two depth blocks); N = 100 keeps the row-by-row way.
SHAPES = [(64, 32, 32, 64), (33, 48, 64, 20), (1100, 96, 64, 9), (7, 576, 32, 16), (40, 100, 64, 8),
          (129, 256, 256, 33)]

SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from qlora_native import ops
from test_ops_nf4_gemm import random_nf4, decode
out = {}
rng = np.random.default_rng(7)
for n, (K, N, bs, M) in enumerate(eval(sys.argv[3])):
    for dq in (True, False):
        w = random_nf4(rng, K, N, bs, dq)
        dy = rng.standard_normal((M, K)).astype(np.float32)
        out[f"y_{n}_{dq}"] = ops.nf4_gemm_nn(dy, w, backend="cpu:avx2")
        out[f"ref_{n}_{dq}"] = dy.astype(np.float64) @ decode(w).astype(np.float64)
        out[f"eye_{n}_{dq}"] = ops.nf4_gemm_nn(np.eye(K, dtype=np.float32), w, backend="cpu:avx2")
        out[f"dec_{n}_{dq}"] = decode(w)
        out[f"bnd_{n}_{dq}"] = (K + 4) * np.finfo(np.float32).eps * (np.abs(dy).astype(np.float64) @ np.abs(decode(w)).astype(np.float64))
np.savez(sys.argv[1], **out)
"""


def _run(path, on):
    env = dict(os.environ)
    env.pop("QLORA_NF4_PANEL_N", None)
    if not on:
        env["QLORA_NF4_PANEL_N"] = "0"
    r = subprocess.run([sys.executable, "-c", SCRIPT, path, HERE, repr(SHAPES)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return np.load(path)


def test_panel_n_bit_identical_and_exact_decode(tmp_path):
    a = _run(str(tmp_path / "on.npz"), True)
    b = _run(str(tmp_path / "off.npz"), False)
    for n in range(len(SHAPES)):
        for dq in (True, False):
            k = f"{n}_{dq}"
            np.testing.assert_array_equal(a[f"y_{k}"], b[f"y_{k}"], err_msg=f"panel on/off differ: {SHAPES[n]} dq={dq}")
            np.testing.assert_array_equal(a[f"eye_{k}"], a[f"dec_{k}"], err_msg=f"decode differs: {SHAPES[n]} dq={dq}")
            np.testing.assert_array_equal(b[f"eye_{k}"], b[f"dec_{k}"])
            assert np.all(np.abs(a[f"y_{k}"] - a[f"ref_{k}"]) <= a[f"bnd_{k}"]), SHAPES[n]
