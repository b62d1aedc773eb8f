"""HF `tokenizer.json` directories and `gpt2`-kind (byte-level BPE) GGUF vocabularies built at
test time. References: transformers' AutoTokenizer (directory and GGUF loaders), and for the GGUF
pre-tokenizer regexes an independent split with the `regex` module."""
import json

import pytest
import regex

from qlora_native import Tokenizer
from qlora_native.chat_template import ChatTemplateError

from helpers_tokenizer import (BLOCKY_TEMPLATE, build_hf_tokenizer_dir, sample_texts, write_gpt2_gguf)

transformers = pytest.importorskip("transformers")

MESSAGES = [
    [{"role": "user", "content": "Hi there  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? 🙂"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "and \"x\" < y\n\ttab"}],
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: build_hf_tokenizer_dir(root / kind, kind, config={"eos_token_id": [1, 4]} if kind == "gpt2" else None)
            for kind in ("llama3", "gpt2", "metaspace")}


def _auto(d, **kw):
    return transformers.AutoTokenizer.from_pretrained(str(d), **kw)


def _check_against(tok, ref, texts, *, add_special=True):
    for text in texts:
        ids = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text, add_special_tokens=False) == ids, repr(text)
        if add_special:
            assert tok.encode(text) == ref.encode(text), repr(text)
        assert tok.decode(ids) == ref.decode(ids), repr(text)
        full = ref.encode(text)
        assert tok.decode(full, skip_special_tokens=True) == ref.decode(full, skip_special_tokens=True)
        assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("kind", ["llama3", "gpt2"])
def test_hf_dir_matches_transformers(dirs, kind, rng):
    tok, ref = Tokenizer.from_pretrained(dirs[kind]), _auto(dirs[kind])
    assert tok.vocab_size == len(ref)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    texts = sample_texts(rng)
    _check_against(tok, ref, texts)
    assert tok.encode("hello")[0] == tok.bos_token_id  # tokenizer.json's post-processor adds BOS
    assert tok.encode_batch(texts) == [ref.encode(t) for t in texts]
    assert tok.eos_token_ids == ({1, 4} if kind == "gpt2" else {4})
    for msgs in MESSAGES:
        for gen in (True, False):
            text = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True) == \
                ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)


def test_hf_metaspace_dir(dirs, rng, tmp_path):
    tok, ref = Tokenizer.from_pretrained(dirs["metaspace"]), _auto(dirs["metaspace"])
    texts = sample_texts(rng)
    # transformers 5 ignores tokenizer_config's add_bos_token for a generic tokenizer.json (it
    # adds nothing); we honour it, so compare without special tokens and check BOS directly.
    _check_against(tok, ref, texts, add_special=False)
    for text in texts:
        assert tok.encode(text) == [tok.bos_token_id] + ref.encode(text, add_special_tokens=False)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    # a template given directly: trim_blocks/lstrip_blocks and tojson as transformers sets them
    msgs = [{"role": "user", "content": "q <1>"}, {"role": "assistant", "content": "a \"é\""}]
    out = tok.apply_chat_template(msgs, chat_template=BLOCKY_TEMPLATE)
    assert out == ref.apply_chat_template(msgs, chat_template=BLOCKY_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert out == '[U] q <1>\n[A] "a \\"é\\""\n[A]'
    with pytest.raises(ChatTemplateError, match="unsupported role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=BLOCKY_TEMPLATE)
    # add_bos_token false in tokenizer_config turns BOS off
    cfg = json.loads((dirs["metaspace"] / "tokenizer_config.json").read_text())
    d = build_hf_tokenizer_dir(tmp_path / "nobos", "metaspace", tokenizer_config={"add_bos_token": False, "add_eos_token": True})
    tok2 = Tokenizer.from_pretrained(d)
    assert tok2.encode("abc") == tok.encode("abc", add_special_tokens=False) + [2]
    assert cfg["add_bos_token"] is True


def test_named_chat_templates(dirs, tmp_path):
    d = build_hf_tokenizer_dir(tmp_path / "named", "gpt2", tokenizer_config={"chat_template": [
        {"name": "default", "template": "{% for m in messages %}{{ m['content'] }}|{% endfor %}"},
        {"name": "tool_use", "template": "TOOLS{{ tools | tojson }}"}]})
    tok = Tokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert tok.apply_chat_template(msgs) == "a|b|"
    assert tok.apply_chat_template(msgs, chat_template="tool_use", tools=[{"n": "é"}]) == 'TOOLS[{"n": "é"}]'
    assert tok.apply_chat_template(msgs, tools=[]) == "TOOLS[]"
    # a string naming no template is a template's source (as in transformers)
    assert tok.apply_chat_template(msgs, chat_template="{{ messages | length }}") == "2"
    d2 = build_hf_tokenizer_dir(tmp_path / "named2", "gpt2", tokenizer_config={"chat_template": {
        "a": "A", "b": "B"}})
    with pytest.raises(ChatTemplateError, match="none is 'default'"):
        Tokenizer.from_pretrained(d2).apply_chat_template(msgs)
    assert Tokenizer.from_pretrained(d2).apply_chat_template(msgs, chat_template="b") == "B"
    with pytest.raises(TypeError):
        tok.apply_chat_template(["not a dict"])


def test_gguf_llama_bpe_matches_transformers(dirs, tmp_path, rng):
    g = write_gpt2_gguf(dirs["llama3"], tmp_path / "l3.gguf", pre="llama-bpe")
    tok = Tokenizer.from_pretrained(g)
    texts = sample_texts(rng)
    # the GGUF says add_bos_token=true, like the directory's post-processor
    _check_against(tok, _auto(dirs["llama3"]), texts)
    _check_against(tok, _auto(tmp_path, gguf_file=g.name), texts)


def test_gguf_gpt2_pre_matches_transformers(dirs, tmp_path, rng):
    g = write_gpt2_gguf(dirs["gpt2"], tmp_path / "g2.gguf", pre="gpt-2", add_bos=False)
    tok = Tokenizer.from_pretrained(g)
    texts = sample_texts(rng)
    ref = _auto(dirs["gpt2"])
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), repr(text)
    _check_against(tok, _auto(tmp_path, gguf_file=g.name), texts)


# llama.cpp's regex lists (llm_tokenizer_bpe), written out again for the `regex` module
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA_CPP_SPLITS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "qwen2": [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


def _isolated_split(pieces, pattern):
    out = []
    for piece in pieces:
        pos = 0
        for m in regex.finditer(pattern, piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            if m.end() > m.start():
                out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


@pytest.mark.parametrize("pre", sorted(_LLAMA_CPP_SPLITS))
def test_gguf_pre_tokenizer_regexes(dirs, tmp_path, rng, pre):
    from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers

    g = write_gpt2_gguf(dirs["gpt2"], tmp_path / f"{pre}.gguf", pre=pre, add_bos=False)
    tok = Tokenizer.from_pretrained(g)
    # reference: split with the `regex` module, then run the plain byte-level BPE on each piece
    bpe = HFTokenizer.from_file(str(dirs["gpt2"] / "tokenizer.json"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    texts = sample_texts(rng) + ["1234567 ½² Ⅻ", "a,b;;c...d!? <x> $5+3=8 ^~|", "I'M HERE'S it's"]
    for text in texts:
        pieces = [text]
        for pattern in _LLAMA_CPP_SPLITS[pre]:
            pieces = _isolated_split(pieces, pattern)
        ref = [i for p in pieces for i in bpe.encode(p, add_special_tokens=False).ids]
        assert tok.encode(text) == ref, (pre, text)


def test_gguf_unknown_pre_is_rejected(dirs, tmp_path):
    g = write_gpt2_gguf(dirs["gpt2"], tmp_path / "odd.gguf", pre="my-fancy-pre")
    with pytest.raises(ValueError, match="my-fancy-pre"):
        Tokenizer.from_pretrained(g)


def test_hf_dir_bad_json(tmp_path):
    from qlora_native import FormatError

    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FormatError):
        Tokenizer.from_pretrained(tmp_path)


def test_deeply_nested_tokenizer_config_is_format_error(tmp_path):
    import shutil

    import qlora_native

    d = tmp_path / "tok"
    shutil.copytree(build_hf_tokenizer_dir(tmp_path / "src", "gpt2"), d)
    (d / "tokenizer_config.json").write_text('{"a": ' + "[" * 200000 + "]" * 200000 + "}")
    with pytest.raises(qlora_native.FormatError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(d)
