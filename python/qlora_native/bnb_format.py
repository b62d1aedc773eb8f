"""bitsandbytes 4-bit checkpoints as transformers saves them (shared/reference/nf4-format.md).

A quantized module P stores, next to the packed nibbles `P.weight` (uint8 [(n+1)//2, 1]):
`P.weight.absmax`, `P.weight.quant_map`, `P.weight.nested_absmax`, `P.weight.nested_quant_map`
and `P.weight.quant_state.bitsandbytes__nf4` (the JSON quant state as uint8). config.json
carries a `quantization_config` with quant_method "bitsandbytes" and load_in_4bit.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from . import _core
from .nf4 import NF4Tensor, nf4_codes, pack_quant_state

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
# Keys stored beside `P.weight` for a 4-bit module.
AUX_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_KEY,
                "quant_state.bitsandbytes__fp4")


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


def is_prequantized(config: Mapping) -> bool:
    """True when config.json describes a pre-quantized bitsandbytes checkpoint; raises
    ValueError for quantizations we cannot load (8-bit, fp4, other methods) and for fields of the
    wrong JSON type (the C API loader, hf_loader.cpp, applies the same rules)."""
    qc = config.get("quantization_config")
    if qc is None:
        return False
    if not isinstance(qc, Mapping):
        raise ValueError(f"config: quantization_config must be an object, got {qc!r}")
    if not qc:
        return False
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"unsupported quantization_config.quant_method {method!r} (only bitsandbytes NF4 4-bit)")

    def flag(key):
        v = qc.get(key)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"config: quantization_config.{key} must be true or false, got {v!r}")
        return bool(v)

    if flag("load_in_8bit") or flag("_load_in_8bit"):
        raise ValueError("bitsandbytes 8-bit checkpoints are not supported (only NF4 4-bit)")
    if not (flag("load_in_4bit") or flag("_load_in_4bit")):
        raise ValueError("quantization_config is bitsandbytes but neither 4-bit nor 8-bit")
    kind = qc.get("bnb_4bit_quant_type", "fp4")
    if kind != "nf4":
        raise ValueError(f"bitsandbytes 4-bit quant type {kind!r} is not supported (only 'nf4')")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise ValueError(f"bnb_4bit_quant_storage {storage!r} is not supported (only 'uint8')")
    return True


def is_aux_key(name: str) -> bool:
    """True for the quant-constant keys stored beside a 4-bit `P.weight`."""
    return any(name.endswith(".weight." + s) for s in AUX_SUFFIXES)


def quantized_weights(names) -> set[str]:
    """The `P.weight` names that are stored 4-bit (they have a quant-state key)."""
    suffix = ".weight." + QUANT_STATE_KEY
    out = set()
    for n in names:
        if n.endswith(".weight.quant_state.bitsandbytes__fp4"):
            raise ValueError(f"{n}: fp4 weights are not supported (only nf4)")
        if n.endswith(suffix):
            out.add(n[: -len(QUANT_STATE_KEY) - 1])
    return out


def read_nf4(get: Callable[[str], np.ndarray], has: Callable[[str], bool], weight_name: str) -> NF4Tensor:
    """Builds the NF4Tensor of `weight_name` ("P.weight") from a checkpoint's arrays."""
    try:
        state = get(f"{weight_name}.{QUANT_STATE_KEY}")
        state = _parse_quant_state(state)
        quant_map = get(f"{weight_name}.quant_map") if has(f"{weight_name}.quant_map") else None
        if quant_map is not None and not np.array_equal(np.asarray(quant_map, np.float32), nf4_codes()):
            raise ValueError("quant_map is not the NF4 code table")
        nested = has(f"{weight_name}.nested_absmax")
        return NF4Tensor.from_quant_state(
            state,
            get(weight_name),
            get(f"{weight_name}.absmax"),
            nested_absmax=get(f"{weight_name}.nested_absmax") if nested else None,
            nested_map=get(f"{weight_name}.nested_quant_map") if has(f"{weight_name}.nested_quant_map") else None,
        )
    except KeyError as e:
        raise ValueError(f"{weight_name}: 4-bit weight lacks {e}") from None
    except ValueError as e:
        raise ValueError(f"{weight_name}: {e}") from None


def _parse_quant_state(state) -> dict:
    """The JSON quant state (uint8 array from the checkpoint) parsed by the engine's parser, as
    the C API loader does: bounded nesting (Python's json raises RecursionError), duplicate keys
    and non-UTF-8 refused."""
    if isinstance(state, np.ndarray):
        if state.dtype != np.uint8:
            raise ValueError(f"quant state array must be uint8, got {state.dtype}")
        state = state.tobytes()
    try:
        d = _core.io.json_loads(bytes(state), 512, False)
    except ValueError as e:
        raise ValueError(f"malformed bitsandbytes quant state: {e}") from None
    if not isinstance(d, dict):
        raise ValueError("malformed bitsandbytes quant state: not a JSON object")
    return d


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
