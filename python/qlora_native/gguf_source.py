"""Llama-architecture GGUF files (llama.cpp) as a source of HF-named weights and an HF config.

Weights come out one tensor at a time, dequantized to float32 by the `gguf` package, renamed to
the Hugging Face Llama names and, for attn_q / attn_k, with llama.cpp's row permutation undone
(GGML's interleaved RoPE layout back to HF's rotate-half layout), so the model code sees exactly
what an HF checkpoint would give.
"""
from __future__ import annotations

import math
import os
import re
from typing import Iterator

import numpy as np

from ._core import FormatError
from .gguf_check import FLOAT_TYPES, INT_TYPES, STRING

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensor types whose dequantization is supported (the gguf package implements them in numpy).
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
# llama.cpp GGUF architectures that are the Llama network (Mistral GGUFs say "llama" too).
_LLAMA_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Types the gguf package's reader exposes as numbers rather than bytes.
_FLOAT_VIEWS = {"F32": np.float32, "F16": np.float16}
_REQUIRED = object()
# Sane limits for the config fields, far above any real model: a larger number in a file is
# corruption, and the engine would size allocations by it.
_MAX_HIDDEN = 1 << 17
_MAX_HEADS = 1 << 12
_MAX_HEAD_DIM = 1 << 12
_MAX_LAYERS = 1 << 12
_MAX_VOCAB = 1 << 24
_MAX_CONTEXT = 1 << 24


class GGUFSource:
    """An open GGUF file: `.config` (an HF-style config dict) and `.tensors()` (HF names, float32).

    The file's structure is validated first (gguf_check.check_gguf: every count, length and
    offset bounded by the file size); the tensors are then views of a read-only memory map at the
    validated offsets, so nothing here trusts an unchecked number from the file."""

    def __init__(self, path: str | os.PathLike):
        from .gguf_check import check_gguf

        self.layout = check_gguf(path)
        self.path = self.layout.path
        if self.layout.byte_order != "<":
            # the gguf package's dequantizers read quantized blocks in little-endian order only
            raise ValueError(f"{self.path}: big-endian GGUF files are not supported")
        self.config = self._read_config()
        from gguf.constants import GGMLQuantizationType

        for t in self.layout.tensors:  # refused before the engine allocates anything
            kind = GGMLQuantizationType(t.ggml_type).name
            if kind not in SUPPORTED_TYPES and self._hf_name(t.name):
                raise ValueError(f"{self.path}: tensor {t.name} has unsupported GGUF type {kind}")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        if self._map.size != self.layout.size:  # the validated offsets are only valid for that file
            raise FormatError(f"{self.path}: the file changed while it was being loaded")

    # ---------------------------------------------------------------- metadata
    def _value(self, key: str, kinds, what: str, default):
        v = self.layout.kv.get(key)
        if v is None:
            if default is _REQUIRED:
                raise FormatError(f"{self.path}: GGUF metadata {key} is missing")
            return default
        if v.type not in kinds:
            raise FormatError(f"{self.path}: GGUF metadata {key} must be {what}, got {v.type_name} {v.value!r}")
        return v.value

    def _int(self, key: str, default=_REQUIRED, hi: int = 1 << 24, lo: int = 1):
        """An integer-typed field within [lo, hi] (a float such as 4.5 is refused, not truncated)."""
        v = self._value(key, INT_TYPES, "an integer", default)
        if v is not default and not lo <= v <= hi:
            raise FormatError(f"{self.path}: GGUF metadata {key} = {v} is outside [{lo}, {hi}]")
        return v

    def _float(self, key: str, default=_REQUIRED) -> float:
        """A positive, finite number (float- or integer-typed)."""
        v = self._value(key, FLOAT_TYPES | INT_TYPES, "a number", default)
        if v is not default and not (math.isfinite(v) and v > 0):
            raise FormatError(f"{self.path}: GGUF metadata {key} = {v} must be a positive finite number")
        return float(v)

    def _str(self, key: str, default=_REQUIRED):
        return self._value(key, {STRING}, "a string", default)

    def _token_id(self, key: str, n_vocab: int):
        v = self._value(key, INT_TYPES, "an integer", None)
        if v is None or v in (-1, 0xFFFFFFFF):  # llama.cpp's "none"
            return None
        if not 0 <= v < n_vocab:
            raise FormatError(f"{self.path}: GGUF metadata {key} = {v} is outside the vocabulary of {n_vocab} tokens")
        return v

    def _read_config(self) -> dict:
        arch = self._str("general.architecture")
        if arch not in _LLAMA_ARCHS:
            raise ValueError(
                f"{self.path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(sorted(_LLAMA_ARCHS))})"
            )
        a = arch
        n_head = self._int(f"{a}.attention.head_count", hi=_MAX_HEADS)
        hidden = self._int(f"{a}.embedding_length", hi=_MAX_HIDDEN)
        n_kv = self._int(f"{a}.attention.head_count_kv", n_head, hi=n_head)
        if n_head % n_kv:
            raise FormatError(f"{self.path}: GGUF metadata {a}.attention.head_count = {n_head} is not a multiple "
                              f"of {a}.attention.head_count_kv = {n_kv}")
        names = {t.name for t in self.layout.tensors}
        n_vocab = self._int(f"{a}.vocab_size", None, hi=_MAX_VOCAB)
        if n_vocab is None:
            toks = self.layout.kv.get("tokenizer.ggml.tokens")
            if toks is None or toks.type_name != "ARRAY[STRING]" or toks.count == 0:
                raise FormatError(f"{self.path}: GGUF metadata has neither {a}.vocab_size nor tokenizer.ggml.tokens")
            n_vocab = toks.count
        head_dim = self._int(f"{a}.attention.key_length", None, hi=_MAX_HEAD_DIM)
        if head_dim is None:
            head_dim = self._int(f"{a}.rope.dimension_count", None, hi=_MAX_HEAD_DIM)
        if head_dim is None:
            if hidden % n_head:
                raise FormatError(f"{self.path}: GGUF metadata {a}.embedding_length = {hidden} is not a multiple of "
                                  f"{a}.attention.head_count = {n_head} (and there is no {a}.attention.key_length)")
            head_dim = hidden // n_head
        cfg = {
            "architectures": [_LLAMA_ARCHS[arch]],
            "model_type": "llama" if arch == "llama" else arch,
            "vocab_size": n_vocab,
            "hidden_size": hidden,
            "intermediate_size": self._int(f"{a}.feed_forward_length", hi=_MAX_HIDDEN * 64),
            "num_hidden_layers": self._int(f"{a}.block_count", hi=_MAX_LAYERS),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "rms_norm_eps": self._float(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._float(f"{a}.rope.freq_base", 10000.0),
            "max_position_embeddings": self._int(f"{a}.context_length", 2048, hi=_MAX_CONTEXT),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
            "attention_bias": "blk.0.attn_q.bias" in names,
            "bos_token_id": self._token_id("tokenizer.ggml.bos_token_id", n_vocab),
            "eos_token_id": self._token_id("tokenizer.ggml.eos_token_id", n_vocab),
        }
        scaling = self._str(f"{a}.rope.scaling.type", None)
        if scaling and scaling != "none":
            if scaling != "linear":
                raise ValueError(f"{self.path}: unsupported GGUF rope scaling type {scaling!r}")
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": self._float(f"{a}.rope.scaling.factor")}
        if "rope_freqs.weight" in names:
            # Llama 3.1 GGUFs carry precomputed llama3 frequency factors instead of the parameters.
            raise ValueError(f"{self.path}: GGUF rope_freqs (llama3 rope scaling) is not supported yet")
        return cfg

    # ---------------------------------------------------------------- tensors
    def tensor_names(self) -> list[str]:
        return [hf for hf in (self._hf_name(t.name) for t in self.layout.tensors) if hf]

    def tensor_shapes(self) -> dict[str, tuple]:
        """HF name -> shape in HF order ([out, in]), as stored."""
        return {hf: tuple(reversed(t.dims)) for t in self.layout.tensors if (hf := self._hf_name(t.name))}

    def _hf_name(self, name: str) -> str | None:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m and m.group(2) in _LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        if name == "rope_freqs.weight":
            return None
        raise ValueError(f"{self.path}: unexpected GGUF tensor {name!r} for a llama-architecture model")

    def _data(self, t) -> tuple[np.ndarray, object]:
        """(numpy view of a tensor's bytes, GGMLQuantizationType), shaped as the gguf package's
        reader shapes it: float types as floats, quantized types as rows of bytes."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        kind = GGMLQuantizationType(t.ggml_type)
        if kind.name not in SUPPORTED_TYPES:
            raise ValueError(f"{self.path}: tensor {t.name} has unsupported GGUF type {kind.name}")
        raw = self._map[t.offset : t.offset + t.n_bytes]
        shape = tuple(reversed(t.dims))
        if kind.name in _FLOAT_VIEWS:
            return raw.view(_FLOAT_VIEWS[kind.name]).reshape(shape), kind
        return raw.reshape(quant_shape_to_byte_shape(shape, kind)), kind

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (hf_name, float32 array in HF layout), one tensor dequantized at a time; the
        embedding and lm_head come as RowSlabs (see SLAB_TENSORS)."""
        from gguf.quants import dequantize

        cfg = self.config
        for t in self.layout.tensors:
            hf = self._hf_name(t.name)
            if hf is None:
                continue
            data, kind = self._data(t)
            # GGUF lists dims fastest-first; the numpy data is already [out, in] (or [n]).
            expected = tuple(reversed(t.dims))
            if hf in SLAB_TENSORS and len(expected) == 2 and data.ndim == 2:
                yield hf, RowSlabs(data, kind, expected)
                continue
            w = _dequantize_rows(data, kind, expected, dequantize)
            # Only llama-arch conversion permutes Q/K (qwen2 uses NEOX-style RoPE, no permutation).
            if cfg["model_type"] == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
                w = _unpermute_rows(w, cfg["num_attention_heads"], t.name)
            elif cfg["model_type"] == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
                w = _unpermute_rows(w, cfg["num_key_value_heads"], t.name)
            yield hf, w


# The [vocab, hidden] tensors: delivered in row slabs so no full fp32 copy is ever held.
SLAB_TENSORS = {"model.embed_tokens.weight", "lm_head.weight"}


class RowSlabs:
    """A large tensor as consecutive float32 row slabs (each ~4 MiB), dequantized on demand.
    `np.asarray(slabs)` materializes the whole tensor (tests)."""

    def __init__(self, data: np.ndarray, kind, shape: tuple):
        self.data, self.kind, self.shape = data, kind, tuple(shape)
        self.step = max(1, (1 << 20) // max(1, int(np.prod(shape[1:]))))

    def __iter__(self):
        from gguf.quants import dequantize

        for r in range(0, self.shape[0], self.step):
            rows = self.data[r : r + self.step]
            yield r, np.ascontiguousarray(np.asarray(dequantize(rows, self.kind), dtype=np.float32).reshape(
                rows.shape[0], *self.shape[1:]))

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, np.float32)
        for r, slab in self:
            out[r : r + slab.shape[0]] = slab
        return out if dtype is None else out.astype(dtype)


def _dequantize_rows(data: np.ndarray, kind, shape: tuple, dequantize) -> np.ndarray:
    """float32 tensor of `shape`, dequantized a slab of rows at a time: the gguf package keeps
    several float temporaries per call, which for a [49152, 576] embedding would triple the
    loader's peak memory."""
    if len(shape) < 2 or data.ndim < 2 or data.shape[0] != shape[0]:
        return np.asarray(dequantize(data, kind), dtype=np.float32).reshape(shape)
    out = np.empty(shape, dtype=np.float32)
    step = max(1, (1 << 20) // max(1, int(np.prod(shape[1:]))))  # ~4 MiB of output per slab
    for r in range(0, shape[0], step):
        out[r : r + step] = np.asarray(dequantize(data[r : r + step], kind), dtype=np.float32).reshape(
            out[r : r + step].shape)
    return out


def _unpermute_rows(w: np.ndarray, n_head: int, name: str = "") -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permutation of Q/K rows (interleaved -> rotate-half)."""
    out = w.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"tensor {name or 'Q/K'}: {out} rows do not split into {n_head} heads of even size")
    rest = w.shape[1:]
    return np.ascontiguousarray(w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest))
