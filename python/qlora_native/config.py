"""config.json of a Hugging Face Llama-family checkpoint: parsing and validation.

Supported: LlamaForCausalLM (also SmolLM), MistralForCausalLM, Qwen2ForCausalLM. Anything the
engine does not implement raises a ValueError that names the field or architecture.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from . import _core
from .io import read_json  # noqa: F401  (config.json and the shard index; also used by model.py)

# architecture -> short name; the network is the same (Qwen2 adds q/k/v biases).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_INT64_MAX = 2**63 - 1
_REQUIRED = object()


class _Fields:
    """Typed access to config.json members: each value must have the JSON type of its field
    (a bool is a JSON bool, not "yes" or 1; an int a JSON integer within int64), else a
    ValueError naming the field. JSON null counts as absent for optional fields, as transformers
    writes unset options."""

    def __init__(self, d: dict, prefix: str = "config: "):
        self.d, self.prefix = d, prefix

    def fail(self, key, want, v):
        raise ValueError(f"{self.prefix}{key} must be {want}, got {v!r}")

    def int(self, key, minimum=1, default=_REQUIRED, maximum=_INT64_MAX):
        v = self.d.get(key)
        if v is None and default is not _REQUIRED:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
            want = f"an integer >= {minimum}" if maximum == _INT64_MAX else f"an integer in [{minimum}, {maximum}]"
            self.fail(key, want, v)
        return v

    def bool(self, key, default=False):
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(key, "true or false", v)
        return v

    def str(self, key, default=None):
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            self.fail(key, "a string", v)
        return v

    def positive(self, key, default=_REQUIRED):
        v = self.d.get(key)
        if v is None and default is not _REQUIRED:
            return float(default)
        return _positive(v, self.prefix + key)

    def token_ids(self, key, vocab, allow_list=True):
        """None, an id in [0, vocab) or (allow_list) a list of them."""
        v = self.d.get(key)
        if v is None:
            return None
        items = v if allow_list and isinstance(v, list) else [v]
        for x in items:
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < vocab:
                want = f"a token id in [0, {vocab})" + (" or a list of them" if allow_list else "")
                self.fail(key, want, v)
        return v


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
        """Parses and validates a config.json dict (also the engine's size and memory checks)."""
        if not isinstance(d, dict):
            raise _core.FormatError(f"config must be a JSON object, got {type(d).__name__}")
        f = _Fields(d)
        archs = d.get("architectures")
        if archs:
            if not isinstance(archs, list) or len(archs) != 1:
                raise ValueError(f"config: architectures must list exactly one architecture, got {archs!r}")
            name = archs[0]
            if not isinstance(name, str) or name not in ARCHITECTURES:
                raise ValueError(
                    f"config: unsupported architecture {name!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
                )
        else:
            mt = d.get("model_type")
            if not isinstance(mt, str) or mt not in _MODEL_TYPES:
                raise ValueError(f"config: no 'architectures' and unsupported model_type {mt!r}")
            name = _MODEL_TYPES[mt]
        arch = ARCHITECTURES[name]

        hidden = f.int("hidden_size")
        heads = f.int("num_attention_heads")
        # Absent or null: as many as the query heads (transformers); 0 is an error, not "absent".
        kv_heads = f.int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ValueError(
                f"config: num_key_value_heads ({kv_heads!r}) must divide num_attention_heads ({heads})"
            )
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            head_dim = hidden // heads
        elif isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2 \
                or head_dim > _INT64_MAX:
            raise ValueError(f"config: head_dim must be an even integer >= 2, got {head_dim!r}")

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config: hidden_act {act!r} is not supported (only 'silu')")
        if f.bool("mlp_bias"):
            raise ValueError("config: mlp_bias=true is not supported")
        tp = d.get("pretraining_tp")
        if tp is not None and (isinstance(tp, bool) or tp != 1 or not isinstance(tp, int)):
            raise ValueError(f"config: pretraining_tp != 1 is not supported (got {tp!r})")

        # transformers >= 5 writes rope_parameters (with rope_theta inside); older: rope_theta + rope_scaling.
        rp = d.get("rope_parameters")
        scaling = d.get("rope_scaling")
        theta = d.get("rope_theta")
        if rp is not None and not isinstance(rp, dict):
            raise ValueError(f"config: rope_parameters must be an object or null, got {rp!r}")
        if isinstance(rp, dict):
            theta = rp.get("rope_theta", theta)
            if scaling is None:
                scaling = rp
        rope_theta = 10000.0 if theta is None else _positive(theta, "config: rope_theta")
        rope_scaling = _rope_scaling(scaling, d.get("max_position_embeddings"))

        attention_bias = f.bool("attention_bias")
        qkv_bias = arch == "qwen2" or attention_bias
        o_bias = arch != "qwen2" and attention_bias
        layers = f.int("num_hidden_layers")
        sliding = None
        if arch == "mistral" and d.get("sliding_window") is not None:
            sliding = f.int("sliding_window")
        if arch == "qwen2" and f.bool("use_sliding_window"):
            sliding = f.int("sliding_window")
            if f.int("max_window_layers", minimum=0, default=0) < layers:
                raise ValueError("config: Qwen2 use_sliding_window with max_window_layers < layers is not supported")
        vocab = f.int("vocab_size")

        cfg = cls(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=f.int("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=f.positive("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=f.bool("tie_word_embeddings"),
            max_position_embeddings=f.int("max_position_embeddings") if "max_position_embeddings" in d else 2048,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            sliding_window=sliding,
            # An id outside the vocabulary would never be generated (an ignored EOS): refused.
            bos_token_id=f.token_ids("bos_token_id", vocab),
            eos_token_id=f.token_ids("eos_token_id", vocab),
            pad_token_id=f.token_ids("pad_token_id", vocab, allow_list=False),
            raw=d,
        )
        cfg.to_core()  # the engine's checks (sizes, their products, memory) before anything is allocated
        from .bnb_format import is_prequantized

        is_prequantized(d)  # quantization_config's types too, so from_file names the file
        return cfg

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
    """key is the full name for the message ("config: rope_theta")."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{key} must be a positive number, got {v!r}")
    return float(v)


def _rope_scaling(s, max_pos):
    """Normalizes rope_scaling / rope_parameters; None for plain RoPE."""
    if s is None:
        return None
    if not isinstance(s, dict):
        raise ValueError(f"config: rope_scaling must be an object or null, got {s!r}")
    kind = s.get("rope_type", s.get("type", "default"))
    prf = s.get("partial_rotary_factor", 1.0)
    if isinstance(prf, bool) or not isinstance(prf, (int, float)) or prf != 1.0:
        raise ValueError("config: rope partial_rotary_factor != 1 is not supported")
    if not isinstance(kind, str):
        raise ValueError(f"config: unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _positive(s.get("factor"), "config: rope_scaling.factor")}
    if kind == "llama3":
        out = {
            "rope_type": "llama3",
            "factor": _positive(s.get("factor"), "config: rope_scaling.factor"),
            "low_freq_factor": _positive(s.get("low_freq_factor"), "config: rope_scaling.low_freq_factor"),
            "high_freq_factor": _positive(s.get("high_freq_factor"), "config: rope_scaling.high_freq_factor"),
        }
        omp = s.get("original_max_position_embeddings", max_pos)
        if isinstance(omp, bool) or not isinstance(omp, int) or not 1 <= omp <= _INT64_MAX:
            raise ValueError(f"config: rope_scaling.original_max_position_embeddings must be an integer >= 1, got {omp!r}")
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ValueError("config: rope_scaling.high_freq_factor must exceed low_freq_factor")
        out["original_max_position_embeddings"] = omp
        return out
    raise ValueError(f"config: unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
