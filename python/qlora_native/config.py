"""config.json of a Hugging Face Llama-family checkpoint: parsing and validation.

Supported: LlamaForCausalLM (also SmolLM), MistralForCausalLM, Qwen2ForCausalLM. Anything the
engine does not implement raises a ValueError that names the field or architecture.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from . import _core

# architecture -> short name; the network is the same (Qwen2 adds q/k/v biases).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


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
        with open(path, "rb") as f:
            try:
                d = json.loads(f.read())
            except ValueError as e:
                raise _core.FormatError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise _core.FormatError(f"{path}: config must be a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures")
        if archs:
            if not isinstance(archs, list) or len(archs) != 1:
                raise ValueError(f"config: architectures must list exactly one architecture, got {archs!r}")
            name = archs[0]
            if name not in ARCHITECTURES:
                raise ValueError(
                    f"config: unsupported architecture {name!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
                )
        else:
            mt = d.get("model_type")
            if mt not in _MODEL_TYPES:
                raise ValueError(f"config: no 'architectures' and unsupported model_type {mt!r}")
            name = _MODEL_TYPES[mt]
        arch = ARCHITECTURES[name]

        def req_int(key, minimum=1):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"config: {key} must be an integer >= {minimum}, got {v!r}")
            return v

        def num(key, default):
            v = d.get(key, default)
            if v is None:
                v = default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"config: {key} must be a positive number, got {v!r}")
            return float(v)

        hidden = req_int("hidden_size")
        heads = req_int("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(
                f"config: num_key_value_heads ({kv_heads!r}) must divide num_attention_heads ({heads})"
            )
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            head_dim = hidden // heads
        elif isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"config: head_dim must be an even integer >= 2, got {head_dim!r}")

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config: hidden_act {act!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise ValueError("config: mlp_bias=true is not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError("config: pretraining_tp != 1 is not supported")

        # transformers >= 5 writes rope_parameters (with rope_theta inside); older: rope_theta + rope_scaling.
        rp = d.get("rope_parameters")
        scaling = d.get("rope_scaling")
        theta = d.get("rope_theta")
        if isinstance(rp, dict):
            theta = rp.get("rope_theta", theta)
            if scaling is None:
                scaling = rp
        rope_theta = num("rope_theta", 10000.0) if theta is None else _positive(theta, "rope_theta")
        rope_scaling = _rope_scaling(scaling, d.get("max_position_embeddings"))

        qkv_bias = arch == "qwen2" or bool(d.get("attention_bias", False))
        o_bias = arch != "qwen2" and bool(d.get("attention_bias", False))
        sliding = None
        if arch == "mistral" and d.get("sliding_window") is not None:
            sliding = req_int("sliding_window")
        if arch == "qwen2" and d.get("use_sliding_window"):
            sliding = req_int("sliding_window")
            if d.get("max_window_layers", 0) < req_int("num_hidden_layers"):
                raise ValueError("config: Qwen2 use_sliding_window with max_window_layers < layers is not supported")

        return cls(
            arch=arch,
            vocab_size=req_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=req_int("intermediate_size"),
            num_hidden_layers=req_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=num("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=req_int("max_position_embeddings") if "max_position_embeddings" in d else 2048,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            sliding_window=sliding,
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


def _positive(v, key):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"config: {key} must be a positive number, got {v!r}")
    return float(v)


def _rope_scaling(s, max_pos):
    """Normalizes rope_scaling / rope_parameters; None for plain RoPE."""
    if s is None:
        return None
    if not isinstance(s, dict):
        raise ValueError(f"config: rope_scaling must be an object or null, got {s!r}")
    kind = s.get("rope_type", s.get("type", "default"))
    if s.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config: rope partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _positive(s.get("factor"), "rope_scaling.factor")}
    if kind == "llama3":
        out = {
            "rope_type": "llama3",
            "factor": _positive(s.get("factor"), "rope_scaling.factor"),
            "low_freq_factor": _positive(s.get("low_freq_factor"), "rope_scaling.low_freq_factor"),
            "high_freq_factor": _positive(s.get("high_freq_factor"), "rope_scaling.high_freq_factor"),
        }
        omp = s.get("original_max_position_embeddings", max_pos)
        if isinstance(omp, bool) or not isinstance(omp, int) or omp < 1:
            raise ValueError(f"config: rope_scaling.original_max_position_embeddings must be an integer >= 1, got {omp!r}")
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ValueError("config: rope_scaling.high_freq_factor must exceed low_freq_factor")
        out["original_max_position_embeddings"] = omp
        return out
    raise ValueError(f"config: unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
