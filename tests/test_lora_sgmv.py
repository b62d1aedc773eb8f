"""Multi-adapter LoRA op (Backend::lora_segments / lora_segments_many, issue 8): every CPU SIMD level
against a float64 reference, with ranks that differ per segment, row counts 0/1/odd/above the
fused path's limit, odd sizes, strided x and y; and the fused job's batch invariance (a row gets
the same bits whatever rows share its call)."""
import numpy as np
import pytest

import qlora_native

ops = qlora_native._core.ops
CPU = [b for b in qlora_native._core.available_backends() if b.startswith("cpu:")]
FAST = [b for b in CPU if b != "cpu:scalar"]


def _strided(rng, rows, cols, pad):
    """A float32 [rows, cols] view with row stride cols + pad (pad 0: contiguous)."""
    big = rng.standard_normal((rows, cols + pad)).astype(np.float32)
    return big[:, :cols] if pad else big


def _problem(rng, M, n_in, n_out, specs, pad=0):
    """x, y0 and segments for specs [(row0, rows, r, alpha, adapter key)], and the float64 result."""
    x = _strided(rng, M, n_in, pad)
    y0 = _strided(rng, M, n_out, pad + 3 if pad else 0)
    factors, segs = {}, []
    want = y0.astype(np.float64)
    for row0, rows, r, alpha, key in specs:
        if key not in factors:
            factors[key] = (rng.standard_normal((r, n_in)).astype(np.float32),
                            rng.standard_normal((n_out, r)).astype(np.float32))
        A, B = factors[key]
        segs.append((row0, rows, A, B, alpha))
        want[row0:row0 + rows] += alpha * (x[row0:row0 + rows].astype(np.float64) @ A.T.astype(np.float64)) \
            @ B.T.astype(np.float64)
    return x, y0, segs, want


def _tol(segs, n_in):
    return dict(rtol=2e-5, atol=2e-5 * max(1, n_in) ** 0.5 * 20)


def test_levels_listed():
    assert "cpu:scalar" in CPU and "cpu:generic" in CPU


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("n_in,n_out,pad", [(37, 53, 0), (64, 48, 5), (576, 192, 0), (17, 16, 1), (1, 1, 0)])
def test_segments_match_float64(backend, n_in, n_out, pad):
    rng = np.random.default_rng(n_in * 1000 + n_out)
    # ranks 1..33 (below, at and across the 8/16-wide SIMD blocks), rows 0, 1, odd, > 8, > 64
    # (the gemm path), one adapter used by two segments, alpha 0 (skipped), a gap row.
    specs = [(0, 1, 16, 0.5, "a"), (1, 3, 5, -2.0, "b"), (4, 0, 7, 1.0, "c"), (4, 9, 33, 1.25, "d"),
             (13, 2, 16, 0.75, "a"), (15, 1, 1, 3.0, "e"), (17, 2, 8, 0.0, "f"), (20, 70, 20, -0.5, "g"),
             (90, 5, 24, 1.0, "h")]
    M = 96  # rows 16 and 19 belong to no segment
    x, y0, segs, want = _problem(rng, M, n_in, n_out, specs, pad)
    y = y0.copy()
    ops.lora_segments(x, y, segs, backend=backend)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()), err_msg=backend)
    for row in (16, 17, 18, 19):  # no segment, or alpha 0: untouched, bit for bit
        np.testing.assert_array_equal(y[row], y0[row])


@pytest.mark.parametrize("backend", CPU)
def test_many_problems_match_float64_and_single_calls(backend):
    """q/k/v-like problems sharing x (and one with its own x) in one call: each equals its own
    lora_segments call bit for bit, and the float64 reference."""
    rng = np.random.default_rng(7)
    M, n_in = 11, 40
    x = _strided(rng, M, n_in, 4)
    probs, wants, singles = [], [], []
    for k, n_out in enumerate((40, 24, 24, 97)):
        specs = [(0, 4, 16, 0.5, "a"), (4, 1, 3 + k, -1.0, "b"), (5, 6, 16 + 2 * k, 2.0, "c")]
        xk = x if k < 3 else _strided(rng, M, 97, 0)[:, :n_in].copy()
        _, y0, segs, _ = _problem(rng, M, n_in, n_out, specs)
        want = y0.astype(np.float64)
        for row0, rows, A, B, alpha in segs:
            want[row0:row0 + rows] += alpha * (xk[row0:row0 + rows].astype(np.float64) @ A.T) @ B.T.astype(np.float64)
        y1 = y0.copy()
        ops.lora_segments(xk, y1, segs, backend=backend)
        probs.append((xk, y0.copy(), segs))
        wants.append(want)
        singles.append(y1)
    ops.lora_segments_many(probs, backend=backend)
    for (xk, y, segs), want, y1 in zip(probs, wants, singles):
        np.testing.assert_array_equal(y, y1)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("backend", FAST)
def test_batch_invariance(backend):
    """A row's LoRA term is the same bits alone and inside a segment of 8 or 9 rows, or next to
    other adapters' segments: mixed batches give each row what it gets when served alone."""
    rng = np.random.default_rng(3)
    M, n_in, n_out = 9, 576, 200
    x = rng.standard_normal((M, n_in)).astype(np.float32)
    y0 = rng.standard_normal((M, n_out)).astype(np.float32)
    A = rng.standard_normal((16, n_in)).astype(np.float32)
    B = rng.standard_normal((n_out, 16)).astype(np.float32)
    A2 = rng.standard_normal((8, n_in)).astype(np.float32)
    B2 = rng.standard_normal((n_out, 8)).astype(np.float32)
    together = y0.copy()
    ops.lora_segments(x, together, [(0, M, A, B, 0.5)], backend=backend)
    mixed = y0.copy()
    ops.lora_segments(x, mixed, [(0, 3, A, B, 0.5), (3, 1, A2, B2, 2.0), (4, 5, A, B, 0.5)], backend=backend)
    for row in range(M):
        alone = y0[row:row + 1].copy()
        ops.lora_segments(x[row:row + 1], alone, [(0, 1, A, B, 0.5)], backend=backend)
        np.testing.assert_array_equal(together[row], alone[0], err_msg=f"row {row}")
        if row != 3:
            np.testing.assert_array_equal(mixed[row], alone[0], err_msg=f"row {row}")


def test_many_bad_input():
    rng = np.random.default_rng(1)
    x, y0, segs, _ = _problem(rng, 4, 8, 6, [(0, 4, 2, 1.0, "a")])
    with pytest.raises(ValueError, match="each problem is"):
        ops.lora_segments_many([(x, y0)])
    with pytest.raises(ValueError, match="must not overlap"):
        ops.lora_segments_many([(x, y0, segs), (x, y0, segs)])
    with pytest.raises(ValueError, match="out of range"):
        ops.lora_segments_many([(x, y0, [(3, 2, segs[0][2], segs[0][3], 1.0)])])
    ops.lora_segments_many([])  # nothing to do


@pytest.mark.parametrize("backend", FAST)
def test_large_job_on_the_thread_pool(backend):
    """A job big enough for the thread pool (8 adapters on gate/up/down-like shapes, several shrink
    and expand tasks per problem, expands waiting on other threads' shrinks): the same bits as
    each row alone (a job small enough to run on the calling thread), and the float64 result."""
    rng = np.random.default_rng(11)
    M, n_in = 8, 576
    x = rng.standard_normal((M, n_in)).astype(np.float32)
    probs, wants, alone = [], [], []
    for n_out in (1536, 1536, 576):
        y0 = rng.standard_normal((M, n_out)).astype(np.float32)
        segs = [(m, 1, rng.standard_normal((16 + 8 * (m % 2), n_in)).astype(np.float32), None, 0.5 + m)
                for m in range(M)]
        segs = [(m, 1, A, rng.standard_normal((n_out, A.shape[0])).astype(np.float32), al) for m, _, A, _, al in segs]
        want = y0.astype(np.float64)
        rows = []
        for m, _, A, B, al in segs:
            want[m] += al * (x[m].astype(np.float64) @ A.T.astype(np.float64)) @ B.T.astype(np.float64)
            y1 = y0[m:m + 1].copy()
            ops.lora_segments(x[m:m + 1], y1, [(0, 1, A, B, al)], backend=backend)
            rows.append(y1[0])
        probs.append((x, y0, segs))
        wants.append(want)
        alone.append(np.stack(rows))
    old = qlora_native.num_threads()
    qlora_native.set_num_threads(2)
    try:
        ops.lora_segments_many(probs, backend=backend)
    finally:
        qlora_native.set_num_threads(old)
    for (_, y, _), want, a in zip(probs, wants, alone):
        np.testing.assert_array_equal(y, a)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
