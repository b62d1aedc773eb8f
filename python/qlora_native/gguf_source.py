"""Llama-architecture GGUF files (llama.cpp) as a source of HF-named weights and an HF config.

Weights come out one tensor at a time, dequantized to float32 by the `gguf` package, renamed to
the Hugging Face Llama names and, for attn_q / attn_k, with llama.cpp's row permutation undone
(GGML's interleaved RoPE layout back to HF's rotate-half layout), so the model code sees exactly
what an HF checkpoint would give.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
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


class GGUFSource:
    """An open GGUF file: `.config` (an HF-style config dict) and `.tensors()` (HF names, float32)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the gguf package raises assorted errors on corrupt files
            from ._core import FormatError

            raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.path = path
        self.config = self._read_config()
        # The reader parsed every metadata field, the 49k-token vocabulary and merges included, into
        # ~160 MB of Python objects; weights need none of it (the tokenizer reads the file itself).
        self.reader.fields.clear()

    # ---------------------------------------------------------------- metadata
    def field(self, key: str, default=None):
        """A metadata value (only while reading the config: the fields are dropped afterwards)."""
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _read_config(self) -> dict:
        arch = self.field("general.architecture")
        if arch not in _LLAMA_ARCHS:
            raise ValueError(
                f"{self.path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(sorted(_LLAMA_ARCHS))})"
            )
        a = arch
        n_head = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        names = {t.name for t in self.reader.tensors}
        n_vocab = self.field(f"{a}.vocab_size")
        if n_vocab is None:
            n_vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        head_dim = self.field(f"{a}.attention.key_length") or self.field(f"{a}.rope.dimension_count") or hidden // n_head
        cfg = {
            "architectures": [_LLAMA_ARCHS[arch]],
            "model_type": "llama" if arch == "llama" else arch,
            "vocab_size": int(n_vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self.field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self.field(f"{a}.block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(self.field(f"{a}.attention.head_count_kv", n_head)),
            "head_dim": int(head_dim),
            "rms_norm_eps": float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.field(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.field(f"{a}.context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
            "attention_bias": "blk.0.attn_q.bias" in names,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
        }
        scaling = self.field(f"{a}.rope.scaling.type")
        if scaling and scaling != "none":
            if scaling != "linear":
                raise ValueError(f"{self.path}: unsupported GGUF rope scaling type {scaling!r}")
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(self.field(f"{a}.rope.scaling.factor"))}
        if "rope_freqs.weight" in names:
            # Llama 3.1 GGUFs carry precomputed llama3 frequency factors instead of the parameters.
            raise ValueError(f"{self.path}: GGUF rope_freqs (llama3 rope scaling) is not supported yet")
        return cfg

    # ---------------------------------------------------------------- tensors
    def tensor_names(self) -> list[str]:
        return [hf for hf in (self._hf_name(t.name) for t in self.reader.tensors) if hf]

    @staticmethod
    def _hf_name(name: str) -> str | None:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m and m.group(2) in _LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        if name == "rope_freqs.weight":
            return None
        raise ValueError(f"unexpected GGUF tensor {name!r} for a llama-architecture model")

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (hf_name, float32 array in HF layout), one tensor dequantized at a time; the
        embedding and lm_head come as RowSlabs (see SLAB_TENSORS)."""
        from gguf.quants import dequantize

        cfg = self.config
        for t in self.reader.tensors:
            hf = self._hf_name(t.name)
            if hf is None:
                continue
            kind = t.tensor_type.name
            if kind not in SUPPORTED_TYPES:
                raise ValueError(f"{self.path}: tensor {t.name} has unsupported GGUF type {kind}")
            # GGUF lists dims fastest-first; the numpy data is already [out, in] (or [n]).
            expected = tuple(int(d) for d in reversed(t.shape))
            if hf in SLAB_TENSORS and len(expected) == 2 and t.data.ndim == 2:
                yield hf, RowSlabs(t.data, t.tensor_type, expected)
                continue
            w = _dequantize_rows(t.data, t.tensor_type, expected, dequantize)
            # Only llama-arch conversion permutes Q/K (qwen2 uses NEOX-style RoPE, no permutation).
            if cfg["model_type"] == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
                w = _unpermute_rows(w, cfg["num_attention_heads"])
            elif cfg["model_type"] == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
                w = _unpermute_rows(w, cfg["num_key_value_heads"])
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


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permutation of Q/K rows (interleaved -> rotate-half)."""
    out = w.shape[0]
    rest = w.shape[1:]
    return np.ascontiguousarray(w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest))
