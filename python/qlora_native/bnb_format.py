"""bitsandbytes 4-bit checkpoints as transformers saves them (shared/reference/nf4-format.md).

A quantized module P stores, next to the packed nibbles `P.weight` (uint8 [(n+1)//2, 1]):
`P.weight.absmax`, `P.weight.quant_map`, `P.weight.nested_absmax`, `P.weight.nested_quant_map`
and `P.weight.quant_state.bitsandbytes__nf4` (the JSON quant state as uint8). config.json
carries a `quantization_config` with quant_method "bitsandbytes" and load_in_4bit.

This module writes that format (export.py, save_pretrained); reading it is the engine's
(cpp/src/model/hf_loader.cpp, behind Model.from_pretrained and qlora_model_load).
"""
from __future__ import annotations

import numpy as np

from .nf4 import NF4Tensor, nf4_codes, pack_quant_state

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def quantization_config(double_quant: bool = True, compute_dtype: str = "float32") -> dict:
    """The `quantization_config` block transformers writes for an NF4 model."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
    }


def nf4_tensors(weight_name: str, t: NF4Tensor) -> dict[str, np.ndarray]:
    """The arrays transformers saves for a 4-bit weight `weight_name` ("P.weight")."""
    out = {
        weight_name: np.ascontiguousarray(t.packed).reshape(-1, 1),
        f"{weight_name}.absmax": np.ascontiguousarray(t.absmax),
        f"{weight_name}.quant_map": nf4_codes().astype(np.float32),
        f"{weight_name}.{QUANT_STATE_KEY}": pack_quant_state(t.quant_state()),
    }
    if t.double_quant:
        out[f"{weight_name}.nested_absmax"] = np.ascontiguousarray(t.nested_absmax)
        out[f"{weight_name}.nested_quant_map"] = np.ascontiguousarray(t.nested_map, dtype=np.float32)
    return out
