"""LoRA training through the C API (qlora_adapter_add / qlora_train_configure / qlora_train_step /
qlora_adapter_save) via ctypes on _core: the saved PEFT directory loads into qlora_native.Model
(load_adapter) and gives the C model's logits; the C model's first loss equals Python's eval_loss."""
import ctypes

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qlora_native  # noqa: E402

from helpers_model import make_checkpoint  # noqa: E402
from test_model import EPS32, rel_err  # noqa: E402
from helpers_capi import ERR_INVALID_ARGUMENT, LORA_DOWN, LORA_Q, LORA_V, OK, QUANT_NF4, CModel, LoraParams  # noqa: E402

I32P, F32P = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float)
Q, V_, DOWN = LORA_Q, LORA_V, LORA_DOWN


def _setup(lib):
    lib.qlora_lora_default_params.restype = LoraParams
    lib.qlora_adapter_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(LoraParams)]
    lib.qlora_train_configure.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_float]
    lib.qlora_train_step.argtypes = [ctypes.c_void_p, I32P, I32P, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                     ctypes.c_float, F32P]
    lib.qlora_adapter_save.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


def _check(lib, rc):
    if rc != OK:
        raise RuntimeError(rc, lib.qlora_last_error().decode())


@pytest.mark.parametrize("use_rslora", [False, True])
def test_train_save_load_matches(lib, tmp_path, rng, use_rslora):
    _setup(lib)
    path, cfg, _ = make_checkpoint(tmp_path, rng, hidden=64, inter=128, heads=4, kv_heads=2, vocab=100)
    ids = rng.integers(0, cfg["vocab_size"], size=(2, 12)).astype(np.int32)  # [B, T]
    labels = ids.copy()
    labels[0, 5] = -100
    py = qlora_native.Model.from_pretrained(path, quantize="nf4", tokenizer=None)
    m = CModel(lib, path, QUANT_NF4)
    try:
        p = lib.qlora_lora_default_params()
        p.r, p.alpha, p.use_rslora, p.target_mask = 4, 8.0, int(use_rslora), Q | V_ | DOWN
        p.seed = int(rng.integers(0, 2**63))
        _check(lib, lib.qlora_adapter_add(m.h, b"ft", ctypes.byref(p)))
        _check(lib, lib.qlora_train_configure(m.h, 1e-2, 0.0))
        losses = []
        for _ in range(6):
            loss = ctypes.c_float(np.nan)
            _check(lib, lib.qlora_train_step(m.h, ids.ctypes.data_as(I32P), labels.ctypes.data_as(I32P), 2, 12,
                                             -1.0, 1.0, ctypes.byref(loss)))
            losses.append(loss.value)
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
        # B = 0 before the first step: its loss is the base model's (Python engine, same weights).
        loss_sum, count = py.eval_loss(ids, labels)
        assert abs(losses[0] - loss_sum / count) <= 1e-5 * abs(losses[0]), (losses[0], loss_sum / count)
        bad = labels.copy()
        bad[1, 3] = cfg["vocab_size"]
        rc = lib.qlora_train_step(m.h, ids.ctypes.data_as(I32P), bad.ctypes.data_as(I32P), 2, 12, -1.0, 1.0, None)
        assert rc == ERR_INVALID_ARGUMENT and b"out of range" in lib.qlora_last_error()

        out = tmp_path / "adapter"
        _check(lib, lib.qlora_adapter_save(m.h, str(out).encode()))
        base = py(ids[:1])[0]
        py.load_adapter(out, "ft")
        assert py.active_adapter == "ft"
        ours, theirs = m.forward(ids[0]), py(ids[:1])[0]
        assert rel_err(ours, theirs) <= 4 * EPS32, rel_err(ours, theirs)
        assert rel_err(ours, base) > 1e-3  # the trained adapter matters
    finally:
        m.close()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_python_and_c_adapters_are_one_init(lib, tmp_path, rng, use_rslora):
    """add_adapter(seed=s) and qlora_adapter_add(seed=s) run the one init (lora_setup.cpp
    init_lora_factors) and the one scaling rule: the same A (bit for bit), B = 0, and the same logits
    after the same B is set."""
    _setup(lib)
    path, cfg, _ = make_checkpoint(tmp_path, rng, hidden=64, inter=128, heads=4, kv_heads=2, vocab=100)
    seed = int(rng.integers(0, 2**63))
    m = CModel(lib, path)
    try:
        p = lib.qlora_lora_default_params()
        p.r, p.alpha, p.use_rslora, p.target_mask, p.seed = 3, 7.0, int(use_rslora), Q | V_ | DOWN, seed
        _check(lib, lib.qlora_adapter_add(m.h, b"c", ctypes.byref(p)))
        _check(lib, lib.qlora_adapter_save(m.h, str(tmp_path / "c").encode()))
    finally:
        m.close()
    py = qlora_native.Model.from_pretrained(path, quantize=None, tokenizer=None)
    py.add_adapter("p", qlora_native.LoraConfig(r=3, lora_alpha=7, use_rslora=use_rslora, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj", "down_proj"]), seed=seed)
    py.load_adapter(tmp_path / "c", "c")
    ours, theirs = py.get_adapter_state_dict("p"), py.get_adapter_state_dict("c")
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 3 * cfg["num_hidden_layers"]
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
        assert k.endswith("lora_A.weight") or not ours[k].any()
    b = {k: rng.standard_normal(v.shape).astype(np.float32) if k.endswith("lora_B.weight") else v
         for k, v in ours.items()}
    py.set_adapter_state_dict("p", b)
    py.set_adapter_state_dict("c", b)
    ids = rng.integers(0, cfg["vocab_size"], size=(1, 7))
    np.testing.assert_array_equal(py(ids, adapter_name="p"), py(ids, adapter_name="c"))
