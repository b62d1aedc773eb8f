"""Sentencepiece tokenizers: a `tokenizer.model` directory, and the same vocabulary embedded in a
`llama`-kind GGUF (rebuilt as a BPE over scores). Reference: the `sentencepiece` library."""
import json

import pytest
import sentencepiece as spm

import qlora_native
from qlora_native import FormatError, Tokenizer
from qlora_native.chat_template import ChatTemplateError

from helpers_tokenizer import (CHATML_TEMPLATE, sample_texts, sentencepiece_dir, train_sentencepiece,
                               write_llama_gguf)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    return {(mt, style): train_sentencepiece(d, 1000, mt, llama_style=(style == "llama"))
            for mt in ("bpe", "unigram") for style in ("llama", "nfkc")}


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize("style", ["llama", "nfkc"])
def test_sentencepiece_dir_matches_sentencepiece(models, model_type, style, tmp_path, rng):
    path = models[(model_type, style)]
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = Tokenizer.from_pretrained(sentencepiece_dir(tmp_path, path))
    assert isinstance(tok, qlora_native.Tokenizer)
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, None)
    assert tok.eos_token_ids == {2}
    texts = sample_texts(rng)
    for text in texts:
        ref = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ref, repr(text)
        assert tok.encode(text) == [1] + ref, repr(text)  # LlamaTokenizer default: BOS, no EOS
        assert tok.decode([1] + ref, skip_special_tokens=True) == sp.decode(ref)
        assert tok.decode([1] + ref) == "<s>" + sp.decode(ref)
        assert tok.convert_ids_to_tokens(ref) == [sp.id_to_piece(i) for i in ref]
    assert tok.encode_batch(texts) == [[1] + sp.encode(t) for t in texts]
    assert tok.encode("") == [1] and tok.encode("", add_special_tokens=False) == []


def test_sentencepiece_dir_config(models, tmp_path):
    path = models[("bpe", "llama")]
    sp = spm.SentencePieceProcessor(model_file=str(path))
    cfg = {"add_bos_token": False, "add_eos_token": True, "chat_template": CHATML_TEMPLATE,
           "bos_token": "<s>", "eos_token": {"content": "</s>"},
           "added_tokens_decoder": {"1000": {"content": "<|im_start|>", "special": True},
                                    "1001": {"content": "<|im_end|>", "special": True}}}
    d = sentencepiece_dir(tmp_path, path, cfg)
    (d / "config.json").write_text(json.dumps({"eos_token_id": [2, 1001]}))
    tok = Tokenizer.from_pretrained(d)
    assert tok.vocab_size == 1002
    assert tok.eos_token_ids == {2, 1001}
    assert tok.encode("hi there") == sp.encode("hi there") + [2]
    # special-token strings are matched whole; the text around them goes to sentencepiece
    ids = tok.encode("<|im_start|>user\nhi</s>", add_special_tokens=False)
    assert ids == [1000] + sp.encode("user\nhi") + [2]
    assert tok.decode(ids) == "<|im_start|>" + sp.decode(sp.encode("user\nhi")) + "</s>"
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode("user\nhi"))
    msgs = [{"role": "user", "content": "hello"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<s><|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, tokenize=True) == tok.encode(text, add_special_tokens=False)
    assert tok.apply_chat_template(msgs, tokenize=True)[:2] == [1, 1000]


@pytest.fixture(scope="module")
def llama_gguf(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_llama")
    return write_llama_gguf(models[("bpe", "llama")], d / "spm.gguf", chat_template=CHATML_TEMPLATE, eot_token_id=3)


def test_llama_gguf_matches_sentencepiece(models, llama_gguf, rng):
    # llama.cpp's SPM tokenizer = sentencepiece's BPE for identity-normalized models (Llama's)
    sp = spm.SentencePieceProcessor(model_file=str(models[("bpe", "llama")]))
    tok = Tokenizer.from_pretrained(llama_gguf)
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.eos_token_ids == {2, 3}
    texts = sample_texts(rng, n=24)
    for text in texts:
        ref = sp.encode(text)
        assert tok.encode(text) == [1] + ref, repr(text)
        assert tok.encode(text, add_special_tokens=False) == ref, repr(text)
        assert tok.decode([1] + ref, skip_special_tokens=True) == sp.decode(ref), repr(text)
        assert tok.convert_ids_to_tokens(ref) == [sp.id_to_piece(i) for i in ref]
    assert tok.encode_batch(texts, add_special_tokens=False) == [sp.encode(t) for t in texts]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<s><|im_start|>user\nx")


def test_llama_gguf_add_bos_false(models, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(models[("bpe", "llama")]))
    tok = Tokenizer.from_pretrained(write_llama_gguf(models[("bpe", "llama")], tmp_path / "nobos.gguf", add_bos=False))
    assert tok.encode("some text") == sp.encode("some text")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_decode_rejects_bad_ids(models, llama_gguf, tmp_path):
    for tok in (Tokenizer.from_pretrained(llama_gguf),
                Tokenizer.from_pretrained(sentencepiece_dir(tmp_path, models[("unigram", "nfkc")]))):
        n = tok.vocab_size
        assert tok.decode([n - 1]) is not None
        for bad in ([n], [-1], [5, n + 10]):
            with pytest.raises(ValueError, match="out of range"):
                tok.decode(bad)
        with pytest.raises(ValueError):
            tok.convert_ids_to_tokens([n])
        with pytest.raises(TypeError):
            tok.encode(None)


def test_bad_sources(tmp_path, llama_gguf):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(FormatError):
        Tokenizer.from_pretrained(junk)
    data = llama_gguf.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(FormatError):
        Tokenizer.from_pretrained(trunc)
    d = tmp_path / "badspm"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(FormatError):
        Tokenizer.from_pretrained(d)


def test_gguf_named_chat_templates(models, tmp_path):
    named = [{"name": "default", "template": "D{{ messages | length }}"},
             {"name": "rag", "template": "R{{ documents | length }}"}]
    tok = Tokenizer.from_pretrained(write_llama_gguf(models[("bpe", "llama")], tmp_path / "n.gguf", chat_template=named))
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "D1"
    assert tok.apply_chat_template(msgs, chat_template="rag", documents=[{"title": "t", "text": "u"}]) == "R1"


def test_prefers_tokenizer_json(models, tmp_path):
    from helpers_tokenizer import build_hf_tokenizer_dir

    d = build_hf_tokenizer_dir(tmp_path / "both", "gpt2", vocab_size=700)
    sentencepiece_dir(d, models[("bpe", "llama")])  # adds a tokenizer.model (vocab 1000)
    tok = Tokenizer.from_pretrained(d)
    assert tok.vocab_size == 700 and tok.bos_token == "<|begin_of_text|>"
    with pytest.raises(ValueError, match="expected a directory"):
        Tokenizer.from_pretrained(d / "tokenizer.json")
