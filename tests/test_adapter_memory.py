"""Memory per served adapter (issue 8): an adapter's gradient buffers dA/dB are allocated (as zeros)
on its first training use only, so an adapter loaded for inference costs just its fp32 A + B in
memory_footprint()["lora_adapters"]; training results are unchanged (the parity tests cover them)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import qlora_native

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_tiny import add_random_adapter, build_tiny  # noqa: E402

IDS = np.array([[5, 6, 7, 8, 9], [3, 4, 5, 6, 7]])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny"))
    build_tiny(d)
    m = qlora_native.Model.from_pretrained(d, tokenizer=None)
    add_random_adapter(m, "a", 1)
    m.save_adapter(os.path.join(d, "adapter"), "a")
    return d


def _ab_bytes(m, name):
    return sum(4 * v.size for v in m.get_adapter_state_dict(name).values())  # fp32, from the shapes


def test_loaded_adapter_costs_only_A_and_B(tiny_dir):
    m = qlora_native.Model.from_pretrained(tiny_dir, tokenizer=None)
    assert m.memory_footprint()["lora_adapters"] == 0
    m.load_adapter(os.path.join(tiny_dir, "adapter"), "x")
    m.load_adapter(os.path.join(tiny_dir, "adapter"), "y")
    ab = _ab_bytes(m, "x")
    assert m.memory_footprint()["lora_adapters"] == 2 * ab
    m(IDS, adapter_names=["x", "y"])  # serving allocates nothing per adapter
    m.set_adapter("x")
    m.eval_loss(IDS, IDS)
    assert m.memory_footprint()["lora_adapters"] == 2 * ab
    # First training use: x gains dA + dB (same sizes as A + B); y stays as it was.
    m.forward_backward(IDS, IDS)
    assert m.memory_footprint()["lora_adapters"] == 2 * ab + ab
    m.configure_optimizer(lr=1e-3)
    m.optimizer_step()
    assert m.memory_footprint()["lora_adapters"] == 2 * ab + ab + 2 * ab  # + AdamW exp_avg, exp_avg_sq
    m.delete_adapter("x")
    assert m.memory_footprint()["lora_adapters"] == ab


def test_gradient_calls_before_training_see_zeros(tiny_dir):
    m = qlora_native.Model.from_pretrained(tiny_dir, tokenizer=None)
    m.load_adapter(os.path.join(tiny_dir, "adapter"), "x")
    m.set_adapter("x")
    ab = _ab_bytes(m, "x")
    g = m.get_adapter_gradients("x")
    assert set(g) == set(m.get_adapter_state_dict("x"))
    assert all(v.shape == m.get_adapter_state_dict("x")[k].shape and not v.any() for k, v in g.items())
    assert m.grad_norm() == 0.0
    assert m.memory_footprint()["lora_adapters"] == 2 * ab


@pytest.mark.parametrize("first", ["zero_grad", "clip_grad_norm", "optimizer_step", "none"])
def test_lazy_gradients_train_bit_identically(tiny_dir, first):
    """Whichever call allocates the gradients first, two steps give the same weights as a fresh run."""
    def run(first):
        m = qlora_native.Model.from_pretrained(tiny_dir, tokenizer=None)
        m.load_adapter(os.path.join(tiny_dir, "adapter"), "x")
        m.set_adapter("x")
        m.configure_optimizer(lr=1e-2)
        if first == "zero_grad":
            m.zero_grad()
        elif first == "clip_grad_norm":
            assert m.clip_grad_norm(1.0) == 0.0
        elif first == "optimizer_step":
            w0 = m.get_adapter_state_dict("x")
            m.optimizer_step()  # zero gradients (weight_decay 0): AdamW moves nothing
            for k, v in m.get_adapter_state_dict("x").items():
                np.testing.assert_array_equal(v, w0[k])
            return None
        ab = _ab_bytes(m, "x")
        assert m.memory_footprint()["lora_adapters"] == (2 if first != "none" else 1) * ab + 2 * ab
        for _ in range(2):
            m.zero_grad()
            m.forward_backward(IDS, IDS)
            m.clip_grad_norm(1.0)
            m.optimizer_step()
        return m.get_adapter_state_dict("x"), m.get_adapter_gradients("x")

    if first == "optimizer_step":  # an extra AdamW step would change the later bias corrections
        run(first)
        return
    w_ref, g_ref = run("none")
    w, g = run(first)
    for k in g_ref:
        np.testing.assert_array_equal(g[k], g_ref[k])
        np.testing.assert_array_equal(w[k], w_ref[k])
