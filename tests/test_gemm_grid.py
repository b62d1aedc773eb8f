"""The fp32 GEMM driver's task grid (cpu/gemm.cpp blocked): each C element is computed by one task
over the same depth blocks in the same order, so the grid never changes a bit. The A/B switches
QLORA_GEMM_GRID_THREADS (the grid of that many threads, tasks run on whatever threads exist) and
QLORA_GEMM_TASKS_PER_THREAD (1..8, default 4) must give results bit-identical to one task and to the
default grid, and stay within the fp32 bound of float64 (gemm_nt / gemm_nn / fused NF4 GEMMs, shapes
with several row and column blocks, K over one depth block, ragged edges)."""
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import nf4, ops

from helpers_gemm import bound, check

KEYS = ("QLORA_GEMM_GRID_THREADS", "QLORA_GEMM_TASKS_PER_THREAD")
SETTINGS = [(None, None), ("2", "1"), ("2", "2"), ("2", None), ("3", "8"), ("7", "3")]


@pytest.fixture
def grid_env():
    saved = {k: os.environ.get(k) for k in KEYS}

    def set_grid(threads, per):
        for k, v in zip(KEYS, (threads, per)):
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    yield set_grid
    set_grid(saved[KEYS[0]], saved[KEYS[1]])


@pytest.mark.parametrize("backend", ["cpu:avx512", "cpu:avx2"])
@pytest.mark.parametrize("op", ["nt", "nn", "nf4_nt", "nf4_nn"])
@pytest.mark.parametrize("threads", [1, 2])
def test_grid_bit_identical(rng, grid_env, backend, op, threads):
    try:
        ops.gemm_nt(np.ones((1, 1), np.float32), np.ones((1, 1), np.float32), backend=backend)
    except ValueError:
        pytest.skip(f"{backend} not available on this CPU")
    M, N, K = 437, 1100, 1100  # > 5e8 FLOP: the big-problem task target; K over one depth block on 1 MiB L2
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    if op.startswith("nf4"):
        q = nf4.quantize(w, blocksize=64, double_quant=True)
        w = ops.nf4_dequantize(q)
    a = rng.standard_normal((M, K if op in ("nt", "nf4_nt") else N)).astype(np.float32)

    def run():
        if op == "nt":
            return ops.gemm_nt(a, w, backend=backend)
        if op == "nn":
            return ops.gemm_nn(a, w, backend=backend)
        if op == "nf4_nt":
            return ops.nf4_gemm_nt(a, q, backend=backend)
        return ops.nf4_gemm_nn(a, q, backend=backend)

    old = qlora_native.num_threads()
    qlora_native.set_num_threads(threads)
    try:
        outs = []
        for s in SETTINGS:
            grid_env(*s)
            outs.append(run())
    finally:
        qlora_native.set_num_threads(old)
    for s, o in zip(SETTINGS[1:], outs[1:]):
        assert np.array_equal(o.view(np.uint32), outs[0].view(np.uint32)), f"grid {s} changed bits"
    b_kn = w.T if op in ("nt", "nf4_nt") else w
    check(outs[0], a.astype(np.float64) @ b_kn.astype(np.float64), bound(a, b_kn))
