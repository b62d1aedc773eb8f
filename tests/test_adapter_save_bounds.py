"""Saving applies the rule loading applies (cpp/src/model/lora_check.hpp: finite, ||A||, |s|·||B||
and their product <= 2^32): save_adapter used to check only NaN / Inf, so an adapter driven past the
bound (one AdamW step with a huge lr, or factors handed to adapter_io.save_adapter) was written and
then refused by load_adapter. Now every writer refuses it before anything is written: Model.save_adapter
/ adapter_io.save_adapter (through _core.io.check_lora_factors, the same C++ function) and the C API's
qlora_adapter_save. A refused save leaves no file, and an adapter saved earlier in that directory
stays as it was."""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig
from qlora_native.adapter_io import load_adapter, save_adapter
from qlora_native.lora_config import peft_tensor_name

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_capi import LORA_Q, OK, QUANT_NONE, load_lib  # noqa: E402
from helpers_tiny import add_random_adapter, build_tiny  # noqa: E402

IDS = np.array([[5, 6, 7, 8, 9], [3, 4, 5, 6, 7]])
A0 = peft_tensor_name(0, "q_proj", "A")
B0 = peft_tensor_name(0, "q_proj", "B")
TOO_LARGE = "too large for float32"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_module_level_save_refuses_what_load_refuses(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])  # scaling 2
    rng = np.random.default_rng(0)
    ts = {}
    for layer in range(2):
        ts[peft_tensor_name(layer, "q_proj", "A")] = rng.standard_normal((2, 8)).astype(np.float32)
        ts[peft_tensor_name(layer, "q_proj", "B")] = rng.standard_normal((8, 2)).astype(np.float32)
    save_adapter(tmp_path / "ok", cfg, ts)
    before = {f: (tmp_path / "ok" / f).read_bytes() for f in _files(tmp_path / "ok")}
    # the exact edge: 2 * 2^15 * 2^16 = 2^32 is saved and loads; one ulp more of B is refused
    edge = dict(ts)
    edge[A0] = np.zeros((2, 8), np.float32)
    edge[B0] = np.zeros((8, 2), np.float32)
    edge[A0][1, 3], edge[B0][5, 1] = 2.0 ** 16, 2.0 ** 15
    save_adapter(tmp_path / "edge", cfg, edge)
    load_adapter(tmp_path / "edge")
    edge[B0][5, 1] = np.nextafter(np.float32(2.0 ** 15), np.float32(np.inf))
    big16 = {k: v.astype(np.float16) for k, v in ts.items()}  # fp16 is checked as the float32 it loads as
    big16[A0][1, :], big16[B0][5, :] = 30000, 30000  # each stage < 2^32, the product 2.9e10
    for bad in (edge, big16):
        with pytest.raises(ValueError, match=TOO_LARGE + r".*scaling \* B \* A") as e:
            save_adapter(tmp_path / "ok", cfg, bad)  # over an existing adapter
        assert str(e.value).startswith("save_adapter: ") and repr(A0) in str(e.value) and repr(B0) in str(e.value)
    assert {f: (tmp_path / "ok" / f).read_bytes() for f in _files(tmp_path / "ok")} == before
    with pytest.raises(ValueError, match=TOO_LARGE):
        save_adapter(tmp_path / "new", cfg, {**ts, A0: np.full((2, 8), 1e30, np.float32)})
    assert not (tmp_path / "new").exists()
    # NaN keeps its message (now from the same C++ check)
    with pytest.raises(ValueError, match=r"save_adapter: tensor '.*lora_A.weight' contains NaN or Inf"):
        save_adapter(tmp_path / "new", cfg, {**ts, A0: np.full((2, 8), np.nan, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["edge", "ok"]  # no staging leftovers


def test_model_save_after_a_huge_step_is_refused(tiny, tmp_path):
    """One AdamW step moves each element by about lr: lr 1e12 gives finite factors far past 2^32."""
    m = qlora_native.Model.from_pretrained(tiny, tokenizer=None)
    add_random_adapter(m, "a", 1)
    m.set_active_adapter("a")
    m.save_adapter(tmp_path / "out")
    before = {f: (tmp_path / "out" / f).read_bytes() for f in _files(tmp_path / "out")}
    m.configure_optimizer()
    m.forward_backward(IDS, IDS)
    m.optimizer_step(lr=1e12)
    assert all(np.isfinite(v).all() for v in m.get_adapter_state_dict("a").values())
    for d in (tmp_path / "out", tmp_path / "new"):
        with pytest.raises(ValueError, match=TOO_LARGE):
            m.save_adapter(d)
    assert {f: (tmp_path / "out" / f).read_bytes() for f in _files(tmp_path / "out")} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_capi_save_after_a_huge_step_is_refused(tiny, tmp_path):
    lib = load_lib()
    lib.qlora_adapter_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    lib.qlora_train_configure.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_float]
    i32p = ctypes.POINTER(ctypes.c_int32)
    lib.qlora_train_step.argtypes = [ctypes.c_void_p, i32p, i32p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                     ctypes.c_float, ctypes.POINTER(ctypes.c_float)]
    lib.qlora_adapter_save.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    p = lib.qlora_model_default_params()
    p.quantize = QUANT_NONE
    h = lib.qlora_model_load(tiny.encode(), ctypes.byref(p))
    assert h, lib.qlora_last_error()
    try:
        lp = lib.qlora_lora_default_params()
        lp.r, lp.alpha, lp.target_mask, lp.seed = 4, 8.0, LORA_Q, 3
        assert lib.qlora_adapter_add(h, b"ft", ctypes.byref(lp)) == OK, lib.qlora_last_error()
        assert lib.qlora_train_configure(h, 1e-2, 0.0) == OK, lib.qlora_last_error()
        ids = np.ascontiguousarray(IDS, np.int32)
        step = lambda lr: lib.qlora_train_step(h, ids.ctypes.data_as(i32p), ids.ctypes.data_as(i32p), 2, 5,  # noqa
                                               lr, 1.0, None)
        assert step(1e-2) == OK, lib.qlora_last_error()
        out = tmp_path / "out"
        assert lib.qlora_adapter_save(h, str(out).encode()) == OK, lib.qlora_last_error()
        load_adapter(out)
        before = {f: (out / f).read_bytes() for f in _files(out)}
        assert step(1e12) == OK, lib.qlora_last_error()
        for d in (out, tmp_path / "new"):
            assert lib.qlora_adapter_save(h, str(d).encode()) != OK
            msg = lib.qlora_last_error().decode()
            assert msg.startswith("qlora_adapter_save: tensor '") and TOO_LARGE in msg, msg
        assert {f: (out / f).read_bytes() for f in _files(out)} == before
        assert sorted(os.listdir(tmp_path)) == ["out"]
    finally:
        lib.qlora_model_free(h)
