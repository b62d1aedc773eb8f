"""Model.save_pretrained: bitsandbytes-format NF4 checkpoints that transformers loads and we reload as-is."""
import json
import os

import numpy as np
import pytest

from helpers_model import make_checkpoint
from qlora_native import Model


def _ids(rng, vocab, B=2, T=9):
    return rng.integers(0, vocab, size=(B, T))


@pytest.mark.parametrize("double_quant", [True, False])
def test_save_reload_is_exact(tmp_path, rng, double_quant):
    path, cfg, _ = make_checkpoint(tmp_path, rng, hidden=72, inter=200, vocab=97)  # blocks straddle rows
    m = Model.from_pretrained(path, quantize="nf4", double_quant=double_quant)
    out = tmp_path / "saved"
    m.save_pretrained(out)
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["quantization_config"]["bnb_4bit_use_double_quant"] is double_quant
    m2 = Model.from_pretrained(out)  # pre-quantized: no re-quantization
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a, b = m.nf4_weight(name), m2.nf4_weight(name)
        for k in ("packed", "absmax"):
            np.testing.assert_array_equal(a[k], b[k])
        assert a["offset"] == b["offset"]
    ids = _ids(rng, 97)
    np.testing.assert_array_equal(m(ids), m2(ids))
    fp16_bytes = 2 * sum(int(np.prod(s)) for _, s in m._core.expected_tensors())
    print(f"saved {os.path.getsize(out / 'model.safetensors')} bytes vs fp16 original {fp16_bytes}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_other_tensors(tmp_path, rng, dtype):
    from qlora_native import io

    path, _, _ = make_checkpoint(tmp_path, rng)
    m = Model.from_pretrained(path, quantize="nf4")
    m.save_pretrained(tmp_path / dtype, dtype=dtype)
    f = io.safe_open(tmp_path / dtype / "model.safetensors")
    assert f.dtype_name("model.embed_tokens.weight") == {"float16": "F16", "bfloat16": "BF16"}[dtype]
    m2 = Model.from_pretrained(tmp_path / dtype)
    emb = np.asarray(f["model.embed_tokens.weight"], np.float32)
    np.testing.assert_array_equal(m2._core.get_tensor("model.embed_tokens.weight").reshape(emb.shape), emb)
    with pytest.raises(ValueError, match="dtype"):
        m.save_pretrained(tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_unquantized_save_roundtrip(tmp_path, rng):
    path, _, _ = make_checkpoint(tmp_path, rng)
    m = Model.from_pretrained(path, quantize=None)
    m.save_pretrained(tmp_path / "fp")
    assert "quantization_config" not in json.loads((tmp_path / "fp" / "config.json").read_text())
    m2 = Model.from_pretrained(tmp_path / "fp", quantize=None)
    ids = _ids(rng, m.config.vocab_size)
    np.testing.assert_array_equal(m(ids), m2(ids))


def test_transformers_bitsandbytes_loads_our_checkpoint(tmp_path, rng):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    # Widths that are multiples of 64: bitsandbytes 0.50's CPU 4-bit kernels mis-decode blocks
    # that straddle rows (see the notes in test_bnb_format.py) and need N divisible by their tile.
    path, cfg, _ = make_checkpoint(tmp_path, rng, hidden=128, inter=256, heads=4, kv_heads=2, vocab=128)
    m = Model.from_pretrained(path, quantize="nf4")
    m.save_pretrained(tmp_path / "bnb")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", device_map="cpu")
    import bitsandbytes
    import bitsandbytes.functional as F
    from qlora_native.nf4 import NF4Tensor

    # transformers rebuilt every projection as a bitsandbytes 4-bit layer decoding to exactly our weights.
    n_checked = 0
    for name, mod in ref.named_modules():
        if name.endswith("_proj"):
            assert isinstance(mod, bitsandbytes.nn.Linear4bit), name
            w = m.nf4_weight(name)
            ours = NF4Tensor.from_arrays(w["packed"], w["absmax"], w["shape"], nested_absmax=w["nested_absmax"],
                                         offset=w["offset"]).dequantize()
            theirs = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().numpy()
            np.testing.assert_array_equal(ours, theirs, err_msg=name)
            n_checked += 1
    assert n_checked == 7 * cfg["num_hidden_layers"]
    ids = _ids(rng, 128)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.float().numpy()
    got = m(ids)
    # bitsandbytes 0.50's CPU 4-bit matmul computes in reduced (bf16-like) precision: measured
    # ~0.5% relative error on one projection against x @ W.T in fp32. Bound: a few bf16 ulps (2^-8).
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 4 * 2.0 ** -8 * scale


def test_save_pretrained_hf_model_tokenizer_replaces_stale_files(tmp_path, rng):
    """An HF-loaded model saves its tokenizer with it (issue 13); tokenizer files a previous save
    left in the target (a chat_template.jinja would shadow the new template) are replaced, and the
    tokenizer's extra end-of-turn ids reach config.json's eos_token_id."""
    from helpers_tokenizer import CHATML_TEMPLATE, build_hf_tokenizer_dir
    from qlora_native import Tokenizer

    tok_dir = build_hf_tokenizer_dir(tmp_path / "tok", "llama3", tokenizer_config={"chat_template": CHATML_TEMPLATE})
    path, _, _ = make_checkpoint(tmp_path, rng, vocab=1300)
    tok = Tokenizer.from_pretrained(tok_dir)
    extra = 7
    tok.eos_token_ids = frozenset(tok.eos_token_ids | {extra})
    m = Model.from_pretrained(path, tokenizer=tok)
    out = tmp_path / "out"
    out.mkdir()
    (out / "chat_template.jinja").write_text("STALE {{ messages }}")
    m.save_pretrained(out)
    assert not (out / "chat_template.jinja").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == sorted(tok.eos_token_ids)
    m2 = Model.from_pretrained(out)
    assert m2.tokenizer is not None and m2.tokenizer.chat_template == tok.chat_template
    msgs = [{"role": "user", "content": "Hi there 123"}]
    assert m2.tokenizer.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    assert set(m2.tokenizer.eos_token_ids) == set(tok.eos_token_ids)
