"""Read and write LoRA adapters in HF PEFT's directory format (adapter_config.json +
adapter_model.safetensors), so adapters move between qlora_native, PEFT, vLLM and LoRAX.

    save_adapter("out/", cfg, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": A, ...})
    cfg, tensors = load_adapter("out/")          # tensors: name -> float32 ndarray

Tensor names and shapes (PEFT strips the adapter name on save):
    base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_B.weight   [out_features, r]
"""
from __future__ import annotations

import os
import re

import ml_dtypes
import numpy as np

from . import _core
from .lora_config import PROJECTIONS, LoraConfig, matcher, peft_tensor_name, peft_tensors

__all__ = ["save_adapter", "load_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_NAME_RE = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
_ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # safetensors dtype names
# Symbolic [out, in] of each projection in a Llama layer: adapters on different projections must
# agree on the shared sizes (hidden, intermediate, q/kv widths).
_DIMS = {"q_proj": ("q", "hidden"), "k_proj": ("kv", "hidden"), "v_proj": ("kv", "hidden"),
         "o_proj": ("hidden", "q"), "gate_proj": ("inter", "hidden"), "up_proj": ("inter", "hidden"),
         "down_proj": ("hidden", "inter")}


def _parse_name(name: str):
    """(layer, projection, "A"|"B") of a canonical PEFT LoRA tensor name, or raise ValueError."""
    m = _NAME_RE.fullmatch(name)
    if m is not None:
        layer, proj, which = int(m.group(1)), m.group(3), m.group(4)
        if proj in PROJECTIONS and peft_tensor_name(layer, proj, which) == name:
            return layer, proj, which
    if name.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in name:
        raise ValueError(f"adapter tensor {name!r}: DoRA (lora_magnitude_vector) is not supported by qlora_native")
    if "lora_embedding_" in name:
        raise ValueError(f"adapter tensor {name!r}: LoRA on embeddings is not supported (projections only)")
    if ".lora_B.bias" in name or ".lora_A.bias" in name:
        raise ValueError(f"adapter tensor {name!r}: LoRA biases (lora_bias=True) are not supported")
    if "modules_to_save" in name or name.endswith(("lm_head.weight", "embed_tokens.weight")):
        raise ValueError(f"adapter tensor {name!r}: full module weights (modules_to_save) are not supported")
    raise ValueError(f"unexpected adapter tensor {name!r}: expected names like "
                     f"'{peft_tensor_name(0, 'q_proj', 'A')}' (PEFT format, adapter name stripped)")


def _check_tensors(config: LoraConfig, tensors, num_layers, module_shapes, where: str) -> dict:
    """Validate names against config.resolve(), shapes and dtypes; return name -> array."""
    parsed = {}
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"{where}: tensor names must be str, got {name!r}")
        parsed[name] = _parse_name(name)
    if not parsed:
        raise ValueError(f"{where}: the adapter has no LoRA tensors")
    max_layer = max(layer for layer, _, _ in parsed.values())
    if num_layers is None:
        num_layers = max_layer + 1
    elif max_layer >= num_layers:
        raise ValueError(f"{where}: tensor for layer {max_layer} but the model has {num_layers} layers")
    expected = {}
    scalings = {}
    for layer, proj, r, _, scaling in config.resolve(num_layers):
        for which in "AB":
            expected[peft_tensor_name(layer, proj, which)] = r
        scalings[(peft_tensor_name(layer, proj, "A"), peft_tensor_name(layer, proj, "B"))] = scaling
    missing = sorted(set(expected) - set(parsed))
    extra = sorted(set(parsed) - set(expected))
    if extra:
        raise ValueError(f"{where}: {len(extra)} tensor(s) for modules the config does not target "
                         f"(target_modules={config.target_modules!r}), e.g. {extra[0]!r}")
    if missing:
        raise ValueError(f"{where}: {len(missing)} tensor(s) missing for modules the config targets, "
                         f"e.g. {missing[0]!r}")
    dims: dict[str, tuple[int, str]] = {}
    if module_shapes:
        for proj, (out_f, in_f) in module_shapes.items():
            if proj not in _DIMS:
                raise ValueError(f"{where}: module_shapes key {proj!r} is not one of {PROJECTIONS}")
            for sym, v in zip(_DIMS[proj], (out_f, in_f)):
                dims.setdefault(sym, (int(v), f"module_shapes[{proj!r}]"))
    out = {}
    for name in sorted(parsed):
        layer, proj, which = parsed[name]
        arr = np.asarray(tensors[name])
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        if arr.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: tensor {name!r} has dtype {arr.dtype}; expected float32, float16 or bfloat16")
        r = expected[name]
        if arr.ndim != 2 or (arr.shape[0] if which == "A" else arr.shape[1]) != r or 0 in arr.shape:
            want = f"[{r}, in_features]" if which == "A" else f"[out_features, {r}]"
            raise ValueError(f"{where}: tensor {name!r} has shape {list(arr.shape)}, expected {want} (r={r})")
        sym_out, sym_in = _DIMS[proj]
        pairs = ((sym_in, arr.shape[1]),) if which == "A" else ((sym_out, arr.shape[0]),)
        for sym, v in pairs:
            seen = dims.setdefault(sym, (int(v), name))
            if seen[0] != v:
                raise ValueError(f"{where}: tensor {name!r} has shape {list(arr.shape)}, inconsistent with "
                                 f"{seen[1]!r} ({sym} size {seen[0]})")
        out[name] = arr
    # The rule loading applies (cpp/src/model/lora_check.hpp, called, not copied: NaN / Inf and the
    # 2^32 magnitude bound): a file loading would refuse is never written.
    for (a, b), scaling in scalings.items():
        _core.io.check_lora_factors(out[a].astype(np.float32), out[b].astype(np.float32), scaling, where,
                                    f"tensor {a!r}", f"tensor {b!r}")
    return out


def save_adapter(directory, config: LoraConfig, tensors: dict, base_model_name_or_path=None, *,
                 num_layers=None, module_shapes=None) -> None:
    """Write `directory`/adapter_config.json and adapter_model.safetensors as PEFT does.

    tensors: PEFT name -> array (float32/float16/bfloat16 kept, float64 stored as float32). Every
    projection config.resolve(num_layers) lists must have its A [r, in] and B [out, r]; num_layers
    defaults to the highest layer index in the names + 1. module_shapes {proj: (out, in)} is checked
    when given. Factors loading would refuse (NaN / Inf, or beyond the magnitude bound of
    cpp/src/model/lora_check.hpp) raise ValueError before anything is written. The engine's writer
    (cpp/src/io/adapter_write.cpp, the C API's qlora_adapter_save) saves the directory as a unit: a kill at any point leaves the complete old or the complete new
    adapter; files of other tools in `directory` are kept.
    base_model_name_or_path is recorded in adapter_config.json (PEFT's field) when given.
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(f"save_adapter: config must be a LoraConfig, got {type(config).__name__}")
    if not isinstance(tensors, dict):
        raise ValueError("save_adapter: tensors must be a dict {peft_name: numpy array}")
    config.validate()
    arrays = _check_tensors(config, tensors, num_layers, module_shapes, "save_adapter")
    cfg = config.peft_config_json(base_model_name_or_path)  # the engine's builder (the C API's too)
    items = []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))  # 2-D: no 0-d pitfall
        items.append((name, _ST_DTYPE[arr.dtype.name], tuple(int(d) for d in arr.shape), arr.reshape(-1).view(np.uint8)))
    # The engine's writer (the C API's qlora_adapter_save): staging, fsync and commit live there.
    _core.io.write_peft_adapter(directory, items, cfg)


def load_adapter(directory, *, num_layers=None, module_shapes=None):
    """Read a PEFT LoRA adapter directory: (LoraConfig, {peft_name: float32 ndarray}).

    The engine's reader does the work (cpp/src/api/peft_adapter.cpp, the one qlora_adapter_load
    uses): names are checked against the config's targets for num_layers layers (default: the
    highest layer index found + 1), shapes against the per-module rank and each other (and
    module_shapes {proj: (out, in)} when given). Regexes in the config are matched by
    lora_config's time-bounded matcher. Raises FileNotFoundError for a missing directory/file,
    NotADirectoryError when `directory` is a file, ValueError for unsupported content
    (adapter_model.bin, DoRA, ...), FormatError when corrupt. A save that was killed is first
    finished or rolled back.
    """
    config, mods = _read(directory, num_layers, module_shapes, "load_adapter")
    return config, peft_tensors((layer, proj, a, b) for layer, proj, _r, _scaling, a, b in mods)


def _read(directory, num_layers, module_shapes, api):
    """(LoraConfig, [(layer, proj, r, scaling, A, B)]) from the engine's PEFT reader."""
    if num_layers is not None and (not isinstance(num_layers, int) or isinstance(num_layers, bool)
                                   or num_layers <= 0):
        raise ValueError(f"{api}: num_layers must be a positive int, got {num_layers!r}")
    shapes = {}
    for proj, shape in (module_shapes or {}).items():
        try:
            out_f, in_f = (int(v) for v in shape)
        except (TypeError, ValueError):
            raise ValueError(f"{api}: module_shapes[{proj!r}] must be (out_features, in_features), "
                             f"got {shape!r}") from None
        shapes[str(proj)] = (out_f, in_f)
    raw, mods = _core.io.read_peft_adapter(directory, num_layers or 0, shapes, matcher(), api)
    try:  # the Python object of the config the engine accepted (warns about unknown keys)
        config = LoraConfig.from_peft_dict(raw)
    except ValueError as exc:
        raise type(exc)(f"{os.path.join(os.fspath(directory), CONFIG_NAME)}: {exc}") from None
    return config, mods
