"""The fp32 GEMM driver's work split (cpu/gemm.cpp): each C element is computed by one task over the
same depth blocks in the same order through the same micro-kernel tiles, so neither the task grid
nor the driver changes a bit. The old task grid (QLORA_GEMM_DRIVER=tasks, each task packs its own
panels) under QLORA_GEMM_GRID_THREADS (the grid of that many threads, tasks run on whatever threads
exist) and QLORA_GEMM_TASKS_PER_THREAD (1..8), and the shared-A driver (default from 2 threads, or
QLORA_GEMM_DRIVER=shared; A panels packed once per row super-block and pass of depth blocks, whose
bytes QLORA_GEMM_SHARED_BYTES shrinks here to reach those loops) must give results bit-identical to
the default, and stay within the fp32 bound of float64: gemm_nt / gemm_nn / gemm_tn / fused NF4
GEMMs, with beta, on shapes with several row and column blocks, K over 2-3 depth blocks (one pass,
or passes of 2 + 1), few B panels (rows split too), shallow depth (the row walk), N <= NR (the
direct kernel), ragged edges."""
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import nf4, ops

from helpers_gemm import bound, check

KEYS = ("QLORA_GEMM_GRID_THREADS", "QLORA_GEMM_TASKS_PER_THREAD", "QLORA_GEMM_DRIVER", "QLORA_GEMM_SHARED_BYTES")
SETTINGS = [
    (None, None, None, None),  # the reference: the default at this thread count
    (None, None, "tasks", None),
    ("2", "1", "tasks", None),
    ("2", "2", "tasks", None),
    ("2", None, "tasks", None),
    ("3", "8", "tasks", None),
    ("7", "3", "tasks", None),
    (None, None, "shared", None),
    ("2", None, None, None),
    ("1", None, "shared", None),
    ("2", "1", "shared", "300000"),
    ("3", "8", "shared", "100000"),  # super-blocks of 42 rows (AVX-512) at kc 560
    ("7", "3", "shared", "1"),  # one A panel per super-block
    ("2", None, "shared", "3000000"),  # K = 2300: passes of 2 + 1 depth blocks of 768
]
# (M, N, K) of out[M, N] for nt (W [N, K]); nn and nf4_nn use W [N, K] as B [K=N, N=K]
SHAPES = [(437, 1100, 1100), (437, 96, 1100), (437, 1100, 48), (437, 16, 1100), (437, 320, 2300)]


@pytest.fixture
def grid_env():
    saved = {k: os.environ.get(k) for k in KEYS}

    def set_grid(*values):
        for k, v in zip(KEYS, values):
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    yield set_grid
    set_grid(*(saved[k] for k in KEYS))


@pytest.mark.parametrize("backend", ["cpu:avx512", "cpu:avx2"])
@pytest.mark.parametrize("op", ["nt", "nn", "tn", "nf4_nt", "nf4_nn"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threads", [1, 2])
def test_grid_bit_identical(rng, grid_env, backend, op, shape, threads):
    try:
        ops.gemm_nt(np.ones((1, 1), np.float32), np.ones((1, 1), np.float32), backend=backend)
    except ValueError:
        pytest.skip(f"{backend} not available on this CPU")
    M, N, K = shape  # 437 x 1100 x 1100 > 5e8 FLOP: the big-problem task target
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    if op.startswith("nf4"):
        q = nf4.quantize(w, blocksize=64, double_quant=True)
        w = ops.nf4_dequantize(q)
    a_cols = K if op in ("nt", "nf4_nt") else N
    a = rng.standard_normal((M, a_cols)).astype(np.float32)
    at = np.ascontiguousarray(a.T)  # tn: A given as [K, M]
    c0 = rng.standard_normal((M, N if op in ("nt", "nf4_nt") else K)).astype(np.float32)
    alpha, beta = 0.75, 0.5

    def run():
        out = c0.copy()
        if op == "nt":
            return ops.gemm_nt(a, w, out, alpha=alpha, beta=beta, backend=backend)
        if op == "nn":
            return ops.gemm_nn(a, w, out, alpha=alpha, beta=beta, backend=backend)
        if op == "tn":
            return ops.gemm_tn(at, w, out, alpha=alpha, beta=beta, backend=backend)
        if op == "nf4_nt":
            return ops.nf4_gemm_nt(a, q, out, alpha=alpha, beta=beta, backend=backend)
        return ops.nf4_gemm_nn(a, q, out, alpha=alpha, beta=beta, backend=backend)

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
        assert np.array_equal(o.view(np.uint32), outs[0].view(np.uint32)), f"setting {s} changed bits"
    b_kn = w.T if op in ("nt", "nf4_nt") else w
    check(outs[0], alpha * (a.astype(np.float64) @ b_kn.astype(np.float64)) + beta * c0.astype(np.float64),
          bound(a, b_kn, alpha, beta, c0))
