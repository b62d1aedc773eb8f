"""ctypes mirror of the C API's structs and constants (cpp/include/qlora/qlora.h) for the tests that
call the C API on _core through ctypes: one copy, so a field added to the header is added here once;
and CModel, a loaded model through them."""
import ctypes
import os

import numpy as np

# qlora_status
OK, ERR_INVALID_ARGUMENT, ERR_FORMAT, ERR_IO, ERR_OUT_OF_MEMORY, ERR_RUNTIME = 0, -1, -2, -3, -4, -5
# qlora_quant
QUANT_NONE, QUANT_NF4 = 0, 1
# QLORA_LORA_* target bits (those the tests use)
LORA_Q, LORA_V, LORA_DOWN = 1 << 0, 1 << 2, 1 << 6


class ModelParams(ctypes.Structure):  # qlora_model_params
    _fields_ = [("quantize", ctypes.c_int32), ("blocksize", ctypes.c_int32), ("double_quant", ctypes.c_int32),
                ("backend", ctypes.c_char_p), ("n_threads", ctypes.c_int32)]


class SamplingParams(ctypes.Structure):  # qlora_sampling_params
    _fields_ = [("temperature", ctypes.c_float), ("top_k", ctypes.c_int32), ("top_p", ctypes.c_float),
                ("repetition_penalty", ctypes.c_float), ("seed", ctypes.c_uint64),
                ("stop_ids", ctypes.POINTER(ctypes.c_int32)), ("n_stop_ids", ctypes.c_int64)]


class LoraParams(ctypes.Structure):  # qlora_lora_params
    _fields_ = [("r", ctypes.c_int32), ("alpha", ctypes.c_float), ("dropout", ctypes.c_float),
                ("use_rslora", ctypes.c_int32), ("target_mask", ctypes.c_uint32), ("seed", ctypes.c_uint64)]


class ContextParams(ctypes.Structure):  # qlora_context_params
    _fields_ = [("n_ctx", ctypes.c_int64)]


CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int32, ctypes.c_void_p)  # qlora_token_callback
P, I32P, F32P = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float)


def load_lib(path=None):
    """The C API of _core (or of the library at `path`) through ctypes, with the signatures every C
    API test needs: qlora_last_error, the *_default_params, qlora_model_load / qlora_model_free.
    Each call returns a new handle: a test's own argtypes do not leak into another's."""
    if path is None:
        from qlora_native import _core
        path = _core.__file__
    lib = ctypes.CDLL(path)
    lib.qlora_last_error.restype = ctypes.c_char_p
    lib.qlora_model_default_params.restype = ModelParams
    lib.qlora_sampling_default_params.restype = SamplingParams
    lib.qlora_lora_default_params.restype = LoraParams
    lib.qlora_context_default_params.restype = ContextParams
    lib.qlora_model_load.restype = ctypes.c_void_p
    lib.qlora_model_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(ModelParams)]
    lib.qlora_model_free.argtypes = [ctypes.c_void_p]
    lib.qlora_model_set_adapter_dtype.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.qlora_model_adapter_dtype.restype = ctypes.c_char_p
    lib.qlora_model_adapter_dtype.argtypes = [ctypes.c_void_p]
    return lib


def load_context_lib(path=None):
    """load_lib plus the serving contexts' signatures: qlora_model_n_vocab, qlora_adapter_load / _free,
    qlora_context_new / _free / _set_adapters / _forward / _generate."""
    lib = load_lib(path)
    lib.qlora_model_n_vocab.argtypes = [P]
    lib.qlora_adapter_load.restype = P
    lib.qlora_adapter_load.argtypes = [P, ctypes.c_char_p]
    lib.qlora_adapter_free.argtypes = [P]
    lib.qlora_context_new.restype = P
    lib.qlora_context_new.argtypes = [P, ContextParams]
    lib.qlora_context_free.argtypes = [P]
    lib.qlora_context_set_adapters.argtypes = [P, ctypes.POINTER(P), F32P, ctypes.c_int32]
    lib.qlora_context_forward.argtypes = [P, I32P, ctypes.c_int64, F32P]
    lib.qlora_context_generate.argtypes = [P, I32P, ctypes.c_int64, ctypes.POINTER(SamplingParams), I32P,
                                           ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), CALLBACK, P]
    return lib


def load_model_lib(path=None):
    """load_lib plus the signatures of CModel's calls: qlora_model_n_vocab, qlora_model_forward, qlora_generate."""
    lib = load_lib(path)
    lib.qlora_model_n_vocab.argtypes = [ctypes.c_void_p]
    lib.qlora_model_forward.argtypes = [ctypes.c_void_p, I32P, ctypes.c_int64, F32P]
    lib.qlora_generate.argtypes = [ctypes.c_void_p, I32P, ctypes.c_int64, ctypes.POINTER(SamplingParams), I32P,
                                   ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), CALLBACK, ctypes.c_void_p]
    return lib


class CModel:
    """A loaded qlora_model*; raises RuntimeError(code, message) on C API errors."""

    def __init__(self, lib, path, quantize=QUANT_NONE, blocksize=64, double_quant=True):
        self.lib = lib
        p = lib.qlora_model_default_params()
        p.quantize, p.blocksize, p.double_quant = quantize, blocksize, int(double_quant)
        self.h = lib.qlora_model_load(os.fspath(path).encode(), ctypes.byref(p))
        if not self.h:
            raise RuntimeError(lib.qlora_last_error().decode())
        self.V = lib.qlora_model_n_vocab(self.h)

    def close(self):
        self.lib.qlora_model_free(self.h)
        self.h = None

    def forward(self, ids):
        ids = np.ascontiguousarray(ids, np.int32)
        out = np.full((len(ids), self.V), np.nan, np.float32)
        rc = self.lib.qlora_model_forward(self.h, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(ids),
                                          out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        if rc != OK:
            raise RuntimeError(rc, self.lib.qlora_last_error().decode())
        return out

    def generate(self, prompt, max_new, temperature=0.0, top_k=0, top_p=1.0, seed=0, stream=None):
        prompt = np.ascontiguousarray(prompt, np.int32)
        sp = self.lib.qlora_sampling_default_params()
        sp.temperature, sp.top_k, sp.top_p, sp.seed = temperature, top_k, top_p, seed
        out = np.full(max_new, -1, np.int32)
        n = ctypes.c_int64(-1)
        cb = CALLBACK((lambda t, u: stream(t) or 0) if stream else (lambda t, u: 0))
        rc = self.lib.qlora_generate(self.h, prompt.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(prompt),
                                     ctypes.byref(sp), out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), max_new,
                                     ctypes.byref(n), cb, None)
        if rc != OK:
            raise RuntimeError(rc, self.lib.qlora_last_error().decode())
        return out[: n.value].tolist()
