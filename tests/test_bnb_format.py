"""bitsandbytes 4-bit checkpoints, against one written by transformers: read by the engine
(hf_loader.cpp, behind Model.from_pretrained and qlora_model_load), written by bnb_format.nf4_tensors."""
import json
import shutil

import numpy as np
import pytest

from qlora_native import Model, _core, io, nf4
from qlora_native.bnb_format import nf4_tensors, quantization_config


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """A tiny Llama quantized and saved by transformers + bitsandbytes (CPU)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    d = tmp_path_factory.mktemp("bnb")
    # hidden 128 (blocks align with rows for q/k/v/o/gate/up), intermediate 200 (down_proj straddles).
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=200, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "fp")
    q = transformers.LlamaForCausalLM.from_pretrained(
        d / "fp", device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True,
                                                            bnb_4bit_compute_dtype=torch.float32))
    q.save_pretrained(d / "bnb")
    return d / "bnb", q


PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def test_reads_transformers_checkpoint_exactly(bnb_checkpoint):
    import bitsandbytes.functional as F

    path, qmodel = bnb_checkpoint
    config = json.loads((path / "config.json").read_text())
    assert _core.config.parse_hf_config(config)["prequantized"]
    m = Model.from_pretrained(path, quantize="nf4", tokenizer=None)
    f = io.safe_open(path / "model.safetensors")
    modules = dict(qmodel.named_modules())
    for proj, parent in PROJ.items():
        prefix = f"model.layers.0.{parent}.{proj}"
        w = prefix + ".weight"
        t = nf4.NF4Tensor.from_engine(m.nf4_weight(prefix))
        assert t.double_quant and t.blocksize == 64
        mod = modules[prefix]
        got = t.dequantize(np.float32)
        # Independent numpy decode of the stored bytes (flat row-major blocks, straddling rows).
        n = got.size
        p = t.packed.reshape(-1)
        nib = np.empty(2 * p.size, np.uint8)
        nib[0::2], nib[1::2] = p >> 4, p & 15
        am = (t.nested_map[t.absmax] * np.repeat(t.nested_absmax, 256)[: t.absmax.size] + np.float32(t.offset))
        ref = (nf4.nf4_codes()[nib[:n]] * np.repeat(am.astype(np.float32), t.blocksize)[:n]).reshape(got.shape)
        np.testing.assert_array_equal(got, ref, err_msg=w)
        if got.shape[1] % t.blocksize == 0:
            # bitsandbytes 0.50's CPU dequantize_4bit is only right when blocks do not straddle
            # rows (measured: wrong by up to 4x the quantization error for [72, 96]); compare there.
            bnb = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().numpy()
            np.testing.assert_allclose(got, bnb, rtol=2 ** -22, atol=0, err_msg=w)
        # Writing it back gives the very same arrays transformers saved.
        for k, v in nf4_tensors(w, t).items():
            stored = f.get(k)
            if k.endswith("quant_state.bitsandbytes__nf4"):
                assert json.loads(bytes(v)) == json.loads(bytes(stored)), k
            else:
                assert v.dtype == stored.dtype and v.shape == stored.shape, k
                np.testing.assert_array_equal(v, stored, err_msg=k)


def _hf_config(**extra):
    return dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, model_type="llama", architectures=["LlamaForCausalLM"], **extra)


def test_quantization_config_checks():
    """The engine's config rules (hf_loader.cpp is_prequantized), as Model.from_pretrained applies them."""
    def prequantized(qc):
        return _core.config.parse_hf_config(_hf_config(quantization_config=qc))["prequantized"]

    assert not _core.config.parse_hf_config(_hf_config())["prequantized"]
    assert not prequantized({}) and not prequantized(None)
    assert prequantized(quantization_config())
    bad = [
        ({"quant_method": "gptq"}, "quant_method"),
        ({**quantization_config(), "load_in_4bit": False, "load_in_8bit": True}, "8-bit"),
        ({**quantization_config(), "bnb_4bit_quant_type": "fp4"}, "fp4"),
        ({**quantization_config(), "bnb_4bit_quant_storage": "bfloat16"}, "storage"),
        ({**quantization_config(), "load_in_4bit": "yes"}, "load_in_4bit must be true or false"),
    ]
    for qc, msg in bad:
        with pytest.raises(ValueError, match=msg):
            prequantized(qc)


@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory):
    """A tiny pre-quantized checkpoint written by save_pretrained (bnb_format.nf4_tensors)."""
    from helpers_save_kill import make_base

    d = tmp_path_factory.mktemp("nf4ck")
    Model.from_pretrained(make_base(d / "base"), quantize="nf4", tokenizer=None).save_pretrained(d / "nf4")
    return d / "nf4"


def _broken(src, dst, edit):
    shutil.copytree(src, dst)
    f = io.safe_open(src / "model.safetensors")
    arrays = {k: np.array(f.get(k)) for k in f.keys()}
    edit(arrays)
    io.save_safetensors(dst / "model.safetensors", arrays)
    return dst


def test_missing_or_corrupt_keys_are_named(nf4_checkpoint, tmp_path, rng):
    """The engine names the weight and the key of a broken 4-bit weight (no Python copy of the reader)."""
    src = nf4_checkpoint
    ref = Model.from_pretrained(src, quantize="nf4", tokenizer=None)
    w = "model.layers.0.mlp.up_proj.weight"
    cases = [
        (lambda a: a.pop(w + ".absmax"), r"up_proj\.weight.*absmax"),
        (lambda a: a.__setitem__(w + ".quant_state.bitsandbytes__nf4", np.frombuffer(b"{not json", np.uint8)),
         r"up_proj\.weight.*quant state"),
        (lambda a: a.__setitem__(w + ".quant_state.bitsandbytes__nf4",
                                 np.frombuffer(b"[" * 100000 + b"]" * 100000, np.uint8)),
         r"up_proj\.weight.*malformed bitsandbytes quant state"),
        (lambda a: a.__setitem__(w + ".quant_map", rng.standard_normal(16).astype(np.float32)), "quant_map"),
        (lambda a: a.__setitem__(w + ".quant_state.bitsandbytes__fp4", a.pop(w + ".quant_state.bitsandbytes__nf4")),
         "fp4"),
    ]
    for i, (edit, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            Model.from_pretrained(_broken(src, tmp_path / str(i), edit), quantize="nf4", tokenizer=None)
    # untouched: loads, with the stored bytes
    t = io.safe_open(src / "model.safetensors")
    np.testing.assert_array_equal(ref.nf4_weight(w[: -len(".weight")])["packed"], np.asarray(t.get(w)).reshape(-1))
