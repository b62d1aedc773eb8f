"""bf16 inference copies of LoRA factors in the multi-adapter op (issue 8, adapter_dtype="bfloat16"):
Backend::lora_segments_many with each segment's A/B packed to bf16 (lora_pack_bf16), at every CPU
SIMD level, against float64 with a bound derived from the bf16 roundings, against the scalar oracle,
and for batch invariance. Levels without bf16 LoRA kernels (lora_bf16_bytes == 0) make no copy and
must give the fp32 result bit for bit.

The bound. u = 2^-8 (bf16 round-to-nearest-even), e = 2^-24 (fp32), g(n) = n e / (1 - n e). The
kernels round x and A (shrink), then t and B (expand), each once, and accumulate in fp32. With
T_j = sum_k |x_k| |A_jk| and the exact t_j = sum_k x_k A_jk:
  shrink:  |t^_j - t_j| <= (2u + u^2 + g(K) (1 + u)^2) T_j = a T_j
  t~ = bf16(t^): |t~_j - t_j| <= u |t^_j| + a T_j <= (u + a + u a) T_j = b T_j
  expand:  |y^_n - y_n| <= |alpha| c sum_j T_j |B_nj| + e |y_n|,
           c = b (1 + u) + u + g(r) (1 + b)(1 + u)        (about 4u)
"""
import numpy as np
import pytest

import qlora_native
from test_lora_sgmv import _problem

ops = qlora_native._core.ops
CPU = [b for b in qlora_native._core.available_backends() if b.startswith("cpu:")]
U, E = 2.0 ** -8, 2.0 ** -24


def _g(n):
    return n * E / (1 - n * E)


def _bound(x, A, B, alpha, y0):
    """Per-element bound of |y_kernel - y_exact| (module docstring) for y = y0 + alpha x A^T B^T."""
    K, r = A.shape[1], A.shape[0]
    a = 2 * U + U * U + _g(K + 2) * (1 + U) ** 2
    b = U + a + U * a
    c = b * (1 + U) + U + _g(r + 2) * (1 + b) * (1 + U)
    T = np.abs(x.astype(np.float64)) @ np.abs(A.astype(np.float64)).T
    exact = y0.astype(np.float64) + alpha * (x.astype(np.float64) @ A.T.astype(np.float64)) @ B.T.astype(np.float64)
    return exact, abs(alpha) * c * (T @ np.abs(B.astype(np.float64)).T) + E * np.abs(exact) + 1e-30


def _case(rng, M, n_in, n_out, specs, pad):
    """test_lora_sgmv's problem (x, y0, segments) without its float64 result (this file's bound has its own)."""
    return _problem(rng, M, n_in, n_out, specs, pad)[:3]


def _run(x, y0, segs, backend, dtype):
    y = y0.copy()
    ops.lora_segments_many([(x, y, segs)], backend=backend, adapter_dtype=dtype)
    return y


# ranks 1..33 (below, at and across 16-lane blocks, odd), rows 0/1/odd/8/70 (prefill size), one
# adapter in two segments, alpha 0, rows in no segment
SPECS = [(0, 1, 16, 0.5, "a"), (1, 3, 5, -2.0, "b"), (4, 0, 7, 1.0, "c"), (4, 9, 33, 1.25, "d"),
         (13, 2, 16, 0.75, "a"), (15, 1, 1, 3.0, "e"), (17, 2, 8, 0.0, "f"), (20, 70, 20, -0.5, "g"),
         (90, 5, 24, 1.0, "h")]


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("n_in,n_out,pad", [(37, 53, 0), (64, 48, 5), (576, 192, 0), (17, 16, 1), (1, 1, 0)])
def test_bf16_segments_within_the_bf16_bound(backend, n_in, n_out, pad):
    rng = np.random.default_rng(n_in * 1000 + n_out)
    x, y0, segs = _case(rng, 96, n_in, n_out, SPECS, pad)
    got = _run(x, y0, segs, backend, "bfloat16")
    f32 = _run(x, y0, segs, backend, "float32")
    if ops.lora_bf16_bytes(16, n_in, n_out, backend=backend) == 0:  # no bf16 kernels here: fp32, same bits
        np.testing.assert_array_equal(got, f32, err_msg=backend)
        return
    for row0, rows, A, B, alpha in segs:
        sl = slice(row0, row0 + rows)
        if rows == 0 or alpha == 0.0:
            continue
        exact, bound = _bound(x[sl], A, B, alpha, y0[sl])
        err = np.abs(got[sl].astype(np.float64) - exact)
        assert (err <= bound).all(), (backend, row0, float((err / bound).max()))
    for row in (16, 17, 18, 19):  # no segment, or alpha 0: untouched
        np.testing.assert_array_equal(got[row], y0[row])
    # the copies were used: bf16 error, well above fp32's, on rows with a non-trivial adapter
    if n_in >= 17:
        assert np.abs(got - f32).max() > 1e-4 * np.abs(f32).max(), backend


@pytest.mark.parametrize("n_in,n_out", [(576, 576), (45, 70)])
def test_kernels_match_the_scalar_oracle(n_in, n_out):
    levels = [b for b in CPU if ops.lora_bf16_bytes(16, n_in, n_out, backend=b)]
    if levels == ["cpu:scalar"] or not levels:
        pytest.skip("no AVX512-BF16 units on this CPU")
    rng = np.random.default_rng(7)
    x, y0, segs = _case(rng, 96, n_in, n_out, SPECS, 0)
    ref = _run(x, y0, segs, "cpu:scalar", "bfloat16")
    for b in levels:
        got = _run(x, y0, segs, b, "bfloat16")
        for row0, rows, A, B, alpha in segs:
            if rows == 0 or alpha == 0.0:
                continue
            sl = slice(row0, row0 + rows)
            _, bound = _bound(x[sl], A, B, alpha, y0[sl])
            # both within the bound of the exact result; in practice they differ by fp32 summation
            # order and an occasional t rounded the other way (one bf16 ulp of t)
            assert (np.abs(got[sl].astype(np.float64) - ref[sl]) <= 2 * bound).all(), b


@pytest.mark.parametrize("backend", CPU)
def test_rows_do_not_depend_on_their_batch(backend):
    """A row's bits are the same alone, in a segment of 8 rows, or of 70 (a prefill; the fp32 path
    takes its blocked GEMMs above 64 rows, so levels without bf16 copies check 40)."""
    rng = np.random.default_rng(3)
    n_in, n_out, r = 576, 1536, 16
    M = 70 if ops.lora_bf16_bytes(r, n_in, n_out, backend=backend) else 40
    x = rng.standard_normal((M, n_in)).astype(np.float32)
    y0 = rng.standard_normal((M, n_out)).astype(np.float32)
    A = rng.standard_normal((r, n_in)).astype(np.float32)
    B = rng.standard_normal((n_out, r)).astype(np.float32)
    whole = _run(x, y0, [(0, M, A, B, 0.5)], backend, "bfloat16")
    eight = _run(x[:8], y0[:8], [(0, 8, A, B, 0.5)], backend, "bfloat16")
    np.testing.assert_array_equal(eight, whole[:8])
    for row in (0, 3, 7, 33, M - 1):
        alone = _run(x[row:row + 1], y0[row:row + 1], [(0, 1, A, B, 0.5)], backend, "bfloat16")
        np.testing.assert_array_equal(alone[0], whole[row], err_msg=f"{backend} row {row}")


def test_problems_sharing_an_input_match_single_calls():
    """q/k/v-like problems over one x (the input rounded once for all): each equals its own call."""
    b = "cpu"
    rng = np.random.default_rng(11)
    x = rng.standard_normal((8, 96)).astype(np.float32)
    outs = [rng.standard_normal((8, n)).astype(np.float32) for n in (96, 32, 32)]
    specs = [[(0, 3, 16, 1.0, "p"), (3, 5, 8, 0.5, "q")], [(0, 8, 4, 2.0, "k")], [(2, 6, 16, -1.0, "v")]]
    problems, singles = [], []
    for y0, sp in zip(outs, specs):
        _, _, segs = _case(rng, 8, 96, y0.shape[1], sp, 0)
        y = y0.copy()
        problems.append((x, y, segs))
        singles.append(_run(x, y0, segs, b, "bfloat16"))
    ops.lora_segments_many(problems, backend=b, adapter_dtype="bfloat16")
    for (_, y, _), want in zip(problems, singles):
        np.testing.assert_array_equal(y, want)


def test_bad_adapter_dtype():
    x = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="adapter_dtype"):
        ops.lora_segments_many([(x, np.zeros((1, 4), np.float32), [])], adapter_dtype="float16")


@pytest.mark.parametrize("r,n_in,n_out", [(16, 576, 1536), (5, 37, 53), (33, 64, 17), (1, 1, 1)])
def test_packed_copy_layout_and_bits(r, n_in, n_out):
    """Every level with copies packs the same words: pairs of RNE-rounded bf16 (ties, denormals,
    inf) in 16-lane blocks (lora_sgmv_bf16_kernels.hpp)."""
    rng = np.random.default_rng(r * 100 + n_in)
    A = rng.standard_normal((r, n_in)).astype(np.float32)
    B = rng.standard_normal((n_out, r)).astype(np.float32)
    A.flat[::7] = np.float32(1 + 2.0 ** -8)  # a tie: rounds to even (1.0)
    A.flat[1::11] = np.float32(1e-40)  # denormal: flushed to zero
    B.flat[::5] = np.float32(3 * 2.0 ** -9 + 1)  # another tie, rounds up to even
    B.flat[2::13] = np.inf
    packs = {b: ops.lora_pack_bf16(A, B, backend=b) for b in CPU}
    packs = {b: p for b, p in packs.items() if p is not None}
    assert "cpu:scalar" in packs
    ref = packs["cpu:scalar"]
    for b, p in packs.items():
        np.testing.assert_array_equal(p, ref, err_msg=b)

    def bf16_bits(x):
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = np.where((u & 0x7F800000) == 0, u & 0x80000000, u)  # denormals -> signed zero
        return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF).astype(np.uint32)

    def unpack(words, n, k):
        kp = (k + 1) // 2
        w = words[: ((n + 15) // 16) * kp * 16].reshape((n + 15) // 16, kp, 16)
        lo, hi = w & 0xFFFF, w >> 16
        out = np.zeros(((n + 15) // 16 * 16, 2 * kp), np.uint32)
        for nb in range(w.shape[0]):
            out[nb * 16:(nb + 1) * 16, 0::2] = lo[nb].T
            out[nb * 16:(nb + 1) * 16, 1::2] = hi[nb].T
        assert not out[n:].any() and not out[:, k:].any()  # padding is zero
        return out[:n, :k]

    a_words = ((r + 15) // 16) * ((n_in + 1) // 2) * 16
    np.testing.assert_array_equal(unpack(ref[:a_words], r, n_in), bf16_bits(A))
    np.testing.assert_array_equal(unpack(ref[a_words:], n_out, r), bf16_bits(B))
