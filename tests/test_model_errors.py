"""Clear errors for unsupported configs, bad checkpoints and bad inputs."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qlora_native  # noqa: E402
from qlora_native.config import ModelConfig  # noqa: E402

from helpers_model import hf_config_dict, make_checkpoint  # noqa: E402


def cfg(**kw):
    d = hf_config_dict(**kw)
    d["architectures"] = ["LlamaForCausalLM"]
    return d


@pytest.mark.parametrize("change,match", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_scaling type 'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "unsupported rope_scaling type 'dynamic'"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "'longrope'"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling.factor"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(vocab_size="100"), "vocab_size"),
    (dict(head_dim=7), "head_dim"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
])
def test_config_rejects_unsupported(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(dict(cfg(), **change)).to_core()


def test_config_fields():
    c = ModelConfig.from_dict(dict(cfg(hidden=96, heads=8, kv_heads=2), architectures=["Qwen2ForCausalLM"]))
    assert c.arch == "qwen2" and c.qkv_bias and not c.o_bias and c.head_dim == 12
    c = ModelConfig.from_dict(cfg(head_dim=32, attention_bias=True))
    assert c.head_dim == 32 and c.qkv_bias and c.o_bias
    # transformers >= 5 format: rope_parameters carries theta and scaling
    c = ModelConfig.from_dict(dict(cfg(), rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}))
    assert c.rope_theta == 5e5 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    c = ModelConfig.from_dict({k: v for k, v in cfg().items() if k != "architectures"} | {"model_type": "mistral"})
    assert c.arch == "mistral"


def test_bad_token_ids_and_masks(tmp_path, rng):
    path, _, _ = make_checkpoint(tmp_path, rng, vocab=100)
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    for ids in ([[1, 100]], [[-1, 3]], [[1, 2**40]]):
        with pytest.raises(ValueError, match="out of range"):
            model(np.array(ids))
    with pytest.raises(ValueError, match="integers"):
        model(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="non-empty"):
        model(np.zeros((1, 0), np.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        model(np.array([[1, 2]]), attention_mask=np.array([[1, 1, 1]]))
    with pytest.raises(ValueError, match="0 and 1"):
        model(np.array([[1, 2]]), attention_mask=np.array([[1, 2]]))
    with pytest.raises(ValueError, match="out of range"):
        model._core.forward(np.array([[1, 100]], np.int32))  # the engine checks too


def _rewrite(path, fn):
    from safetensors.numpy import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.ones(3, np.float32)}), "unexpected tensor.*extra"),
    (lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}), "model.norm.weight.*shape"),
    (lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}), "model.norm.weight.*dtype"),
    (lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), np.nan), "q_proj.*NaN"),
])
def test_bad_checkpoint_names_the_tensor(tmp_path, rng, edit, match):
    path, _, _ = make_checkpoint(tmp_path, rng, hidden=64)
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=match) as exc:
        qlora_native.Model.from_pretrained(path, quantize=None)
    assert str(exc.value).startswith(f"{path}: ")  # the checkpoint is named too


def test_nan_weight_rejected_by_nf4(tmp_path, rng):
    path, _, _ = make_checkpoint(tmp_path, rng, hidden=64)
    _rewrite(path, lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((1, 2), np.inf))
    with pytest.raises(ValueError, match="down_proj"):
        qlora_native.Model.from_pretrained(path, quantize="nf4")


def test_missing_files(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="config.json"):
        qlora_native.Model.from_pretrained(tmp_path)
    path, _, _ = make_checkpoint(tmp_path, rng)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        qlora_native.Model.from_pretrained(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg(), architectures=["FalconForCausalLM"]), f)
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        qlora_native.Model.from_pretrained(path)


def test_sliding_window_exceeded(tmp_path, rng):
    path, _, _ = make_checkpoint(tmp_path, rng, arch="mistral", sliding_window=8)
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    model(np.arange(3, 11)[None])  # 8 tokens: within the window
    with pytest.raises(ValueError, match="sliding_window"):
        model(np.arange(3, 12)[None])


def test_kv_cache_capacity_and_feed_order(tmp_path, rng):
    path, _, _ = make_checkpoint(tmp_path, rng)
    core = qlora_native.Model.from_pretrained(path, quantize=None)._core
    with pytest.raises(ValueError, match="no generation started"):
        core.feed(np.array([[5]], np.int32))
    core.start(1, 3)
    core.feed(np.array([[5, 6]], np.int32))
    with pytest.raises(ValueError, match="KV cache full"):
        core.feed(np.array([[7, 8]], np.int32))
    with pytest.raises(ValueError, match="batch"):
        core.feed(np.array([[7], [8]], np.int32))
    core.stop()
