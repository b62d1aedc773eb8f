"""The bf16-compute lm_head over an fp32 table with its bf16 B panels packed once per call
(cpu/lm_head_bf16.hpp, QLORA_BF16_HEAD_PANELS): the same bits as the per-chunk gemm_nt_bf16 path,
the packed table counted in workspace_bytes, and the loss / dh against float64 within the bf16 bound."""
import os

import numpy as np
import pytest

from helpers_bf16 import EPS32, U, bf16, needs_bf16
from qlora_native import _core

ce = _core.grad_ops.lm_cross_entropy
pytestmark = needs_bf16


def panel_bytes(V, D):
    return -(-V // 32) * 32 * -(-D // 2) * 4


def run(switch, h, E, lab, **kw):
    old = os.environ.get("QLORA_BF16_HEAD_PANELS")
    os.environ["QLORA_BF16_HEAD_PANELS"] = switch
    try:
        return ce(h, E, lab, bf16=True, **kw)
    finally:
        if old is None:
            del os.environ["QLORA_BF16_HEAD_PANELS"]
        else:
            os.environ["QLORA_BF16_HEAD_PANELS"] = old


def problem(rng, N, D, V):
    E = (rng.standard_normal((V, D)) * 0.3).astype(np.float32)
    h = rng.standard_normal((N, D)).astype(np.float32)
    lab = rng.integers(0, V, N).astype(np.int32)
    lab[3] = -100
    return h, E, lab


# ragged panels (V % 32 != 0), odd D (a zero-paired tail), a ragged last chunk and row tile, V over
# several depth blocks of the backward (2048 on Zen 4: 4500 -> 1504, 1504, 1492), V % 16 == 0 (rows
# 64-byte aligned: whole logits tiles by streaming stores, the rest masked stores); V, D > 64
# (gemm_nt_bf16 / gemm_nn_bf16 run N <= kSkinnyMaxN = 64 through their skinny kernels, another order)
@pytest.mark.parametrize("N,D,V,chunk", [(40, 96, 200, 16), (45, 97, 97, 14), (30, 130, 130, 29), (20, 71, 70, 8),
                                         (30, 100, 4500, 16), (30, 100, 2080, 16)])
def test_packed_once_bit_identical_to_per_chunk(rng, N, D, V, chunk):
    h, E, lab = problem(rng, N, D, V)
    on, off = run("1", h, E, lab, chunk_rows=chunk), run("0", h, E, lab, chunk_rows=chunk)
    assert np.float32(on["loss_sum"]).tobytes() == np.float32(off["loss_sum"]).tobytes()
    assert on["count"] == off["count"] == N - 1
    np.testing.assert_array_equal(on["dh"].view(np.uint32), off["dh"].view(np.uint32))
    # the packed table is scratch of this call: counted in workspace_bytes
    assert on["workspace_bytes"] == off["workspace_bytes"] + panel_bytes(V, D)
    # forward only (eval) takes the same path
    fo, fo0 = run("1", h, E, lab, chunk_rows=chunk, want_grad=False), run("0", h, E, lab, chunk_rows=chunk,
                                                                           want_grad=False)
    assert fo["loss_sum"] == fo0["loss_sum"] == on["loss_sum"] and fo["dh"] is None


@pytest.mark.parametrize("kernel", ["0", "emulate"])
def test_each_micro_kernel(rng, monkeypatch, kernel):
    """The packed-once path under each bf16 micro-kernel (QLORA_AMX: 0 = AVX512-BF16, emulate = the AMX
    kernel on emulated tiles, so CPUs without AMX run its 16-row A panels and 32-row calls): the same
    bits as gemm_nt_bf16 / gemm_nn_bf16 under that kernel, the panels counted; chunks of 29 / 40 / 20
    rows (a whole call + a one-panel call, ragged calls), a ragged last 16-pair chunk (D 97, 130: 49,
    65 pairs), dh over depth blocks."""
    monkeypatch.setenv("QLORA_AMX", kernel)
    for N, D, V, chunk in ((45, 97, 97, 29), (90, 130, 300, 40), (40, 100, 4500, 20)):
        h, E, lab = problem(rng, N, D, V)
        on, off = run("1", h, E, lab, chunk_rows=chunk), run("0", h, E, lab, chunk_rows=chunk)
        assert np.float32(on["loss_sum"]).tobytes() == np.float32(off["loss_sum"]).tobytes()
        np.testing.assert_array_equal(on["dh"].view(np.uint32), off["dh"].view(np.uint32))
        assert on["workspace_bytes"] == off["workspace_bytes"] + panel_bytes(V, D)


def test_one_chunk_packs_nothing(rng):
    h, E, lab = problem(rng, 16, 96, 100)
    on, off = run("1", h, E, lab, chunk_rows=16), run("0", h, E, lab, chunk_rows=16)
    assert on["workspace_bytes"] == off["workspace_bytes"]
    np.testing.assert_array_equal(on["dh"], off["dh"])


def test_vs_float64(rng):
    """loss and dh against float64 on the bf16-rounded operands: logits carry (D + 4) eps32 |h|·|E|
    of fp32 accumulation, the loss at most twice the largest logit error per row; dh = dlogits·E with
    dlogits rounded to bf16 (u relative) and fp32 accumulation over V."""
    N, D, V = 48, 64, 300
    h, E, lab = problem(rng, N, D, V)
    got = run("1", h, E, lab, chunk_rows=16)
    hb, Eb = bf16(h), bf16(E)
    logits = hb @ Eb.T
    err = (D + 4) * EPS32 * (np.abs(hb) @ np.abs(Eb).T).max(axis=1)
    m = logits.max(axis=1, keepdims=True)
    p = np.exp(logits - m)
    p /= p.sum(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    keep = lab != -100
    loss = (lse - logits[np.arange(N), np.where(keep, lab, 0)])[keep]
    bound = float(np.sum(2 * err[keep] + 4 * EPS32 * (np.abs(lse[keep]) + 1)))
    assert abs(got["loss_sum"] - loss.sum()) <= bound
    g = p.copy()
    g[np.arange(N), np.where(keep, lab, 0)] -= 1.0
    g[~keep] = 0.0
    dh = g @ Eb
    # per logit: p off by a relative 2 err + 8 eps32 (logit and lse errors, exp within 2 ulp), then g
    # rounded to bf16 (u relative) and summed over V in fp32
    bound = (U + (V + 4) * EPS32) * (np.abs(g) @ np.abs(Eb)) + \
        (2 * err[:, None] + 8 * EPS32) * (1 + U) * (p @ np.abs(Eb))
    assert np.all(np.abs(got["dh"] - dh) <= 1.01 * bound + 1e-30)


def test_training_pass_bit_identical_and_planned(tmp_path, monkeypatch):
    """A bf16 training pass over an fp32 tied table with 300 rows (two loss chunks): the packed panels
    give the same losses and adapter, bit for bit, and the pass's peak_train_bytes is the memory plan's
    (whose cross-entropy part grows by exactly the panels)."""
    import json

    from helpers_tiny import build_tiny
    from helpers_train import adapter_model, train_batch
    from qlora_native import memory_model as mm

    shape = dict(hidden_size=96, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                 vocab_size=1000, num_hidden_layers=2)  # the logits chunk makes the loss moment the peak
    path = build_tiny(str(tmp_path), **shape)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    models, peaks, plans = {}, {}, {}
    for sw in ("1", "0"):
        monkeypatch.setenv("QLORA_BF16_HEAD_PANELS", sw)
        m = adapter_model(path, compute_dtype="bfloat16")
        assert m.head_format == "float32"
        m.configure_optimizer(lr=1e-3)
        losses = [m.train_step([train_batch(s, B=3, T=100)], lr=1e-3, max_grad_norm=1.0)["loss"] for s in range(2)]
        models[sw], peaks[sw] = (m, losses), m.last_train_peak_bytes
        plans[sw] = mm.activation_bytes(cfg, 3, 100, 4, device=False, compute_dtype="bfloat16")
        assert peaks[sw] == plans[sw]["peak"], (sw, peaks[sw], plans[sw])
    assert peaks["1"] == peaks["0"] + panel_bytes(1000, 96)  # the loss moment is the peak here
    assert models["1"][1] == models["0"][1]
    sa, sb = models["1"][0].get_adapter_state_dict("a"), models["0"][0].get_adapter_state_dict("a")
    for k in sa:
        np.testing.assert_array_equal(np.asarray(sa[k]), np.asarray(sb[k]), err_msg=k)
    assert plans["1"]["cross_entropy"] == plans["0"]["cross_entropy"] + panel_bytes(1000, 96)


def test_backward_switch_and_narrow_shapes(rng, monkeypatch):
    """QLORA_BF16_HEAD_NN=0: the logits from the panels, dh through gemm_nn_bf16 again (same bits);
    V or D <= 64 keep the skinny kernels' path (no panels for V, gemm_nn_bf16 for D)."""
    h, E, lab = problem(rng, 40, 96, 300)
    on = run("1", h, E, lab, chunk_rows=16)
    monkeypatch.setenv("QLORA_BF16_HEAD_NN", "0")
    nn_off = run("1", h, E, lab, chunk_rows=16)
    assert nn_off["workspace_bytes"] == on["workspace_bytes"]
    np.testing.assert_array_equal(on["dh"].view(np.uint32), nn_off["dh"].view(np.uint32))
    monkeypatch.delenv("QLORA_BF16_HEAD_NN")
    for D, V in ((96, 64), (64, 300)):
        h, E, lab = problem(rng, 40, D, V)
        a, b = run("1", h, E, lab, chunk_rows=16), run("0", h, E, lab, chunk_rows=16)
        assert a["workspace_bytes"] == b["workspace_bytes"] + (panel_bytes(V, D) if V > 64 else 0)
        np.testing.assert_array_equal(a["dh"].view(np.uint32), b["dh"].view(np.uint32))
