"""Optimizer backend ops (issue 11): AdamW, the chunked sum of squares behind the global gradient
norm, the clipping scale and the non-finite scan, on one contiguous buffer, on every backend.

The AdamW update and the clipping scale are exact float operations (no FMA contraction, subnormals
kept), so every backend must match a numpy float32 emulation of train::adamw_update bit for bit.
The norm's partial sums are sums of exact double squares: each backend sums in its own fixed order,
so they are checked against float64 with a rounding bound and for run-to-run equality; the CPU
backends (cpu, cpu:devsim) must give exactly the host global_grad_norm. CUDA cases skip without a GPU.
"""
import numpy as np
import pytest

from qlora_native import _core

HAVE_GPU = _core.cuda_device_count() > 0
NO_GPU = f"no CUDA GPU: {_core.cuda_device_summary()}"
BACKENDS = ["cpu", "cpu:scalar", "cpu:devsim",
            pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU))]
CHUNK = 1 << 15


def _adamw_ref(p, g, m, v, t, lr, beta1, beta2, eps, wd):
    """train::adamw_update in numpy float32, one rounded operation at a time (the CPU build's order)."""
    f = np.float32
    decay = f(1.0 - lr * wd) if wd != 0.0 else f(1.0)
    w1, b2, w2 = f(1.0 - beta1), f(beta2), f(1.0 - beta2)
    bc2s = f((1.0 - beta2 ** t) ** 0.5)
    ns = f(-(lr / (1.0 - beta1 ** t)))
    with np.errstate(all="ignore"):
        mi = m + w1 * (g - m)
        vi = v * b2 + (w2 * g) * g
        denom = np.sqrt(vi) / bc2s + f(eps)
        po = p * decay + (ns * mi) / denom
    return po.astype(f), mi.astype(f), vi.astype(f)


def _vec(rng, n):
    x = rng.standard_normal(n).astype(np.float32)
    x[:: 7] *= np.float32(1e-3)
    if n > 10:
        x[3] = 0.0
        x[5] = np.float32(1e-41)  # subnormal: must survive (no flush to zero)
        x[9] = np.float32(-3e-39)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adamw_update_bit_exact(backend, wd):
    rng = np.random.default_rng(1)
    n = 3 * CHUNK + 77  # several chunks and a ragged tail
    p, g = _vec(rng, n), _vec(rng, n)
    m = (_vec(rng, n) * np.float32(0.1)).astype(np.float32)
    v = np.abs(_vec(rng, n) * np.float32(0.01)).astype(np.float32)
    v[11] = np.float32(2e-42)  # subnormal second moment
    hp = dict(lr=3e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd)
    for t in (1, 2, 7):
        want = _adamw_ref(p, g, m, v, t, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], wd)
        got = _core.backend_op(backend, "adamw_update", {"p": p, "g": g, "m": m, "v": v}, {"n": n, "t": t}, hp)
        for name, w in zip(("p", "m", "v"), want):
            np.testing.assert_array_equal(got[name].view(np.uint32), w.view(np.uint32), err_msg=f"{name} t={t}")
        p, m, v = got["p"], got["m"], got["v"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_update_equals_host_adamw(backend):
    """The op, run as the flat optimizer runs it over tensors back to back, equals the host AdamW."""
    rng = np.random.default_rng(2)
    sizes = [5, CHUNK + 3, 0, 1000]
    ps = [_vec(rng, n) for n in sizes]
    gs = [_vec(rng, n) for n in sizes]
    host = _core.train.AdamW([x.copy() for x in ps], (0.9, 0.95), 1e-6, 0.1)
    flat = np.concatenate(ps)
    m = np.zeros_like(flat)
    v = np.zeros_like(flat)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.1)
    for t in (1, 2):
        host.step(gs, 1e-3)
        r = _core.backend_op(backend, "adamw_update", {"p": flat, "g": np.concatenate(gs), "m": m, "v": v},
                             {"n": flat.size, "t": t}, hp)
        flat, m, v = r["p"], r["m"], r["v"]
    st = host.state_dict()
    np.testing.assert_array_equal(m, np.concatenate(st["exp_avg"]))
    np.testing.assert_array_equal(v, np.concatenate(st["exp_avg_sq"]))


def _bounds(sizes):
    b, off = [0], 0
    for n in sizes:
        b += [off + min(n, s + CHUNK) for s in range(0, n, CHUNK)]
        off += n
    return np.array(b, np.int64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_squares_chunks(backend):
    rng = np.random.default_rng(3)
    sizes = [3, 2 * CHUNK + 5, 0, 17, CHUNK]
    xs = [_vec(rng, n) * np.float32(10.0) for n in sizes]
    x = np.concatenate(xs).astype(np.float32)
    b = _bounds(sizes)
    nc = b.size - 1
    args = {"bounds": b, "x": x, "partial": np.zeros(nc), "out": np.zeros(1)}
    r1 = _core.backend_op(backend, "sum_squares", args, {"n_chunks": nc})
    r2 = _core.backend_op(backend, "sum_squares", args, {"n_chunks": nc})
    np.testing.assert_array_equal(r1["out"], r2["out"])  # deterministic
    x64 = x.astype(np.float64)
    for c in range(nc):
        seg = x64[b[c]:b[c + 1]] ** 2
        # a double sum of n non-negative exact terms: relative error <= n * eps64
        assert abs(r1["partial"][c] - seg.sum()) <= seg.size * 2.3e-16 * seg.sum() + 1e-300
    want = float(np.sum(x64 ** 2))
    assert abs(r1["out"][0] - want) <= (x.size + nc) * 2.3e-16 * want
    if backend.startswith("cpu"):  # the host norm over the same tensors, bit for bit
        assert np.sqrt(r1["out"][0]) == _core.train.grad_norm([a for a in xs])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_squares_no_chunks_and_nonfinite(backend):
    r = _core.backend_op(backend, "sum_squares", {"bounds": np.zeros(1, np.int64), "x": np.zeros(1, np.float32),
                                                  "partial": np.zeros(1), "out": np.full(1, 7.0)}, {"n_chunks": 0})
    assert r["out"][0] == 0.0
    x = np.ones(100, np.float32)
    x[40] = np.inf
    r = _core.backend_op(backend, "sum_squares", {"bounds": np.array([0, 100], np.int64), "x": x,
                                                  "partial": np.zeros(1), "out": np.zeros(1)}, {"n_chunks": 1})
    assert np.isinf(r["out"][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_inplace_exact(backend):
    rng = np.random.default_rng(4)
    x = _vec(rng, 2 * CHUNK + 3)
    s = np.float32(0.37)
    r = _core.backend_op(backend, "scale_inplace", {"x": x}, {"n": x.size}, {"s": float(s)})
    np.testing.assert_array_equal(r["x"].view(np.uint32), (x * s).view(np.uint32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_find_nonfinite(backend):
    n = 3 * CHUNK + 11
    x = np.ones(n, np.float32)
    r = _core.backend_op(backend, "find_nonfinite", {"x": x, "out": np.zeros(1, np.int64)}, {"n": n})
    assert r["out"][0] == -1
    for bad in ([n - 1], [CHUNK + 2, 2 * CHUNK + 1], [5, 6, n - 2]):
        y = x.copy()
        for i, j in enumerate(bad):
            y[j] = [np.nan, np.inf, -np.inf][i % 3]
        r = _core.backend_op(backend, "find_nonfinite", {"x": y, "out": np.zeros(1, np.int64)}, {"n": n})
        assert r["out"][0] == min(bad)
    x[7] = np.float32(3e38) * np.float32(1.0)  # large but finite
    r = _core.backend_op(backend, "find_nonfinite", {"x": x, "out": np.zeros(1, np.int64)}, {"n": n})
    assert r["out"][0] == -1


def test_optimizer_ops_in_capability_tables():
    ops = {"adamw_update", "sum_squares", "scale_inplace", "find_nonfinite"}
    assert ops <= set(_core.all_backend_ops())
    assert ops <= set(_core.backend_ops("cpu:devsim"))
    if _core.cuda_compiled():
        assert ops <= set(_core.backend_ops("cuda"))  # the table is known without a GPU
