"""A runtime scale is held to the bound every way LoRA factors come in is held to (test_adapter_bounds.py,
cpp/src/model/lora_check.hpp): with each module's scaling multiplied by the scale, ||A||, |s|·||B|| and
|s|·||B||·||A|| must stay within 2^32. Before, set_adapter_scale(name, 1e30) (and a C API context's
scale) was taken and the logits came back NaN / Inf without an error. Negative scales stay legal
(llama.cpp's --lora-scaled, PEFT's set_scale): only |s| counts. One rule in C++ (check_lora_scale),
for Model.set_adapter_scale and qlora_context_set_adapters."""
from __future__ import annotations

import ctypes
import os
import re
import sys

import numpy as np
import pytest

import qlora_native

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_capi import ERR_INVALID_ARGUMENT, F32P, I32P, OK, P, load_context_lib  # noqa: E402
from helpers_tiny import add_random_adapter, build_tiny  # noqa: E402

IDS = np.array([[5, 6, 7, 8, 9], [3, 4, 5, 6, 7]])
LIMIT = 2.0 ** 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = qlora_native.Model.from_pretrained(tiny_dir, tokenizer=None)
    add_random_adapter(m, "a", 1)  # r=4, alpha=8: scaling 2, B not zero
    return m


def largest_scale(m, name):
    """The largest |scale| the rule allows for adapter `name`, from its factors (float64)."""
    sd = m.get_adapter_state_dict(name)
    best = np.inf
    for ka in (k for k in sd if ".lora_A." in k):
        A, B = sd[ka].astype(np.float64), sd[ka.replace(".lora_A.", ".lora_B.")].astype(np.float64)
        na, nb = np.abs(A).sum(1).max(), np.abs(B).sum(1).max()
        scaling = 2.0
        best = min(best, LIMIT / (scaling * nb), LIMIT / (scaling * nb * na))
    return best


@pytest.mark.parametrize("scale", [1e30, -1e30])
def test_huge_scale_is_refused_naming_adapter_and_scale(model, scale):
    model.set_adapter_scale("a", 0.5)
    before = model(IDS, adapter_name="a")
    with pytest.raises(ValueError, match="too large for float32") as e:
        model.set_adapter_scale("a", scale)
    msg = str(e.value)
    assert "adapter 'a'" in msg and f"scale {scale:.3g}" in msg and "layer 0 q_proj" in msg, msg
    assert model.get_adapter_scale("a") == 0.5  # kept
    np.testing.assert_array_equal(model(IDS, adapter_name="a"), before)
    model.set_adapter_scale("a", 1.0)


def test_the_bound_is_the_load_rule(model):
    """Just inside the bound is taken (either sign) and gives finite logits; just beyond is refused."""
    s_max = largest_scale(model, "a")
    assert 1.0 < s_max < 1e12
    for sign in (1.0, -1.0):
        model.set_adapter_scale("a", sign * 0.99 * s_max)
        assert model.get_adapter_scale("a") == np.float32(sign * 0.99 * s_max)
        assert np.isfinite(model(IDS, adapter_name="a")).all()
        with pytest.raises(ValueError, match="too large for float32"):
            model.set_adapter_scale("a", sign * 1.01 * s_max)
    model.set_adapter_scale("a", 1.0)


@pytest.mark.parametrize("scale,match", [(float("nan"), "scale nan is not finite"),
                                         (float("inf"), "scale inf is not finite"),
                                         (1e300, "scale 1e\\+300 is not finite as a float32"),  # Inf as a float
                                         (10 ** 400, "scale must be a finite number"),  # beyond a double
                                         ("x", "scale must be a finite number")])
def test_non_finite_scale_is_refused(model, scale, match):
    with pytest.raises(ValueError, match=match) as e:
        model.set_adapter_scale("a", scale)
    assert "adapter 'a'" in str(e.value)
    assert model.get_adapter_scale("a") == 1.0


def test_zero_B_adapter(model):
    """A fresh adapter (PEFT's zero B) takes any float scale whose product with its scaling stays a
    float (its update is 0: the base logits exactly); 3e38 * scaling 2 would be Inf in the passes."""
    model.add_adapter("z", qlora_native.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), seed=3)
    try:
        model.set_adapter_scale("z", 1e30)
        with model.disable_adapter():
            base = model(IDS)
        np.testing.assert_array_equal(model(IDS, adapter_name="z"), base)
        with pytest.raises(ValueError, match=r"adapter 'z': scale 3e\+38: layer 0 q_proj: scaling 2 \* scale "
                                             r"overflows float32"):
            model.set_adapter_scale("z", 3e38)
        assert model.get_adapter_scale("z") == np.float32(1e30)
    finally:
        model.delete_adapter("z")


# ---------------------------------------------------------------- C API: qlora_context_set_adapters
@pytest.fixture(scope="module")
def capi(model, tiny_dir, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ad") / "a")
    model.save_adapter(d, "a")
    lib = load_context_lib()
    p = lib.qlora_model_default_params()
    p.quantize = 0
    h = lib.qlora_model_load(tiny_dir.encode(), ctypes.byref(p))
    assert h, lib.qlora_last_error()
    a = lib.qlora_adapter_load(h, d.encode())
    assert a, lib.qlora_last_error()
    c = lib.qlora_context_new(h, lib.qlora_context_default_params())
    assert c, lib.qlora_last_error()
    yield lib, h, a, c
    lib.qlora_context_free(c)
    lib.qlora_model_free(h)


def _set(lib, c, ads, scales):
    arr = (P * len(ads))(*ads)
    sc = (ctypes.c_float * len(scales))(*scales)
    return lib.qlora_context_set_adapters(c, arr, sc, len(ads))


def _forward(lib, h, c, ids):
    ids = np.ascontiguousarray(ids, np.int32)
    out = np.full((len(ids), lib.qlora_model_n_vocab(h)), np.nan, np.float32)
    assert lib.qlora_context_forward(c, ids.ctypes.data_as(I32P), len(ids), out.ctypes.data_as(F32P)) == OK, \
        lib.qlora_last_error()
    return out


@pytest.mark.parametrize("n", [1, 2])  # one adapter runs as it is; two are combined first
def test_capi_huge_scale_is_refused(model, capi, n):
    lib, h, a, c = capi
    s_max = largest_scale(model, "a")
    assert _set(lib, c, [a], [0.5]) == OK
    before = _forward(lib, h, c, IDS[0])
    for scale in (1e30, -1e30, 1.01 * s_max):
        assert _set(lib, c, [a] * n, [1.0] * (n - 1) + [scale]) == ERR_INVALID_ARGUMENT
        msg = lib.qlora_last_error().decode()
        assert re.search(rf"adapters\[{n - 1}\]: scale {re.escape(f'{scale:.3g}')}: layer \d+ \w+_proj: ", msg), msg
        assert "too large for float32" in msg, msg
        np.testing.assert_array_equal(_forward(lib, h, c, IDS[0]), before)  # the set is kept
    assert _set(lib, c, [a], [-0.99 * s_max]) == OK, lib.qlora_last_error()
    assert np.isfinite(_forward(lib, h, c, IDS[0])).all()
