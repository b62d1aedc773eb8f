"""bf16 compute over a GGUF's tied Q8_0 token_embd (head_format "float32"): the training pass reads
the Q8_0 rows themselves (the embedding gather and the lm_head's bf16 panels, cpu/lm_head_bf16.hpp,
ops_backward.hpp lm_cross_entropy_q8_0_as_f32) instead of widening them to a V x D fp32 table: the
same bits as over that table (QLORA_BF16_HEAD_Q8=0 widens it, as before), the table never made, the
pass's peak still the memory plan's."""

import numpy as np
import pytest

from helpers_bf16 import needs_bf16
from qlora_native import _core

g = _core.grad_ops
pytestmark = needs_bf16


def q8_0_rows(rng, V, D):
    """(Q8_0 rows uint8 [V, D/32*34], their dequantization [V, D] fp32 by numpy: fp16 d x int8 q)."""
    x = (rng.standard_normal((V, D // 32, 32)) * rng.uniform(0.01, 2.0, (V, D // 32, 1))).astype(np.float32)
    d = (np.abs(x).max(axis=2, keepdims=True) / 127).astype(np.float16)
    q = np.clip(np.round(x / np.maximum(d.astype(np.float32), 1e-30)), -127, 127).astype(np.int8)
    raw = np.concatenate([d.view(np.uint8).reshape(V, D // 32, 2), q.view(np.uint8)], axis=2).reshape(V, -1)
    return np.ascontiguousarray(raw), (d.astype(np.float32) * q.astype(np.float32)).reshape(V, D)


def problem(rng, N, D, V):
    raw, E = q8_0_rows(rng, V, D)
    h = rng.standard_normal((N, D)).astype(np.float32)
    lab = rng.integers(0, V, N).astype(np.int32)
    lab[2] = -100
    return h, raw, E, lab


def same(a, b):
    assert np.float64(a["loss_sum"]).tobytes() == np.float64(b["loss_sum"]).tobytes()
    assert a["count"] == b["count"] and a["workspace_bytes"] == b["workspace_bytes"]
    if a["dh"] is None:
        assert b["dh"] is None
    else:
        np.testing.assert_array_equal(a["dh"].view(np.uint32), b["dh"].view(np.uint32))


# ragged panels (V % 32 != 0) and last chunk, D over several 16-pair chunks, V over several depth
# blocks of the backward (4500), D > 64 (narrower dh runs gemm_nn_bf16's skinny kernel: no panels)
@pytest.mark.parametrize("kernel", ["default", "0", "emulate"])
@pytest.mark.parametrize("N,D,V,chunk", [(40, 96, 200, 16), (45, 160, 97, 14), (30, 128, 4500, 16)])
def test_as_f32_is_the_fp32_table(rng, monkeypatch, kernel, N, D, V, chunk):
    """lm_cross_entropy_q8_0(as_f32) == lm_cross_entropy over the numpy dequantization, bit for bit,
    under each bf16 micro-kernel (QLORA_AMX); the same workspace (the panels, no widened chunk)."""
    if kernel != "default":
        monkeypatch.setenv("QLORA_AMX", kernel)
    h, raw, E, lab = problem(rng, N, D, V)
    for want_grad in (True, False):
        a = g.lm_cross_entropy_q8_0(h, raw, lab, bf16=True, as_f32=True, chunk_rows=chunk, want_grad=want_grad)
        b = g.lm_cross_entropy(h, E, lab, bf16=True, chunk_rows=chunk, want_grad=want_grad)
        same(a, b)
    panels = -(-V // 32) * 32 * (D // 2) * 4
    assert a["workspace_bytes"] == g.cross_entropy_workspace_bytes(chunk, V, D) + panels


@pytest.mark.parametrize("kernel", ["default", "0", "emulate"])
@pytest.mark.parametrize("N,D,V,chunk", [(40, 96, 200, 40), (45, 160, 97, 256), (1, 128, 4500, 16)])
def test_as_f32_one_chunk_is_the_fp32_table(rng, monkeypatch, kernel, N, D, V, chunk):
    """One chunk (N <= chunk_rows): the Q8_0 path still packs the panels (there is no fp32 table),
    and its bits are those of lm_cross_entropy over the numpy dequantization, which with one chunk
    packs no panels (gemm_nt_bf16 / gemm_nn_bf16 per chunk); workspace: + the panels."""
    if kernel != "default":
        monkeypatch.setenv("QLORA_AMX", kernel)
    h, raw, E, lab = problem(rng, max(N, 3), D, V)
    h, lab = h[:N], lab[:N]
    panels = -(-V // 32) * 32 * (D // 2) * 4
    for want_grad in (True, False):
        a = g.lm_cross_entropy_q8_0(h, raw, lab, bf16=True, as_f32=True, chunk_rows=chunk, want_grad=want_grad)
        b = g.lm_cross_entropy(h, E, lab, bf16=True, chunk_rows=chunk, want_grad=want_grad)
        assert b["workspace_bytes"] == g.cross_entropy_workspace_bytes(N, V, D)  # no panels over the table
        assert a["workspace_bytes"] == b["workspace_bytes"] + panels
        a["workspace_bytes"] = b["workspace_bytes"]
        same(a, b)


def test_as_f32_refuses_where_it_does_not_apply(rng, monkeypatch):
    h, raw, E, lab = problem(rng, 40, 96, 200)
    h64, raw64, _, lab64 = problem(rng, 40, 64, 200)
    with pytest.raises(ValueError, match="panels"):  # D <= 64: dh by gemm_nn_bf16's skinny kernel
        g.lm_cross_entropy_q8_0(h64, raw64, lab64, bf16=True, as_f32=True, chunk_rows=16)
    assert g.lm_cross_entropy_q8_0(h64, raw64, lab64, bf16=True, as_f32=True, chunk_rows=16,
                                   want_grad=False)["dh"] is None  # the logits alone still apply
    # (fp32, as_f32 without bf16: tests/test_lm_head_f32_q8.py)
    monkeypatch.setenv("QLORA_BF16_HEAD_Q8", "0")
    with pytest.raises(ValueError, match="panels"):
        g.lm_cross_entropy_q8_0(h, raw, lab, bf16=True, as_f32=True, chunk_rows=16)


@pytest.fixture(scope="module")
def tied_gguf(tmp_path_factory, request):
    """The tiny GGUF with hidden 96 (D > 64 and a multiple of 32) and no output.weight (tied to the
    Q8_0 token_embd)."""
    import helpers_gguf as hg

    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    mp.setattr(hg, "HIDDEN", 96)
    mp.setattr(hg, "HEAD_DIM", 24)
    path = tmp_path_factory.mktemp("q8tied") / "tied.gguf"
    hg.write_tiny_gguf(path, seed=5, drop_tensors=("output.weight",))
    return str(path), hg.VOCAB


def test_training_reads_q8_0_rows(tied_gguf, monkeypatch):
    """Two bf16 train steps of 300 rows (two loss chunks) from the Q8_0 rows and over the widened fp32
    table (QLORA_BF16_HEAD_Q8=0): the same losses and adapter, bit for bit; the first never makes
    the V x D x 4 table (memory_footprint); both peaks are the memory plan's."""
    from helpers_train import adapter_model, train_batch
    from qlora_native import memory_model as mm
    from qlora_native.gguf_source import GGUFSource

    path, V = tied_gguf
    cfg = GGUFSource(path).config
    assert cfg.get("tie_word_embeddings") and cfg["hidden_size"] == 96
    plan = mm.activation_bytes(cfg, 3, 100, 4, device=False, compute_dtype="bfloat16")
    runs = {}
    for sw in ("1", "0"):
        monkeypatch.setenv("QLORA_BF16_HEAD_Q8", sw)
        m = adapter_model(path, compute_dtype="bfloat16")
        assert m.head_format == "float32"
        m.configure_optimizer(lr=1e-3)
        before = m.memory_footprint()["other_weights"]
        losses = [m.train_step([train_batch(s, B=3, T=100, V=V)], lr=1e-3, max_grad_norm=1.0)["loss"]
                  for s in range(2)]
        assert m.last_train_peak_bytes == plan["peak"], (sw, m.last_train_peak_bytes, plan)
        runs[sw] = (losses, m.get_adapter_state_dict("a"), m.memory_footprint()["other_weights"] - before)
    assert runs["1"][0] == runs["0"][0]
    for k in runs["1"][1]:
        np.testing.assert_array_equal(np.asarray(runs["1"][1][k]), np.asarray(runs["0"][1][k]), err_msg=k)
    assert runs["1"][2] == 0 and runs["0"][2] == V * 96 * 4  # the widened table: only when switched off


def test_one_chunk_pass_and_eval_read_q8_0_rows(tied_gguf, monkeypatch):
    """bf16 train steps of 2 x 100 and 1 x 20 rows (one loss chunk each) and eval_loss of one short
    sequence from the Q8_0 rows (the panels packed for that one chunk) and over the widened table
    (QLORA_BF16_HEAD_Q8=0): the same losses, adapter and eval losses, bit for bit; the first never
    makes the V x D x 4 table (memory_footprint); each step's peak is its memory plan's
    (f32_from_q8_0: the panels counted; the 1 x 20 step's peak is set by them)."""
    from helpers_train import adapter_model, train_batch
    from qlora_native import memory_model as mm
    from qlora_native.gguf_source import GGUFSource

    path, V = tied_gguf
    cfg = GGUFSource(path).config
    def plan(B, T, sw):
        return mm.activation_bytes(cfg, B, T, 4, device=False, compute_dtype="bfloat16", f32_from_q8_0=(sw == "1"))

    panels = -(-V // 32) * 32 * (96 // 2) * 4
    assert plan(2, 100, "1")["cross_entropy"] == plan(2, 100, "0")["cross_entropy"] + panels
    assert plan(1, 20, "1")["peak"] > plan(1, 20, "0")["peak"]  # a short pass: the panels set its peak
    short_ids = np.random.default_rng(8).integers(3, V, (1, 20)).astype(np.int32)
    short = (short_ids, short_ids.copy(), np.ones_like(short_ids))
    ev_ids = np.random.default_rng(9).integers(3, V, (1, 7)).astype(np.int32)  # one short sequence
    ev_lab = ev_ids.copy()
    runs = {}
    for sw in ("1", "0"):
        monkeypatch.setenv("QLORA_BF16_HEAD_Q8", sw)
        m = adapter_model(path, compute_dtype="bfloat16")
        assert m.head_format == "float32"
        m.configure_optimizer(lr=1e-3)
        before = m.memory_footprint()["other_weights"]
        ev0 = m.eval_loss(ev_ids, ev_lab)
        grown_eval = m.memory_footprint()["other_weights"] - before
        loss = []
        for batch in (train_batch(4, B=2, T=100, V=V), short):
            loss.append(m.train_step([batch], lr=1e-3, max_grad_norm=1.0)["loss"])
            B, T = batch[0].shape
            assert m.last_train_peak_bytes == plan(B, T, sw)["peak"], (sw, B, T, m.last_train_peak_bytes)
        ev1 = m.eval_loss(ev_ids, ev_lab)
        runs[sw] = (ev0, loss, ev1, m.get_adapter_state_dict("a"), grown_eval,
                    m.memory_footprint()["other_weights"] - before)
    for i in (0, 2):  # eval_loss: (loss_sum, count)
        assert np.float64(runs["1"][i][0]).tobytes() == np.float64(runs["0"][i][0]).tobytes(), i
        assert runs["1"][i][1] == runs["0"][i][1] == 6, i  # (labels shifted by one)
    assert np.float64(runs["1"][1]).tobytes() == np.float64(runs["0"][1]).tobytes()  # both steps' losses
    for k in runs["1"][3]:
        np.testing.assert_array_equal(np.asarray(runs["1"][3][k]), np.asarray(runs["0"][3][k]), err_msg=k)
    assert runs["1"][4:] == (0, 0)  # the Q8_0 rows: no table, neither by eval_loss nor by the step
    assert runs["0"][4:] == (V * 96 * 4, V * 96 * 4)  # switched off: eval_loss widens it at once
