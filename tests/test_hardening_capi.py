"""C API handles after free (the session-16 fuzz sweep): contexts and loaded adapters were already
checked against a set of live handles; models and tokenizers were not, so a double free or any call
on a freed model / tokenizer dereferenced freed memory (SIGSEGV in 7 of 18 fuzz cases). Now every
handle kind is checked: calls fail with QLORA_ERR_INVALID_ARGUMENT naming the call, getters return
their 'none' value, double frees and freeing a model's own tokenizer are refused with an error.
The calls run in a child process, so a regression fails the test instead of killing the run."""
from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import helpers_capi as H
from helpers_gguf import write_tiny_gguf
from helpers_tiny import build_tiny

CHILD = textwrap.dedent(r"""
    import ctypes, json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    import helpers_capi as H
    lib = H.load_context_lib()
    P, I32P, F32P = ctypes.c_void_p, H.I32P, H.F32P
    lib.qlora_model_forward.argtypes = [P, I32P, ctypes.c_int64, F32P]
    lib.qlora_generate.argtypes = [P, I32P, ctypes.c_int64, ctypes.POINTER(H.SamplingParams), I32P, ctypes.c_int64,
                                   ctypes.POINTER(ctypes.c_int64), H.CALLBACK, P]
    lib.qlora_adapter_add.argtypes = [P, ctypes.c_char_p, ctypes.POINTER(H.LoraParams)]
    lib.qlora_model_get_tokenizer.restype = P
    lib.qlora_model_get_tokenizer.argtypes = [P]
    lib.qlora_tokenizer_load.restype = P
    lib.qlora_tokenizer_load.argtypes = [ctypes.c_char_p]
    lib.qlora_tokenizer_free.argtypes = [P]
    lib.qlora_tokenize.argtypes = [P, ctypes.c_char_p, ctypes.c_int32, I32P, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
    lib.qlora_tokenizer_n_vocab.argtypes = [P]
    lib.qlora_token_to_piece.argtypes = [P, ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32]
    err = lambda: lib.qlora_last_error().decode()
    ids = np.array([1, 2, 3], np.int32)
    idp = ids.ctypes.data_as(I32P)
    out = {}

    m = lib.qlora_model_load(sys.argv[1].encode(), None)
    lib.qlora_model_free(m)
    logits = np.zeros(3 * 64, np.float32)
    out["forward"] = [lib.qlora_model_forward(m, idp, 3, logits.ctypes.data_as(F32P)), err()]
    gen = np.zeros(4, np.int32)
    n = ctypes.c_int64()
    out["generate"] = [lib.qlora_generate(m, idp, 3, None, gen.ctypes.data_as(I32P), 4, ctypes.byref(n),
                                          H.CALLBACK(lambda t, u: 0), None), err()]
    out["adapter_add"] = [lib.qlora_adapter_add(m, b"a", None), err()]
    out["n_vocab"] = lib.qlora_model_n_vocab(m)
    out["context_new"] = [lib.qlora_context_new(m, lib.qlora_context_default_params()), err()]
    out["get_tokenizer"] = [lib.qlora_model_get_tokenizer(m), err()]
    lib.qlora_model_free(m)
    out["model_double_free"] = err()

    t = lib.qlora_tokenizer_load(sys.argv[2].encode())
    lib.qlora_tokenizer_free(t)
    buf = (ctypes.c_int32 * 16)()
    out["tokenize"] = [lib.qlora_tokenize(t, b"hello", 5, buf, 16, 1, 0), err()]
    piece = ctypes.create_string_buffer(16)
    out["token_to_piece"] = [lib.qlora_token_to_piece(t, 1, piece, 16), err()]
    out["tok_n_vocab"] = lib.qlora_tokenizer_n_vocab(t)
    lib.qlora_tokenizer_free(t)
    out["tok_double_free"] = err()

    g = lib.qlora_model_load(sys.argv[2].encode(), None)  # a GGUF: the model has a tokenizer
    mt = lib.qlora_model_get_tokenizer(g)
    lib.qlora_tokenizer_free(mt)
    out["free_model_tokenizer"] = err()
    out["model_tokenizer_still_works"] = lib.qlora_tokenize(mt, b"hello", 5, buf, 16, 0, 0) > 0
    lib.qlora_model_free(g)
    out["model_tokenizer_after_model_free"] = [lib.qlora_tokenize(mt, b"hello", 5, buf, 16, 0, 0), err()]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("capi")
    return build_tiny(str(d / "model")), write_tiny_gguf(d / "tiny.gguf")


def test_freed_models_and_tokenizers_are_errors_not_crashes(sources):
    hf, gguf = sources
    r = subprocess.run([sys.executable, "-c", CHILD, hf, str(gguf), str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stderr[-2000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    dead_model = "model is not a live qlora_model (freed, or not made by qlora_model_load)"
    for call in ("forward", "generate", "adapter_add"):
        rc, msg = out[call]
        assert rc == -1 and msg == f"qlora_{'model_forward' if call == 'forward' else call}: {dead_model}", out[call]
    assert out["n_vocab"] == -1
    assert out["context_new"][0] is None and dead_model in out["context_new"][1]
    assert out["get_tokenizer"][0] is None and dead_model in out["get_tokenizer"][1]
    assert out["model_double_free"] == "qlora_model_free: not a live qlora_model (already freed)"
    dead_tok = "tokenizer is not a live qlora_tokenizer (freed, or freed with its model)"
    assert out["tokenize"] == [-2**31, f"qlora_tokenize: {dead_tok}"]
    assert out["token_to_piece"] == [-2**31, f"qlora_token_to_piece: {dead_tok}"]
    assert out["tok_n_vocab"] == -1
    assert out["tok_double_free"] == "qlora_tokenizer_free: not a live qlora_tokenizer (already freed)"
    assert "belongs to its model" in out["free_model_tokenizer"]
    assert out["model_tokenizer_still_works"] is True
    assert out["model_tokenizer_after_model_free"] == [-2**31, f"qlora_tokenize: {dead_tok}"]


@pytest.mark.parametrize("stops,n,match", [
    ([64], 1, r"stop_ids: token id 64 at index 0 is out of range \[0, 64\)"),  # never produced: never stopped
    ([5, -1], 2, r"stop_ids: token id -1 at index 1 is out of range"),
    (None, -1, r"n_stop_ids must be >= 0, got -1"),  # was "stop_ids is NULL but n_stop_ids > 0"
])
def test_stop_ids_outside_the_vocabulary_are_refused(sources, stops, n, match):
    lib = H.load_model_lib()
    m = H.CModel(lib, sources[0])
    try:
        sp = lib.qlora_sampling_default_params()
        arr = (ctypes.c_int32 * len(stops))(*stops) if stops else None
        sp.stop_ids, sp.n_stop_ids = arr, n
        prompt = np.array([1, 2, 3], np.int32)
        out = np.zeros(4, np.int32)
        n_out = ctypes.c_int64(-1)
        rc = lib.qlora_generate(m.h, prompt.ctypes.data_as(H.I32P), 3, ctypes.byref(sp), out.ctypes.data_as(H.I32P), 4,
                                ctypes.byref(n_out), H.CALLBACK(lambda t, u: 0), None)
        assert rc == H.ERR_INVALID_ARGUMENT and n_out.value == 0
        assert re.search(match, lib.qlora_last_error().decode())
    finally:
        m.close()
