"""ctypes mirror of the C API's structs and constants (cpp/include/qlora/qlora.h) for the tests that
call the C API on _core through ctypes: one copy, so a field added to the header is added here once."""
import ctypes

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
