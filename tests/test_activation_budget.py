"""activation_memory_budget (PyTorch's name and 0..1 scale): with gradient checkpointing, the budget's
share of the memory between recomputing every layer and recomputing none keeps intermediates where they
save the most recompute per byte: first the attention halves of the checkpointed layers (their recompute
then runs only the norms and the MLP half), then whole layers, the last ones, that skip the recompute
(cpp/src/model/train_memory.cpp kept_parts decides, llama_train.cpp train_pass follows the plan).
Same kernels on the same inputs either way, so every budget gives the bits of gradient_checkpointing
True and False; the plan's peak is the pass's measured peak; bad budgets are a ValueError."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import _core
from qlora_native import memory_model as mm

from helpers_tiny import build_tiny
from helpers_train import adapter_model, assert_same_training, train_batch

L = 5
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
             vocab_size=80, num_hidden_layers=L)
BF16 = qlora_native.ops.bf16_compute_available("cpu")
SIMD = [lv for lv in ("avx2", "avx512") if lv in _core.supported_simd_levels()]


def _floats(B=2, T=20, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, **_):
    """(whole layer set, attention half) in floats, from the shapes: h1, q, k, v, att, lse, x_mid, h2, g, u, a."""
    M, D, I = B * T, hidden_size, intermediate_size
    QD, KD = num_attention_heads * head_dim, num_key_value_heads * head_dim
    lse = B * num_attention_heads * T
    return M * (3 * D + 2 * QD + 2 * KD + 3 * I) + lse, M * (D + 2 * QD + 2 * KD) + lse


SET, ATT = _floats()
# (gradient_checkpointing, budget) -> (whole layers kept, attention halves kept) at B x T = 2 x 20, L = 5:
# the budget allows b x 4 x SET floats; the 4 checkpointed layers' halves cost 4 x ATT (b ~ 0.46), each
# whole layer beyond the last one SET - ATT more.
MODES = [(True, 0.0, (1, 0)), (True, 0.15, (1, 1)), (True, 0.3, (1, 2)), (True, 0.5, (1, 4)), (True, 0.75, (3, 2)),
         (True, 1.0, (L, 0)), (False, 0.0, (L, 0)), (False, 0.5, (L, 0))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("budget")), **SHAPE)


@pytest.fixture
def simd(request):
    old = qlora_native.simd_level()
    qlora_native.set_simd_level(request.param)
    yield request.param
    qlora_native.set_simd_level(old)


def _plan(**kw):
    args = dict(hidden_size=64, intermediate_size=96, vocab_size=80, num_hidden_layers=L, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, batch=2, seq=20, r=4)
    args.update(kw)
    return _core.train.memory_plan(**args)


# ------------------------------------------------------------------ the plan
def _kept(p):
    return p["layers_kept"], p["attention_kept"]


@pytest.mark.parametrize("layers", [2, 5, 30])
@pytest.mark.parametrize("dims", [{}, dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                          num_key_value_heads=3, head_dim=64, B=4, T=256)], ids=["tiny", "smollm2"])
def test_budget_spends_attention_halves_first(layers, dims):
    """budget b may spend b x (max - min) floats above full recompute, max - min = L - 1 layer sets:
    whole parts, never over the allowance; attention halves (the highest checkpointed layers) first,
    then whole layers; nothing more fits; budget 0 keeps nothing, 1 everything, and more budget never
    keeps less."""
    set_f, att_f = _floats(**dims)
    plan_dims = {k: v for k, v in dims.items() if k not in ("B", "T")}
    B, T = dims.get("B", 2), dims.get("T", 20)

    def kept(b, **kw):
        return _kept(_plan(num_hidden_layers=layers, activation_memory_budget=b, batch=B, seq=T, **plan_dims, **kw))

    used_before = -1
    for b in sorted({i / 40 for i in range(41)} | {k / (layers - 1) for k in range(layers)}):
        full, att = kept(b)
        allow = b * (layers - 1) * set_f
        used = (full - 1) * set_f + att * att_f
        assert 1 <= full <= layers and 0 <= att and full - 1 + att <= layers - 1, (b, full, att)
        assert used <= allow * (1 + 1e-12), (b, full, att)
        if full - 1 + att < layers - 1:   # not every checkpointed layer keeps its half: no whole layer yet,
            assert full == 1 and used + att_f > allow, (b, full, att)  # and one more half would not fit
        elif full < layers:                # every half kept: one more whole layer would not fit
            assert used + (set_f - att_f) > allow, (b, full, att)
        assert used >= used_before, b
        used_before = used
    assert kept(0.0) == (1, 0) and kept(1.0) == (layers, 0)
    assert kept(0.5, checkpointing=False) == (layers, 0)  # checkpointing off keeps everything anyway
    assert kept(0.5, backward=False) == (1, 0)             # eval reuses one set


def test_plan_parts_scale_with_kept_parts():
    """Only layer_activations (and so the peak) grows, by one layer set per kept layer and one half per
    kept attention half; budget 1 is the plan of checkpointing off, part by part."""
    base = _plan()
    per_set = base["layer_activations"]
    assert per_set == 4 * SET
    for _, b, (full, att) in MODES[1:6]:
        p = _plan(activation_memory_budget=b)
        assert _kept(p) == (full, att), b
        extra = 4 * ((full - 1) * SET + att * ATT)
        assert p["layer_activations"] == base["layer_activations"] + extra
        assert p["peak"] == base["peak"] + extra
        skip = ("layer_activations", "peak", "layers_kept", "attention_kept")
        assert {k: v for k, v in p.items() if k not in skip} == {k: v for k, v in base.items() if k not in skip}
    assert _plan(activation_memory_budget=1.0) == _plan(checkpointing=False)
    got = mm.activation_bytes(SHAPE, 2, 20, 4, activation_memory_budget=0.75)
    assert got["layer_activations"] == 4 * (3 * SET + 2 * ATT)


# ------------------------------------------------------------------ bits and peak
def _run(path, ckpt, budget, compute="float32", dropout=0.0, offload=False, backend="cpu", steps=2):
    m = adapter_model(path, backend, compute_dtype=compute, dropout=dropout)
    m.gradient_checkpointing = ckpt
    m.activation_memory_budget = budget
    m.offload_checkpoints = offload
    out = []
    for s in range(steps):  # the second pass: another dropout mask (micro_step)
        ids, labels, mask = train_batch(seed=s, B=2, T=20)
        m.zero_grad()
        loss = m.forward_backward(ids, labels, mask)
        out.append((loss, {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()},
                    m.last_train_peak_bytes))
    return out


def _assert_same_bits(ref, got):
    for (l0, g0, _), (l1, g1, _) in zip(ref, got):
        assert l0 == l1
        assert g0.keys() == g1.keys() and g0
        for k in g0:
            np.testing.assert_array_equal(g0[k], g1[k], err_msg=k)


def _check_modes(tiny, **kw):
    ref = _run(tiny, True, 0.0, **kw)
    for ckpt, budget, kept in MODES:
        got = _run(tiny, ckpt, budget, **kw)
        _assert_same_bits(ref, got)
        est = mm.activation_bytes(SHAPE, 2, 20, 4, checkpointing=ckpt, activation_memory_budget=budget,
                                  dropout=kw.get("dropout", 0.0) > 0, offload=kw.get("offload", False),
                                  device=kw.get("backend", "cpu") != "cpu",
                                  compute_dtype=kw.get("compute", "float32"))
        assert all(p == est["peak"] for _, _, p in got), (ckpt, budget, [p for _, _, p in got], est)
        assert _kept(_plan(checkpointing=ckpt, activation_memory_budget=budget)) == kept


@pytest.mark.parametrize("simd", SIMD, indirect=True)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_bits_and_peak(tiny, simd, dropout):
    """fp32 at AVX-512 and AVX2: loss and every LoRA gradient are the same bits for budgets 0, 0.3,
    0.5, 1 and checkpointing off; each pass's peak is the plan's."""
    _check_modes(tiny, dropout=dropout)


@pytest.mark.skipif(not BF16, reason="no AVX512-BF16")
def test_bf16_bits_and_peak(tiny):
    _check_modes(tiny, compute="bfloat16", dropout=0.1)


@pytest.mark.parametrize("backend,offload", [("cpu", True), ("cpu:devsim", False), ("cpu:devsim", True)])
def test_offload_and_device_bits_and_peak(tiny, backend, offload):
    """Kept layers compose with offloaded checkpoints (the kept layer's input comes back from the
    host) and with a device backend's plan."""
    _check_modes(tiny, dropout=0.1, offload=offload, backend=backend)


def test_recompute_skipped_for_kept_layers(tiny, monkeypatch):
    """The backward recomputes the attention of exactly the layers below the kept ones that keep no
    attention half (attention calls: L forward + L - kept - halves recomputes), and the MLP half of every
    layer below the kept ones (gate/up: 2 GEMMs per layer forward + 2 per recompute);
    QLORA_SKIP_LAST_RECOMPUTE=0 recomputes the lowest kept layer too."""
    def calls(budget):
        m = adapter_model(tiny, "cpu")
        m.activation_memory_budget = budget
        ids, labels, mask = train_batch()
        was = _core.profile_enabled()
        _core.profile_enable(True)
        try:
            _core.profile_reset()
            m.forward_backward(ids, labels, mask)
            rep = _core.profile_report()
            att = sum(r["calls"] for r in rep if r["op"] == "attention_train")
            swiglu = sum(r["calls"] for r in rep if r["op"] == "swiglu")
            return att, swiglu
        finally:
            _core.profile_enable(was)
            _core.profile_reset()

    for _, budget, (full, att) in MODES[:6]:
        assert calls(budget) == (2 * L - full - att, 2 * L - full), budget
    monkeypatch.setenv("QLORA_SKIP_LAST_RECOMPUTE", "0")
    for _, budget, (full, att) in MODES[:6]:
        assert calls(budget) == (2 * L - full - att + 1, 2 * L - full + 1), budget


def test_train_step_same_bits(tiny):
    """Through the step rule (lora_train_step: AdamW steps), budget 0.75 (whole layers and attention
    halves) trains as budget 0."""
    a, b = adapter_model(tiny), adapter_model(tiny)
    b.activation_memory_budget = 0.75
    assert_same_training(a, b, steps=3)


# ------------------------------------------------------------------ bad values
BAD = [-0.1, 1.5, float("nan"), float("inf"), "0.5", True, None]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_budget_raises_value_error(tiny, bad):
    m = adapter_model(tiny)
    with pytest.raises(ValueError, match="activation_memory_budget must be a number in"):
        m.activation_memory_budget = bad
    assert m.activation_memory_budget == 0.0
    with pytest.raises(ValueError, match="activation_memory_budget"):
        mm.activation_bytes(SHAPE, 1, 8, 4, activation_memory_budget=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")], ids=repr)
def test_engine_refuses_bad_budget(tiny, bad):
    """The engine's own check (the one front door), for callers of _core: before any gradient changes."""
    m = adapter_model(tiny)
    m.configure_optimizer(lr=1e-3)
    ids, labels, mask = train_batch()
    m.forward_backward(ids, labels, mask)
    before = {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()}
    shifted = np.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    match = "activation_memory_budget must be a number in"
    with pytest.raises(ValueError, match=match):
        m._core.forward_backward(ids, mask, shifted, 1.0, True, True, bad)
    with pytest.raises(ValueError, match=match):
        m._core.lora_train_step([(ids, mask, shifted, int((shifted != -100).sum()))], 1e-3, math.inf, True, True,
                                None, bad)
    with pytest.raises(ValueError, match=match):
        _plan(activation_memory_budget=bad)
    for k, v in m.get_adapter_gradients("a").items():
        np.testing.assert_array_equal(np.array(v), before[k], err_msg=k)


def test_cli_refuses_bad_budget_before_loading(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qlora_native", "train", "--model", str(tmp_path / "missing"),
                          "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out"),
                          "--activation-memory-budget", "1.5"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                         timeout=120)
    assert out.returncode != 0
    assert "activation_memory_budget must be a number in [0, 1]" in out.stderr, out.stderr
