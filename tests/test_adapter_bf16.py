"""bf16 inference copies of adapters (issue 8, Model.adapter_dtype): the serving path reads each
adapter's A/B from a bf16 copy (made at add_adapter, rebuilt after training or lora_set), rounding x
and x·Aᵀ to bf16 as well, with fp32 accumulation. Checks: "auto" keeps the fp32 parity mode bit
for bit; logits equal a float64 PEFT reference that rounds the same four operands to bf16, within
the fp32 tolerance of the fp32 path plus the effect of rounding flips (the reference rounds exact
values, the kernels fp32 ones, so an element near a boundary can round the other way); the mixed-batch tests pass in bf16; a trained or
replaced adapter never serves stale copies; an open context keeps the dtype it started with."""
import os
import sys

import numpy as np
import pytest

import qlora_native

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_mixed_batch as tmb  # noqa: E402
from helpers_tiny import build_tiny  # noqa: E402
from test_lora_model import needs_peft  # noqa: E402

HAS_BF16 = qlora_native._core.ops.lora_bf16_bytes(16, 64, 64, backend="cpu") > 0
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="no AVX512-BF16 units (the fp32 factors are used)")
U = 2.0 ** -8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def test_auto_keeps_the_fp32_parity_mode(tiny_dir):
    m = tmb._model(tiny_dir)
    assert m.adapter_dtype == "auto" and m.compute_dtype == "float32"
    assert not m._core.adapter_bf16_active
    assert m.memory_footprint()["lora_adapters_bf16"] == 0  # no copy made in the fp32 mode
    ids, mask = tmb._padded(tmb.PROMPTS)
    auto = m(ids, mask, adapter_names=tmb.NAMES)
    m.adapter_dtype = "float32"
    np.testing.assert_array_equal(m(ids, mask, adapter_names=tmb.NAMES), auto)
    with pytest.raises(ValueError, match="adapter_dtype must be"):
        m.adapter_dtype = "float16"
    with pytest.raises(ValueError, match="adapter_dtype must be"):
        m.adapter_dtype = 16


@needs_bf16
def test_bf16_copies_are_used_and_reported(tiny_dir):
    m = tmb._model(tiny_dir)
    ids, mask = tmb._padded(tmb.PROMPTS)
    f32 = m(ids, mask, adapter_names=tmb.NAMES)
    m.adapter_dtype = "bfloat16"
    assert m._core.adapter_bf16_active
    b16 = m(ids, mask, adapter_names=tmb.NAMES)
    assert m.memory_footprint()["lora_adapters_bf16"] > 0  # built at first use (added under fp32)
    assert 1e-4 < np.abs(b16 - f32).max()
    # made at add_adapter when the model serves in bf16
    before = m.memory_footprint()["lora_adapters_bf16"]
    m.add_adapter("new", tmb.ADAPTERS["r4"], seed=9)
    assert m.memory_footprint()["lora_adapters_bf16"] > before
    # compute_dtype="bfloat16" with "auto" uses them too
    m2 = tmb._model(tiny_dir)
    m2.compute_dtype = "bfloat16"
    assert m2.adapter_dtype == "auto" and m2._core.adapter_bf16_active


@needs_bf16
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_mixed_batch_tests_pass_in_bf16(tiny_dir, quantize, monkeypatch):
    orig = tmb._model

    def bf16_model(*a, **k):
        m = orig(*a, **k)
        m.adapter_dtype = "bfloat16"
        return m

    monkeypatch.setattr(tmb, "_model", bf16_model)
    tmb.test_forward_rows_equal_their_single_runs(tiny_dir, quantize)
    if quantize == "nf4":
        tmb.test_generate_rows_equal_their_single_runs(tiny_dir)
        tmb.test_generate_keeps_its_adapter_set(tiny_dir)
        tmb.test_one_name_for_every_row_is_the_single_adapter_path(tiny_dir)


@needs_bf16
def test_trained_or_set_adapters_never_serve_stale_copies(tiny_dir):
    """After lora_set (set_adapter_state_dict) and after an optimizer step the bf16 logits equal those
    of a fresh adapter holding the new fp32 factors, bit for bit."""
    m = tmb._model(tiny_dir)
    m.adapter_dtype = "bfloat16"
    ids, mask = tmb._padded(tmb.PROMPTS)

    def fresh_equals(name):
        sd = m.get_adapter_state_dict(name)
        m.add_adapter("fresh", tmb.ADAPTERS[name], seed=1)
        m.set_adapter_state_dict("fresh", sd)
        np.testing.assert_array_equal(m(ids, mask, adapter_name=name), m(ids, mask, adapter_name="fresh"))
        m.delete_adapter("fresh")

    m(ids, mask, adapter_name="r4")  # the copy exists and is in use
    rng = np.random.default_rng(5)
    m.set_adapter_state_dict("r4", {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
                                    for k, v in m.get_adapter_state_dict("r4").items()})
    fresh_equals("r4")
    before = m(ids, mask, adapter_name="r4")
    core = m._core
    core.lora_configure_optimizer("r4", (0.9, 0.999), 1e-8, 0.0)
    lab = np.where(mask == 1, ids, -100).astype(np.int32)
    core.lora_set_active("r4")
    core.lora_zero_grad("r4")
    core.forward_backward(ids, mask, lab, 1.0, False, False)
    core.lora_optimizer_step("r4", 1e-2)
    after = m(ids, mask, adapter_name="r4")
    assert np.abs(after - before).max() > 1e-3  # the step changed the served adapter
    fresh_equals("r4")


@needs_bf16
def test_open_context_keeps_its_adapter_dtype(tiny_dir):
    m = tmb._model(tiny_dir)
    core = m._core
    ids = np.array([[3, 4, 5], [0, 6, 7]], np.int32)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int32)
    m.adapter_dtype = "bfloat16"
    c = core.new_context(2, 16, "r4")
    c.feed(ids, mask)
    m.adapter_dtype = "float32"
    step = c.feed(np.array([[9], [9]], np.int32))
    ids2, mask2 = np.array([[3, 4, 5, 9], [0, 6, 7, 9]], np.int32), np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int32)
    f32 = core.new_context(2, 16, "r4").feed(ids2, mask2)
    m.adapter_dtype = "bfloat16"
    b16 = core.new_context(2, 16, "r4").feed(ids2, mask2)
    # decode vs prefill of the same tokens: equal up to fp32 summation order (as in fp32 mode)
    assert np.abs(step - b16).max() <= 1e-5
    assert np.abs(step - f32).max() > 1e-3
    c.close()


@needs_bf16
@needs_peft
@pytest.mark.parametrize("nf4", [True, False])
def test_logits_match_a_bf16_emulating_float64_reference(tmp_path, rng, nf4):
    import torch
    from test_lora_model import build, fp32_tol, peft_reference, random_adapter, torch_logits

    model, cfg, ref = build(tmp_path, rng, nf4=nf4, hidden=64, inter=128, heads=4, kv_heads=2, vocab=100)
    random_adapter(model, "a", rng, r=16, lora_alpha=32, target_modules="all-linear")
    pm = peft_reference(model, cfg, ref, "a", tmp_path)
    ids = rng.integers(0, cfg["vocab_size"], (3, 9))
    ref32 = torch_logits(pm, ids)
    with pm.disable_adapter():
        base = torch_logits(pm, ids)

    def bf(z):  # round to bf16 (RNE) and back
        return z.to(torch.float32).to(torch.bfloat16).to(torch.float64)

    # The kernels' rounding, in float64: x and A, then t = x·Aᵀ and B.
    hooks = []
    for mod in pm.modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            la, lb = mod.lora_A["default"], mod.lora_B["default"]
            hooks.append(la.register_forward_hook(lambda m_, i, o: bf(bf(i[0]) @ bf(m_.weight).T)))
            hooks.append(lb.register_forward_hook(lambda m_, i, o: i[0] @ bf(m_.weight).T))
    ref16 = torch_logits(pm, ids)
    for h in hooks:
        h.remove()
    model.adapter_dtype = "bfloat16"
    ours16 = model(ids)
    model.adapter_dtype = "float32"
    ours32 = model(ids)
    scale = np.abs(ref16).max()
    effect = np.abs(ref32 - base).max()  # what the adapter does to the logits
    # The fp32 path's tolerance, plus the bf16 rounding flips: the reference rounds exact values, we
    # round fp32 ones, so an x or a t element near a rounding boundary can round the other way (one
    # bf16 ulp, at most 2u of it); an x flip and the t flips it causes move the logits, to first
    # order, by at most 2u + 2u of the adapter's effect. Flips are rare: the means are far smaller.
    bound = fp32_tol(cfg) * scale + 4 * U * effect
    d16, d32 = np.abs(ours16 - ref16), np.abs(ours16 - ref32)
    print(f"bf16 logits: max {d16.max():.3g} mean {d16.mean():.3g} from the bf16-emulating reference "
          f"(bound {bound:.3g}), max {d32.max():.3g} mean {d32.mean():.3g} from fp32's")
    assert d16.max() <= bound, (d16.max(), bound)
    # the emulation is what changed: our bf16 logits are much nearer the bf16 reference than the fp32
    # one (flips are rare: compare means), and the fp32 mode stays within fp32 tolerance of fp32's
    assert d16.mean() < 0.25 * d32.mean() and d32.max() > fp32_tol(cfg) * scale
    assert np.abs(ours32 - ref32).max() <= fp32_tol(cfg) * np.abs(ref32).max()


def test_levels_without_bf16_units_serve_the_fp32_factors(tiny_dir):
    """QLORA_SIMD / set_simd_level below avx512 (or a CPU without AVX512-BF16): adapter_dtype
    "bfloat16" falls back to the fp32 factors, bit for bit, also for copies made at avx512."""
    m = tmb._model(tiny_dir)
    ids, mask = tmb._padded(tmb.PROMPTS)
    best = qlora_native._core.best_simd_level()
    m.adapter_dtype = "bfloat16"
    m(ids, mask, adapter_names=tmb.NAMES)  # copies made where the best level has bf16 units
    try:
        for level in qlora_native.supported_simd_levels():
            if level in ("scalar", "avx512"):
                continue
            qlora_native.set_simd_level(level)
            assert not m._core.adapter_bf16_active
            m.adapter_dtype = "bfloat16"
            b16 = m(ids, mask, adapter_names=tmb.NAMES)
            m.adapter_dtype = "float32"
            np.testing.assert_array_equal(b16, m(ids, mask, adapter_names=tmb.NAMES), err_msg=level)
    finally:
        qlora_native.set_simd_level(best)
