"""NF4-quantized Llama-family models: the stored NF4 weights decode (independent numpy decoder)
to close approximations of the checkpoint, and the logits match transformers loaded with exactly
those decoded weights."""
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qlora_native  # noqa: E402

from helpers_model import (PROJECTIONS, dequantize_nf4_numpy, make_checkpoint, reference_logits,  # noqa: E402
                           reference_model, save_bnb_checkpoint)
from conftest import cpu_backends  # noqa: E402
from test_model import fp32_tol, rel_err  # noqa: E402


def nf4_state(model, cfg, state):
    """The checkpoint state with every projection replaced by its decoded NF4 weight."""
    out = dict(state)
    for layer in range(cfg["num_hidden_layers"]):
        for proj in PROJECTIONS:
            prefix = f"model.layers.{layer}.{proj}"
            w = model.nf4_weight(prefix)
            assert w is not None
            deq = dequantize_nf4_numpy(w)
            orig = state[prefix + ".weight"]
            assert deq.shape == orig.shape
            # NF4 keeps ~3 bits of each weight: relative Frobenius error ~0.1, never O(1)
            # (a transposed, shuffled or mis-scaled weight would be).
            assert np.linalg.norm(deq - orig) / np.linalg.norm(orig) < 0.15
            out[prefix + ".weight"] = deq.astype(np.float64)
    return out


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (128, True)])
@pytest.mark.parametrize("kw", [
    dict(hidden=72, inter=200, heads=4, kv_heads=2, vocab=130),                 # blocks straddle rows
    dict(arch="qwen2", hidden=200, inter=136, heads=5, kv_heads=1, vocab=97, tie=True),
], ids=["llama-h72", "qwen2-h200"])
def test_nf4_forward_matches_transformers_on_decoded_weights(tmp_path, rng, kw, blocksize, double_quant):
    path, cfg, state = make_checkpoint(tmp_path, rng, **kw)
    model = qlora_native.Model.from_pretrained(path, quantize="nf4", blocksize=blocksize, double_quant=double_quant)
    w = model.nf4_weight("model.layers.0.self_attn.q_proj")
    assert w["blocksize"] == blocksize and w["double_quant"] == double_quant
    ref_model = reference_model(cfg, nf4_state(model, cfg, state), "float64")
    ids = rng.integers(0, cfg["vocab_size"], size=(2, 9))
    ref = reference_logits(ref_model, ids)
    assert rel_err(model(ids), ref) < fp32_tol(cfg)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nf4_forward_every_cpu_backend(tmp_path, rng, backend):
    path, cfg, state = make_checkpoint(tmp_path, rng, hidden=72, inter=200, heads=4, kv_heads=2, vocab=130)
    model = qlora_native.Model.from_pretrained(path, quantize="nf4", backend=backend)
    assert model.backend == backend
    ref_model = reference_model(cfg, nf4_state(model, cfg, state), "float64")
    ids = rng.integers(0, cfg["vocab_size"], size=(3, 6))
    for x in (ids, ids[:, :1], ids[:1, :1]):  # M = 18 (GEMM path), 3 and 1 (decode-size GEMV path)
        assert rel_err(model(x), reference_logits(ref_model, x)) < fp32_tol(cfg)


def test_nf4_from_bf16_checkpoint(tmp_path, rng):
    path, cfg, state = make_checkpoint(tmp_path, rng, dtype="bfloat16", hidden=64, inter=128, heads=4, kv_heads=2)
    model = qlora_native.Model.from_pretrained(path, quantize="nf4")
    ref_model = reference_model(cfg, nf4_state(model, cfg, state), "float64")
    ids = rng.integers(0, cfg["vocab_size"], size=(1, 8))
    assert rel_err(model(ids), reference_logits(ref_model, ids)) < fp32_tol(cfg)


def test_nf4_bad_blocksize(tmp_path, rng):
    path, _, _ = make_checkpoint(tmp_path, rng)
    with pytest.raises(ValueError, match="blocksize"):
        qlora_native.Model.from_pretrained(path, quantize="nf4", blocksize=48)
    with pytest.raises(ValueError, match="quantize"):
        qlora_native.Model.from_pretrained(path, quantize="int8")


def test_prequantized_nf4_tensors_plug_in(tmp_path, rng):
    """The engine accepts already-quantized NF4 projections (the route for bitsandbytes
    checkpoints): loading the NF4 storage of a quantized model reproduces its logits exactly."""
    from types import SimpleNamespace

    from qlora_native.model import SafetensorsSource

    path, cfg, state = make_checkpoint(tmp_path, rng, hidden=72, inter=200, heads=4, kv_heads=2, vocab=130)
    quantized = qlora_native.Model.from_pretrained(path, quantize="nf4")
    core = qlora_native._core.model.LlamaModel(quantized.config.to_core(), "cpu", False)
    src = SafetensorsSource(path)
    for name, data, dtype, shape in src.tensors(src.names()):
        prefix = name[: -len(".weight")]
        if any(prefix.endswith(p) for p in PROJECTIONS):
            core.load_nf4(name, SimpleNamespace(**quantized.nf4_weight(prefix)))
        else:
            core.load_tensor(name, data, dtype, list(shape))
    core.check_complete()
    ids = rng.integers(0, cfg["vocab_size"], size=(2, 5)).astype(np.int32)
    np.testing.assert_array_equal(core.forward(ids), quantized(ids))
    with pytest.raises(ValueError, match="not a projection"):
        core.load_nf4("model.norm.weight", SimpleNamespace(**quantized.nf4_weight("model.layers.0.mlp.up_proj")))


def test_prequantized_bitsandbytes_checkpoint(tmp_path, rng):
    """A checkpoint quantized and saved by transformers + bitsandbytes loads with its NF4 bytes
    as stored, and the logits match transformers (float64) on those weights decoded."""
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from qlora_native import io

    path, cfg, state = make_checkpoint(tmp_path, rng, hidden=64, inter=200, heads=4, kv_heads=2, vocab=100)
    bnb_dir = save_bnb_checkpoint(path, tmp_path / "bnb")
    with pytest.raises(ValueError, match="pre-quantized"):
        qlora_native.Model.from_pretrained(bnb_dir, quantize=None)
    model = qlora_native.Model.from_pretrained(bnb_dir, quantize="nf4", blocksize=128)  # the file's 64 wins
    f = io.safe_open(bnb_dir / "model.safetensors")
    w = model.nf4_weight("model.layers.1.mlp.down_proj")
    assert w["blocksize"] == 64
    np.testing.assert_array_equal(w["packed"], np.asarray(f["model.layers.1.mlp.down_proj.weight"]).reshape(-1))
    np.testing.assert_array_equal(w["absmax"], np.asarray(f["model.layers.1.mlp.down_proj.weight.absmax"]))
    ref_model = reference_model(cfg, nf4_state(model, cfg, state), "float64")
    ids = rng.integers(0, cfg["vocab_size"], size=(2, 7))
    assert rel_err(model(ids), reference_logits(ref_model, ids)) < fp32_tol(cfg)
