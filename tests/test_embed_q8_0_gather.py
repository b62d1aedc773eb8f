"""Training over an untied GGUF's Q8_0 token_embd (head_format "float32"): the pass gathers the
embedding from the Q8_0 rows (Backend::q8_0_rows, as inference does) instead of widening them to a
V x D fp32 table first: the same bits as a GGUF whose token_embd holds their fp32 dequantization
(gguf's own, an independent decode), the table never made, each step's peak the memory plan's; on
the CPU backend (fp32 and bf16 compute) and cpu:devsim (the device path)."""

import numpy as np
import pytest

import helpers_gguf as hg
from helpers_train import adapter_model, train_batch
from qlora_native import memory_model as mm


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The tiny untied GGUF (Q8_0 token_embd, Q4_0 output.weight) and the same file with token_embd
    stored as the F32 dequantization of those Q8_0 rows."""
    import gguf

    d = tmp_path_factory.mktemp("embq8")
    q8 = hg.write_tiny_gguf(d / "q8.gguf", seed=21)
    t = next(t for t in gguf.GGUFReader(str(q8)).tensors if t.name == "token_embd.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    deq = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(hg.VOCAB, hg.HIDDEN)
    f32 = hg.write_tiny_gguf(d / "f32.gguf", seed=21, tensor_overrides={"token_embd.weight": deq})
    return str(q8), str(f32)


def run(path, backend, compute):
    """eval_loss, two train steps (3 x 100: two loss chunks; 1 x 20), eval_loss; the adapter, how much
    other_weights grew, and each step's peak against the plan."""
    m = adapter_model(path, backend, compute_dtype=compute)
    m.configure_optimizer(lr=1e-3)
    before = m.memory_footprint()["other_weights"]
    ev_ids = np.random.default_rng(9).integers(3, hg.VOCAB, (1, 7)).astype(np.int32)
    ev0 = m.eval_loss(ev_ids, ev_ids.copy())
    short = np.random.default_rng(8).integers(3, hg.VOCAB, (1, 20)).astype(np.int32)
    losses = []
    for batch in (train_batch(4, B=3, T=100, V=hg.VOCAB), (short, short.copy(), np.ones_like(short))):
        B, T = batch[0].shape
        plan = mm.activation_bytes(m, B, T, 4, device=backend != "cpu", compute_dtype=compute)
        losses.append(m.train_step([batch], lr=1e-3, max_grad_norm=1.0)["loss"])
        assert m.last_train_peak_bytes == plan["peak"], (B, T, m.last_train_peak_bytes, plan)
    ev1 = m.eval_loss(ev_ids, ev_ids.copy())
    return (m._core.embed_is_q8_0(), ev0, losses, ev1, m.get_adapter_state_dict("a"),
            m.memory_footprint()["other_weights"] - before)


@pytest.mark.parametrize("backend,compute", [("cpu", "float32"), ("cpu", "bfloat16"), ("cpu:devsim", "float32")])
def test_untied_q8_0_embedding_is_gathered_from_its_rows(pair, backend, compute):
    a, b = run(pair[0], backend, compute), run(pair[1], backend, compute)
    assert a[0] and not b[0]
    for i in (1, 3):  # eval_loss (loss_sum, count)
        assert np.float64(a[i][0]).tobytes() == np.float64(b[i][0]).tobytes(), i
        assert a[i][1] == b[i][1] == 6
    assert np.float64(a[2]).tobytes() == np.float64(b[2]).tobytes()  # both steps' losses
    assert a[4].keys() == b[4].keys()
    for k in a[4]:
        np.testing.assert_array_equal(np.asarray(a[4][k]).view(np.uint32), np.asarray(b[4][k]).view(np.uint32),
                                      err_msg=k)
    assert a[5] == b[5] == 0  # no fp32 table made (before: + V x D x 4 on the first pass)
