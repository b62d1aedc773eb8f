"""The NT NF4 B panels of the bf16 GEMM (cpu/gemm_bf16.cpp nf4_gemm_nt_bf16): packed straight from
the 4-bit codes (bf16_k::pack_nf4_nt, the default where K % blocksize == 0) or decoded to an fp32
tmp and then rounded + transposed (QLORA_BF16_NF4_PACK=tmp, the earlier way; also every weight
with K % blocksize != 0). Both form the same fp32 product code * absmax and round it RNE, so the
results must agree bit for bit: ragged panels (nr < 16, 16 < nr < 32), N over NC = 1024, K over
KC = 2048 (depth blocks starting inside a quantization block), blocksizes 32..4096, double quant,
both drivers; and each stays within test_bf16's float64 bound. nf4_gemm_nt_many in bf16 (X's panels
packed once for q/k/v-like groups, QLORA_BF16_NF4_MANY=0: one call each) == single calls, bit for bit."""
import numpy as np
import pytest

from qlora_native import ops

from helpers_bf16 import HAVE_BF16, check, env_fixture, strided
from test_ops_nf4_gemm import decode, random_nf4

pytestmark = pytest.mark.skipif(not HAVE_BF16, reason="no AVX512-BF16 on this CPU")

# (M, out_features = N, in_features = K, blocksize, double_quant); M > 8 keeps the GEMM (not the GEMV).
CASES = [(9, 7, 64, 64, True), (37, 45, 64, 32, False), (30, 70, 256, 64, False), (100, 96, 576, 64, True),
         (20, 33, 2112, 64, True), (15, 50, 4160, 128, False), (17, 40, 96, 32, True), (29, 18, 4608, 64, False),
         (14, 32, 1536, 256, True), (16, 33, 4096, 4096, False), (40, 1100, 192, 64, True),
         (29, 65, 100, 32, False), (13, 31, 4100, 64, True)]  # last two: K % blocksize != 0 (tmp path)


env = env_fixture("QLORA_BF16_NF4_PACK", "QLORA_BF16_GEMM", "QLORA_BF16_NF4_MANY")


@pytest.mark.parametrize("driver", ["shared", "tasks"])
def test_direct_nf4_panels_equal_tmp(rng, env, driver):
    env["QLORA_BF16_GEMM"] = driver
    for M, N, K, bs, dq in CASES:
        w = random_nf4(rng, N, K, bs, dq)
        x = strided(rng, M, K)
        c0 = rng.standard_normal((M, N)).astype(np.float32)
        outs = []
        for pack in ("tmp", "direct"):
            env["QLORA_BF16_NF4_PACK"] = pack
            y = c0.copy()
            ops.nf4_gemm_nt(x, w, y, alpha=-1.5, beta=0.5, backend="cpu:avx512", compute_dtype="bfloat16")
            outs.append(y)
        assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32)), (M, N, K, bs, dq)
        check(outs[1], x, decode(w).T, K, -1.5, 0.5, c0)


# (M, [(out_features, blocksize, double_quant), ...], in_features): q/k/v- and gate/up-like groups,
# ragged panels, K over KC, mixed blocksizes; the first under 4 MFLOP per weight (one call each).
MANY = [(20, [(7, 64, True), (45, 32, False)], 64),
        (100, [(96, 64, True), (32, 64, True), (32, 64, True)], 576),
        (57, [(130, 64, False), (70, 128, True)], 2112),
        (31, [(1100, 64, True), (33, 32, False), (64, 256, True)], 192),
        (29, [(40, 32, False), (41, 32, True)], 100)]


@pytest.mark.parametrize("driver", ["", "shared", "tasks"])
def test_many_equals_single_calls(rng, env, driver):
    """ops.nf4_gemm_nt_many(compute_dtype="bfloat16") (Backend::nf4_gemm_nt_many_bf16: X's bf16 panels
    packed once for all weights) == one nf4_gemm_nt call per weight, bit for bit, and == itself with
    QLORA_BF16_NF4_MANY=0 (one call each inside the op)."""
    env["QLORA_BF16_GEMM"] = driver
    for M, specs, K in MANY:
        ws = [random_nf4(rng, n, K, bs, dq) for n, bs, dq in specs]
        x = strided(rng, M, K)
        env.pop("QLORA_BF16_NF4_MANY", None)
        many = ops.nf4_gemm_nt_many(x, ws, backend="cpu:avx512", compute_dtype="bfloat16")
        env["QLORA_BF16_NF4_MANY"] = "0"
        each = ops.nf4_gemm_nt_many(x, ws, backend="cpu:avx512", compute_dtype="bfloat16")
        for w, y, y1 in zip(ws, many, each):
            y0 = ops.nf4_gemm_nt(x, w, backend="cpu:avx512", compute_dtype="bfloat16")
            assert np.array_equal(y.view(np.uint32), y0.view(np.uint32)), (M, w.shape, K)
            assert np.array_equal(y1.view(np.uint32), y0.view(np.uint32)), (M, w.shape, K)
            check(y, x, decode(w).T, K)


def test_many_bad_dtype():
    w = random_nf4(np.random.default_rng(0), 4, 64, 64, False)
    with pytest.raises(ValueError, match="compute_dtype"):
        ops.nf4_gemm_nt_many(np.zeros((2, 64), np.float32), [w], compute_dtype="float16")
