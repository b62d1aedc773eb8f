"""config.json, the shard index and the bitsandbytes quant state from strangers (issue 14): typed
fields, sizes checked before allocating, one JSON rule for Python and the C API, shard names
confined to the checkpoint directory. Every error is a ValueError / FormatError naming the field
(and the file where there is one), and the C API loader says the same as config.py."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qlora_native  # noqa: E402
from qlora_native import _core  # noqa: E402
from qlora_native.config import ModelConfig  # noqa: E402
from qlora_native.model import SafetensorsSource  # noqa: E402

from helpers_model import make_checkpoint  # noqa: E402
from helpers_capi import QUANT_NONE, CModel  # noqa: E402
from test_capi import _base_config  # noqa: E402

BIG = 2**31 - 1
BAD_FIELDS = {
    # lax types: each was accepted (truthy / truncated) before
    "tie-yes": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, got 'yes'"),
    "tie-1": ({"tie_word_embeddings": 1}, "tie_word_embeddings must be true or false"),
    "attn-bias-str": ({"attention_bias": "false"}, "attention_bias must be true or false"),
    "mlp-bias-int": ({"mlp_bias": 0}, "mlp_bias must be true or false"),
    "qwen-window-str": ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": "no"},
                        "use_sliding_window must be true or false"),
    "max-window-str": ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 16,
                        "max_window_layers": "2"}, "max_window_layers must be an integer >= 0"),
    "tp-float": ({"pretraining_tp": 1.0}, "pretraining_tp"),
    "tp-bool": ({"pretraining_tp": True}, "pretraining_tp"),
    "rope-params-str": ({"rope_parameters": "linear"}, "rope_parameters must be an object or null"),
    "rope-partial-bool": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": True}},
                          "partial_rotary_factor"),
    "arch-list": ({"architectures": [["LlamaForCausalLM"]]}, "unsupported architecture"),
    "model-type-dict": ({"architectures": None, "model_type": {"a": 1}}, "unsupported model_type"),
    # token ids: JSON integers inside the vocabulary
    "eos-oov": ({"eos_token_id": 100}, "eos_token_id must be a token id in [0, 100) or a list of them, got 100"),
    "eos-list-oov": ({"eos_token_id": [2, 1000]}, "eos_token_id must be a token id in [0, 100)"),
    "eos-float": ({"eos_token_id": 2.0}, "eos_token_id must be a token id"),
    "eos-negative": ({"eos_token_id": -1}, "eos_token_id must be a token id"),
    "bos-str": ({"bos_token_id": "1"}, "bos_token_id must be a token id"),
    "pad-list": ({"pad_token_id": [0]}, "pad_token_id must be a token id in [0, 100), got [0]"),
    "pad-oov": ({"pad_token_id": 100}, "pad_token_id must be a token id"),
    # counts
    "kv-heads-0": ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1, got 0"),
    "hidden-beyond-int64": ({"hidden_size": 2**70}, "hidden_size must be an integer >= 1"),
    "layers-beyond-int64": ({"num_hidden_layers": 2**64}, "num_hidden_layers must be an integer >= 1"),
    # sizes: refused before anything is allocated (a bare std::bad_alloc before)
    "huge-head-dim": ({"head_dim": 2**40}, "head_dim must be <= 65536"),
    "huge-head-dim-wrap": ({"head_dim": 2**62}, "head_dim must be <= 65536"),
    "huge-hidden": ({"hidden_size": 2**40, "head_dim": 16}, "hidden_size must be <= 16777216"),
    "huge-layers": ({"num_hidden_layers": 2**40}, "num_hidden_layers must be <= 65536"),
    "huge-inter": ({"intermediate_size": 2**40}, "intermediate_size must be <= 16777216"),
    "huge-max-pos": ({"max_position_embeddings": 2**62}, "max_position_embeddings must be <= 2147483647"),
    "weights-exceed-memory": ({"vocab_size": BIG, "hidden_size": 2**24, "head_dim": 64},
                              "the weights need at least"),
    "many-layers-exceed-memory": ({"num_hidden_layers": 65536, "hidden_size": 8192, "intermediate_size": 2**20,
                                   "head_dim": 64}, "more than this machine's memory"),
    # quantization_config
    "quant-str": ({"quantization_config": "x"}, "quantization_config must be an object, got 'x'"),
    "quant-flag-str": ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": "yes"}},
                       "quantization_config.load_in_4bit must be true or false"),
}


@pytest.mark.parametrize("name", list(BAD_FIELDS))
def test_bad_field_is_a_clear_error_in_python_and_c(lib, tmp_path, name):
    change, match = BAD_FIELDS[name]
    d = dict(_base_config(), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    d.update(change)
    with pytest.raises(ValueError) as py_err:
        ModelConfig.from_dict(d)  # runs the engine's checks itself (to_core) and quantization_config's
    assert match in str(py_err.value)
    assert type(py_err.value) is ValueError
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(d))
    # from_file reads with the engine's parser (integers beyond int64 become floats, as in C) and
    # names the file; the C API loader gives the same message after the path.
    with pytest.raises(ValueError) as file_err:
        ModelConfig.from_file(cfg)
    assert type(file_err.value) is ValueError and match.split(",")[0].split(" got")[0] in str(file_err.value)
    prefix = f"{cfg}: "
    assert str(file_err.value).startswith(prefix)
    with pytest.raises(RuntimeError) as c_err:
        CModel(lib, tmp_path, QUANT_NONE)
    assert c_err.value.args[0] == str(file_err.value)[len(prefix):]


def test_valid_typed_fields_still_load():
    d = dict(_base_config(), tie_word_embeddings=None, attention_bias=False, mlp_bias=None, pretraining_tp=1,
             bos_token_id=1, eos_token_id=[2, 99], pad_token_id=None, num_key_value_heads=None,
             quantization_config=None, rope_parameters=None)
    c = ModelConfig.from_dict(d)
    assert c.num_key_value_heads == c.num_attention_heads and c.eos_token_id == [2, 99]
    assert not c.tie_word_embeddings and not _core.config.parse_hf_config(c.raw)["prequantized"]
    assert not _core.config.parse_hf_config(dict(d, quantization_config={}))["prequantized"]


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("kind", ["bom", "deep", "not-object", "nan"])
def test_config_json_parsed_by_the_engine(lib, tmp_path, kind):
    """One rule in Python and C: the engine's parser (bounded depth; BOM and NaN refused)."""
    text = json.dumps(_base_config()).encode()
    data = {"bom": b"\xef\xbb\xbf" + text,
            "deep": text[:-1] + b', "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
            "not-object": b"[1, 2]",
            "nan": text[:-1] + b', "rope_theta": NaN}'}[kind]
    cfg = tmp_path / "config.json"
    _write(cfg, data)
    with pytest.raises(_core.FormatError, match="config.json"):
        ModelConfig.from_file(cfg)
    with pytest.raises(_core.FormatError, match="config.json"):
        qlora_native.Model.from_pretrained(tmp_path, tokenizer=None)
    with pytest.raises(RuntimeError, match="config.json"):
        CModel(lib, tmp_path, QUANT_NONE)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    rng = np.random.default_rng(0)
    path, _, _ = make_checkpoint(tmp_path_factory.mktemp("ckpt"), rng, max_shard_size="30KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    return path


def _with_index(sharded, tmp_path, edit):
    """A copy of the sharded checkpoint whose index is edit(index dict) (or raw bytes)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(sharded, dst)
    idx = dst / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    out = edit(doc, dst)
    _write(idx, out if isinstance(out, bytes) else json.dumps(out).encode())
    return dst


def _first_shard_to(doc, target):
    """Points every tensor of the first shard at `target`."""
    first = sorted(set(doc["weight_map"].values()))[0]
    doc["weight_map"] = {n: (target if s == first else s) for n, s in doc["weight_map"].items()}
    return first


@pytest.mark.parametrize("kind", ["parent", "absolute", "subdir", "dotdot", "empty", "nul", "backslash"])
def test_shard_names_stay_inside_the_checkpoint(lib, sharded, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()

    def edit(doc, dst):
        first = sorted(set(doc["weight_map"].values()))[0]
        # The shard's real bytes outside the checkpoint: a loader that follows the name succeeds.
        shutil.copy(dst / first, outside / "evil.safetensors")
        os.makedirs(dst / "sub", exist_ok=True)
        shutil.copy(dst / first, dst / "sub" / "evil.safetensors")
        target = {"parent": "../outside/evil.safetensors", "absolute": str(outside / "evil.safetensors"),
                  "subdir": "sub/evil.safetensors", "dotdot": "..", "empty": "", "nul": first + "\u0000x",
                  "backslash": "sub\\evil.safetensors"}[kind]
        _first_shard_to(doc, target)
        return doc

    dst = _with_index(sharded, tmp_path, edit)
    with pytest.raises(_core.FormatError, match=r"model\.safetensors\.index\.json: weight_map names an invalid shard"):
        qlora_native.Model.from_pretrained(dst, quantize=None, tokenizer=None)
    with pytest.raises(_core.FormatError, match=r"model\.safetensors\.index\.json: weight_map names an invalid shard"):
        SafetensorsSource(dst)  # the same rule (model/checkpoint_source.cpp), not a copy of it
    with pytest.raises(RuntimeError, match=r"model\.safetensors\.index\.json: weight_map names an invalid shard"):
        CModel(lib, dst, QUANT_NONE)


def test_symlinked_shard_is_still_allowed(sharded, tmp_path):
    # The Hugging Face cache links snapshot files to ../../blobs/<hash>: the name rule, not a realpath rule.
    def edit(doc, dst):
        first = sorted(set(doc["weight_map"].values()))[0]
        blobs = tmp_path / "blobs"
        blobs.mkdir()
        shutil.move(dst / first, blobs / "abc123")
        os.symlink(os.path.relpath(blobs / "abc123", dst), dst / first)
        return doc

    dst = _with_index(sharded, tmp_path, edit)
    qlora_native.Model.from_pretrained(dst, quantize=None, tokenizer=None)


@pytest.mark.parametrize("kind, match", [
    ("list", "no valid weight_map"), ("map-list", "no valid weight_map"), ("map-str", "no valid weight_map"),
    ("shard-int", "weight_map entry .* is not a file name"), ("deep", "not valid JSON"), ("bom", "not valid JSON"),
])
def test_bad_index_is_a_format_error(lib, sharded, tmp_path, kind, match):
    def edit(doc, dst):
        if kind == "list":
            return [doc]
        if kind == "map-list":
            return dict(doc, weight_map=list(doc["weight_map"]))
        if kind == "map-str":
            return dict(doc, weight_map="model-00001.safetensors")
        if kind == "shard-int":
            _first_shard_to(doc, 1)
            return doc
        if kind == "deep":
            return b'{"weight_map": {}, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        return b"\xef\xbb\xbf" + json.dumps(doc).encode()

    dst = _with_index(sharded, tmp_path, edit)
    with pytest.raises(_core.FormatError, match=r"model\.safetensors\.index\.json: " + match):
        qlora_native.Model.from_pretrained(dst, quantize=None, tokenizer=None)
    with pytest.raises(_core.FormatError, match=r"model\.safetensors\.index\.json: " + match):
        SafetensorsSource(dst)
    with pytest.raises(RuntimeError, match=r"model\.safetensors\.index\.json"):
        CModel(lib, dst, QUANT_NONE)


def test_config_symlink_to_dev_zero_is_bounded(tmp_path):
    os.symlink("/dev/zero", tmp_path / "config.json")
    with pytest.raises(_core.FormatError, match="config.json: larger than"):
        ModelConfig.from_file(tmp_path / "config.json")
