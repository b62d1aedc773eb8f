"""Chunked causal-LM cross-entropy through the lm_head (qlora_native._core.grad_ops.lm_cross_entropy)
against a numpy float64 reference, finite differences, and its memory bound."""
import numpy as np
import pytest

from qlora_native import _core

from conftest import cpu_backends

g = _core.grad_ops
EPS32 = float(np.finfo(np.float32).eps)


def ce_ref(h, E, labels, grad_scale=1.0):
    """float64: (loss_sum, count, dh, per-row logits error scale)."""
    h64, E64 = h.astype(np.float64), E.astype(np.float64)
    logits = h64 @ E64.T  # [N, V]
    mx = logits.max(1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(1))
    keep = labels != -100
    idx = np.where(keep, labels, 0)
    loss = np.where(keep, lse - logits[np.arange(len(labels)), idx], 0.0)
    p = np.exp(logits - lse[:, None])
    p[np.arange(len(labels)), idx] -= 1.0
    dlogits = np.where(keep[:, None], p, 0.0) * grad_scale
    return loss.sum(), int(keep.sum()), dlogits @ E64


def make_inputs(rng, N, D, V, ignore_frac=0.25):
    h = rng.standard_normal((N, D)).astype(np.float32)
    E = (rng.standard_normal((V, D)) / np.sqrt(D)).astype(np.float32)
    labels = rng.integers(0, V, N).astype(np.int32)
    labels[rng.random(N) < ignore_frac] = -100
    return h, E, labels


def tolerances(h, E, labels, grad_scale):
    """fp32 error bounds: a logit (K = D products) is off by <= c sqrt(D) eps |h|·|E|; a row's loss
    by about twice that plus the log-sum-exp rounding; dh (K = V products of |dlogit| <= 1) by
    c sqrt(V) eps |grad_scale| (|softmax| + onehot)·|E| plus the logit error carried through softmax."""
    N, D = h.shape
    V = E.shape[0]
    c = 8.0
    logit_err = c * np.sqrt(D) * EPS32 * float((np.abs(h).astype(np.float64) @ np.abs(E).T).max())
    count = int((labels != -100).sum())
    loss_tol = max(count, 1) * (2 * logit_err + c * EPS32 * np.log(V) * 4)
    dh_tol = abs(grad_scale) * float(np.abs(E).max()) * 2 * (c * np.sqrt(V) * EPS32 + 2 * logit_err)
    return loss_tol, dh_tol


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("N,D,V,chunk", [(300, 48, 1000, 128), (37, 16, 61, 5), (10, 8, 130, 256)])
def test_cross_entropy_matches_reference(rng, backend, N, D, V, chunk):
    h, E, labels = make_inputs(rng, N, D, V)
    gs = 1.0 / max(1, int((labels != -100).sum()))  # mean loss, as training uses it
    r = g.lm_cross_entropy(h, E, labels, grad_scale=gs, chunk_rows=chunk, backend=backend)
    loss, count, dh = ce_ref(h, E, labels, gs)
    loss_tol, dh_tol = tolerances(h, E, labels, gs)
    assert r["count"] == count
    assert abs(r["loss_sum"] - loss) <= loss_tol, (r["loss_sum"], loss, loss_tol)
    assert r["dh"].dtype == np.float32 and r["dh"].shape == (N, D)
    err = float(np.abs(r["dh"] - dh).max())
    assert err <= dh_tol, (err, dh_tol)
    assert np.all(r["dh"][labels == -100] == 0)  # ignored rows get exactly zero gradient

    # Forward-only (eval) variant: same loss, no gradient.
    f = g.lm_cross_entropy(h, E, labels, chunk_rows=chunk, want_grad=False, backend=backend)
    assert f["dh"] is None and f["count"] == count
    assert abs(f["loss_sum"] - loss) <= loss_tol


def test_cross_entropy_chunking_does_not_change_result(rng):
    N, D, V = 50, 24, 333
    h, E, labels = make_inputs(rng, N, D, V)
    loss, _, dh = ce_ref(h, E, labels)
    loss_tol, dh_tol = tolerances(h, E, labels, 1.0)
    for chunk in (1, 7, 49, 50, 51, 1000):
        r = g.lm_cross_entropy(h, E, labels, chunk_rows=chunk)
        assert abs(r["loss_sum"] - loss) <= loss_tol, chunk
        assert float(np.abs(r["dh"] - dh).max()) <= dh_tol, chunk


def test_cross_entropy_finite_differences(rng):
    N, D, V = 5, 4, 7
    h, E, labels = make_inputs(rng, N, D, V, ignore_frac=0.0)
    labels[2] = -100
    gs = 0.7
    r = g.lm_cross_entropy(h, E, labels, grad_scale=gs, chunk_rows=2)
    fd = np.empty((N, D))
    step = 1e-6
    for i in range(N):
        for j in range(D):
            hp, hm = h.astype(np.float64), h.astype(np.float64)
            hp[i, j] += step
            hm[i, j] -= step
            fd[i, j] = gs * (ce_ref(hp, E, labels)[0] - ce_ref(hm, E, labels)[0]) / (2 * step)
    _, dh_tol = tolerances(h, E, labels, gs)
    assert float(np.abs(r["dh"] - fd).max()) <= dh_tol


def test_cross_entropy_large_logits_are_stable(rng):
    # Logits of a few hundred: a naive exp overflows fp32; the max-shifted log-softmax does not.
    N, D, V = 6, 8, 100
    h, E, labels = make_inputs(rng, N, D, V, ignore_frac=0.0)
    h *= 300.0
    r = g.lm_cross_entropy(h, E, labels)
    loss, _, dh = ce_ref(h, E, labels)
    loss_tol, dh_tol = tolerances(h, E, labels, 1.0)
    assert np.isfinite(r["loss_sum"]) and np.all(np.isfinite(r["dh"]))
    assert abs(r["loss_sum"] - loss) <= loss_tol
    assert float(np.abs(r["dh"] - dh).max()) <= dh_tol


def test_cross_entropy_all_ignored(rng):
    h, E, labels = make_inputs(rng, 9, 8, 20)
    labels[:] = -100
    r = g.lm_cross_entropy(h, E, labels, chunk_rows=4)
    assert r["loss_sum"] == 0.0 and r["count"] == 0
    assert np.all(r["dh"] == 0)


@pytest.mark.parametrize("bad", [-1, -101, 20, 2**31 - 1])
def test_cross_entropy_rejects_out_of_range_labels(rng, bad):
    h, E, labels = make_inputs(rng, 9, 8, 20)
    labels[4] = bad
    with pytest.raises(ValueError, match=r"labels\[4\]"):
        g.lm_cross_entropy(h, E, labels)


def test_cross_entropy_rejects_bad_input(rng):
    h, E, labels = make_inputs(rng, 9, 8, 20)
    with pytest.raises(ValueError, match="int32"):
        g.lm_cross_entropy(h, E, labels.astype(np.int64))
    with pytest.raises(ValueError, match="float32"):
        g.lm_cross_entropy(h.astype(np.float64), E, labels)
    with pytest.raises(ValueError, match="shape"):
        g.lm_cross_entropy(h, E[:, :7], labels)
    with pytest.raises(ValueError, match="shape"):
        g.lm_cross_entropy(h, E, labels[:8])
    with pytest.raises(ValueError, match="chunk_rows"):
        g.lm_cross_entropy(h, E, labels, chunk_rows=0)
    h[3, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        g.lm_cross_entropy(h, E, labels)


def test_cross_entropy_scratch_does_not_grow_with_rows(rng):
    # The only scratch is one [chunk, V] logits block plus [chunk] losses and the [chunk + 1, D]
    # gathered labelled rows with their [chunk] indices (workspace_bytes counts what the call
    # actually allocated), so memory is O(chunk * V) whatever N is, never O(N * V).
    D, V, chunk = 8, 1000, 64
    E = (rng.standard_normal((V, D)) / np.sqrt(D)).astype(np.float32)
    sizes = {}
    for N in (10, 64, 65, 2000):
        h = rng.standard_normal((N, D)).astype(np.float32)
        labels = rng.integers(0, V, N).astype(np.int32)
        sizes[N] = g.lm_cross_entropy(h, E, labels, chunk_rows=chunk)["workspace_bytes"]
        assert sizes[N] == g.cross_entropy_workspace_bytes(min(N, chunk), V, D)
    assert sizes[10] == 10 * V * 4 + 10 * 4 + 11 * D * 4 + 10 * 4
    assert sizes[64] == sizes[65] == sizes[2000] == chunk * V * 4 + chunk * 4 + (chunk + 1) * D * 4 + chunk * 4
    assert sizes[2000] < 2000 * V * 4 / 30
    assert g.default_chunk_rows == 256
