"""The C API (cpp/include/qlora/qlora.h) through ctypes on _core's shared object, where it is
linked with default visibility: HF checkpoints loaded by the C++ loader (cpp/src/model/hf_loader)
give the logits of transformers (float64 reference) and of qlora_native.Model, generation
matches Model.generate token for token, and config.json errors read exactly as config.py's."""
import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qlora_native  # noqa: E402
from qlora_native.config import ModelConfig  # noqa: E402

from helpers_model import make_checkpoint, reference_logits, reference_model, save_bnb_checkpoint  # noqa: E402
from test_model import CONFIGS, EPS32, fp32_tol, rel_err  # noqa: E402

from helpers_capi import ERR_INVALID_ARGUMENT, QUANT_NF4, QUANT_NONE, CModel  # noqa: E402


# The `lib` fixture (the C API through ctypes): tests/conftest.py; CModel: tests/helpers_capi.py.


@pytest.mark.parametrize("name", ["gqa1-tied", "gqa2-h72-v130", "llama3-rope", "qwen2-bias", "mistral",
                                  "llama-attn-bias-h200"])
def test_fp32_matches_transformers_and_model(lib, tmp_path, rng, name):
    path, cfg, state = make_checkpoint(tmp_path, rng, **CONFIGS[name])
    ids = rng.integers(0, cfg["vocab_size"], size=9)
    m = CModel(lib, path, QUANT_NONE)
    try:
        ours = m.forward(ids)
    finally:
        m.close()
    ref = reference_logits(reference_model(cfg, state, "float64"), ids[None])[0]
    assert rel_err(ours, ref) < fp32_tol(cfg), rel_err(ours, ref)
    # The Python loader feeds the same tensors: the same engine gives the same numbers.
    py = qlora_native.Model.from_pretrained(path, quantize=None, tokenizer=None)(ids[None])[0]
    assert rel_err(ours, py) <= 4 * EPS32


@pytest.mark.parametrize("dtype,shard", [("bfloat16", None), ("float16", "40KB")])
def test_half_and_sharded_checkpoints(lib, tmp_path, rng, dtype, shard):
    path, cfg, state = make_checkpoint(tmp_path, rng, dtype=dtype, max_shard_size=shard, hidden=64, inter=128,
                                       heads=4, kv_heads=2)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json")) == (shard is not None)
    ids = rng.integers(0, cfg["vocab_size"], size=6)
    m = CModel(lib, path, QUANT_NONE)
    ours = m.forward(ids)
    m.close()
    ref = reference_logits(reference_model(cfg, state, "float64"), ids[None])[0]
    assert rel_err(ours, ref) < fp32_tol(cfg)


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False)])
def test_nf4_matches_model_and_generate(lib, tmp_path, rng, blocksize, double_quant):
    path, cfg, _ = make_checkpoint(tmp_path, rng, hidden=64, inter=200, heads=4, kv_heads=2, vocab=100)
    py = qlora_native.Model.from_pretrained(path, quantize="nf4", blocksize=blocksize, double_quant=double_quant,
                                            tokenizer=None)
    m = CModel(lib, path, QUANT_NF4, blocksize, double_quant)
    try:
        prompt = rng.integers(0, cfg["vocab_size"], size=7)
        assert rel_err(m.forward(prompt), py(prompt[None])[0]) <= 4 * EPS32
        streamed = []
        greedy = m.generate(prompt, 10, stream=streamed.append)
        assert greedy == py.generate(prompt.tolist(), max_new_tokens=10, eos_token_id=None)[0]
        assert streamed == greedy
        kw = dict(temperature=0.8, top_k=20, top_p=0.9, seed=int(rng.integers(0, 2**63)))
        sampled = m.generate(prompt, 12, **kw)
        assert sampled == py.generate(prompt.tolist(), max_new_tokens=12, eos_token_id=None, **kw)[0]
        # A bad id: error code and message, no crash.
        with pytest.raises(RuntimeError) as e:
            m.forward([1, cfg["vocab_size"], 2])
        assert e.value.args[0] == ERR_INVALID_ARGUMENT and "out of range" in e.value.args[1]
    finally:
        m.close()


def test_prequantized_bitsandbytes_checkpoint(lib, tmp_path, rng):
    """A checkpoint saved by transformers + bitsandbytes loads with its NF4 bytes as stored."""
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")

    path, cfg, _ = make_checkpoint(tmp_path, rng, hidden=64, inter=200, heads=4, kv_heads=2, vocab=100)
    bnb_dir = save_bnb_checkpoint(path, tmp_path / "bnb")
    with pytest.raises(RuntimeError, match="pre-quantized"):
        CModel(lib, bnb_dir, QUANT_NONE)
    m = CModel(lib, bnb_dir, QUANT_NF4, blocksize=128)  # the checkpoint's blocksize 64 wins
    ids = rng.integers(0, cfg["vocab_size"], size=8)
    ours = m.forward(ids)
    m.close()
    py = qlora_native.Model.from_pretrained(bnb_dir, quantize="nf4", tokenizer=None)(ids[None])[0]
    assert rel_err(ours, py) <= 4 * EPS32


def _base_config():
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu"}


BAD_CONFIGS = {
    "float-hidden": {"hidden_size": 64.0},
    "bool-hidden": {"hidden_size": True},
    "zero-vocab": {"vocab_size": 0},
    "arch": {"architectures": ["GPT2LMHeadModel"]},
    "model-type": {"architectures": None, "model_type": "gpt2"},
    "kv-heads": {"num_key_value_heads": 3},
    "head-dim": {"head_dim": 7},
    "not-multiple": {"hidden_size": 66},
    "act": {"hidden_act": "gelu"},
    "act-null": {"hidden_act": None},
    "mlp-bias": {"mlp_bias": True},
    "tp": {"pretraining_tp": 2},
    "theta": {"rope_theta": -1},
    "eps-str": {"rms_norm_eps": "x"},
    "max-pos-null": {"max_position_embeddings": None},
    "rope-yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
    "rope-linear-0": {"rope_scaling": {"type": "linear", "factor": 0}},
    "rope-partial": {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
    "rope-llama3-order": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                           "high_freq_factor": 1.0}},
    "rope-params-theta": {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 0}},
    "qwen2-window": {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 16,
                     "max_window_layers": 1},
    "mistral-window": {"architectures": ["MistralForCausalLM"], "sliding_window": 0},
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_config_errors_read_as_python(lib, tmp_path, name):
    d = _base_config()
    d.update(BAD_CONFIGS[name])
    with pytest.raises(ValueError) as py_err:
        ModelConfig.from_dict(d).to_core()
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(RuntimeError) as c_err:
        CModel(lib, tmp_path, QUANT_NONE)
    assert c_err.value.args[0] == str(py_err.value)


def test_load_errors(lib, tmp_path, rng):
    with pytest.raises(RuntimeError, match="No such file"):
        CModel(lib, tmp_path / "missing", QUANT_NONE)
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(RuntimeError, match="not valid JSON"):
        CModel(lib, tmp_path, QUANT_NONE)
    d = _base_config()
    d["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(RuntimeError, match="8-bit checkpoints are not supported"):
        CModel(lib, tmp_path, QUANT_NF4)
    (tmp_path / "config.json").write_text(json.dumps(_base_config()))
    with pytest.raises(RuntimeError, match="no model.safetensors"):
        CModel(lib, tmp_path, QUANT_NONE)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(RuntimeError, match="model.safetensors"):
        CModel(lib, tmp_path, QUANT_NONE)
