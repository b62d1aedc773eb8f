"""GGUF export (llama.cpp format): Model.export_gguf and export_gguf_lora / loading a GGUF LoRA back.

The exported model must load back (our loader, transformers' GGUF loader) with the logits of the
model that was exported, up to the rounding of the chosen dtype: the reference for f16 / bf16 /
q8_0 is a float32 model holding exactly those rounded weights, so the comparison stays tight."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig
from qlora_native.config import ModelConfig
from qlora_native.lora_config import peft_tensor_name

from helpers_tokenizer import build_hf_tokenizer_dir, sample_texts, sentencepiece_dir, train_sentencepiece

gguf = pytest.importorskip("gguf")

_TOK_CACHE: dict = {}


def _tokenizer_dir(tmp_path_factory, kind: str):
    if kind not in _TOK_CACHE:
        base = tmp_path_factory.mktemp(f"tok_{kind}")
        if kind == "sentencepiece":
            _TOK_CACHE[kind] = sentencepiece_dir(base / "d", train_sentencepiece(base, vocab_size=1000),
                                                 {"add_bos_token": True, "chat_template": "{{ messages }}"})
        else:
            _TOK_CACHE[kind] = build_hf_tokenizer_dir(base / "d", kind=kind, vocab_size=400)
    return _TOK_CACHE[kind]


def _weights(cfg: dict, rng, round_to=None) -> dict[str, np.ndarray]:
    core = qlora_native._core.model.LlamaModel(ModelConfig.from_dict(cfg).to_core())
    ts = {}
    for name, shape in core.expected_tensors():
        shape = tuple(shape)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name or name.endswith(".bias"):
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        ts[name] = w.astype(np.float32)
    return ts


def _rounded(ts: dict, dtype: str) -> dict:
    """The weights as a `dtype` export stores them (2-D tensors rounded, 1-D kept F32), by the
    `gguf` package's own quantize/dequantize (rounding is per row, so the Q/K row permutation
    does not change it)."""
    if dtype == "f32":
        return ts
    q = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
         "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    out = {}
    for n, w in ts.items():
        if w.ndim == 2:
            qq = q if not (dtype == "q8_0" and w.shape[1] % 32) else gguf.GGMLQuantizationType.F16
            w = np.asarray(gguf.quants.dequantize(gguf.quants.quantize(w, qq), qq), np.float32).reshape(w.shape)
        out[n] = w
    return out


def _model_dir(path, cfg: dict, ts: dict, tokdir=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if tokdir is not None:
        for f in os.listdir(tokdir):
            shutil.copy(os.path.join(tokdir, f), path)
    qlora_native.io.save_safetensors(os.path.join(path, "model.safetensors"), ts)
    return str(path)


def _config(arch="llama", vocab=300, tie=False, tokenizer=None, **kw):
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=256, hidden_act="silu",
               architectures=["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
               model_type=arch)
    if tokenizer is not None:
        cfg.update(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    cfg.update(kw)
    return cfg


def _ids(V, rng, B=2, T=12):
    return rng.integers(0, V, size=(B, T)).astype(np.int32)


def _hf_logits(gguf_path, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path),
                                                           gguf_file=os.path.basename(gguf_path),
                                                           dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        return hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def _tensor_names(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _kv(path, key):
    from qlora_native.tokenizer_gguf import _field_value

    f = gguf.GGUFReader(str(path)).fields.get(key)
    return None if f is None else _field_value(f)


# ---------------------------------------------------------------- model export
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_export_reload_logits(tmp_path, tmp_path_factory, dtype):
    tokdir = _tokenizer_dir(tmp_path_factory, "llama3")
    tok = qlora_native.Tokenizer.from_pretrained(tokdir)
    rng = np.random.default_rng(1)
    cfg = _config(tokenizer=tok)
    ts = _weights(cfg, rng)
    m = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "src", cfg, ts, tokdir), quantize=None)
    ref = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "ref", cfg, _rounded(ts, dtype)), quantize=None,
                                             tokenizer=None)
    out = tmp_path / "out" / f"m-{dtype}.gguf"
    out.parent.mkdir()
    m.export_gguf(out, dtype)
    assert sorted(os.listdir(out.parent)) == [out.name]  # no temporary left

    ids = _ids(cfg["vocab_size"], rng)
    want = ref(ids)
    back = qlora_native.Model.from_pretrained(out, quantize=None)
    np.testing.assert_allclose(back(ids), want, rtol=0, atol=2e-4 * np.abs(want).max())
    if dtype == "f32":  # exactly the exported model
        np.testing.assert_allclose(back(ids), m(ids), rtol=0, atol=1e-5 * np.abs(want).max())
    else:  # and the rounding did change something (the reference is not the original)
        assert np.abs(want - m(ids)).max() > 1e-4
    hf = _hf_logits(out, ids)
    np.testing.assert_allclose(hf, want, rtol=0, atol=1e-3 * np.abs(want).max())

    # metadata llama.cpp reads
    assert _kv(out, "general.architecture") == "llama"
    assert _kv(out, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[dtype]
    assert _kv(out, "llama.attention.head_count_kv") == 2 and _kv(out, "llama.rope.dimension_count") == 16
    assert _kv(out, "llama.vocab_size") == cfg["vocab_size"] and _kv(out, "llama.block_count") == 2
    names = _tensor_names(out)
    assert names["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert names["blk.0.ffn_up.weight"].tensor_type.name == dtype.upper()
    assert "output.weight" in names
    # the tokenizer: llama.cpp's byte-level BPE with the pre-tokenizer that reproduces it
    assert _kv(out, "tokenizer.ggml.model") == "gpt2" and _kv(out, "tokenizer.ggml.pre") == "llama-bpe"
    assert _kv(out, "tokenizer.chat_template") == tok.chat_template
    texts = sample_texts(np.random.default_rng(7), n=6)
    assert [back.tokenizer.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def test_qk_rows_are_permuted_for_llama_cpp(tmp_path):
    """attn_q / attn_k as llama.cpp's converter stores them: the HF rows permuted per head."""
    rng = np.random.default_rng(2)
    cfg = _config()
    ts = _weights(cfg, rng)
    m = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "src", cfg, ts), quantize=None)
    out = tmp_path / "m.gguf"
    with pytest.warns(UserWarning, match="no tokenizer"):
        m.export_gguf(out, "f32")
    r = gguf.GGUFReader(str(out))
    stored = {t.name: np.asarray(t.data) for t in r.tensors}

    def permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute, written out
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    q = ts["model.layers.1.self_attn.q_proj.weight"]
    k = ts["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(stored["blk.1.attn_q.weight"], permute(q, 4))
    np.testing.assert_array_equal(stored["blk.1.attn_k.weight"], permute(k, 2))
    assert not np.array_equal(stored["blk.1.attn_q.weight"], q)
    np.testing.assert_array_equal(stored["blk.1.attn_v.weight"], ts["model.layers.1.self_attn.v_proj.weight"])


def test_export_tied_qwen2_and_nf4(tmp_path):
    """Tied embeddings (no output.weight), qwen2 (biases, no permutation) and an NF4 model
    (dequantized by the engine's codec) all reload with the exported model's logits."""
    rng = np.random.default_rng(3)
    ids = _ids(300, rng)
    cases = [("llama", dict(tie=True), None), ("qwen2", dict(), None), ("llama", dict(), "nf4")]
    for k, (arch, kw, quant) in enumerate(cases):
        cfg = _config(arch=arch, **kw)
        ts = _weights(cfg, rng)
        m = qlora_native.Model.from_pretrained(_model_dir(tmp_path / f"src{k}", cfg, ts), quantize=quant)
        out = tmp_path / f"m{k}.gguf"
        with pytest.warns(UserWarning, match="no tokenizer"):
            m.export_gguf(out, "f32")
        names = _tensor_names(out)
        assert ("output.weight" in names) == (not cfg["tie_word_embeddings"])
        assert _kv(out, "general.architecture") == arch
        want = m(ids)
        back = qlora_native.Model.from_pretrained(out, quantize=None)
        assert back.tokenizer is None  # the file has no vocabulary: tokenizer="auto" gives None, no error
        np.testing.assert_allclose(back(ids), want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=str(cases[k]))
        np.testing.assert_allclose(_hf_logits(out, ids), want, rtol=0, atol=1e-3 * np.abs(want).max(),
                                   err_msg=str(cases[k]))


@pytest.mark.parametrize("kind", ["sentencepiece", "metaspace", "gpt2"])
def test_tokenizer_kinds_round_trip(tmp_path, tmp_path_factory, kind):
    tokdir = _tokenizer_dir(tmp_path_factory, kind)
    tok = qlora_native.Tokenizer.from_pretrained(tokdir)
    cfg = _config(tokenizer=tok, num_hidden_layers=1)
    m = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "src", cfg, _weights(cfg, np.random.default_rng(4)),
                                                      tokdir), quantize=None)
    out = tmp_path / "m.gguf"
    m.export_gguf(out, "f16")
    back = qlora_native.Tokenizer.from_pretrained(out)
    texts = sample_texts(np.random.default_rng(8), n=6)
    assert [back.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert back.bos_token_id == tok.bos_token_id and back.eos_token_id == tok.eos_token_id
    assert back.chat_template == tok.chat_template
    assert _kv(out, "tokenizer.ggml.model") == ("gpt2" if kind == "gpt2" else "llama")


def test_export_bad_input_leaves_nothing(tmp_path, monkeypatch):
    cfg = _config(num_hidden_layers=1)
    m = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "src", cfg, _weights(cfg, np.random.default_rng(5))),
                                           quantize=None)
    d = tmp_path / "out"
    d.mkdir()
    for bad in ("q4_0", "float16", None, 16):
        with pytest.raises(ValueError, match="dtype"):
            m.export_gguf(d / "x.gguf", bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        m.export_gguf(tmp_path / "missing" / "x.gguf")
    with pytest.raises(IsADirectoryError):
        m.export_gguf(d)
    # a failure while writing: the old file stays as it was, no temporary is left
    (d / "x.gguf").write_bytes(b"old")
    import qlora_native.export_gguf as eg

    def boom(data, kind):
        raise RuntimeError("disk full")

    monkeypatch.setattr(eg, "_encode", boom)
    with pytest.raises(RuntimeError, match="disk full"), pytest.warns(UserWarning):
        m.export_gguf(d / "x.gguf")
    assert sorted(os.listdir(d)) == ["x.gguf"] and (d / "x.gguf").read_bytes() == b"old"


@pytest.mark.slow
def test_smollm2_export_f16_same_greedy_tokens(tmp_path):
    from helpers_smollm import require_smollm

    src = require_smollm()
    m = qlora_native.Model.from_pretrained(src, quantize=None)
    out = tmp_path / "smollm2-f16.gguf"
    m.export_gguf(out, "f16")
    back = qlora_native.Model.from_pretrained(out, quantize=None)
    prompt = m.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             tokenize=True)
    assert back.tokenizer.encode("The capital of France is") == m.tokenizer.encode("The capital of France is")
    assert back.generate(prompt, 12) == m.generate(prompt, 12)
    assert _kv(out, "tokenizer.ggml.pre") == "smollm" and _kv(out, "tokenizer.chat_template") == _kv(
        src, "tokenizer.chat_template")


# ---------------------------------------------------------------- LoRA export
def _adapter(m, name, cfg, seed):
    m.add_adapter(name, cfg, seed=seed)
    rng = np.random.default_rng(seed)
    m.set_adapter_state_dict(name, {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
                                    for k, v in m.get_adapter_state_dict(name).items()})


_LORA_CONFIGS = {
    "plain": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    # rsLoRA with a rank pattern and an alpha pattern: per-module scalings that differ from alpha / r
    "rslora_patterns": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "down_proj"],
                                  use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3},
                                  layers_to_transform=[1]),
}


@pytest.mark.parametrize("which", list(_LORA_CONFIGS))
def test_lora_export_load_same_logits(tmp_path, which):
    rng = np.random.default_rng(6)
    cfg = _config(num_hidden_layers=2)
    m = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "src", cfg, _weights(cfg, rng)), quantize="nf4")
    lcfg = _LORA_CONFIGS[which]
    _adapter(m, "ad", lcfg, 11)
    ids = _ids(300, rng)
    want = m(ids)
    m.set_active_adapter(None)
    base = m(ids)
    assert np.abs(want - base).max() > 1e-2  # the adapter matters
    out = tmp_path / "ad.gguf"
    m.export_gguf_lora(out, "ad")
    assert _kv(out, "general.type") == "adapter" and _kv(out, "adapter.type") == "lora"
    assert _kv(out, "general.architecture") == "llama"
    alpha = _kv(out, "adapter.lora.alpha")

    # llama.cpp's rule, applied to the raw file: delta = alpha / r * B @ A (r from the tensors),
    # with the q/k rows of B in GGML order, equals the adapter's scaling * B @ A per module
    stored = {t.name: np.asarray(t.data, np.float64) for t in gguf.GGUFReader(str(out)).tensors}
    sd = m.get_adapter_state_dict("ad")
    from qlora_native.export_gguf import _PROJ_GGUF
    from qlora_native.gguf_source import _unpermute_rows

    mods = lcfg.resolve(2)
    assert len(stored) == 2 * len(mods)
    for layer, proj, r, _, scaling in mods:
        base_name = f"blk.{layer}.{_PROJ_GGUF[proj]}.weight"
        a, b = stored[base_name + ".lora_a"], stored[base_name + ".lora_b"]
        assert a.shape == (r, 64 if proj != "down_proj" else 96) and b.shape[1] == r
        if proj in ("q_proj", "k_proj"):
            b = _unpermute_rows(b, 4 if proj == "q_proj" else 2)
        got = alpha / a.shape[0] * b @ a
        exp = scaling * sd[peft_tensor_name(layer, proj, "B")].astype(np.float64) @ sd[
            peft_tensor_name(layer, proj, "A")].astype(np.float64)
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6 * np.abs(exp).max(), err_msg=base_name)

    m.load_adapter(out, "back")
    m.set_active_adapter("back")
    np.testing.assert_allclose(m(ids), want, rtol=0, atol=2e-5 * np.abs(want).max())
    # stored as f16 / bf16: each factor within its rounding (elementwise, after the fold); the
    # logits for f16 close to the adapter's (this random adapter is very strong, so bf16's 2^-9
    # rounding moves them visibly: checked on the factors only)
    for dt, eps in (("f16", 2.0**-11), ("bf16", 2.0**-8)):
        o = tmp_path / f"ad-{dt}.gguf"
        m.export_gguf_lora(o, "ad", dtype=dt)
        assert _tensor_names(o)["blk.1.attn_q.weight.lora_a"].tensor_type.name == dt.upper()
        m.load_adapter(o, dt)
        got_sd = m.get_adapter_state_dict(dt)
        s_got = {(l, p): s for l, p, _, _, s in m.adapter_config(dt).resolve(2)}
        for layer, proj, _, _, scaling in mods:  # A, and B times its scaling (B holds the fold)
            for w, f_got, f_want in (("A", 1.0, 1.0), ("B", s_got[layer, proj], scaling)):
                k = peft_tensor_name(layer, proj, w)
                v = sd[k].astype(np.float64) * f_want
                err = np.abs(got_sd[k].astype(np.float64) * f_got - v)
                assert (err <= 1.01 * eps * np.abs(v) + 1e-6).all() and err.max() > 0, (dt, k)
        if dt == "f16":
            m.set_active_adapter(dt)
            assert np.abs(m(ids) - want).max() < 0.02 * np.abs(want - base).max()


def test_lora_gguf_bad_input(tmp_path):
    rng = np.random.default_rng(9)
    cfg = _config(num_hidden_layers=2)
    m = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "src", cfg, _weights(cfg, rng)), quantize=None)
    _adapter(m, "ad", _LORA_CONFIGS["plain"], 3)
    with pytest.raises(ValueError, match="dtype"):
        m.export_gguf_lora(tmp_path / "a.gguf", dtype="q8_0")
    with pytest.raises(ValueError, match="no adapter named"):
        m.export_gguf_lora(tmp_path / "a.gguf", "nope")
    with pytest.raises(FileNotFoundError):
        m.export_gguf_lora(tmp_path / "nodir" / "a.gguf")
    good = tmp_path / "a.gguf"
    m.export_gguf_lora(good)
    # a model file is not an adapter
    model_file = tmp_path / "model.gguf"
    with pytest.warns(UserWarning):
        m.export_gguf(model_file, "f32")
    with pytest.raises(ValueError, match="general.type is 'model'"):
        m.load_adapter(model_file, "x")
    # an adapter for another shape of model
    cfg2 = _config(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    m2 = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "src2", cfg2, _weights(cfg2, rng)), quantize=None)
    with pytest.raises(ValueError, match="do not fit"):
        m2.load_adapter(good, "x")
    # another architecture
    cfg3 = _config(arch="qwen2", num_hidden_layers=2)
    m3 = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "src3", cfg3, _weights(cfg3, rng)), quantize=None)
    with pytest.raises(ValueError, match="architecture"):
        m3.load_adapter(good, "x")
    assert m2.adapters == [] and m3.adapters == []


def _write_adapter(path, tensors: dict, alpha=8.0, arch="llama", gtype="adapter", qtypes=None):
    """A GGUF LoRA file; qtypes: {tensor name: GGMLQuantizationType} for those not stored as F32."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    if gtype is not None:
        w.add_type(gtype)
    w.add_string("adapter.type", "lora")
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    for n, a in tensors.items():
        qt = (qtypes or {}).get(n)
        if qt is None:
            w.add_tensor(n, np.asarray(a, np.float32))
        else:
            w.add_tensor(n, gguf.quants.quantize(np.asarray(a, np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_lora_gguf_written_elsewhere_and_corrupt(tmp_path):
    """Files as other writers make them (alpha absent: llama.cpp then applies no alpha / r, a
    scaling of 1), and broken ones: each refused with the file and the tensor named."""
    rng = np.random.default_rng(10)
    cfg = _config(num_hidden_layers=2)
    m = qlora_native.Model.from_pretrained(_model_dir(tmp_path / "src", cfg, _weights(cfg, rng)), quantize=None)
    a = rng.standard_normal((3, 64)).astype(np.float32)
    b = rng.standard_normal((64, 3)).astype(np.float32)
    ok = _write_adapter(tmp_path / "noalpha.gguf", {"blk.0.attn_v.weight.lora_a": a,
                                                    "blk.0.attn_v.weight.lora_b": b[:32]}, alpha=None)
    m.load_adapter(ok, "noalpha")
    (layer, proj, r, _, scaling), = m.adapter_config("noalpha").resolve(2)
    assert (layer, proj, r, scaling) == (0, "v_proj", 3, 1.0)
    np.testing.assert_array_equal(m.get_adapter_state_dict("noalpha")[peft_tensor_name(0, "v_proj", "B")], b[:32])

    nan_a = a.copy()
    nan_a[0, 0] = np.nan
    cases = {
        "only_a": ({"blk.0.attn_q.weight.lora_a": a}, {}, "not its pair"),
        "nan": ({"blk.0.attn_v.weight.lora_a": nan_a, "blk.0.attn_v.weight.lora_b": b[:32]}, {}, "NaN"),
        "name": ({"blk.0.attn_q.weight.lora_x": a}, {}, "unexpected tensor"),
        "layer": ({"blk.7.attn_v.weight.lora_a": a, "blk.7.attn_v.weight.lora_b": b[:32]}, {}, "layer 7"),
        "rank": ({"blk.0.attn_v.weight.lora_a": a, "blk.0.attn_v.weight.lora_b": b[:32, :2]}, {}, "do not fit"),
        "alpha": ({"blk.0.attn_v.weight.lora_a": a, "blk.0.attn_v.weight.lora_b": b[:32]}, {"alpha": -1.0},
                  "alpha"),
        "type": ({"blk.0.attn_v.weight.lora_a": a, "blk.0.attn_v.weight.lora_b": b[:32]}, {"gtype": None},
                 "general.type"),
        "empty": ({}, {}, "no LoRA tensors"),
    }
    for name, (tensors, kw, msg) in cases.items():
        p = _write_adapter(tmp_path / f"{name}.gguf", tensors, **kw)
        with pytest.raises(ValueError, match=msg) as e:
            m.load_adapter(p, name)
        assert str(p) in str(e.value), name
    assert m.adapters == ["noalpha"]
    with pytest.raises(FileNotFoundError):
        m.load_adapter(tmp_path / "missing.gguf", "x")


LOAD_WITHOUT_GGUF = r"""
import sys
sys.modules["gguf"] = None  # importing the gguf package now fails
import numpy as np
import qlora_native
m = qlora_native.Model.from_pretrained(sys.argv[1], quantize=None, tokenizer=None)
m.load_adapter(sys.argv[2], "x")
np.savez(sys.argv[3], **m.get_adapter_state_dict("x"))
"""


def test_lora_gguf_factors_decoded_by_the_engine(tmp_path):
    """load_gguf_lora decodes F16 / BF16 / Q8_0 factors with the engine's GGUF decoder, as the base
    weights: the gguf package is not needed (it loads with the package blocked), and the factors are
    the package's own dequantization bit for bit (B of a llama q_proj: un-permuted to HF's rows)."""
    import subprocess
    import sys

    from qlora_native.gguf_source import _unpermute_rows

    rng = np.random.default_rng(12)
    cfg = _config(num_hidden_layers=2)
    path = _model_dir(tmp_path / "src", cfg, _weights(cfg, rng))
    Q = gguf.GGMLQuantizationType
    f = {"blk.0.attn_v.weight.lora_a": (rng.standard_normal((4, 64)), Q.Q8_0),
         "blk.0.attn_v.weight.lora_b": (rng.standard_normal((32, 4)), Q.F16),
         "blk.1.attn_q.weight.lora_a": (rng.standard_normal((4, 64)), Q.BF16),
         "blk.1.attn_q.weight.lora_b": (rng.standard_normal((64, 4)), Q.BF16)}
    lora = _write_adapter(tmp_path / "q.gguf", {n: a for n, (a, _) in f.items()},
                          qtypes={n: qt for n, (_, qt) in f.items()})
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_GGUF, str(path), str(lora), str(tmp_path / "sd.npz")],
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "sd.npz")

    def ref(n):
        a, qt = f[n]
        return np.asarray(gguf.quants.dequantize(gguf.quants.quantize(a.astype(np.float32), qt), qt), np.float32)
    for (layer, proj, hf, gg) in ((0, "v_proj", "attn_v", None), (1, "q_proj", "attn_q", 4)):
        want_b = ref(f"blk.{layer}.{hf}.weight.lora_b")
        want_b = want_b if gg is None else _unpermute_rows(want_b, gg)
        np.testing.assert_array_equal(got[peft_tensor_name(layer, proj, "A")], ref(f"blk.{layer}.{hf}.weight.lora_a"))
        np.testing.assert_array_equal(got[peft_tensor_name(layer, proj, "B")], want_b)


@pytest.mark.slow
def test_llama_cpp_runs_exported_model_and_lora(tmp_path):
    """Bench-side check (llama-cpp-python is not a dependency; skipped without it): llama.cpp runs
    the exported SmolLM2 with the exported LoRA and gives our greedy tokens and logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from helpers_smollm import require_smollm

    src = qlora_native.Model.from_pretrained(require_smollm(), quantize=None)
    base = tmp_path / "base-f16.gguf"
    src.export_gguf(base, "f16")
    del src
    m = qlora_native.Model.from_pretrained(base, quantize=None)
    prompt = m.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             tokenize=True)
    m.add_adapter("ad", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                   use_rslora=True, rank_pattern={"k_proj": 4}), seed=1)
    rng = np.random.default_rng(2)
    m.set_adapter_state_dict("ad", {k: v if "lora_A" in k else (0.02 * rng.standard_normal(v.shape)).astype(np.float32)
                                    for k, v in m.get_adapter_state_dict("ad").items()})
    lora = tmp_path / "ad.gguf"
    m.export_gguf_lora(lora, "ad")

    def run(**kw):
        llm = llama_cpp.Llama(model_path=str(base), n_ctx=128, logits_all=True, verbose=False, seed=0, **kw)
        llm.eval(prompt)
        logits = np.array(llm.scores[:len(prompt)], np.float32)
        llm.reset()
        out = []
        for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            out.append(t)
            if len(out) == 12 or t == m.tokenizer.eos_token_id:
                break
        return logits, out

    m.set_active_adapter(None)
    ours_base, g_base = m(np.array([prompt]))[0], m.generate(prompt, 12)[0]
    lb, tb = run()
    m.set_active_adapter("ad")
    ours, g = m(np.array([prompt]))[0], m.generate(prompt, 12)[0]
    ll, tl = run(lora_path=str(lora), lora_scale=1.0)
    assert tb == g_base and tl == g
    assert np.corrcoef((ll - lb).ravel(), (ours - ours_base).ravel())[0, 1] > 0.99  # the adapter's effect
    assert np.abs(ll - ours).max() < 0.05 * np.abs(ours - ours_base).max() + 0.1
