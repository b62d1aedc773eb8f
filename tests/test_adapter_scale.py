"""Per-adapter runtime scale (issue 8): set_adapter_scale(name, s) multiplies the adapter's LoRA term
(llama.cpp's --lora-scaled, PEFT's set_scale). It is part of what a request takes at its start, so a
change never reaches a generation already running (llama.cpp #10374); training uses it (as PEFT);
save_adapter does not."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

import qlora_native

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_tiny import add_random_adapter, build_tiny  # noqa: E402

PROMPTS = [[3, 4, 5], [6, 7, 8, 9]]
IDS = np.array([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]])
MASK = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def _model(tiny_dir):
    m = qlora_native.Model.from_pretrained(tiny_dir, tokenizer=None)
    add_random_adapter(m, "a", 1)
    m.set_adapter("a")
    return m


def _scaled_copy(m, src, dst, s):
    """Adapter `dst` = adapter `src` with every B multiplied by s (same A, same scaling)."""
    m.add_adapter(dst, m.adapter_config(src))
    m.set_adapter_state_dict(dst, {k: (v * np.float32(s) if "lora_B" in k else v)
                                   for k, v in m.get_adapter_state_dict(src).items()})


@pytest.mark.parametrize("s", [0.0, 0.5, 2.0, -1.0])
def test_scale_equals_scaled_B(tiny_dir, s):
    m = _model(tiny_dir)
    _scaled_copy(m, "a", "a_s", s)
    assert m.get_adapter_scale("a") == 1.0
    ref = m(IDS, MASK, adapter_name="a_s")
    one = m(IDS, MASK, adapter_name="a")
    m.set_adapter_scale("a", s)
    assert m.get_adapter_scale("a") == s
    got = m(IDS, MASK, adapter_name="a")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m(IDS, MASK), ref, rtol=1e-5, atol=1e-5)  # the active adapter takes it too
    if s != 1.0:
        assert np.abs(got - one).max() > 1e-3, "the scale must change the logits"
    assert m.get_adapter_scale("a_s") == 1.0  # per adapter


def test_scale_zero_is_the_base_model_exactly(tiny_dir):
    m = _model(tiny_dir)
    base = m(IDS, MASK, adapter_name="__base__")
    gen_base = m.generate(PROMPTS, 8, eos_token_id=None, adapter_name="__base__")
    m.set_adapter_scale("a", 0)
    np.testing.assert_array_equal(m(IDS, MASK), base)
    assert m.generate(PROMPTS, 8, eos_token_id=None) == gen_base
    m.set_adapter_scale("a", 1)
    assert not np.array_equal(m(IDS, MASK), base)


def test_running_generation_keeps_its_scale(tiny_dir):
    m = _model(tiny_dir)
    old = m.generate(PROMPTS, 12, eos_token_id=None)
    m.set_adapter_scale("a", -1.5)
    new = m.generate(PROMPTS, 12, eos_token_id=None)
    m.set_adapter_scale("a", 1.0)
    assert old != new, "the two scales must give different tokens"
    # The scale changes inside the stream callback of a running generate (its first token), and from
    # another thread: the running call keeps scale 1 to its last token; a call started afterwards gets -1.5.
    changed = []

    def cb(row, tok):
        if not changed:
            changed.append(1)
            t = threading.Thread(target=m.set_adapter_scale, args=("a", -1.5))
            t.start()
            t.join()
    assert m.generate(PROMPTS, 12, eos_token_id=None, stream=cb) == old
    assert changed and m.get_adapter_scale("a") == -1.5
    assert m.generate(PROMPTS, 12, eos_token_id=None) == new
    # an open engine context also keeps the scale it was made with
    ctx = m._core.new_context(1, 16, "a")
    m.set_adapter_scale("a", 1.0)
    ids = np.array([[3, 4, 5]], np.int32)
    ctx2 = m._core.new_context(1, 16, "a")
    np.testing.assert_array_equal(ctx2.feed(ids), m(ids)[:, -1])
    m.set_adapter_scale("a", -1.5)
    np.testing.assert_array_equal(ctx.feed(ids), m(ids)[:, -1])


def test_training_uses_the_scale(tiny_dir):
    """As PEFT's set_scale: the loss and gradients of scale s equal those of the adapter with B*s, with
    dB = s * (dB of the B*s adapter) (chain rule through B_eff = s*B)."""
    m = _model(tiny_dir)
    s = 0.5
    _scaled_copy(m, "a", "a_s", s)
    labels = IDS.copy()
    m.set_adapter("a_s")
    m.zero_grad()
    ref_loss = m.forward_backward(IDS, labels, MASK, training=False)
    ref = m.get_adapter_gradients("a_s")
    m.set_adapter("a")
    m.set_adapter_scale("a", s)
    m.zero_grad()
    loss = m.forward_backward(IDS, labels, MASK, training=False)
    got = m.get_adapter_gradients("a")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert m.eval_loss(IDS, labels, MASK)[0] == pytest.approx(m.eval_loss(IDS, labels, MASK)[0])
    for k, g in got.items():
        want = ref[k] * np.float32(s) if "lora_B" in k else ref[k]
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6, err_msg=k)
    m.set_adapter_scale("a", 0.0)  # scale 0: the base loss, zero gradients
    m.zero_grad()
    base_loss = m.forward_backward(IDS, labels, MASK, training=False)
    with m.disable_adapter():
        assert m.eval_loss(IDS, labels, MASK)[0] / m.eval_loss(IDS, labels, MASK)[1] == pytest.approx(base_loss)
    assert all(not g.any() for g in m.get_adapter_gradients("a").values())


def test_save_adapter_ignores_the_scale(tiny_dir, tmp_path):
    m = _model(tiny_dir)
    before = m.get_adapter_state_dict("a")
    m.set_adapter_scale("a", 3.0)
    m.save_adapter(str(tmp_path / "ad"), "a")
    m2 = qlora_native.Model.from_pretrained(tiny_dir, tokenizer=None)
    m2.load_adapter(str(tmp_path / "ad"), "a")
    assert m2.get_adapter_scale("a") == 1.0
    after = m2.get_adapter_state_dict("a")
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    m.set_adapter_scale("a", 1.0)
    np.testing.assert_array_equal(m2(IDS, MASK, adapter_name="a"), m(IDS, MASK, adapter_name="a"))


@pytest.mark.parametrize("name,scale,match", [("zz", 1.0, "no adapter named 'zz'"),
                                              ("a", float("nan"), "finite"), ("a", float("inf"), "finite"),
                                              ("a", "x", "finite"), ("a", None, "finite")])
def test_set_adapter_scale_bad(tiny_dir, name, scale, match):
    m = _model(tiny_dir)
    with pytest.raises(ValueError, match=match):
        m.set_adapter_scale(name, scale)
    assert m.get_adapter_scale("a") == 1.0
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        m.get_adapter_scale("zz")
    with pytest.raises(ValueError, match="finite"):  # the engine checks too
        m._core.lora_set_scale("a", float("nan"))


def test_scale_goes_with_the_adapter(tiny_dir):
    m = _model(tiny_dir)
    m.set_adapter_scale("a", 0.0)
    m.delete_adapter("a")
    add_random_adapter(m, "a", 1)  # a new adapter of the same name starts at scale 1
    assert m.get_adapter_scale("a") == 1.0
