"""The chunked LM loss skips rows labelled -100 (model/lm_loss.cpp): the lm_head GEMMs run on the
labelled rows only, gathered chunk_rows at a time, and dh comes back through a gather with a zero row.

Each labelled row's dh must be the bits it gets when every row is labelled (the same GEMM route: more
than 16 rows per chunk on both sides), each ignored row's dh exactly 0, and the loss the sum of the
labelled rows' losses (float64 reference within the fp32 bound of test_loss_ops). The training pass
takes the same path: test_train_parity's batches (a -100 prompt prefix, padding, random -100s) check
its gradients and loss curves against PEFT."""
import numpy as np
import pytest

from qlora_native import _core

from conftest import cpu_backends
from test_loss_ops import ce_ref, tolerances

g = _core.grad_ops


def sft_labels(rng, B, T, V):
    """B sequences of T rows: a prompt prefix and right padding ignored, the completion labelled."""
    labels = rng.integers(0, V, B * T).astype(np.int32)
    for b in range(B):
        prompt = int(rng.integers(1, T // 2))
        pad = int(rng.integers(0, T // 4))
        labels[b * T:b * T + prompt] = -100
        labels[(b + 1) * T - pad:(b + 1) * T] = -100
    return labels


def patterns(rng, N, V):
    """Ignored rows at the start, the end, in runs, scattered, all but a few, none."""
    out = {}
    lab = rng.integers(0, V, N).astype(np.int32)
    a = lab.copy(); a[: N // 3] = -100; out["head"] = a
    a = lab.copy(); a[-N // 3:] = -100; out["tail"] = a
    a = lab.copy(); a[rng.random(N) < 0.5] = -100; out["scattered"] = a
    a = np.full(N, -100, np.int32); keep = rng.choice(N, 3, replace=False); a[keep] = lab[keep]; out["few"] = a
    out["none"] = lab.copy()
    return out


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("chunk", [7, 40, 256])
def test_ignored_rows_match_reference(rng, backend, chunk):
    N, D, V = 150, 32, 500
    h = rng.standard_normal((N, D)).astype(np.float32)
    E = (rng.standard_normal((V, D)) / np.sqrt(D)).astype(np.float32)
    for name, labels in patterns(rng, N, V).items():
        gs = 1.0 / max(1, int((labels != -100).sum()))
        r = g.lm_cross_entropy(h, E, labels, grad_scale=gs, chunk_rows=chunk, backend=backend)
        loss, count, dh = ce_ref(h, E, labels, gs)
        loss_tol, dh_tol = tolerances(h, E, labels, gs)
        assert r["count"] == count, name
        assert abs(r["loss_sum"] - loss) <= loss_tol, (name, r["loss_sum"], loss, loss_tol)
        assert float(np.abs(r["dh"] - dh).max()) <= dh_tol, name
        assert np.all(r["dh"][labels == -100] == 0), name  # exactly zero, not merely small
        f = g.lm_cross_entropy(h, E, labels, chunk_rows=chunk, want_grad=False, backend=backend)
        assert f["dh"] is None and f["count"] == count
        assert abs(f["loss_sum"] - loss) <= loss_tol, name


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("B,T,chunk", [(4, 64, 64), (3, 100, 256), (2, 200, 50)])
def test_labelled_rows_keep_their_bits(rng, bf16, B, T, chunk):
    """An SFT batch (prompt and padding ignored): each labelled row's dh is bit-identical to the one
    it gets when the ignored rows carry labels too (those then go through the ungathered chunks).
    Every chunk on both sides has more than 16 rows, so both take the blocked GEMM, whose per-row
    sums do not depend on the other rows of the call."""
    N, D, V = B * T, 64, 700
    assert N % chunk == 0 or N % chunk > 16  # the all-labelled call's chunks on the blocked route too
    h = rng.standard_normal((N, D)).astype(np.float32)
    E = (rng.standard_normal((V, D)) / np.sqrt(D)).astype(np.float32)
    labels = sft_labels(rng, B, T, V)
    ignored = labels == -100
    count = int((~ignored).sum())
    if count % chunk and count % chunk <= 16:  # keep every gathered chunk on the blocked route
        labels[np.flatnonzero(ignored)[: 17 - count % chunk]] = 1
        ignored = labels == -100
    full = np.where(ignored, rng.integers(0, V, N), labels).astype(np.int32)
    a = g.lm_cross_entropy(h, E, labels, chunk_rows=chunk, bf16=bf16)
    b = g.lm_cross_entropy(h, E, full, chunk_rows=chunk, bf16=bf16)
    assert np.array_equal(a["dh"][~ignored], b["dh"][~ignored])
    assert np.all(a["dh"][ignored] == 0)



@pytest.fixture
def profiling():
    _core.profile_reset()
    _core.profile_enable(True)
    yield
    _core.profile_enable(False)
    _core.profile_reset()


@pytest.mark.parametrize("want_grad", [True, False])
def test_gemms_run_on_labelled_rows_only(rng, profiling, want_grad):
    """The lm_head GEMMs see the labelled rows only (the CPU backend's op timers record each call's
    shape): 150 of 300 rows labelled, chunks of 64 -> 64 + 64 + 22 rows per GEMM, not 64 x 5."""
    N, D, V = 300, 32, 500
    h = rng.standard_normal((N, D)).astype(np.float32)
    E = rng.standard_normal((V, D)).astype(np.float32)
    labels = rng.integers(0, V, N).astype(np.int32)
    labels[:100] = -100
    labels[250:] = -100
    g.lm_cross_entropy(h, E, labels, chunk_rows=64, want_grad=want_grad)
    rows = {}
    for r in _core.profile_report():
        if r["part"] == "lm_head_gemm":
            rows[r["op"]] = rows.get(r["op"], 0) + r["calls"] * r["shape"][0]
    assert rows == ({"gemm_nt": 150, "gemm_nn": 150} if want_grad else {"gemm_nt": 150})
