"""Finite but huge LoRA factors (e.g. 1e30) used to load silently and give NaN logits: the update
s·B(A x) is multiplied by another one (q·k, gate·up) and squared by the next RMSNorm, which
overflows float32. The engine's one rule (cpp/src/model/lora_check.hpp), applied wherever factors
come in (the PEFT reader of load_adapter and the C API, lora_add, set_adapter_state_dict): for an
input bounded by 1, ||A||, |s|·||B|| and |s|·||B||·||A|| (largest absolute row sums) must be at most
2^32 = FLT_MAX^(1/4); NaN / Inf stay refused as before. Refusals name the file's tensors or the
module."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig
from qlora_native.adapter_io import load_adapter
from qlora_native.lora_config import peft_tensor_name

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_tiny import add_random_adapter, build_tiny  # noqa: E402

IDS = np.array([[5, 6, 7, 8, 9], [3, 4, 5, 6, 7]])
A0 = peft_tensor_name(0, "q_proj", "A")
B0 = peft_tensor_name(0, "q_proj", "B")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = qlora_native.Model.from_pretrained(build_tiny(str(tmp_path_factory.mktemp("tiny"))), tokenizer=None)
    add_random_adapter(m, "a", 1)  # r=4, alpha=8: scaling 2, B not zero
    return m


def _saved_with(m, tmp_path, name, **changes):
    """Adapter "a" saved to tmp_path/name with tensors replaced by `changes` {A0|B0 key: array}."""
    sd = m.get_adapter_state_dict("a")
    m.add_adapter(name, m.adapter_config("a"))
    m.set_adapter_state_dict(name, sd)
    d = tmp_path / name
    m.save_adapter(d, name)
    m.delete_adapter(name)
    if changes:
        from qlora_native.adapter_io import WEIGHTS_NAME
        ts = dict(qlora_native.io.load_safetensors(str(d / WEIGHTS_NAME)))
        ts.update({k: np.asarray(v, np.float32) for k, v in changes.items()})
        qlora_native.io.save_safetensors(str(d / WEIGHTS_NAME), ts)
    return d


def test_huge_factor_in_a_file_is_refused_naming_the_tensor(model, tmp_path):
    A = model.get_adapter_state_dict("a")[A0].copy()
    A[1, 3] = 1e30  # finite: old engines loaded it and returned NaN logits
    d = _saved_with(model, tmp_path, "huge", **{A0: A})
    for load in (lambda: load_adapter(d), lambda: model.load_adapter(d, "huge")):
        with pytest.raises(ValueError, match="too large for float32") as e:
            load()
        assert A0 in str(e.value) and B0 in str(e.value) and "1e+30" in str(e.value)
    assert "huge" not in model.adapters
    # the unchanged adapter still loads and gives finite logits
    ok = _saved_with(model, tmp_path, "ok")
    model.load_adapter(ok, "ok")
    assert np.isfinite(model(IDS, adapter_name="ok")).all()
    model.delete_adapter("ok")


def test_large_but_bounded_factors_load_and_stay_finite(model, tmp_path):
    """1e6 in A with a small B: far above trained values, below the bound; the logits are finite."""
    sd = model.get_adapter_state_dict("a")
    A = sd[A0].copy()
    A[0, 0] = 1e6
    d = _saved_with(model, tmp_path, "big", **{A0: A, B0: sd[B0] * np.float32(1e-3)})
    model.load_adapter(d, "big")
    assert np.isfinite(model(IDS, adapter_name="big")).all()
    model.delete_adapter("big")


def test_bound_is_exact_and_named_on_every_entry(model):
    """scaling 2, one nonzero element per factor: gain 2·b·a. 2^32 exactly is accepted, one ulp of b
    more is refused, by set_adapter_state_dict and by a new adapter made from tensors (lora_add)."""
    sd = model.get_adapter_state_dict("a")
    model.add_adapter("edge", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    A = np.zeros_like(sd[A0])
    B = np.zeros_like(sd[B0])
    A[2, 5] = 2.0 ** 16
    B[7, 2] = 2.0 ** 15
    model.set_adapter_state_dict("edge", {**sd, A0: A, B0: B})
    assert np.isfinite(model(IDS, adapter_name="edge")).all()
    B[7, 2] = np.nextafter(np.float32(2.0 ** 15), np.float32(np.inf))
    with pytest.raises(ValueError, match=r"layer 0 q_proj: .*too large for float32.*scaling \* B \* A"):
        model.set_adapter_state_dict("edge", {**sd, A0: A, B0: B})
    # each factor alone is bounded too: a huge A with B = 0 (PEFT's init) would blow up the first step
    A[2, 5] = 2.0 ** 33
    with pytest.raises(ValueError, match=r"layer 0 q_proj: .*A alone"):
        model.set_adapter_state_dict("edge", {**sd, A0: A, B0: np.zeros_like(B)})
    model.delete_adapter("edge")
    # lora_add (a new adapter from tensors: the GGUF LoRA loader, add_weighted_adapter) names the module
    with pytest.raises(ValueError, match=r"layer 0 q_proj: .*A alone"):
        model._core.lora_add("edge2", [(0, "q_proj", 2.0, A, B)], 0.0, 0)
    assert "edge2" not in model._core.lora_names()
    # NaN keeps its own message
    A = sd[A0].copy()
    A[0, 0] = np.nan
    with pytest.raises(ValueError, match="layer 0 q_proj: LoRA: A contains NaN or Inf"):
        model.set_adapter_state_dict("a", {**sd, A0: A})
    model.set_adapter_state_dict("a", sd)
