"""bitsandbytes 4-bit checkpoint keys <-> NF4Tensor, against a checkpoint written by transformers."""
import json

import numpy as np
import pytest

from qlora_native import io, nf4
from qlora_native.bnb_format import (is_aux_key, is_prequantized, nf4_tensors, quantization_config,
                                     quantized_weights, read_nf4)


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


def test_reads_transformers_checkpoint_exactly(bnb_checkpoint):
    import bitsandbytes.functional as F

    path, qmodel = bnb_checkpoint
    config = json.loads((path / "config.json").read_text())
    assert is_prequantized(config)
    f = io.safe_open(path / "model.safetensors")
    names = set(f.keys())
    qweights = quantized_weights(names)
    assert len(qweights) == 7  # one layer, seven projections
    modules = dict(qmodel.named_modules())
    for w in sorted(qweights):
        t = read_nf4(f.get, names.__contains__, w)
        assert t.double_quant and t.blocksize == 64
        mod = modules[w[: -len(".weight")]]
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
    assert all(is_aux_key(n) for n in names if n not in qweights and ".weight." in n)


def test_quantization_config_checks():
    assert not is_prequantized({})
    assert is_prequantized({"quantization_config": quantization_config()})
    bad = [
        ({"quant_method": "gptq"}, "quant_method"),
        ({**quantization_config(), "load_in_4bit": False, "load_in_8bit": True}, "8-bit"),
        ({**quantization_config(), "bnb_4bit_quant_type": "fp4"}, "fp4"),
        ({**quantization_config(), "bnb_4bit_quant_storage": "bfloat16"}, "storage"),
    ]
    for qc, msg in bad:
        with pytest.raises(ValueError, match=msg):
            is_prequantized({"quantization_config": qc})


def test_missing_or_corrupt_keys_are_named(rng):
    w = rng.standard_normal((8, 40)).astype(np.float32)
    t = nf4.quantize(w)
    arrays = nf4_tensors("m.weight", t)
    back = read_nf4(arrays.__getitem__, arrays.__contains__, "m.weight")
    np.testing.assert_array_equal(back.dequantize(), t.dequantize())
    broken = dict(arrays)
    del broken["m.weight.absmax"]
    with pytest.raises(ValueError, match="m.weight.*absmax"):
        read_nf4(broken.__getitem__, broken.__contains__, "m.weight")
    broken = dict(arrays)
    broken["m.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b"{not json", np.uint8)
    with pytest.raises(ValueError, match="m.weight.*quant state"):
        read_nf4(broken.__getitem__, broken.__contains__, "m.weight")
    broken = dict(arrays)
    broken["m.weight.quant_map"] = rng.standard_normal(16).astype(np.float32)
    with pytest.raises(ValueError, match="quant_map"):
        read_nf4(broken.__getitem__, broken.__contains__, "m.weight")
    with pytest.raises(ValueError, match="fp4"):
        quantized_weights(["m.weight.quant_state.bitsandbytes__fp4"])
