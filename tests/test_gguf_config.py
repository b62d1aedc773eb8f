"""One config front door: config.json dicts (HF) and the config a GGUF's metadata gives are parsed by
the same C++ rules (cpp/src/model/hf_loader.cpp parse_hf_config) from Python and from the C API;
config.py keeps no copy of them."""
import numpy as np
import pytest

from helpers_gguf import write_tiny_gguf

import qlora_native
from qlora_native import _core, config
from qlora_native.config import ModelConfig

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 512}


def test_python_config_is_the_engine_parser():
    assert not any(hasattr(config, n) for n in ("_Fields", "_rope_scaling", "_positive"))  # no copies of the rules
    d = dict(BASE, rope_scaling={"rope_type": "llama3", "factor": 8.1, "low_freq_factor": 1.1,
                                 "high_freq_factor": 4.3, "original_max_position_embeddings": 256},
             eos_token_id=[2, 7], bos_token_id=1)
    c = ModelConfig.from_dict(d)
    p = _core.config.parse_hf_config(d)
    # values as config.json states them (double precision, not the engine's float32 copies)
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 500000.0
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.1, "low_freq_factor": 1.1, "high_freq_factor": 4.3,
                              "original_max_position_embeddings": 256} == p["rope_scaling"]
    assert c.eos_token_id == [2, 7] and c.bos_token_id == 1 and c.sliding_window is None
    core = c.to_core()
    for k in ("vocab_size", "hidden_size", "head_dim", "rope_factor", "rope_low_freq_factor", "rms_norm_eps",
              "rope_original_max_pos", "num_kv_heads"):
        assert getattr(core, k) == getattr(p["core"], k), k
    assert core.rope_type == p["core"].rope_type == _core.model.RopeType.llama3
    q = ModelConfig.from_dict(dict(BASE, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                   sliding_window=64, max_window_layers=2))
    assert q.qkv_bias and not q.o_bias and q.sliding_window == 64


@pytest.mark.parametrize("change,match", [
    ({"hidden_size": 2**70}, "config: hidden_size must be an integer >= 1, got 1.1805916207174113e+21"),
    ({"num_key_value_heads": 3}, "config: num_key_value_heads (3) must divide num_attention_heads (4)"),
    ({"tie_word_embeddings": "yes"}, "config: tie_word_embeddings must be true or false, got 'yes'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "config: unsupported rope_scaling type 'yarn'"),
    ({"rms_norm_eps": float("nan")}, "config: rms_norm_eps must be a positive number, got nan"),
    ({"eos_token_id": [2, 100]}, "config: eos_token_id must be a token id in [0, 100) or a list of them"),
    ({"head_dim": np.int64(16)}, "config: head_dim must be an even integer >= 2, got 'np.int64(16)'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "unsupported quantization_config.quant_method 'gptq'"),
])
def test_errors_are_the_engine_messages(change, match):
    d = dict(BASE, **change)
    with pytest.raises(ValueError) as py_err:
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError) as core_err:
        _core.config.parse_hf_config(d)
    assert str(py_err.value) == str(core_err.value)
    assert str(py_err.value).startswith(match), str(py_err.value)
    with pytest.raises(qlora_native.FormatError, match="config must be a JSON object, got list"):
        ModelConfig.from_dict([d])


def test_gguf_config_goes_through_the_same_rules(tmp_path):
    p = write_tiny_gguf(tmp_path / "t.gguf")
    f = _core.gguf.GGUFFile(str(p))
    hf = f.hf_config()
    model = qlora_native.Model.from_pretrained(p, tokenizer=None, quantize=None)
    assert model.config == ModelConfig.from_dict(hf)
    assert model.config.raw == hf and model.config.bos_token_id == 1 and model.config.eos_token_id == 2


def _tiny_hf_dir(tmp_path, rng):
    import json

    d = dict(BASE, tie_word_embeddings=False)
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(d))
    core = _core.model.LlamaModel(ModelConfig.from_dict(d).to_core())
    tensors = []
    for name, shape in core.expected_tensors():
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        tensors.append((name, "F32", list(shape), np.frombuffer(w.tobytes(), np.uint8)))
    _core.io.save_safetensors(str(path / "model.safetensors"), tensors, {})
    return path


def test_hf_directory_loads_through_the_engine_loader(tmp_path, rng, monkeypatch):
    """Model.from_pretrained on an HF directory is the C API's loader (hf_loader.cpp): the Python
    copy (load_from_source) is gone, and both faces give bit-identical logits."""
    import ctypes

    from qlora_native import model as model_mod

    assert not hasattr(model_mod, "load_from_source")
    path = _tiny_hf_dir(tmp_path, rng)
    ids = np.array([[3, 17, 42, 99, 0]], np.int32)
    for nf4 in (False, True):
        ours = qlora_native.Model.from_pretrained(path, quantize="nf4" if nf4 else None, tokenizer=None)(ids)[0]
        lib = ctypes.CDLL(_core.__file__)
        from helpers_capi import ModelParams

        lib.qlora_model_default_params.restype = ModelParams
        lib.qlora_model_load.restype = ctypes.c_void_p
        lib.qlora_model_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(ModelParams)]
        lib.qlora_model_forward.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int64,
                                            ctypes.POINTER(ctypes.c_float)]
        lib.qlora_model_free.argtypes = [ctypes.c_void_p]
        p = lib.qlora_model_default_params()
        p.quantize = int(nf4)
        h = lib.qlora_model_load(str(path).encode(), ctypes.byref(p))
        assert h
        got = np.zeros_like(ours)
        assert lib.qlora_model_forward(h, ids[0].ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), ids.shape[1],
                                       got.ctypes.data_as(ctypes.POINTER(ctypes.c_float))) == 0
        lib.qlora_model_free(h)
        np.testing.assert_array_equal(ours.view(np.uint32), got.view(np.uint32))

    def boom(*a, **k):
        raise ValueError("engine loader called")

    monkeypatch.setattr(_core.config, "load_hf_model", boom)
    with pytest.raises(ValueError, match=f"{path}: engine loader called"):
        qlora_native.Model.from_pretrained(path, tokenizer=None)
