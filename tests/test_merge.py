"""Merging LoRA adapters into the weights (merge_adapter / unmerge_adapter / merge_and_unload), the
drift report, and the HF export of merged models (issue 9, "Merge" and the HF half of "Export")."""
from __future__ import annotations

import json
import math
import os
import threading

import ml_dtypes
import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig, nf4
from qlora_native.lora_config import peft_tensor_name
from qlora_native.merge import format_drift

from helpers_model import PROJECTIONS, dequantize_nf4_numpy
from helpers_tiny import add_random_adapter, build_tiny

PROJ = [p.split(".")[1] for p in PROJECTIONS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("merge") / "tiny"))


def _load(path, nf4_=True, name="a", seed=1, targets="all-linear"):
    m = qlora_native.Model.from_pretrained(path, quantize="nf4" if nf4_ else None)
    if name:
        if targets == "all-linear":
            add_random_adapter(m, name, seed)
        else:
            m.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules=targets), seed=seed)
            rng = np.random.default_rng(seed)
            m.set_adapter_state_dict(name, {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
                                            for k, v in m.get_adapter_state_dict(name).items()})
    return m


def _hf(layer, i):
    return f"model.layers.{layer}.{PROJECTIONS[i]}"


def _delta64(m, name, layer, proj):
    sd = m.get_adapter_state_dict(name)
    a = sd[peft_tensor_name(layer, proj, "A")].astype(np.float64)
    b = sd[peft_tensor_name(layer, proj, "B")].astype(np.float64)
    return m._core.lora_scaling(name, layer, proj) * (b @ a)


IDS = np.array([[1, 5, 9, 33, 2, 17, 60, 4, 8, 21, 44, 3, 12, 50, 7, 30]], np.int32)


# ------------------------------------------------------------------ the merged weights
def test_merged_fp32_weights_and_logits_match_float64_reference(tmp_path):
    """deq(W_nf4) + scaling * B @ A in float64, run through transformers in float64: the merged model
    gives the adapter's logits to float32 rounding, and so did base + adapter before the merge."""
    from helpers_model import make_checkpoint, reference_logits, reference_model

    path, cfg, stored = make_checkpoint(tmp_path, np.random.default_rng(3))
    m = qlora_native.Model.from_pretrained(path, quantize="nf4")
    add_random_adapter(m, "a", 7)
    L = m.config.num_hidden_layers
    ref_state = dict(stored)
    for l in range(L):
        for i, p in enumerate(PROJ):
            base = dequantize_nf4_numpy(m._core.linear_nf4(_hf(l, i))).astype(np.float64)
            ref_state[_hf(l, i) + ".weight"] = base + _delta64(m, "a", l, p)
    ref = reference_logits(reference_model(cfg, ref_state), IDS)
    with_adapter = m(IDS)
    report = m.merge_and_unload(eval_ids=IDS)
    merged = m(IDS)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(with_adapter, ref, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(merged, ref, rtol=0, atol=2e-5 * scale)
    assert report["max_abs_logit_diff"] < 2e-5 * scale
    for l in range(L):
        for i in range(7):
            assert m._core.linear_nf4(_hf(l, i)) is None  # nothing stays NF4 in an unquantized merge
            w = m._core.get_tensor(_hf(l, i) + ".weight").reshape(ref_state[_hf(l, i) + ".weight"].shape)
            want = ref_state[_hf(l, i) + ".weight"]
            np.testing.assert_allclose(w, want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert m.adapters == [] and m.active_adapter is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_merged_nf4_is_the_codec_quantization_of_the_merged_weight(tiny, dtype):
    fp = _load(tiny, targets=["q_proj", "v_proj", "down_proj"])
    untouched = {(l, i): fp._core.linear_nf4(_hf(l, i)) for l in range(2) for i in range(7)}
    fp.merge_adapter(dtype=dtype)  # unquantized: the engine's merged weight (rounded to dtype)
    q = _load(tiny, targets=["q_proj", "v_proj", "down_proj"])
    q.merge_and_unload(quantize="nf4", dtype=dtype, eval_ids=IDS)
    cast = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    for l in range(2):
        for i, p in enumerate(PROJ):
            got = q._core.linear_nf4(_hf(l, i))
            if p not in ("q_proj", "v_proj", "down_proj"):
                for k in ("packed", "absmax", "nested_absmax"):  # not adapted: the original bytes
                    np.testing.assert_array_equal(got[k], untouched[(l, i)][k])
                continue
            w = fp._core.get_tensor(_hf(l, i) + ".weight").reshape(got["shape"])
            np.testing.assert_array_equal(w, w.astype(cast).astype(np.float32))  # rounded to dtype
            want = nf4.quantize(w, blocksize=got["blocksize"], double_quant=got["double_quant"])
            np.testing.assert_array_equal(got["packed"], want.packed)
            np.testing.assert_array_equal(got["absmax"], want.absmax)
            np.testing.assert_array_equal(got["nested_absmax"], want.nested_absmax)
            assert got["offset"] == want.offset


def test_rounding_matches_ml_dtypes_including_ties_and_subnormals(tiny):
    """The engine's bf16 / fp16 rounding of merged weights equals numpy / ml_dtypes' (nearest, ties
    to even), checked on weights built to hit ties, subnormals and the float16 maximum."""
    for dtype, cast in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        m = _load(tiny, nf4_=False, name=None)
        rng = np.random.default_rng(0)
        sd = {}
        m.add_adapter("a", LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"]), seed=0)
        for k, v in m.get_adapter_state_dict("a").items():
            sd[k] = np.zeros_like(v)
        w0 = m._core.get_tensor(_hf(0, 0) + ".weight")
        # A = e_0, B = column of special values: delta lands in column 0 of q_proj layer 0.
        special = np.array([65504.0, 65519.0, -65505.0, 1 + 2**-8, 1 + 3 * 2**-8, 2**-20, 3 * 2**-26, 1e-30,
                            1 + 2**-11, 1 + 3 * 2**-11], np.float64)
        k_a, k_b = peft_tensor_name(0, "q_proj", "A"), peft_tensor_name(0, "q_proj", "B")
        sd[k_a][0, 0] = 1.0
        col = rng.standard_normal(sd[k_b].shape[0])
        col[: special.size] = special
        sd[k_b][:, 0] = col - w0.reshape(sd[k_b].shape[0], -1)[:, 0]  # W[:, 0] + delta = col (in fp32)
        m.set_adapter_state_dict("a", {k: v.astype(np.float32) for k, v in sd.items()})
        exact = w0.reshape(-1, m.config.hidden_size).copy()
        exact[:, 0] = exact[:, 0] + sd[k_b][:, 0].astype(np.float32)  # the fp32 merge (one rounding)
        m.merge_adapter(dtype=dtype)
        got = m._core.get_tensor(_hf(0, 0) + ".weight").reshape(exact.shape)
        np.testing.assert_array_equal(got, exact.astype(cast).astype(np.float32))


def test_fp16_overflow_is_refused_and_nothing_changes(tiny):
    m = _load(tiny)
    sd = m.get_adapter_state_dict("a")
    k = peft_tensor_name(1, "down_proj", "B")
    sd[k] = sd[k] * 1e6  # merged weights far beyond float16's range
    m.set_adapter_state_dict("a", sd)
    before = m(IDS)
    nf4_before = m._core.linear_nf4(_hf(0, 0))
    with pytest.raises(ValueError, match=r"layer 1 down_proj: merged weight .* not finite in float16; nothing"):
        m.merge_adapter(dtype="float16")
    assert m.active_adapter == "a" and m.merged_adapter is None
    np.testing.assert_array_equal(m(IDS), before)
    np.testing.assert_array_equal(m._core.linear_nf4(_hf(0, 0))["packed"], nf4_before["packed"])
    m.merge_adapter(dtype="float32")  # fp32 holds it
    np.testing.assert_allclose(m(IDS), before, rtol=1e-4, atol=1e-3 * np.abs(before).max())


# ------------------------------------------------------------------ merge_adapter / unmerge_adapter
@pytest.mark.parametrize("nf4_base", [True, False])
def test_merge_adapter_keeps_adapter_inactive_and_unmerge_restores(tiny, nf4_base):
    m = _load(tiny, nf4_=nf4_base)
    base_model = _load(tiny, nf4_=nf4_base, name=None)
    with_adapter, base = m(IDS), base_model(IDS)
    m.merge_adapter()
    assert m.adapters == ["a"] and m.active_adapter is None and m.merged_adapter == "a"
    tol = 2e-5 * np.abs(with_adapter).max()
    np.testing.assert_allclose(m(IDS), with_adapter, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="is merged into the weights"):
        m.set_active_adapter("a")
    with pytest.raises(ValueError, match="already merged"):
        m.merge_adapter("a")
    with pytest.raises(ValueError, match="already merged"):
        m.merge_and_unload()
    m.unmerge_adapter()
    assert m.active_adapter == "a" and m.merged_adapter is None
    np.testing.assert_allclose(m(IDS), with_adapter, rtol=0, atol=tol)
    m.set_active_adapter(None)
    np.testing.assert_allclose(m(IDS), base, rtol=0, atol=tol)


def test_merge_one_adapter_while_another_is_active(tiny):
    """merge_adapter('b') while 'a' is active: b goes into the weights, a keeps applying on top;
    a second merge while b is merged is refused."""
    m = _load(tiny)
    add_random_adapter(m, "b", 2)
    ref = _load(tiny, name="b", seed=2)
    m.set_active_adapter("a")
    m.merge_adapter("b")
    assert m.active_adapter == "a" and m.merged_adapter == "b"
    ref.merge_and_unload(eval_ids=IDS)
    ref.add_adapter("a", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ref.set_adapter_state_dict("a", m.get_adapter_state_dict("a"))
    np.testing.assert_allclose(m(IDS), ref(IDS), rtol=0, atol=1e-5 * np.abs(ref(IDS)).max())
    with pytest.raises(ValueError, match="'b' is already merged"):
        m.merge_adapter("a")
    m.delete_adapter("b")  # the weights stay merged; nothing to unmerge any more
    with pytest.raises(ValueError, match="no adapter is merged"):
        m.unmerge_adapter()


def test_merge_errors(tiny):
    m = _load(tiny, name=None)
    with pytest.raises(ValueError, match="no active adapter"):
        m.merge_adapter()
    with pytest.raises(ValueError, match="no active adapter"):
        m.merge_and_unload()
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        m.merge_adapter("x")
    with pytest.raises(ValueError, match="no adapter is merged"):
        m.unmerge_adapter()
    add_random_adapter(m, "a", 1)
    for bad in ("bf16", "float64", None, 3):
        with pytest.raises(ValueError, match="merge dtype must be one of float32, bfloat16, float16"):
            m.merge_adapter(dtype=bad)
    for bad in ("int8", "NF4", True):
        with pytest.raises(ValueError, match="quantize must be None"):
            m.merge_and_unload(quantize=bad)
    with pytest.raises(ValueError, match="progress must be a callable"):
        m.merge_adapter(progress=5)
    with pytest.raises(ValueError, match="eval_text or eval_ids, not both"):
        m.merge_and_unload(eval_text="x", eval_ids=IDS)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        m.merge_and_unload(eval_text="hello")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        m.merge_and_unload(eval_ids=[5])
    with pytest.raises(ValueError, match="out of range"):
        m.merge_and_unload(eval_ids=[5, 999])
    with pytest.raises(ValueError, match=r"one sequence"):
        m.merge_and_unload(eval_ids=np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="merge dtype must be float32, bfloat16 or float16, got 'half'"):
        m._core.lora_merge("a", False, False, "half", None)
    assert m.active_adapter == "a" and m.merged_adapter is None  # nothing happened
    m.merge_adapter(quantize="nf4")
    with pytest.raises(ValueError, match="re-quantized to NF4.*cannot be unmerged"):
        m.unmerge_adapter()
    # the C++ side refuses too (an NF4 projection cannot be subtracted exactly)
    with pytest.raises(ValueError, match="unmerge: layer 0 q_proj is stored NF4"):
        m._core.lora_merge("a", True, False, "float32", None)


def test_merge_refused_while_a_generation_runs(tiny):
    m = _load(tiny)
    errors = []

    def stream(row, tok):
        if not errors:
            for call in (lambda: m.merge_adapter(),  # the engine: the generation's context is open
                         lambda: m._core.lora_merge("a", False, False, "float32", None)):  # C++ guard
                try:
                    call()
                    errors.append(None)
                except ValueError as e:
                    errors.append(str(e))

    out = m.generate([1, 5, 9], max_new_tokens=3, stream=stream)
    assert len(out[0]) == 3
    assert errors[0] and "generation is running" in errors[0]
    assert errors[1] and "is running on this model" in errors[1]
    assert m.merged_adapter is None and m.active_adapter == "a"
    m.merge_adapter()  # after the generation: fine
    assert m.merged_adapter == "a"


def test_merge_refused_while_a_forward_runs_in_another_thread(tiny):
    """A forward holds the weights (shared); a merge from another thread is refused meanwhile."""
    m = _load(tiny, nf4_=False)
    long_ids = np.random.default_rng(0).integers(0, 64, (8, 256)).astype(np.int32)
    started, stop = threading.Event(), threading.Event()

    def worker():
        while not stop.is_set():
            started.set()
            m._core.forward(long_ids, None)

    t = threading.Thread(target=worker)
    t.start()
    refused = None
    try:
        assert started.wait(30)
        for _ in range(1000):
            try:
                m._core.lora_merge("a", False, False, "float32", None)
                m._core.lora_merge("a", True, False, "float32", None)  # between two passes: undo, retry
            except ValueError as e:
                refused = str(e)
                break
    finally:
        stop.set()
        t.join(60)
    assert refused is not None and "is running on this model" in refused


# ------------------------------------------------------------------ drift report
def _numpy_loss(logits, ids):
    z = logits[0, :-1].astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(-1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), ids[0, 1:]]))


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_drift_report_is_computed(tiny, quantize):
    m = _load(tiny)
    base = _load(tiny, name=None)(IDS).astype(np.float64)
    before = m(IDS)
    calls = []
    r = m.merge_and_unload(quantize=quantize, eval_ids=IDS[0], progress=calls.append)
    after = m(IDS)
    assert calls == [1, 2]
    d = np.abs(before.astype(np.float64) - after)
    assert r["max_abs_logit_diff"] == pytest.approx(d.max(), rel=1e-12)
    assert r["mean_abs_logit_diff"] == pytest.approx(d.mean(), rel=1e-12)
    la, lm = _numpy_loss(before, IDS), _numpy_loss(after, IDS)
    assert r["loss_adapter"] == pytest.approx(la, rel=1e-9) and r["loss_merged"] == pytest.approx(lm, rel=1e-9)
    assert r["ppl_merged"] == pytest.approx(math.exp(lm), rel=1e-9)
    assert r["top1_agreement"] == np.mean(before[0].argmax(-1) == after[0].argmax(-1))
    assert r["tokens"] == IDS.shape[1] and r["eval"] == "eval_ids" and r["quantize"] == quantize
    assert r["loss_base"] == pytest.approx(_numpy_loss(base, IDS), rel=1e-9)
    effect = before - base
    assert r["mean_abs_adapter_effect"] == pytest.approx(np.abs(effect).mean(), rel=1e-9)
    kept = np.sum((after - base) * effect) / np.sum(effect * effect)
    assert r["adapter_effect_kept"] == pytest.approx(kept, rel=1e-9)
    if quantize:
        assert r["max_abs_logit_diff"] > 0.01  # re-quantizing changes the model, and it shows
        assert r["adapter_effect_kept"] < 0.999
    else:
        assert r["max_abs_logit_diff"] < 1e-4
        assert r["adapter_effect_kept"] == pytest.approx(1.0, abs=1e-4)
    table = format_drift(r)
    assert "perplexity" in table and f"{r['loss_merged']:.5f}" in table and f"{r['loss_base']:.5f}" in table
    assert f"adapter effect kept by the merge: {100 * kept:.1f}%" in table


def test_drift_default_sample_without_tokenizer(tiny):
    m = _load(tiny)
    r = m.merge_and_unload(quantize="nf4")
    assert r["tokens"] == 256 and "random token ids" in r["eval"]


def test_drift_default_text_and_eval_text_with_tokenizer(tmp_path):
    from helpers_tokenizer import build_hf_tokenizer_dir

    from qlora_native.merge import DEFAULT_EVAL_TEXT

    d = build_tiny(str(tmp_path / "m"), vocab_size=320)  # room for the tokenizer's 300 ids
    tok_dir = build_hf_tokenizer_dir(tmp_path / "tok", vocab_size=300)
    for f in os.listdir(tok_dir):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            os.replace(os.path.join(tok_dir, f), os.path.join(d, f))
    m = _load(d)
    assert m.tokenizer is not None
    ids = np.array([m.tokenizer.encode(DEFAULT_EVAL_TEXT)])
    assert ids.shape[1] > 256  # this small tokenizer: longer than the model's context
    ids = ids[:, :256]
    before = m(ids)
    r = m.merge_and_unload(quantize="nf4")
    assert r["eval"] == "built-in sample text (truncated to max_position_embeddings 256)" and r["tokens"] == 256
    assert r["max_abs_logit_diff"] == pytest.approx(np.abs(before.astype(np.float64) - m(ids)).max(), rel=1e-12)
    m2 = _load(d)
    r2 = m2.merge_and_unload(eval_text="one two three four five six")
    assert r2["eval"] == "eval_text" and r2["tokens"] == len(m2.tokenizer.encode("one two three four five six"))


# ------------------------------------------------------------------ export
def test_save_pretrained_of_merged_model_loads_in_transformers(tmp_path):
    import torch
    import transformers
    from helpers_model import make_checkpoint
    from helpers_tokenizer import build_hf_tokenizer_dir

    path, cfg, _ = make_checkpoint(tmp_path, np.random.default_rng(5), vocab=320)
    tok_dir = build_hf_tokenizer_dir(tmp_path / "tok", vocab_size=300)
    for f in os.listdir(tok_dir):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            os.replace(os.path.join(tok_dir, f), os.path.join(path, f))
    for dtype in ("float32", "bfloat16"):
        m = qlora_native.Model.from_pretrained(path, quantize="nf4")
        add_random_adapter(m, "a", 4)
        m.merge_and_unload(dtype=dtype, eval_ids=IDS)
        out = tmp_path / f"merged_{dtype}"
        m.save_pretrained(out)  # default dtype: the merge's
        conf = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in conf and conf["torch_dtype"] == dtype
        assert (out / "tokenizer.json").is_file()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
        hf.eval()
        with torch.no_grad():
            theirs = hf(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
        # float32: the merged model itself; bfloat16: every tensor was saved rounded (embeddings and
        # norms too), so the reference is the saved checkpoint reloaded here unquantized.
        ours = m(IDS) if dtype == "float32" else qlora_native.Model.from_pretrained(out, quantize=None)(IDS)
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-5 * np.abs(ours).max())
        sd = hf.state_dict()
        q = sd["model.layers.0.self_attn.q_proj.weight"].numpy()
        np.testing.assert_array_equal(q.ravel(), m._core.get_tensor("model.layers.0.self_attn.q_proj.weight"))


def test_save_pretrained_of_nf4_merged_model_reloads_exactly(tiny, tmp_path):
    m = _load(tiny)
    m.merge_and_unload(quantize="nf4", eval_ids=IDS)
    m.save_pretrained(tmp_path / "q")
    conf = json.loads((tmp_path / "q" / "config.json").read_text())
    assert conf["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    r = qlora_native.Model.from_pretrained(tmp_path / "q")
    np.testing.assert_array_equal(r(IDS), m(IDS))


def test_merge_uses_the_runtime_scale_and_unmerge_subtracts_what_was_merged(tiny):
    """PEFT merges its scaled term: a set_adapter_scale(s) adapter merges as s * scaling * B A; unmerge
    subtracts that even if the scale changed after the merge."""
    m = _load(tiny, nf4_=False)
    base = _load(tiny, nf4_=False, name=None)(IDS)
    m.set_adapter_scale("a", 0.5)
    scaled = m(IDS)
    assert np.abs(scaled - base).max() > 1e-2
    m.merge_adapter()
    tol = 2e-5 * np.abs(scaled).max()
    np.testing.assert_allclose(m(IDS), scaled, rtol=0, atol=tol)
    m.set_adapter_scale("a", 3.0)
    m.unmerge_adapter()
    m.set_active_adapter(None)
    np.testing.assert_allclose(m(IDS), base, rtol=0, atol=tol)
