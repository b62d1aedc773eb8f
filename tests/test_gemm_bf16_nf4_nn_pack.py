"""The NN NF4 B panels of the bf16 GEMM (cpu/gemm_bf16.cpp nf4_gemm_nn_bf16, the backward's dX =
dY·W): packed straight from the 4-bit codes a row pair at a time (bf16_k::pack_nf4_nn_pair, the
default where the task's columns, its first column and in_features are multiples of 16) or decoded
to fp32 tmp rows, then rounded + interleaved (QLORA_BF16_NF4_NN_PACK=tmp, the earlier way; also
every other shape). Both form the same fp32 product code * absmax and round it RNE: the results
agree bit for bit on ragged panels, odd out_features (a last row pair of one row), depth blocks
over KC, blocksizes 32..4096, double quant, both drivers; and each stays within test_bf16's float64
bound."""
import numpy as np
import pytest

from qlora_native import ops

from helpers_bf16 import HAVE_BF16, check, env_fixture, strided
from test_ops_nf4_gemm import decode, random_nf4

pytestmark = pytest.mark.skipif(not HAVE_BF16, reason="no AVX512-BF16 on this CPU")

# (M, out_features, in_features, blocksize, double_quant): dX[M, in] = dY[M, out] · W[out, in].
CASES = [(9, 7, 64, 64, True), (37, 45, 64, 32, False), (30, 70, 256, 64, False), (100, 96, 576, 64, True),
         (20, 2113, 64, 64, True), (15, 50, 4160, 128, False), (17, 40, 96, 32, True), (29, 18, 1536, 64, False),
         (14, 33, 1536, 256, True), (16, 3, 4096, 4096, False), (40, 1100, 192, 64, True),
         (29, 65, 100, 32, False), (13, 31, 40, 64, True)]  # last two: in_features % 16 != 0 (tmp path)


env = env_fixture("QLORA_BF16_NF4_NN_PACK", "QLORA_BF16_GEMM")


@pytest.mark.parametrize("driver", ["shared", "tasks"])
def test_direct_nn_panels_equal_tmp(rng, env, driver):
    env["QLORA_BF16_GEMM"] = driver
    for M, N, K, bs, dq in CASES:
        w = random_nf4(rng, N, K, bs, dq)
        dy = strided(rng, M, N)
        c0 = rng.standard_normal((M, K)).astype(np.float32)
        outs = []
        for pack in ("tmp", "direct"):
            env["QLORA_BF16_NF4_NN_PACK"] = pack
            out = c0.copy()
            ops.nf4_gemm_nn(dy, w, out, alpha=-1.5, beta=0.5, backend="cpu:avx512", compute_dtype="bfloat16")
            outs.append(out)
        assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32)), (M, N, K, bs, dq)
        check(outs[1], dy, decode(w), N, -1.5, 0.5, c0)
