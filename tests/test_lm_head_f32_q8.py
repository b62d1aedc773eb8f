"""fp32 compute over a GGUF's tied Q8_0 token_embd (head_format "float32", compute_dtype float32): the
training pass reads the Q8_0 rows (the embedding gather, and each lm_head GEMM decoding them into its
B panels: cpu/q8_0_head.hpp, ops_backward.hpp lm_cross_entropy_q8_0_as_f32) instead of widening
them to a V x D fp32 table: the same bits as over that table (QLORA_F32_HEAD_Q8=0
widens it, as before) at AVX-512 and AVX2, 1 and 2 threads, the table never made, the pass's peak
the memory plan's."""

import os
import subprocess
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import _core
from test_lm_head_bf16_q8 import problem, same

g = _core.grad_ops
LEVELS = [lv for lv in ("avx512", "avx2") if f"cpu:{lv}" in _core.available_backends()]


@pytest.fixture(params=LEVELS)
def level(request):
    old = qlora_native.simd_level()
    qlora_native.set_simd_level(request.param)
    yield request.param
    qlora_native.set_simd_level(old)


# several loss chunks and one; V over several of the backward's depth blocks (KC <= 1024: 3000, 4500,
# the last block shorter); M = 1 (the GEMV route of gemm_nt) and M > 16; D = 32 (dh's N <= NR: the
# direct micro-kernel); V % 16 != 0 (ragged micro-panels); 256 x 96 x 24000: GEMMs over 1e9 FLOP (at
# 2 threads gemm.cpp's shared-A driver), the others under it (the task grid); D = 1056 > KC: the
# logits' depth blocks split a Q8_0 block (KC <= 1024 balanced: 528 = 16.5 blocks)
SHAPES = [(40, 96, 200, 16), (45, 160, 97, 14), (30, 128, 4500, 16), (1, 128, 4500, 16), (20, 32, 3000, 256),
          (17, 64, 1100, 8), (256, 96, 24000, 256), (40, 1056, 300, 40)]


@pytest.mark.parametrize("N,D,V,chunk", SHAPES)
def test_as_f32_is_the_fp32_table(rng, level, threads, N, D, V, chunk):
    """lm_cross_entropy_q8_0(as_f32, fp32) == lm_cross_entropy over the numpy dequantization, bit for
    bit (loss, dh), in the same workspace (the rows are decoded into the GEMMs' B panels)."""
    h, raw, E, lab = problem(rng, max(N, 3), D, V)
    h, lab = h[:N], lab[:N].copy()
    lab[-1], lab[0] = V - 1, 7  # (a wrong row moves its logit's loss term by O(1), not O(1/V))
    be = f"cpu:{level}"
    for want_grad in (True, False):
        a = g.lm_cross_entropy_q8_0(h, raw, lab, as_f32=True, chunk_rows=chunk, want_grad=want_grad, backend=be)
        b = g.lm_cross_entropy(h, E, lab, chunk_rows=chunk, want_grad=want_grad, backend=be)
        same(a, b)


def test_as_f32_refuses_where_it_does_not_apply(rng, monkeypatch):
    h, raw, E, lab = problem(rng, 40, 96, 200)
    with pytest.raises(ValueError, match="scalar"):  # the scalar GEMMs sum all of K in double
        g.lm_cross_entropy_q8_0(h, raw, lab, as_f32=True, chunk_rows=16, backend="cpu:scalar")
    monkeypatch.setenv("QLORA_F32_HEAD_Q8", "0")
    with pytest.raises(ValueError, match="QLORA_F32_HEAD_Q8"):
        g.lm_cross_entropy_q8_0(h, raw, lab, as_f32=True, chunk_rows=16)


@pytest.fixture(scope="module")
def tied_gguf(tmp_path_factory, request):
    """The tiny GGUF with hidden 96 and no output.weight (tied to the Q8_0 token_embd)."""
    import helpers_gguf as hg

    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    mp.setattr(hg, "HIDDEN", 96)
    mp.setattr(hg, "HEAD_DIM", 24)
    path = tmp_path_factory.mktemp("q8tied32") / "tied.gguf"
    hg.write_tiny_gguf(path, seed=5, drop_tensors=("output.weight",))
    return str(path), hg.VOCAB


def run_pass_pair(path, V, monkeypatch):
    """Per QLORA_F32_HEAD_Q8 in ("1", "0"): eval_loss of 1 x 7, fp32 train steps of 3 x 100 (two loss
    chunks) and 1 x 20 (one), eval_loss again; each step's peak checked against the memory plan
    derived from the model; returns the results, the adapter and the table bytes made."""
    from helpers_train import adapter_model, train_batch
    from qlora_native import memory_model as mm
    from qlora_native.gguf_source import GGUFSource

    src = GGUFSource(path)
    short_ids = np.random.default_rng(8).integers(3, V, (1, 20)).astype(np.int32)
    short = (short_ids, short_ids.copy(), np.ones_like(short_ids))
    ev_ids = np.random.default_rng(9).integers(3, V, (1, 7)).astype(np.int32)
    runs = {}
    for sw in ("1", "0"):
        monkeypatch.setenv("QLORA_F32_HEAD_Q8", sw)
        m = adapter_model(path)
        assert m.head_format == "float32"
        assert m._core.tied_q8_0_unwidened()
        m.configure_optimizer(lr=1e-3)
        before = m.memory_footprint()["other_weights"]
        ev0 = m.eval_loss(ev_ids, ev_ids.copy())
        grown_eval = m.memory_footprint()["other_weights"] - before
        loss = []
        for batch in (train_batch(4, B=3, T=100, V=V), short):
            B, T = batch[0].shape
            plan = mm.activation_bytes(m, B, T, 4, device=False)  # derived from the model, before the pass
            if sw == "1":  # the GGUF file says the same; so does a bare config (an fp32 table's
                assert mm.activation_bytes(src, B, T, 4, device=False) == plan  # loss: no scratch either)
                assert mm.activation_bytes(src.config, B, T, 4, device=False) == plan
            loss.append(m.train_step([batch], lr=1e-3, max_grad_norm=1.0)["loss"])
            assert m.last_train_peak_bytes == plan["peak"], (sw, B, T, m.last_train_peak_bytes, plan)
        ev1 = m.eval_loss(ev_ids, ev_ids.copy())
        runs[sw] = (ev0, loss, ev1, m.get_adapter_state_dict("a"), grown_eval,
                    m.memory_footprint()["other_weights"] - before)
    return runs


def check_pair(runs, V):
    for i in (0, 2):  # eval_loss: (loss_sum, count)
        assert np.float64(runs["1"][i][0]).tobytes() == np.float64(runs["0"][i][0]).tobytes(), i
        assert runs["1"][i][1] == runs["0"][i][1] == 6, i  # (labels shifted by one)
    assert np.float64(runs["1"][1]).tobytes() == np.float64(runs["0"][1]).tobytes()  # both steps' losses
    for k in runs["1"][3]:
        np.testing.assert_array_equal(np.asarray(runs["1"][3][k]).view(np.uint32),
                                      np.asarray(runs["0"][3][k]).view(np.uint32), err_msg=k)
    assert runs["1"][4:] == (0, 0)  # the Q8_0 rows: no table, neither by eval_loss nor by the steps
    assert runs["0"][4:] == (V * 96 * 4, V * 96 * 4)  # switched off: eval_loss widens it at once


def test_training_reads_q8_0_rows(tied_gguf, monkeypatch, level, threads):
    """fp32 train steps and eval_loss from the Q8_0 rows and over the widened table: eval losses,
    losses and adapter bit for bit; no table made; peaks == the plan derived from the model."""
    path, V = tied_gguf
    check_pair(run_pass_pair(path, V, monkeypatch), V)


@pytest.mark.parametrize("lv", LEVELS)
def test_training_reads_q8_0_rows_several_blocks(lv):
    """The same with the depth block shrunk (QLORA_CACHE_SIZES l2=64K: KC 256, so V = 300 is two
    blocks of 160 / 140 rows; read once per process, hence a child process) at 1 and 2 threads."""
    env = dict(os.environ, QLORA_CACHE_SIZES="l2=64K", QLORA_SIMD=lv, QLORA_F32_Q8_CHILD="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                        "-k", f"(test_training_reads_q8_0_rows and not several and {lv}) or test_child_block_size"],
                       env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 passed" in r.stdout, r.stdout[-2000:]


def test_child_block_size():
    """(In the child of ..._several_blocks) KC is 256 (dh's depth blocks of V = 300: 160 and 140 rows),
    and the loss is the table's bit for bit in the same workspace."""
    if os.environ.get("QLORA_F32_Q8_CHILD") != "1":
        pytest.skip("runs in the child process only")
    rng = np.random.default_rng(0)
    h, raw, E, lab = problem(rng, 20, 96, 300)
    assert _core.gemm_blocking(qlora_native.simd_level())["kc"] == 256
    a = g.lm_cross_entropy_q8_0(h, raw, lab, as_f32=True, chunk_rows=8)
    b = g.lm_cross_entropy(h, E, lab, chunk_rows=8)
    same(a, b)
