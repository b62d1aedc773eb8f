"""Saving a loaded model as an HF checkpoint: NF4 projections in the bitsandbytes 4-bit layout
(transformers + bitsandbytes load it; qlora_native reloads it without re-quantizing), every
other tensor in float32 (the precision the engine holds it in)."""
from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np

from . import atomic_io, io
from .bnb_format import nf4_tensors, quantization_config
from .nf4 import NF4Tensor
from .tokenizer import TOKENIZER_FILES

# Keys of config.json that describe the source file, not the model saved here.
_DROP_KEYS = {"quantization_config", "torch_dtype", "dtype", "_name_or_path"}


_DTYPES = {"float32": np.float32, "float16": np.float16}

# Files of an earlier checkpoint in the target directory that would shadow or contradict the new
# model.safetensors (loaders prefer the index): removed by the save.
_OBSOLETE = ("model.safetensors.index.json", re.compile(r"model-\d+-of-\d+\.safetensors"))


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {name!r}")
    return _DTYPES[name]


def hf_config(model, dtype: str = "float32") -> dict:
    """config.json for the saved checkpoint (GGUF-loaded models get a complete HF config too)."""
    cfg = {k: v for k, v in model.config.raw.items() if k not in _DROP_KEYS}
    cfg.setdefault("model_type", "qwen2" if model.config.arch == "qwen2" else
                   "mistral" if model.config.arch == "mistral" else "llama")
    cfg["torch_dtype"] = dtype
    first = model._core.linear_nf4("model.layers.0.self_attn.q_proj")  # all projections share the spec
    if first is not None:
        cfg["quantization_config"] = quantization_config(first["double_quant"], compute_dtype="float32")
    return cfg


def state_tensors(model, dtype: str = "float32") -> dict[str, np.ndarray]:
    """HF name -> array for every tensor of the model; NF4 projections expand to their bnb keys,
    the others are cast to `dtype`."""
    cast = _np_dtype(dtype)
    core = model._core
    out: dict[str, np.ndarray] = {}
    for name, shape in core.expected_tensors():
        shape = tuple(shape)
        if name.endswith("_proj.weight"):
            w = core.linear_nf4(name[: -len(".weight")])
            if w is not None:
                out.update(nf4_tensors(name, NF4Tensor.from_engine(w)))
                continue
        out[name] = core.get_tensor(name).reshape(shape).astype(cast, copy=False)
    return out


def save_pretrained(model, path: str | os.PathLike, dtype: str = "float32", *, _stacklevel: int = 2) -> None:
    """Writes config.json + model.safetensors (+ the tokenizer's files) into directory `path`,
    saved as a unit (atomic_io.save_dir): a kill at any point leaves the complete old or the
    complete new checkpoint; other files in `path` are kept, except a stale sharded index and its
    shards (they would shadow the new weights).
    dtype: storage of the non-quantized tensors (embeddings, norms, lm_head, biases).
    Writes the base model only: an active LoRA adapter is not included (a UserWarning says so;
    save it with model.save_adapter)."""
    tensors = state_tensors(model, dtype)  # validates dtype before anything is written
    cfg = hf_config(model, dtype)
    active = getattr(model, "active_adapter", None)
    if active is not None:
        warnings.warn(f"save_pretrained writes the base model only: the active LoRA adapter {active!r} is not "
                      f"included (reloading gives the base model). Save it with model.save_adapter(dir, "
                      f"{active!r}) and load it with model.load_adapter(dir).", UserWarning, stacklevel=_stacklevel)
    tok = model.tokenizer if hasattr(model.tokenizer, "save_pretrained") else None
    obsolete = _OBSOLETE
    if tok is not None:
        # A stale chat_template.jinja / added_tokens.json would shadow the new tokenizer's files.
        obsolete += TOKENIZER_FILES
        eos = sorted(int(i) for i in getattr(tok, "eos_token_ids", ()))
        if len(eos) > 1:  # GGUF eot/eom ids (e.g. <|eot_id|>): config.json is where loaders find them
            cfg["eos_token_id"] = eos
    with atomic_io.save_dir(path, obsolete=obsolete) as d:
        io.save_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
        atomic_io.write_text(d / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tok is not None:
            tok.save_pretrained(os.fspath(d))
