"""Mixed-adapter batches (issue 8), PEFT's argument: model(ids, mask, adapter_names=[...]) and
generate(prompts, adapter_names=[...]), one adapter per row, "__base__" for none. One forward pass
serves the batch (base projections once, the LoRA terms per segment of rows sharing an adapter,
Backend::lora_segments); every row must give what it gives alone with its adapter: different ranks
and target sets, rsLoRA, runtime scales, left padding, "__base__" rows."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_tiny import build_tiny  # noqa: E402

PROMPTS = [[3, 4, 5], [6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16], [17, 18], [19, 20, 21, 22, 23]]
# r2 twice apart, r4 twice adjacent (one segment), an rsLoRA adapter, a base row
NAMES = ["r2", "__base__", "rs", "r4", "r4", "r2"]
ADAPTERS = {
    "r2": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "r4": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "rs": LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def _model(tiny_dir, quantize="nf4"):
    m = qlora_native.Model.from_pretrained(tiny_dir, quantize=quantize, tokenizer=None)
    for seed, (name, cfg) in enumerate(ADAPTERS.items(), 1):
        m.add_adapter(name, cfg, seed=seed)
        rng = np.random.default_rng(seed)
        m.set_adapter_state_dict(name, {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
                                        for k, v in m.get_adapter_state_dict(name).items()})
    m.set_adapter("r4")
    return m


def _padded(prompts):
    P = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), P), np.int32)
    mask = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = p
        mask[b, P - len(p):] = 1
    return ids, mask


def _check_rows_alone(m, names):
    ids, mask = _padded(PROMPTS)
    got = m(ids, mask, adapter_names=names)
    P = ids.shape[1]
    for b, (p, n) in enumerate(zip(PROMPTS, names)):
        alone = m(np.array([p]), adapter_name=n)[0]
        np.testing.assert_allclose(got[b, P - len(p):], alone, rtol=1e-4, atol=1e-4, err_msg=f"row {b} ({n})")
    return got


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_forward_rows_equal_their_single_runs(tiny_dir, quantize):
    m = _model(tiny_dir, quantize)
    got = _check_rows_alone(m, NAMES)
    # the adapters really differ from each other and from the base on these rows
    ids, mask = _padded(PROMPTS)
    for n in ("r2", "rs", "r4"):
        assert np.abs(got - m(ids, mask, adapter_name=n)).max() > 1e-2, n
    # runtime scales go with each row's adapter (scale 0: that adapter's rows are base rows)
    m.set_adapter_scale("r4", 0.5)
    m.set_adapter_scale("r2", 0.0)
    _check_rows_alone(m, NAMES)
    np.testing.assert_allclose(m(ids, mask, adapter_names=NAMES)[0], m(ids, mask, adapter_name="__base__")[0],
                               rtol=1e-4, atol=1e-4)


def test_generate_rows_equal_their_single_runs(tiny_dir):
    m = _model(tiny_dir)
    got = m.generate(PROMPTS, 10, eos_token_id=None, adapter_names=NAMES)
    alone = [m.generate([p], 10, eos_token_id=None, adapter_name=n)[0] for p, n in zip(PROMPTS, NAMES)]
    assert got == alone
    same_prompt = [m.generate([PROMPTS[1]], 10, eos_token_id=None, adapter_name=n)[0] for n in ("r2", "r4", "rs",
                                                                                                 "__base__")]
    assert len({str(t) for t in same_prompt}) == 4, "the adapters must change the greedy output"
    assert m.active_adapter == "r4"  # adapter_names does not change the active adapter


def test_generate_keeps_its_adapter_set(tiny_dir):
    """Deleting an adapter and changing a scale inside the stream callback of a running mixed generate
    does not change its tokens."""
    m = _model(tiny_dir)
    ref = m.generate(PROMPTS, 8, eos_token_id=None, adapter_names=NAMES)
    done = []

    def cb(row, tok):
        if not done:
            done.append(1)
            m.delete_adapter("rs")
            m.set_adapter_scale("r2", -3.0)
    assert m.generate(PROMPTS, 8, eos_token_id=None, adapter_names=NAMES, stream=cb) == ref
    with pytest.raises(ValueError, match=r"no adapter named 'rs' \(loaded: 'r2', 'r4'"):
        m.generate(PROMPTS, 8, adapter_names=NAMES)


def test_one_name_for_every_row_is_the_single_adapter_path(tiny_dir):
    m = _model(tiny_dir)
    ids, mask = _padded(PROMPTS)
    for n in ("r2", "__base__"):
        np.testing.assert_array_equal(m(ids, mask, adapter_names=[n] * len(PROMPTS)), m(ids, mask, adapter_name=n))


def test_lora_segments_op_float64_reference():
    rng = np.random.default_rng(0)
    M, n_in, n_out = 9, 24, 40
    x = rng.standard_normal((M, n_in)).astype(np.float32)
    y0 = rng.standard_normal((M, n_out)).astype(np.float32)
    segs, want = [], y0.astype(np.float64)
    for row0, rows, r, alpha in [(0, 2, 3, 0.5), (2, 1, 5, -2.0), (5, 4, 3, 1.25), (3, 0, 2, 1.0)]:
        A = rng.standard_normal((r, n_in)).astype(np.float32)
        B = rng.standard_normal((n_out, r)).astype(np.float32)
        segs.append((row0, rows, A, B, alpha))
        want[row0:row0 + rows] += alpha * (x[row0:row0 + rows].astype(np.float64) @ A.T.astype(np.float64)) @ B.T
    for backend in qlora_native._core.available_backends() if hasattr(qlora_native._core, "available_backends") \
            else ["cpu"]:
        if not backend.startswith("cpu"):
            continue
        y = y0.copy()
        qlora_native._core.ops.lora_segments(x, y, segs, backend=backend)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4, err_msg=backend)
        np.testing.assert_array_equal(y[4], y0[4])  # a row no segment covers is untouched
    with pytest.raises(ValueError, match="out of range"):
        qlora_native._core.ops.lora_segments(x, y0.copy(), [(8, 2, segs[0][2], segs[0][3], 1.0)])


@pytest.mark.parametrize("kw,match", [
    (dict(adapter_names=["r2", "zz"] + ["r4"] * 4), r"adapter_names\[1\]: no adapter named 'zz' \(loaded: 'r2', 'r4', "
                                                     r"'rs'; '__base__' = no adapter\)"),
    (dict(adapter_names=["r2"] * 5), "5 names for a batch of 6 rows"),
    (dict(adapter_names=["r2"] * 7), "7 names for a batch of 6 rows"),
    (dict(adapter_names="r2"), "must be a list"),
    (dict(adapter_names=["r2", 3, "r2", "r2", "r2", "r2"]), r"adapter_names\[1\] must be"),
    (dict(adapter_names=["r2"] * 6, adapter_name="r2"), "not both"),
])
def test_adapter_names_bad(tiny_dir, kw, match):
    m = _model(tiny_dir)
    ids, mask = _padded(PROMPTS)
    with pytest.raises(ValueError, match=match):
        m(ids, mask, **kw)
    with pytest.raises(ValueError, match=match):
        m.generate(PROMPTS, 2, **kw)
    assert m.memory_footprint()["kv_cache"] == 0
    # the engine checks the length itself too
    with pytest.raises(ValueError, match="5 names for a batch of 6 rows"):
        m._core.forward(ids, mask, None, ["r2"] * 5)
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        m._core.new_context(6, 8, None, ["zz"] * 6)


def test_training_refuses_adapter_names(tiny_dir):
    m = _model(tiny_dir)
    ids = np.array([[3, 4, 5, 6]])
    with pytest.raises(ValueError, match="forward_backward does not take adapter_names"):
        m.forward_backward(ids, ids, adapter_names=["r2"])
    assert all(not g.any() for g in m.get_adapter_gradients("r4").values())
