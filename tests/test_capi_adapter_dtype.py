"""C API: qlora_model_set_adapter_dtype / qlora_model_adapter_dtype (issue 8), the C face of Python's
Model.adapter_dtype. C contexts read LoRA factors in the dtype the setter chose, bit for bit as Python
with the same setting; bad names are refused with INVALID_ARGUMENT and a message, the setting kept."""
import ctypes
import os
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_capi import ERR_INVALID_ARGUMENT, F32P, I32P, OK, P, load_context_lib  # noqa: E402
from helpers_tiny import build_tiny  # noqa: E402

IDS = np.array([3, 17, 42, 5, 23, 9], np.int32)
HAS_BF16 = qlora_native._core.ops.lora_bf16_bytes(16, 64, 64, backend="cpu") > 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capi_adt")
    tiny = build_tiny(str(root / "tiny"))
    m = qlora_native.Model.from_pretrained(tiny, quantize=None, tokenizer=None)
    m.add_adapter("a", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), seed=1)
    rng = np.random.default_rng(1)
    m.set_adapter_state_dict("a", {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
                                   for k, v in m.get_adapter_state_dict("a").items()})
    m.save_adapter(str(root / "a"), "a")
    lib = load_context_lib()
    return lib, tiny, str(root / "a")


def test_setter_validates_and_reports(setup):
    lib, tiny, _ = setup
    h = lib.qlora_model_load(tiny.encode(), ctypes.byref(lib.qlora_model_default_params()))
    assert h, lib.qlora_last_error()
    try:
        assert lib.qlora_model_adapter_dtype(h) == b"auto"  # the default
        for name in (b"bfloat16", b"float32", b"auto"):
            assert lib.qlora_model_set_adapter_dtype(h, name) == OK
            assert lib.qlora_model_adapter_dtype(h) == name
        assert lib.qlora_model_set_adapter_dtype(h, b"bfloat16") == OK
        for bad in (b"bf16", b"BFLOAT16", b"", b"float16"):
            assert lib.qlora_model_set_adapter_dtype(h, bad) == ERR_INVALID_ARGUMENT
            msg = lib.qlora_last_error().decode()
            assert "auto" in msg and "bfloat16" in msg and repr(bad.decode())[1:-1] in msg, msg
            assert lib.qlora_model_adapter_dtype(h) == b"bfloat16"  # unchanged
        assert lib.qlora_model_set_adapter_dtype(h, None) == ERR_INVALID_ARGUMENT
        assert "NULL" in lib.qlora_last_error().decode()
    finally:
        lib.qlora_model_free(h)
    assert lib.qlora_model_set_adapter_dtype(None, b"auto") == ERR_INVALID_ARGUMENT
    assert "model is NULL" in lib.qlora_last_error().decode()
    assert lib.qlora_model_adapter_dtype(None) is None


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_contexts_follow_the_setting_as_python(setup, quantize):
    lib, tiny, adir = setup
    py = qlora_native.Model.from_pretrained(tiny, quantize=quantize, tokenizer=None)
    py.load_adapter(adir, "a")
    p = lib.qlora_model_default_params()
    p.quantize = {None: 0, "nf4": 1}[quantize]
    h = lib.qlora_model_load(tiny.encode(), ctypes.byref(p))
    assert h, lib.qlora_last_error()
    try:
        ad = lib.qlora_adapter_load(h, adir.encode())
        assert ad, lib.qlora_last_error()
        ctx = lib.qlora_context_new(h, lib.qlora_context_default_params())
        assert lib.qlora_context_set_adapters(ctx, (P * 1)(ad), None, 1) == OK

        def forward():
            out = np.full((len(IDS), lib.qlora_model_n_vocab(h)), np.nan, np.float32)
            assert lib.qlora_context_forward(ctx, IDS.ctypes.data_as(I32P), len(IDS), out.ctypes.data_as(F32P)) == OK
            return out

        got = {}
        for dt in ("float32", "bfloat16", "auto"):
            assert lib.qlora_model_set_adapter_dtype(h, dt.encode()) == OK
            py.adapter_dtype = dt
            got[dt] = forward()
            assert np.array_equal(got[dt], py(IDS[None], adapter_name="a")[0]), dt  # bit for bit as Python
        assert np.array_equal(got["auto"], got["float32"])  # fp32 compute: auto is the fp32 parity mode
        if HAS_BF16:  # the bf16 copies are really read: close to fp32, not identical
            d = np.abs(got["bfloat16"] - got["float32"]).max()
            assert 0 < d < 0.05 * np.abs(got["float32"]).max()
        else:  # no bf16 LoRA kernels: "bfloat16" runs the fp32 factors
            assert np.array_equal(got["bfloat16"], got["float32"])
        lib.qlora_context_free(ctx)
    finally:
        lib.qlora_model_free(h)
