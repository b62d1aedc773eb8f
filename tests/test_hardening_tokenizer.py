"""Tokenizer files against hostile input (the session-16 fuzz sweep): each case here crashed the
process out of memory, hung, or loaded a different tokenizer than the file says before the fix.
The C++ face is `_core.Tokenizer` (the C API's loader); the Python face `Tokenizer.from_pretrained`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers_gguf import VOCAB, _vocab, write_tiny_gguf
from helpers_tokenizer import build_hf_tokenizer_dir

from qlora_native import FormatError, Tokenizer, _core
from qlora_native.tokenizer_gguf import _spm_merges


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_tokenizer_dir(tmp_path_factory.mktemp("tok") / "src", "llama3", vocab_size=400)


def _edited(hf_dir, tmp_path, edit=None, files=None):
    d = tmp_path / "t"
    shutil.copytree(hf_dir, d)
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    if edit:
        edit(tj)
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    for name, obj in (files or {}).items():
        (d / name).write_text(json.dumps(obj), encoding="utf-8")
    return d


_TEMPLATE = {"type": "TemplateProcessing", "pair": [],
             "single": [{"SpecialToken": {"id": "X", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}

BAD_TOKENIZER_JSON = [
    # an id far past the others sized the id table from it: std::bad_alloc (MemoryError) or the OOM killer
    ("vocab id 2^31-2", lambda t: t["model"]["vocab"].update({"zzz": 2**31 - 2}), r"token id 2147483646 \(\"zzz\"\) is far past"),
    ("added id 2^30", lambda t: t["added_tokens"].append({"id": 2**30, "content": "<big>", "special": True,
                                                         "single_word": False, "lstrip": False, "rstrip": False,
                                                         "normalized": False}), r"token id 1073741824"),
    # reported as "merges[68] = 'Ġ !': token '!' is not in the vocabulary" (its id went to "zzz")
    ("two tokens one id", lambda t: t["model"]["vocab"].update({"zzz": t["model"]["vocab"]["!"]}),
     r'vocab tokens "!" and "zzz" share id'),
    # narrowed to int32 without a check: 2^32 + 1 became token 1, prepended to every encoding
    ("post-processor id 2^32+1", lambda t: t.update(post_processor=dict(
        _TEMPLATE, special_tokens={"X": {"id": "X", "ids": [2**32 + 1], "tokens": ["X"]}})),
     "post_processor special token id = 4294967297 is out of range"),
    # cast to int32 (2^40 -> 0, -5 -> no-op) or used as given: tokenizers stores a char / usize and refuses
    ("Strip start 2^40", lambda t: t.update(decoder={"type": "Strip", "content": " ", "start": 2**40, "stop": 0}),
     "Strip decoder start = 1099511627776 is out of range"),
    ("Strip stop -5", lambda t: t.update(decoder={"type": "Strip", "content": " ", "start": 0, "stop": -5}),
     "Strip decoder stop = -5 is out of range"),
    ("Strip content 'ab'", lambda t: t.update(decoder={"type": "Strip", "content": "ab", "start": 1, "stop": 0}),
     'Strip decoder content "ab" is not one character'),
    # an empty replacement silently dropped every space (and split UTF-8) on encode
    ("Metaspace replacement ''", lambda t: t.update(pre_tokenizer={"type": "Metaspace", "replacement": "",
                                                                   "prepend_scheme": "always"}),
     'Metaspace replacement "" is not one character'),
    ("Metaspace decoder replacement 'ab'", lambda t: t.update(decoder={"type": "Metaspace", "replacement": "ab"}),
     'Metaspace decoder replacement "ab" is not one character'),
    # ignored silently here; tokenizers panics on it
    ("Replace normalizer ''", lambda t: t.update(normalizer={"type": "Replace", "pattern": {"String": ""}, "content": "x"}),
     "Replace normalizer with an empty pattern"),
    ("Replace decoder ''", lambda t: t.update(decoder={"type": "Replace", "pattern": {"String": ""}, "content": "x"}),
     "Replace decoder with an empty pattern"),
]


@pytest.mark.parametrize("edit,match", [c[1:] for c in BAD_TOKENIZER_JSON], ids=[c[0] for c in BAD_TOKENIZER_JSON])
def test_bad_tokenizer_json_is_a_format_error(hf_dir, tmp_path, edit, match):
    d = _edited(hf_dir, tmp_path, edit)
    with pytest.raises(FormatError, match=match) as e:
        _core.Tokenizer(str(d))
    assert str(d / "tokenizer.json") in str(e.value)


BAD_CONFIG_IDS = [
    # 2^32 + 2 became id 2 (an extra end-of-sequence token); 10^12 was reported as -727379968
    ("config.json", {"eos_token_id": [2**32 + 2]}, "eos_token_id = 4294967298 is out of range"),
    ("generation_config.json", {"eos_token_id": 10**12}, "eos_token_id = 1000000000000 is out of range"),
    # these were reported as errors of tokenizer.json
    ("config.json", {"eos_token_id": "2"}, 'eos_token_id = "2" is not an integer'),
    ("config.json", {"eos_token_id": 2.5}, "eos_token_id = 2.5 is not an integer"),
]


@pytest.mark.parametrize("name,obj,match", BAD_CONFIG_IDS)
def test_bad_ids_in_config_files_name_the_file(hf_dir, tmp_path, name, obj, match):
    d = _edited(hf_dir, tmp_path, files={name: obj})
    with pytest.raises(FormatError, match=match) as e:
        _core.Tokenizer(str(d))
    assert str(d / name) in str(e.value)


def test_dense_ids_and_integral_floats_still_load(hf_dir, tmp_path):
    """The bounds refuse only what was wrong: a few holes in the ids, an eos id written 4.0."""
    def holes(t):
        n = max(t["model"]["vocab"].values())
        t["added_tokens"].append({"id": n + 100, "content": "<late>", "special": True, "single_word": False,
                                  "lstrip": False, "rstrip": False, "normalized": False})
    d = _edited(hf_dir, tmp_path, holes, files={"config.json": {"eos_token_id": [4.0]}})
    tok = _core.Tokenizer(str(d))
    ids = tok.encode("hello <late>", True)
    assert ids[-1] == tok.vocab_size - 1 and tok.decode(ids).endswith("<late>")


def _last_token_gguf(path, last):
    import gguf

    tokens, _, _ = _vocab()
    T = gguf.GGUFValueType
    return write_tiny_gguf(path, kv_overrides={"tokenizer.ggml.tokens": (tokens[:-1] + [last], T.ARRAY, T.STRING)})


def test_long_token_in_a_scored_gguf_vocab_loads(tmp_path):
    """A 1 MB token in a `llama` (scored) GGUF vocabulary: every split of every token was hashed
    afresh (len^2: a 64 KB token took 6.5 s, 1 MB hours) in both faces. Run in a child with a
    generous timeout so that a regression fails instead of hanging the suite."""
    p = _last_token_gguf(tmp_path / "long.gguf", "ab" * (1 << 19))
    ref = _last_token_gguf(tmp_path / "ref.gguf", "qq")  # as unreachable as the long one
    code = textwrap.dedent(f"""
        from qlora_native import Tokenizer, _core
        text = "the quick brown fox " * 5
        for path in ({str(p)!r}, {str(ref)!r}):
            a = _core.Tokenizer(path).encode(text, True)
            b = Tokenizer.from_pretrained(path).encode(text)
            print(a == b, a[:8])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (same_long, ids_long), (same_ref, ids_ref) = [ln.split(" ", 1) for ln in r.stdout.split("\n")[:2]]
    assert same_long == same_ref == "True"
    assert ids_long == ids_ref  # the long token is unreachable: the same ids as without it


def _spm_merges_reference(tokens, scores, types):
    """The plain definition: every split of every eligible token into two tokens."""
    vocab = set(tokens)
    ranked = [(-scores[i], i, k, t[:k], t[k:]) for i, t in enumerate(tokens) if types[i] in (1, 4, 5)
              for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    ranked.sort(key=lambda r: r[:3])
    return [(a, b) for *_, a, b in ranked]


def test_spm_merges_skip_only_impossible_splits(rng):
    """The Python face's split search (only lengths some token has) finds exactly what the plain
    definition finds, on random vocabularies with multi-byte characters and long tokens."""
    alphabet = list("abcé\u2581") + ["\U0001F642"]
    for _ in range(5):
        tokens = list(dict.fromkeys("".join(rng.choice(alphabet, int(rng.integers(1, 9))))
                                    for _ in range(300)))
        tokens += ["ab" * int(rng.integers(20, 60))]
        scores = [float(s) for s in rng.standard_normal(len(tokens))]
        types = [int(t) for t in rng.choice([1, 1, 1, 3, 4, 6], len(tokens))]
        assert _spm_merges(tokens, scores, types) == _spm_merges_reference(tokens, scores, types)


def test_scored_gguf_long_tokens_reachable_by_merges_agree_between_faces(tmp_path):
    """Tokens 'ab' * k (k up to 40) reachable by merges: the C++ split search (prefix hashes
    extended byte by byte, halves looked up only at lengths some token has) gives the Python
    face's ids."""
    import gguf

    T = gguf.GGUFValueType
    tokens, scores, types = _vocab()
    extra = ["ab" * k for k in range(1, 41)] + ["\u2581" + "ab" * k for k in range(1, 41)]
    kv = {"tokenizer.ggml.tokens": (tokens + extra, T.ARRAY, T.STRING),
          "tokenizer.ggml.scores": (scores + [-1.0 - 0.01 * i for i in range(len(extra))], T.ARRAY, T.FLOAT32),
          "tokenizer.ggml.token_type": (types + [1] * len(extra), T.ARRAY, T.INT32)}
    p = write_tiny_gguf(tmp_path / "ab.gguf", kv_overrides=kv)
    text = "ab abab " + "ab" * 37 + " x" + "ab" * 81
    a = _core.Tokenizer(str(p)).encode(text, True)
    b = Tokenizer.from_pretrained(p).encode(text)
    assert a == b
    assert len(a) < 20  # the long tokens were used


def _gguf_with(tmp_path, **kv):
    import gguf

    T = gguf.GGUFValueType
    table = {
        "types_str": {"tokenizer.ggml.token_type": (["1"] * VOCAB, T.ARRAY, T.STRING)},
        "scores_nan": {"tokenizer.ggml.scores": ([float("nan")] * VOCAB, T.ARRAY, T.FLOAT32)},
        "tokens_scalar": {"tokenizer.ggml.tokens": ("abc", T.STRING)},
        "scores_scalar": {"tokenizer.ggml.scores": (1.0, T.FLOAT32)},
        "add_space_str": {"tokenizer.ggml.add_space_prefix": ("yes", T.STRING)},
        "template_int": {"tokenizer.chat_template": (5, T.INT32)},
    }
    (name,) = kv
    return write_tiny_gguf(tmp_path / f"{name}.gguf", kv_overrides=table[name])


@pytest.mark.parametrize("name,match", [
    # each loaded in the Python face (string types as ints, NaN scores ranked arbitrarily, "abc" as
    # three tokens, "yes" as true) or failed later with a bare TypeError; the C++ face refused all
    ("types_str", r"token_type\[0\] = '1' is not an integer"),
    ("scores_nan", r"scores\[0\] = nan is not a number"),
    ("tokens_scalar", "tokenizer.ggml.tokens is str, not an array"),
    ("scores_scalar", "tokenizer.ggml.scores is float, not an array"),
    ("add_space_str", "add_space_prefix = 'yes' is not a bool"),
    ("template_int", "tokenizer.chat_template is int, not a string"),
])
def test_python_face_refuses_what_the_cpp_face_refuses(tmp_path, name, match):
    p = _gguf_with(tmp_path, **{name: True})
    with pytest.raises(FormatError, match=match):
        Tokenizer.from_pretrained(p)
    if name != "template_int":  # the C++ tokenizer does not read chat templates
        with pytest.raises(ValueError):
            _core.Tokenizer(str(p))



@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update(normalizer={"type": "Prepend", "prepend": ""}), "PanicException"),
    (lambda t: t.update(normalizer={"type": "Replace", "pattern": {"String": ""}, "content": "x"}), "PanicException"),
], ids=["Prepend ''", "Replace ''"])
def test_python_face_turns_tokenizers_panics_into_value_errors(hf_dir, tmp_path, edit, match):
    """tokenizers loads these and panics on the first encode: a pyo3 PanicException, a
    BaseException that `except Exception` does not catch (it escaped Tokenizer.encode)."""
    tok = Tokenizer.from_pretrained(_edited(hf_dir, tmp_path, edit))
    with pytest.raises(ValueError, match=match):
        tok.encode("hello world")
    with pytest.raises(ValueError, match=match):
        tok.encode_batch(["hello", "world"])
