"""The NF4 GEMVs' per-thread scratch (cpu/nf4_gemv.cpp gemv_many, cpu/nf4_gemv_bf16.cpp): the regrouped X
and the task list live in grow-only per-thread buffers instead of a fresh zero-filled vector per call.
What is left in them from a larger earlier call (other M, other K) must never reach a result: every call
gives exactly the bits of QLORA_GEMV_SCRATCH=0 (a fresh vector per call; read per call), at every SIMD
level, fp32 and (where present) bf16 compute, shrinking and growing shapes in one process."""
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import ops

from test_ops_nf4_gemm import random_nf4

LEVELS = [b for b in qlora_native._core.available_backends() if b.startswith("cpu:") and b != "cpu:scalar"]


@pytest.mark.parametrize("backend", LEVELS)
def test_scratch_reuse_equals_fresh_buffers(backend):
    rng = np.random.default_rng(8)
    dtypes = ["float32"] + (["bfloat16"] if ops.bf16_compute_available(backend) else [])
    # K shrinks and grows (1536 -> 576 -> 128 -> 1536), M too, so stale scratch sits past / inside each call's
    shapes = [(8, 1536, (96, 64)), (3, 576, (64, 32, 64)), (8, 128, (32,)), (1, 576, (64,)), (5, 1536, (64, 32)),
              (2, 576, (160,))]
    for dt in dtypes:
        for M, K, rows in shapes:
            ws = [random_nf4(rng, r, K, 64, True) for r in rows]
            x = rng.standard_normal((M, K)).astype(np.float32)
            os.environ.pop("QLORA_GEMV_SCRATCH", None)
            reused = ops.nf4_gemm_nt_many(x, ws, backend=backend, compute_dtype=dt)
            single = [ops.nf4_gemm_nt(x, w, backend=backend, compute_dtype=dt) for w in ws]
            os.environ["QLORA_GEMV_SCRATCH"] = "0"
            try:
                fresh = ops.nf4_gemm_nt_many(x, ws, backend=backend, compute_dtype=dt)
                fresh_single = [ops.nf4_gemm_nt(x, w, backend=backend, compute_dtype=dt) for w in ws]
            finally:
                del os.environ["QLORA_GEMV_SCRATCH"]
            for a, b, c, d in zip(reused, fresh, single, fresh_single):
                np.testing.assert_array_equal(a, b, err_msg=f"{backend} {dt} M={M} K={K}")
                np.testing.assert_array_equal(c, d, err_msg=f"{backend} {dt} M={M} K={K}")
