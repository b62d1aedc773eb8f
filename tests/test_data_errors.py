"""Bad text, ids and vocabularies give clear errors naming what is wrong (issue 14): lone surrogates
in JSONL rows (file:line and field) or passed to encode, non-integer ids to decode, GGUF merges
outside the vocabulary (FormatError naming the file and the merge)."""
import numpy as np
import pytest

from qlora_native import FormatError, Tokenizer
from qlora_native.data import load_dataset, read_jsonl, tokenize_row

from helpers_tokenizer import _finish_gguf, _gguf_writer, build_hf_tokenizer_dir, train_sentencepiece, sentencepiece_dir


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return [Tokenizer.from_pretrained(build_hf_tokenizer_dir(d / "hf", "metaspace")),
            Tokenizer.from_pretrained(sentencepiece_dir(d / "spd", train_sentencepiece(d, 1000, "bpe", n_lines=800)))]


def test_lone_surrogate_in_jsonl_names_file_line_field(toks, tmp_path):
    f = tmp_path / "d.jsonl"
    # JSON escapes decode to a lone surrogate; a valid pair (an emoji) is fine
    f.write_text('{"text": "ok \\ud83d\\ude00"}\n\n'
                 '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\\udc80"}]}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: field 'messages\[1\]\.content' has a lone surrogate"):
        read_jsonl(f)
    with pytest.raises(ValueError, match=r"d\.jsonl:3: .*lone surrogate"):
        load_dataset(f, toks[0], 64)
    f.write_text('{"prompt": "\\ud800", "completion": "x"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: field 'prompt'"):
        load_dataset(f, toks[0], 64)
    with pytest.raises(ValueError, match=r"row 7: field 'text' has a lone surrogate"):
        tokenize_row({"text": "a\ud800"}, toks[1], where="row 7")


def test_deeply_nested_jsonl_row(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text('{"text": "a"}\n' + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:2: invalid JSON"):
        read_jsonl(f)


def test_encode_rejects_lone_surrogates(toks):
    for tok in toks:
        with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at index 3"):
            tok.encode("abc\ud800def")
        with pytest.raises(ValueError, match=r"texts\[1\]"):
            tok.encode_batch(["fine", "x\udfff"])
        assert tok.decode(tok.encode("ok 🙂", add_special_tokens=False)) == "ok 🙂"


def test_decode_rejects_non_integer_ids(toks):
    for tok in toks:
        for bad in ([1.5], [2.0], [True], [np.float32(3)], ["3"], [None], [[1, 2]], "12", 3.5, None):
            with pytest.raises(ValueError, match="token ids must be"):
                tok.decode(bad)
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([tok.vocab_size])
        with pytest.raises(ValueError, match="token ids must be integers"):
            tok.convert_ids_to_tokens([1.5])
        ids = tok.encode("hello world", add_special_tokens=False)
        text = tok.decode(ids)
        assert tok.decode(np.array(ids)) == text and tok.decode([np.int32(i) for i in ids]) == text
        assert tok.decode(ids[0]) == tok.decode(ids[:1])  # one id, as transformers allows
        with pytest.raises(TypeError):
            tok.convert_tokens_to_ids(["a", 5])


def _gpt2_gguf(path, tokens, merges, **ids):
    w = _gguf_writer(path.with_name(path.name + ".tmp"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    for k, v in ids.items():
        w.add_uint32(f"tokenizer.ggml.{k}", v) if isinstance(v, int) else w.add_float32(f"tokenizer.ggml.{k}", v)
    return _finish_gguf(w, path.with_name(path.name + ".tmp"), path)


@pytest.mark.parametrize("merges, bad", [
    (["a b", "a c"], "'c'"),        # an unknown token: tokenizers raised a bare Exception
    (["a b", "b a"], "'ba'"),       # the merged token unknown: tokenizers panicked (PanicException)
    (["a b", "ab"], "two space-separated"),
])
def test_gguf_merges_outside_vocab(tmp_path, merges, bad):
    g = _gpt2_gguf(tmp_path / "m.gguf", ["a", "b", "ab", "<eos>"], merges, eos_token_id=3)
    with pytest.raises(FormatError, match=rf"m\.gguf: tokenizer\.ggml\.merges\[1\] .*{bad}"):
        Tokenizer.from_pretrained(g)
    ok = _gpt2_gguf(tmp_path / "ok.gguf", ["a", "b", "ab", "<eos>"], ["a b"], eos_token_id=3)
    assert Tokenizer.from_pretrained(ok).encode("ab", add_special_tokens=False) == [2]


def test_gguf_float_token_id(tmp_path):
    g = _gpt2_gguf(tmp_path / "f.gguf", ["a", "b", "ab", "<eos>"], ["a b"], eos_token_id=2.5)
    with pytest.raises(FormatError, match=r"f\.gguf: tokenizer\.ggml\.eos_token_id = 2\.5 is not an integer"):
        Tokenizer.from_pretrained(g)
