"""Read and write LoRA adapters in HF PEFT's directory format (adapter_config.json +
adapter_model.safetensors), so adapters move between qlora_native, PEFT, vLLM and LoRAX.

    save_adapter("out/", cfg, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": A, ...})
    cfg, tensors = load_adapter("out/")          # tensors: name -> float32 ndarray

Tensor names and shapes (PEFT strips the adapter name on save):
    base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_B.weight   [out_features, r]
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from . import atomic_io
from . import io as _io
from .lora_config import PROJECTIONS, LoraConfig, peft_tensor_name

__all__ = ["save_adapter", "load_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_BIN_NAME = "adapter_model.bin"

_NAME_RE = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
# Symbolic [out, in] of each projection in a Llama layer: adapters on different projections must
# agree on the shared sizes (hidden, intermediate, q/kv widths).
_DIMS = {"q_proj": ("q", "hidden"), "k_proj": ("kv", "hidden"), "v_proj": ("kv", "hidden"),
         "o_proj": ("hidden", "q"), "gate_proj": ("inter", "hidden"), "up_proj": ("inter", "hidden"),
         "down_proj": ("hidden", "inter")}


def _parse_name(name: str):
    """(layer, projection, "A"|"B") of a canonical PEFT LoRA tensor name, or raise ValueError."""
    m = _NAME_RE.fullmatch(name)
    if m is not None:
        layer, parent, proj, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
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
    for layer, proj, r, _, _ in config.resolve(num_layers):
        for which in "AB":
            expected[peft_tensor_name(layer, proj, which)] = r
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
        if not np.isfinite(arr.astype(np.float32)).all():
            raise ValueError(f"{where}: tensor {name!r} contains NaN or Inf")
        out[name] = arr
    return out


def save_adapter(directory, config: LoraConfig, tensors: dict, base_model_name_or_path=None, *,
                 num_layers=None, module_shapes=None) -> None:
    """Write `directory`/adapter_config.json and adapter_model.safetensors as PEFT does.

    tensors: PEFT name -> array (float32/float16/bfloat16 kept, float64 stored as float32). Every
    projection config.resolve(num_layers) lists must have its A [r, in] and B [out, r]; num_layers
    defaults to the highest layer index in the names + 1. module_shapes {proj: (out, in)} is checked
    when given. The directory is saved as a unit (atomic_io.save_dir): a kill at any point leaves
    the complete old or the complete new adapter; files of other tools in `directory` are kept.
    base_model_name_or_path is recorded in adapter_config.json (PEFT's field) when given.
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(f"save_adapter: config must be a LoraConfig, got {type(config).__name__}")
    if not isinstance(tensors, dict):
        raise ValueError("save_adapter: tensors must be a dict {peft_name: numpy array}")
    config.validate()
    arrays = _check_tensors(config, tensors, num_layers, module_shapes, "save_adapter")
    cfg = config.to_peft_dict()
    if base_model_name_or_path is not None:
        cfg["base_model_name_or_path"] = str(base_model_name_or_path)
    with atomic_io.save_dir(directory) as d:
        _io.save_safetensors(d / WEIGHTS_NAME, arrays, metadata={"format": "pt"})
        atomic_io.write_text(d / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_adapter(directory, *, num_layers=None, module_shapes=None):
    """Read a PEFT LoRA adapter directory: (LoraConfig, {peft_name: float32 ndarray}).

    Names are checked against config.resolve(num_layers) (num_layers defaults to the highest layer
    index found + 1), shapes against the per-module rank and each other (and module_shapes
    {proj: (out, in)} when given). Raises FileNotFoundError for a missing directory/file,
    NotADirectoryError when `directory` is a file, ValueError for unsupported content
    (adapter_model.bin, DoRA, ...), FormatError when corrupt. A save that was killed is first
    finished or rolled back (atomic_io.recover).
    """
    d = Path(directory)
    atomic_io.recover(d)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"load_adapter: {str(d)!r} is a file, not an adapter directory (a PEFT adapter "
                                 f"directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not d.is_dir():
        raise FileNotFoundError(f"load_adapter: adapter directory {str(d)!r} does not exist")
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load_adapter: {str(cfg_path)!r} not found (a PEFT adapter directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    if not w_path.is_file():
        if (d / _BIN_NAME).is_file():
            raise ValueError(f"load_adapter: {str(d / _BIN_NAME)!r} is a torch pickle, which qlora_native does not "
                             f"read; convert it to {WEIGHTS_NAME} (e.g. PeftModel.from_pretrained(base, dir)"
                             f".save_pretrained(dir, safe_serialization=True))")
        raise FileNotFoundError(f"load_adapter: {str(w_path)!r} not found")
    raw = _io.read_json(cfg_path)  # the engine's parser: bounded depth and size, FormatError naming the file
    try:
        config = LoraConfig.from_peft_dict(raw)
    except ValueError as exc:
        raise type(exc)(f"{cfg_path}: {exc}") from None
    f = _io.safe_open(w_path)
    arrays = _check_tensors(config, {k: f[k] for k in f.keys()}, num_layers, module_shapes, f"load_adapter({d})")
    return config, {k: np.array(v, dtype=np.float32) for k, v in arrays.items()}

