"""The bf16 GEMM drivers (cpu/gemm_bf16.cpp): the shared-A driver (the A panels packed once per
call by all threads together, each task packing its own B panels; QLORA_BF16_GEMM=shared, the
default from 4 MFLOP) and the per-task driver (QLORA_BF16_GEMM=tasks), with the streaming B
packers (default) and the direct ones (QLORA_BF16_PACK=direct), the A panels packed by
pack_a_panel (whole-vector stores, default) or by the general pack_rows (QLORA_BF16_PACK_A=rows).
All round the operands to bf16
(RNE) at the same points and sum the same k-blocks in the same order, so they must agree bit for
bit; each is also checked against float64 under test_bf16's bound. QLORA_BF16_SHARED_BYTES shrinks
the A-panel budget so small shapes go through several row super-blocks (1 byte: one 14-row tile
per pass). The variables are read per call. Shapes with fewer B panels than tasks split rows."""
import os

import numpy as np
import pytest

from qlora_native import ops

from helpers_bf16 import HAVE_BF16, check, strided
from test_ops_nf4_gemm import decode, random_nf4

pytestmark = pytest.mark.skipif(not HAVE_BF16, reason="no AVX512-BF16 on this CPU")

VARIANTS = [("tasks", "direct", None), ("shared", "direct", None), ("shared", "stream", None),
            ("tasks", "stream", None), ("shared", "stream", "20000"), ("shared", "direct", "1"),
            ("shared", "stream", None, "rows"), ("tasks", "direct", "20000", "rows")]
# ragged M / N / K around MR = 14, NR = 32, the packers' 16 / 32 k steps and KC = 2048
SHAPES = [(1, 1, 1), (13, 31, 33), (15, 33, 7), (29, 65, 301), (57, 97, 130), (200, 70, 2100), (171, 96, 4111)]
# N over NC = 1024 and K over KC = 2048: several column and depth blocks (test_big_blocks)
BIG = [(33, 2100, 70), (29, 1090, 4111)]


@pytest.fixture
def env():
    keys = ("QLORA_BF16_GEMM", "QLORA_BF16_PACK", "QLORA_BF16_SHARED_BYTES", "QLORA_BF16_PACK_A")
    saved = {k: os.environ.get(k) for k in keys}

    def set_variant(drv, pack, budget, pack_a="panel"):
        os.environ["QLORA_BF16_GEMM"] = drv
        os.environ["QLORA_BF16_PACK"] = pack
        os.environ["QLORA_BF16_PACK_A"] = pack_a
        if budget is None:
            os.environ.pop("QLORA_BF16_SHARED_BYTES", None)
        else:
            os.environ["QLORA_BF16_SHARED_BYTES"] = budget

    yield set_variant
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_all(env, fn):
    """fn() under every variant; all results equal bit for bit; returns the first."""
    outs = []
    for v in VARIANTS:
        env(*v)
        outs.append(fn())
    for v, o in zip(VARIANTS[1:], outs[1:]):
        assert np.array_equal(o, outs[0]), f"{v} differs from {VARIANTS[0]}"
    return outs[0]


@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
def test_gemm_bf16_drivers_agree(rng, env, layout):
    check_shapes(rng, env, layout, SHAPES)


@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_big_blocks(rng, env, layout):
    """Shapes with several column blocks and depth blocks (the A panels of each depth block packed
    by both packers, whole 32-k steps and the ragged tail)."""
    check_shapes(rng, env, layout, BIG)


def check_shapes(rng, env, layout, shapes):
    fn = {"nt": ops.gemm_nt, "nn": ops.gemm_nn, "tn": ops.gemm_tn}[layout]
    for M, N, K in shapes:
        a = strided(rng, M, K) if layout != "tn" else strided(rng, K, M)
        b = strided(rng, N, K) if layout == "nt" else strided(rng, K, N)
        A = a if layout != "tn" else a.T
        B = b.T if layout == "nt" else b
        c = run_all(env, lambda: fn(a, b, backend="cpu:avx512", compute_dtype="bfloat16"))
        check(c, A, B, K)
        c0 = strided(rng, M, N)  # alpha / beta into a strided out

        def with_beta():
            out = c0.copy()
            fn(a, b, out, alpha=-0.75, beta=0.5, backend="cpu:avx512", compute_dtype="bfloat16")
            return out

        check(run_all(env, with_beta), A, B, K, -0.75, 0.5, c0)


@pytest.mark.parametrize("nt", [True, False], ids=["nt", "nn"])
def test_nf4_gemm_bf16_drivers_agree(rng, env, nt):
    cases = [(5, 7, 64, 64, True), (37, 45, 67, 32, True), (30, 70, 260, 64, False), (100, 96, 576, 64, True),
             (200, 33, 2100, 64, True), (64, 1100, 96, 128, False)]
    for M, out_f, in_f, bs, dq in cases:
        w = random_nf4(rng, out_f, in_f, bs, dq)
        W = decode(w)
        if nt:
            x = strided(rng, M, in_f)
            y = run_all(env, lambda: ops.nf4_gemm_nt(x, w, backend="cpu:avx512", compute_dtype="bfloat16"))
            check(y, x, W.T, in_f)
        else:
            dy = strided(rng, M, out_f)
            c0 = rng.standard_normal((M, in_f)).astype(np.float32)

            def call():
                out = c0.copy()
                ops.nf4_gemm_nn(dy, w, out, alpha=2.0, beta=-1.0, backend="cpu:avx512", compute_dtype="bfloat16")
                return out

            check(run_all(env, call), dy, W, out_f, 2.0, -1.0, c0)


def test_k_zero_scales_c(env):
    """K = 0: C = beta * C under every driver (no packing, no kernel)."""
    a = np.zeros((5, 0), np.float32)
    b = np.zeros((0, 7), np.float32)
    c0 = np.arange(35, dtype=np.float32).reshape(5, 7)

    def call():
        out = c0.copy()
        ops.gemm_nn(a, b, out, alpha=1.0, beta=0.5, backend="cpu:avx512", compute_dtype="bfloat16")
        return out

    assert np.array_equal(run_all(env, call), 0.5 * c0)
