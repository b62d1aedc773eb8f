"""The fp32 GEMM driver's panel fusion (cpu/gemm.cpp run_panels): a task whose rows are one A block
(M <= MC) packs each B micro-panel right before its micro-kernel calls instead of all of a column
block's panels first. Same micro-kernel calls per C tile, so bit-identical to QLORA_GEMM_PANEL_FUSE=0
and within the fp32 bound of float64, at both SIMD levels, 1 and 2 threads (the task grid and the
shared-A driver); shapes with one and several row blocks, several column blocks (NC = 1024) and depth
blocks, a ragged last tile and panel, nn and nt (the NF4 and Q8_0 GEMMs pass their own packers to the
same driver: tests/test_lm_head_f32_q8.py)."""
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import ops

from helpers_gemm import bound, check

SHAPES = [(17, 100, 70), (40, 33, 1500), (256, 1100, 576), (300, 2050, 2100), (100, 45, 80), (1031, 70, 96)]


@pytest.fixture
def fuse():
    saved = os.environ.get("QLORA_GEMM_PANEL_FUSE")

    def set_fuse(on):
        os.environ["QLORA_GEMM_PANEL_FUSE"] = "1" if on else "0"

    yield set_fuse
    if saved is None:
        os.environ.pop("QLORA_GEMM_PANEL_FUSE", None)
    else:
        os.environ["QLORA_GEMM_PANEL_FUSE"] = saved


@pytest.fixture(params=[1, 2], ids=lambda n: f"t{n}")
def threads(request):
    old = qlora_native.num_threads()
    qlora_native.set_num_threads(request.param)
    yield request.param
    qlora_native.set_num_threads(old)


@pytest.mark.parametrize("backend", ["cpu:avx512", "cpu:avx2"])
@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_panel_fuse_bit_identical(rng, fuse, threads, backend, layout):
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
            fuse(on)
            c = c0.copy()
            fn(a, b, c, alpha=0.5, beta=1.0, backend=backend)
            outs.append(c)
        assert np.array_equal(outs[0], outs[1]), f"{backend} {layout} {M}x{N}x{K}: panel fusion changed bits"
        B = b.T if layout == "nt" else b
        ref = 0.5 * (a.astype(np.float64) @ B.astype(np.float64)) + c0
        check(outs[1], ref, bound(a, B, 0.5, 1.0, c0))
