"""One adapter_config.json builder (cpp/src/model/peft_config.cpp) for both faces: Python's
save_adapter / LoraConfig.peft_config_json write byte for byte what the former Python dict builder
wrote, and the C API's qlora_adapter_save writes the same full PEFT config as a Python save of the
same settings (before, the C API wrote 8 of PEFT's fields); PEFT loads the C API's adapter."""
import ctypes
import json

import numpy as np
import pytest

import qlora_native
from qlora_native.adapter_io import load_adapter, save_adapter
from qlora_native.lora_config import LoraConfig

from helpers_model import make_checkpoint
from helpers_capi import CModel
from test_capi_train import DOWN, Q, V_, _check, _setup


def _old_peft_dict(c):  # the Python builder as it was (lora_config.py to_peft_dict before issue 12)
    t = c.target_modules
    t = sorted(["q_proj", "v_proj"]) if t is None else (t if isinstance(t, str) else sorted(t))
    ex = c.exclude_modules
    num = lambda v: int(v) if isinstance(v, (int, np.integer)) else float(v)  # noqa: E731
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": c.base_model_name_or_path,
            "inference_mode": True, "r": int(c.r), "lora_alpha": num(c.lora_alpha),
            "lora_dropout": float(c.lora_dropout), "target_modules": t,
            "exclude_modules": ex if (ex is None or isinstance(ex, str)) else sorted(ex),
            "use_rslora": bool(c.use_rslora), "init_lora_weights": c.init_lora_weights,
            "rank_pattern": {k: int(v) for k, v in c.rank_pattern.items()},
            "alpha_pattern": {k: num(v) for k, v in c.alpha_pattern.items()},
            "layers_to_transform": c.layers_to_transform, "layers_pattern": c.layers_pattern, "bias": "none",
            "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False, "lora_bias": False,
            "revision": None, "auto_mapping": None}


CONFIGS = [
    dict(),
    dict(target_modules=r".*\.(q|v)_proj", lora_alpha=3, lora_dropout=0.3),
    dict(r=4, lora_alpha=32.0, lora_dropout=0.05, target_modules=["v_proj", "q_proj", "down_proj"], use_rslora=True),
    dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["up_proj", "q_proj", "v_proj"],
         init_lora_weights="gaussian", rank_pattern={"q_proj": 4, "a": 2}, alpha_pattern={"v_proj": 7.5, "b": 3},
         layers_to_transform=[0, 1], layers_pattern="layers", base_model_name_or_path="Ünï/mödel\x7f\t😀\"\\"),
    dict(r=2, lora_alpha=1e-5, lora_dropout=0.0, exclude_modules=["o_proj", "k_proj"], init_lora_weights=False,
         layers_to_transform=1, layers_pattern="layers"),
    dict(r=5, lora_alpha=1e17, lora_dropout=0.123456789, exclude_modules=r"gate.*", init_lora_weights=True),
]


def _tensors(cfg, rng, num_layers=2, width=8):
    out = {}
    for layer, proj, r, _, scaling in cfg.resolve(num_layers):
        parent = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        base = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
        out[base + ".lora_A.weight"] = rng.standard_normal((r, width)).astype(np.float32)
        # B / scaling: save_adapter refuses factors load would (lora_alpha=1e17 gives scaling 2e16)
        out[base + ".lora_B.weight"] = (rng.standard_normal((width, r)) / max(1.0, abs(scaling))).astype(np.float32)
    return out


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_python_config_text_unchanged(i, rng, tmp_path):
    cfg = LoraConfig(**CONFIGS[i])
    want = json.dumps(_old_peft_dict(cfg), indent=2, sort_keys=True) + "\n"
    assert cfg.peft_config_json() == want
    assert cfg.to_peft_dict() == _old_peft_dict(cfg)
    save_adapter(tmp_path, cfg, _tensors(cfg, rng), num_layers=2)
    assert (tmp_path / "adapter_config.json").read_bytes() == want.encode()
    save_adapter(tmp_path, cfg, _tensors(cfg, rng), base_model_name_or_path=tmp_path / "b", num_layers=2)
    old = _old_peft_dict(cfg)
    old["base_model_name_or_path"] = str(tmp_path / "b")
    assert (tmp_path / "adapter_config.json").read_text() == json.dumps(old, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("fields, word", [
    ({"bogus": 1}, "bogus"), ({"r": "4"}, "r"), ({"r": 0}, "r"), ({"target_modules": [1]}, "target_modules"),
    ({"rank_pattern": {"q": 1.5}}, "rank_pattern"), ({"lora_alpha": None}, "lora_alpha"), ([], "object")])
def test_builder_rejects_bad_fields(fields, word):
    with pytest.raises(ValueError, match=word):
        qlora_native._core.io.peft_config_json(fields)


def test_c_api_and_python_write_one_config(lib, tmp_path, rng):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    _setup(lib)
    path, hf, _ = make_checkpoint(tmp_path, rng, hidden=64, inter=128, heads=4, kv_heads=2, vocab=100)
    m = CModel(lib, path)
    try:
        p = lib.qlora_lora_default_params()
        p.r, p.alpha, p.dropout, p.use_rslora, p.target_mask = 3, 7.0, 0.05, 1, Q | V_ | DOWN
        p.seed = 5
        _check(lib, lib.qlora_adapter_add(m.h, b"c", ctypes.byref(p)))
        _check(lib, lib.qlora_adapter_save(m.h, str(tmp_path / "c").encode()))
    finally:
        m.close()
    c_text = (tmp_path / "c" / "adapter_config.json").read_text()
    _, tensors = load_adapter(tmp_path / "c")
    cfg = LoraConfig(r=3, lora_alpha=7.0, lora_dropout=0.05, use_rslora=True,
                     target_modules=["q_proj", "v_proj", "down_proj"])
    save_adapter(tmp_path / "p", cfg, tensors)
    py_text = (tmp_path / "p" / "adapter_config.json").read_text()
    assert json.loads(c_text) == json.loads(py_text)
    assert c_text == py_text  # same builder, same settings: same bytes (0.05f written 0.05)
    # PEFT loads the C API's adapter: config fields and weights.
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "c")
    pc = pm.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.lora_dropout, pc.use_rslora) == (3, 7.0, 0.05, True)
    assert set(pc.target_modules) == {"q_proj", "v_proj", "down_proj"}
    got = {k.replace(".default", ""): v.detach().numpy() for k, v in pm.state_dict().items() if "lora_" in k}
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
