"""config.json of a Hugging Face Llama-family checkpoint: parsing and validation.

Supported: LlamaForCausalLM (also SmolLM), MistralForCausalLM, Qwen2ForCausalLM. Anything the
engine does not implement raises a ValueError that names the field or architecture. The rules
live once, in C++ (cpp/src/model/hf_loader.cpp, parse_hf_config), used by this module and by the
C API loader alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import _core
from .io import read_json  # noqa: F401  (config.json and the shard index; also used by model.py)


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # normalized: {"rope_type": "linear"|"llama3", ...} or None
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads config.json with the engine's JSON parser (the C API loader's rules: duplicate
        keys allowed, the last one wins, as in Python's json); errors name the file."""
        path = os.fspath(path)
        d = read_json(path, allow_duplicate_keys=True)
        if not isinstance(d, dict):
            raise _core.FormatError(f"{path}: config must be a JSON object")
        try:
            return cls.from_dict(d)
        except _core.FormatError as e:
            raise _core.FormatError(f"{path}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Parses and validates a config.json dict: the engine's rules (cpp/src/model/hf_loader.cpp,
        the C API loader's too), its size and memory checks and quantization_config's types."""
        if not isinstance(d, dict):
            raise _core.FormatError(f"config must be a JSON object, got {type(d).__name__}")
        p = _core.config.parse_hf_config(d)
        return cls(
            arch=p["arch"],
            vocab_size=p["vocab_size"],
            hidden_size=p["hidden_size"],
            intermediate_size=p["intermediate_size"],
            num_hidden_layers=p["num_hidden_layers"],
            num_attention_heads=p["num_attention_heads"],
            num_key_value_heads=p["num_key_value_heads"],
            head_dim=p["head_dim"],
            rms_norm_eps=p["rms_norm_eps"],
            rope_theta=p["rope_theta"],
            rope_scaling=p["rope_scaling"],
            tie_word_embeddings=p["tie_word_embeddings"],
            max_position_embeddings=p["max_position_embeddings"],
            qkv_bias=p["qkv_bias"],
            o_bias=p["o_bias"],
            sliding_window=p["sliding_window"],
            # validated by the engine: None, an id in the vocabulary or (bos / eos) a list of them
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            raw=d,
        )

    def to_core(self) -> "_core.model.LlamaConfig":
        c = _core.model.LlamaConfig()
        c.arch = self.arch
        c.vocab_size = self.vocab_size
        c.hidden_size = self.hidden_size
        c.intermediate_size = self.intermediate_size
        c.num_layers = self.num_hidden_layers
        c.num_heads = self.num_attention_heads
        c.num_kv_heads = self.num_key_value_heads
        c.head_dim = self.head_dim
        c.rms_norm_eps = self.rms_norm_eps
        c.rope_theta = self.rope_theta
        c.tie_word_embeddings = self.tie_word_embeddings
        c.max_position_embeddings = self.max_position_embeddings
        c.qkv_bias = self.qkv_bias
        c.o_bias = self.o_bias
        c.sliding_window = self.sliding_window or 0
        rs = self.rope_scaling
        if rs is None:
            c.rope_type = _core.model.RopeType.default
        elif rs["rope_type"] == "linear":
            c.rope_type = _core.model.RopeType.linear
            c.rope_factor = rs["factor"]
        else:
            c.rope_type = _core.model.RopeType.llama3
            c.rope_factor = rs["factor"]
            c.rope_low_freq_factor = rs["low_freq_factor"]
            c.rope_high_freq_factor = rs["high_freq_factor"]
            c.rope_original_max_pos = rs["original_max_position_embeddings"]
        c.validate()
        return c
