"""The fp32 GEMM's row walk for shallow depth (cpu/gemm.cpp run_task, K <= 64: LoRA's rank-r expand
C += s·t·Bᵀ and the grouped dX = dt·A): a tile row runs across all column panels before the next
tile row. Same tiles through the same micro-kernel calls, so the result is bit-identical to the
panel-major order (QLORA_GEMM_ROW_WALK=0) and within the fp32 bound of float64, at both SIMD
levels that share the driver; shapes span several row blocks (MC), column blocks (NC = 1024), a
ragged last tile and panel, and K at and just over the limit."""
import os

import numpy as np
import pytest

from qlora_native import ops

from helpers_gemm import bound, check

SHAPES = [(1, 40, 1), (300, 1100, 16), (1031, 70, 48), (97, 2049, 64), (45, 33, 65)]


@pytest.fixture
def walk():
    saved = os.environ.get("QLORA_GEMM_ROW_WALK")

    def set_walk(on):
        os.environ["QLORA_GEMM_ROW_WALK"] = "1" if on else "0"

    yield set_walk
    if saved is None:
        os.environ.pop("QLORA_GEMM_ROW_WALK", None)
    else:
        os.environ["QLORA_GEMM_ROW_WALK"] = saved


@pytest.mark.parametrize("backend", ["cpu:avx512", "cpu:avx2"])
@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_row_walk_bit_identical(rng, walk, backend, layout):
    try:
        ops.gemm_nt(np.ones((1, 1), np.float32), np.ones((1, 1), np.float32), backend=backend)
    except ValueError:
        pytest.skip(f"{backend} not available on this CPU")
    fn = ops.gemm_nt if layout == "nt" else ops.gemm_nn
    for M, N, K in SHAPES:
        a = rng.standard_normal((M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if layout == "nt" else (K, N)).astype(np.float32)
        c0 = rng.standard_normal((M, N)).astype(np.float32)
        outs = []
        for on in (False, True):
            walk(on)
            c = c0.copy()
            fn(a, b, c, alpha=0.5, beta=1.0, backend=backend)
            outs.append(c)
        assert np.array_equal(outs[0], outs[1]), f"{backend} {layout} {M}x{N}x{K}: row walk changed bits"
        B = b.T if layout == "nt" else b
        ref = 0.5 * (a.astype(np.float64) @ B.astype(np.float64)) + c0
        check(outs[1], ref, bound(a, B, 0.5, 1.0, c0))
