"""Grouped LoRA in the training pass (issue 11, Unsloth's fused LoRA): the LoRA of q/k/v and of
gate/up share their input, their A factors lie back to back in the parameter arena, so the shrinks
are one GEMM x·[A_q; A_k; A_v]ᵀ, the input-gradient terms one GEMM with K = r_q + r_k + r_v and dA
one GEMM dtᵀ·x. QLORA_LORA_GROUP=0 runs the ungrouped calls: losses and gradients must agree to
fp32 rounding (only the summation order differs), with dropout (never grouped) exactly; the
optimizer state keeps the PEFT tensor order though the arena holds another."""

import numpy as np
import pytest

from qlora_native import _core

from helpers_tiny import build_tiny
from helpers_train import adapter_model, train_batch

HAVE_GPU = _core.cuda_device_count() > 0
BACKENDS = ["cpu", "cpu:devsim",
            pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU"))]
EPS32 = float(np.finfo(np.float32).eps)
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=80)

CONFIGS = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    # Ranks and alphas differ per module, rsLoRA scaling.
    "mixed-ranks": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                        rank_pattern={"q_proj": 2, "k_proj": 6, "gate_proj": 3},
                        alpha_pattern={"v_proj": 5, "up_proj": 3}),
    # k untargeted (q, v grouped); gate/up a lone up (not grouped).
    "partial": dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"]),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")), **SHAPE)


@pytest.fixture
def group_env(monkeypatch):
    def set_(on):
        monkeypatch.setenv("QLORA_LORA_GROUP", "1" if on else "0")
    return set_


def _model(path, backend, cfg, dropout=0.0, compute_dtype="float32"):
    m = adapter_model(path, backend, lora=cfg, dropout=dropout, compute_dtype=compute_dtype)
    rng = np.random.default_rng(7)  # nonzero B: every LoRA gradient term is live
    sd = {k: (rng.standard_normal(v.shape) * 0.2).astype(np.float32) if "lora_B" in k else v
          for k, v in m.get_adapter_state_dict("a").items()}
    m.set_adapter_state_dict("a", sd)
    return m


def _pass(m, group_env, on, ckpt=True):
    group_env(on)
    m.gradient_checkpointing = ckpt
    ids, labels, mask = train_batch()
    m.zero_grad()
    loss = m.forward_backward(ids, labels, mask)
    ev = m.eval_loss(ids, labels, mask)[0]
    return loss, ev, {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("ckpt", [True, False])
def test_grouped_equals_ungrouped(tiny, group_env, backend, name, ckpt):
    """Loss, eval loss and every A/B gradient of the grouped pass equal the ungrouped pass's within
    an fp32 summation-order bound: 2 layers of sums over <= 96 terms, 64 u relative to the tensor's
    largest gradient (measured differences are a few u)."""
    m = _model(tiny, backend, CONFIGS[name])
    l0, e0, g0 = _pass(m, group_env, False, ckpt)
    l1, e1, g1 = _pass(m, group_env, True, ckpt)
    assert abs(l1 - l0) <= 16 * EPS32 * abs(l0)
    assert abs(e1 - e0) <= 16 * EPS32 * abs(e0)
    assert g0.keys() == g1.keys()
    for k in g0:
        scale = float(np.abs(g0[k]).max())
        assert scale > 0, k
        err = float(np.abs(g1[k] - g0[k]).max())
        assert err <= 64 * EPS32 * scale, (k, err / (EPS32 * scale))
    # Run to run the grouped pass is deterministic.
    _, _, g2 = _pass(m, group_env, True, ckpt)
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)


@pytest.mark.parametrize("backend", ["cpu", "cpu:devsim"])
def test_grouped_bf16_compute(tiny, group_env, backend):
    """compute_dtype bfloat16 (the bases in bf16, the LoRA branch fp32): grouping reorders fp32 sums
    only, but downstream every GEMM rounds its operands to bf16, and a value whose fp32 sum moved by an
    ulp can round to the neighbouring bf16 value (one bf16 ulp, 2^-8 relative). Such a flip is rare
    (the seed below hits one under the AMX kernel's k order: ~1.7e-3 of the largest gradient; other
    seeds and the AVX512-BF16 kernel stay at a few fp32 u), so the bound is one bf16 unit roundoff
    of the largest gradient, not the fp32 one; the loss (before any backward rounding) keeps 16 u32."""
    m = _model(tiny, backend, CONFIGS["all-linear"], compute_dtype="bfloat16")
    l0, _, g0 = _pass(m, group_env, False)
    l1, _, g1 = _pass(m, group_env, True)
    assert abs(l1 - l0) <= 16 * EPS32 * abs(l0)
    u_bf16 = 2.0 ** -8
    for k in g0:
        assert float(np.abs(g1[k] - g0[k]).max()) <= u_bf16 * float(np.abs(g0[k]).max()), k


@pytest.mark.parametrize("backend", ["cpu", "cpu:devsim"])
def test_dropout_is_never_grouped(tiny, group_env, backend):
    """lora_dropout > 0: each module sees its own dropped-out input, so the switch changes nothing
    (bit for bit)."""
    m = _model(tiny, backend, CONFIGS["all-linear"], dropout=0.1)
    m.train()
    dstate = m._core.lora_dropout_state("a")
    l0, _, g0 = _pass(m, group_env, False)
    m._core.lora_set_dropout_state("a", *dstate)  # the same masks again
    l1, _, g1 = _pass(m, group_env, True)
    assert l0 == l1
    assert all(np.array_equal(g0[k], g1[k]) for k in g0)


def _lora_gemms(m, on, group_env):
    group_env(on)
    ids, labels, mask = train_batch()
    _core.profile_reset()
    _core.profile_enable(True)
    try:
        m.zero_grad()
        m.forward_backward(ids, labels, mask)
    finally:
        _core.profile_enable(False)
    rows = [r for r in _core.profile_report() if r["part"].lower().startswith("lora")]
    _core.profile_reset()
    return rows


def test_grouped_calls_run(tiny, group_env):
    """With grouping on, the shrink of q/k/v is one GEMM with N = r_q + r_k + r_v (and of gate/up
    N = r_gate + r_up), and the LoRA GEMM count drops; off, every shrink has N = one rank."""
    m = _model(tiny, "cpu", CONFIGS["mixed-ranks"])
    M, D = 24, SHAPE["hidden_size"]
    off, on = _lora_gemms(m, False, group_env), _lora_gemms(m, True, group_env)
    shrinks = lambda rows: {r["shape"] for r in rows if r["op"] == "gemm_nt" and r["shape"][0] == M and
                            r["shape"][2] == D}
    assert (M, 2 + 6 + 4, D) in shrinks(on) and (M, 3 + 4, D) in shrinks(on)
    assert (M, 2 + 6 + 4, D) not in shrinks(off) and (M, 3 + 4, D) not in shrinks(off)
    calls = lambda rows: sum(r["calls"] for r in rows)
    # Per layer: q/k/v saves 2 shrinks in the forward, 2 recomputed shrinks, 2 dA and 2 dX GEMMs in
    # the backward (8); gate/up 4; the checkpoint recompute (all layers but the last,
    # QLORA_SKIP_LAST_RECOMPUTE) repeats the forward's savings (2 + 1). There the backward reuses the
    # recompute's t (QLORA_LORA_KEEP_T): grouped it runs no shrink, per module still 3 + 2 (2 more saved).
    L = 2
    assert calls(off) - calls(on) == L * (8 + 4) + (L - 1) * (2 + 1 + 2)


def test_optimizer_state_in_peft_order(tiny, group_env):
    """The arena holds [A_q; A_k; A_v] back to back, yet get_optimizer_state lists the tensors in
    PEFT order (its names), each moment belonging to its tensor; a restored state resumes exactly."""
    m = _model(tiny, "cpu", CONFIGS["mixed-ranks"])
    m.configure_optimizer(lr=1e-3)
    ids, labels, mask = train_batch()
    m.zero_grad()
    m.forward_backward(ids, labels, mask)
    g = {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()}
    m.optimizer_step()
    st = m.get_optimizer_state()
    params = m.get_adapter_state_dict("a")
    assert len(st["names"]) == len(st["exp_avg"]) == len(params)
    for name, ea, es in zip(st["names"], st["exp_avg"], st["exp_avg_sq"]):
        ea, es = np.asarray(ea).ravel(), np.asarray(es).ravel()
        want = g[name].ravel()
        # First AdamW step: m = (1 - beta1) g, v = (1 - beta2) g² (float32 products).
        np.testing.assert_allclose(ea, np.float32(1 - 0.9) * want, rtol=1e-6, atol=0)
        np.testing.assert_allclose(es, np.float32(1 - 0.999) * want * want, rtol=1e-5, atol=1e-30)
    # Save, take a step, restore into a fresh model: the same next step.
    m2 = _model(tiny, "cpu", CONFIGS["mixed-ranks"])
    m2.set_adapter_state_dict("a", params)
    m2.set_optimizer_state(st)
    for mm in (m, m2):
        mm.zero_grad()
        mm.forward_backward(ids, labels, mask)
        mm.optimizer_step()
    a, b = m.get_adapter_state_dict("a"), m2.get_adapter_state_dict("a")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    st2 = m2.get_optimizer_state()
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(st2["exp_avg"], m.get_optimizer_state()["exp_avg"]))
