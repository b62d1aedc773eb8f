"""GGUF through the one C++ loader from both faces: the C API's qlora_model_load on a .gguf file
gives the same model as Model.from_pretrained (logits bit-identical), and errors name the file."""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers_gguf import VOCAB, write_tiny_gguf

import qlora_native

from helpers_capi import ERR_FORMAT, ERR_IO, OK, load_lib  # noqa: E402


@pytest.fixture(scope="module")
def lib():
    lib = load_lib()
    for fn in ("qlora_model_n_vocab", "qlora_model_n_layer", "qlora_model_bos_token"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    lib.qlora_model_eos_tokens.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]
    lib.qlora_model_forward.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int64,
                                        ctypes.POINTER(ctypes.c_float)]
    return lib


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def c_load(lib, path, nf4):
    p = lib.qlora_model_default_params()
    p.quantize = 1 if nf4 else 0
    h = lib.qlora_model_load(os.fspath(path).encode(), ctypes.byref(p))
    return h, (None if h else lib.qlora_last_error().decode())


@pytest.mark.parametrize("nf4", [False, True])
def test_c_api_loads_a_gguf_like_python(lib, tiny, nf4):
    h, err = c_load(lib, tiny, nf4)
    assert h, err
    try:
        assert lib.qlora_model_n_vocab(h) == VOCAB and lib.qlora_model_n_layer(h) == 2
        assert lib.qlora_model_bos_token(h) == 1
        eos = (ctypes.c_int32 * 4)()
        assert lib.qlora_model_eos_tokens(h, eos, 4) == 1 and eos[0] == 2
        ids = np.array([1, 5, 77, 250, 3, 299], np.int32)
        got = np.full((len(ids), VOCAB), np.nan, np.float32)
        rc = lib.qlora_model_forward(h, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(ids),
                                     got.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        assert rc == OK, lib.qlora_last_error()
    finally:
        lib.qlora_model_free(h)
    model = qlora_native.Model.from_pretrained(tiny, quantize="nf4" if nf4 else None, tokenizer=None)
    want = model(ids[None])[0]
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_c_api_gguf_errors_name_the_file(lib, tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny.read_bytes()[:1000])
    h, err = c_load(lib, bad, False)
    assert not h and str(bad) in err and "not a readable GGUF file" in err, err
    assert lib.qlora_last_status() == ERR_FORMAT
    h, err = c_load(lib, tmp_path / "missing.gguf", False)
    assert not h and "missing.gguf" in err, err
    assert lib.qlora_last_status() == ERR_IO


def test_loading_a_gguf_needs_no_gguf_package(tiny):
    """The weights come through C++: loading (tokenizer=None) never imports the `gguf` package
    (the Python loader dequantized with gguf.quants)."""
    code = (f"import sys, qlora_native; m = qlora_native.Model.from_pretrained({str(tiny)!r}, tokenizer=None); "
            f"print(sorted(k for k in sys.modules if k == 'gguf' or k.startswith('gguf.')))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
