"""LoRA adapter configuration with HF PEFT's field names and matching rules (peft 0.21).

Which modules get an adapter, and with which rank/alpha, follows PEFT exactly
(peft/tuners/tuners_utils.py `check_target_module_exists`, peft/utils/other.py `get_pattern_key`),
so an adapter moves between qlora_native and PEFT without changing meaning. Only the seven Llama
projections can carry an adapter; features that qlora_native does not implement (DoRA, LoRA bias,
modules_to_save, fan_in_fan_out, ...) raise ValueError naming the feature instead of being ignored.

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", rank_pattern={"q_proj": 8})
    for layer, name, r, alpha, scaling in cfg.resolve(num_layers=30): ...
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

__all__ = ["LoraConfig", "PROJECTIONS", "module_path", "peft_tensor_name"]

# The seven Llama projections, in the order a decoder layer applies them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# Other module paths of a transformers LlamaForCausalLM: a regex target that reaches one of them
# asks for something we cannot adapt (PEFT would wrap lm_head/embed_tokens or fail on the rest).
_OTHER_GLOBAL = ("model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
_OTHER_PER_LAYER = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm")

ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND (compared case-insensitively)
DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's default for model_type "llama" when target_modules is None

# PEFT 0.21 keys that do not change what the adapter computes on a plain Llama model.
_IGNORED_KEYS = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "revision", "inference_mode",
    "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "ensure_weight_tying", "runtime_config", "base_model_name_or_path",
}
# PEFT features we do not implement: key -> value meaning "off". Any other value is rejected.
_UNSUPPORTED_KEYS = {
    "use_dora": False, "bias": "none", "modules_to_save": None, "fan_in_fan_out": False,
    "lora_bias": False, "trainable_token_indices": None, "layer_replication": None,
    "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None,
    "megatron_config": None, "use_bdlora": None, "arrow_config": None, "velora_config": None,
    "kasa_config": None, "monteclora_config": None,
}
_FEATURE_NAMES = {
    "use_dora": "DoRA (use_dora=True)", "bias": "training biases (bias != 'none')",
    "modules_to_save": "modules_to_save (full trainable copies of modules)",
    "fan_in_fan_out": "fan_in_fan_out=True (Conv1D-style weights)", "lora_bias": "lora_bias=True",
    "trainable_token_indices": "trainable_token_indices", "layer_replication": "layer_replication",
    "target_parameters": "target_parameters", "use_qalora": "QA-LoRA (use_qalora=True)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "megatron_config": "megatron_config", "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)", "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)", "monteclora_config": "MonteCLoRA (monteclora_config)",
}


def module_path(layer: int, name: str) -> str:
    """PEFT's module path of a projection, e.g. model.layers.3.self_attn.q_proj."""
    return f"model.layers.{int(layer)}.{_PARENT[name]}.{name}"


def peft_tensor_name(layer: int, name: str, which: str) -> str:
    """Name PEFT saves a LoRA factor under; which is "A" or "B"."""
    if which not in ("A", "B"):
        raise ValueError(f"which must be 'A' or 'B', got {which!r}")
    return f"base_model.model.{module_path(layer, name)}.lora_{which}.weight"


def _is_off(value, off) -> bool:
    if off is None:
        return value is None or value == [] or value == {} or value == ()
    return value == off


@dataclass
class LoraConfig:
    """LoRA hyper-parameters with PEFT's names and semantics (see module docstring).

    target_modules: None (PEFT's Llama default: q_proj, v_proj), a list of module names (a name
    matches a module path equal to it or ending in "." + name), a regex string (full match against
    the module path), or "all-linear" (the seven projections, never lm_head).
    rank_pattern / alpha_pattern: {regex: r} / {regex: alpha}; the first key (in dict order) for
    which re.match(rf"(.*\\.)?({key})$", path) succeeds wins, as in PEFT's get_pattern_key.
    layers_to_transform (int or list) / layers_pattern: only with a list target_modules (PEFT
    rule); a module whose path equals a target_modules entry exactly is not filtered (also PEFT).
    init_lora_weights: True (A ~ U(+-1/sqrt(in)), B = 0), "gaussian" (A ~ N(0, std=1/r), B = 0) or
    False (A and B both keep nn.Linear's default init, so the adapter is not a no-op).
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: Optional[Union[list, str]] = None
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers_to_transform: Optional[Union[int, list]] = None
    layers_pattern: Optional[Union[str, list]] = None
    exclude_modules: Optional[Union[list, str]] = None
    bias: str = "none"
    use_dora: bool = False
    modules_to_save: Optional[list] = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: Optional[str] = None

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError for invalid values or features qlora_native does not implement."""
        for key in ("use_dora", "bias", "modules_to_save", "fan_in_fan_out"):
            if not _is_off(getattr(self, key), _UNSUPPORTED_KEYS[key]):
                raise ValueError(f"LoraConfig: {_FEATURE_NAMES[key]} is not supported by qlora_native "
                                 f"(got {key}={getattr(self, key)!r})")
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or isinstance(self.lora_dropout, bool) \
                or not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig: use_rslora must be a bool, got {self.use_rslora!r}")
        if not (self.init_lora_weights is True or self.init_lora_weights is False
                or (isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() == "gaussian")):
            raise ValueError(f"LoraConfig: init_lora_weights={self.init_lora_weights!r} is not supported "
                             "(qlora_native implements True, False and 'gaussian'; PiSSA/OLoRA/LoftQ/EVA/CorDA/"
                             "LoRA-GA/orthogonal inits are not)")
        for attr, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            pat = getattr(self, attr)
            if pat is None:
                setattr(self, attr, {})
                continue
            if not isinstance(pat, dict):
                raise ValueError(f"LoraConfig: {attr} must be a dict {{regex: value}}, got {type(pat).__name__}")
            for k, v in pat.items():
                if not isinstance(k, str):
                    raise ValueError(f"LoraConfig: {attr} keys must be regex strings, got {k!r}")
                _compile(k, f"{attr} key")
                check(f"{attr}[{k!r}]", v)
        self._validate_targets()

    def _validate_targets(self) -> None:
        t = self.target_modules
        if isinstance(t, (set, tuple)):
            t = self.target_modules = sorted(t)
        if isinstance(t, str):
            if t.lower() != ALL_LINEAR:
                _compile(t, "target_modules regex")
            if self.layers_to_transform is not None:
                raise ValueError("LoraConfig: layers_to_transform cannot be used when target_modules is a str "
                                 "(PEFT rule); list the module names instead")
            if self.layers_pattern is not None:
                raise ValueError("LoraConfig: layers_pattern cannot be used when target_modules is a str (PEFT rule)")
        elif t is not None:
            if not isinstance(t, list) or not t or not all(isinstance(x, str) and x for x in t):
                raise ValueError(f"LoraConfig: target_modules must be None, a regex string, 'all-linear' or a "
                                 f"non-empty list of module names, got {t!r}")
            for x in t:
                if x.rsplit(".", 1)[-1] not in PROJECTIONS:
                    raise ValueError(f"LoraConfig: target module {x!r} is not supported: qlora_native puts "
                                     f"adapters only on the projections {', '.join(PROJECTIONS)} "
                                     "(not lm_head, embed_tokens, norms)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig: layers_pattern needs layers_to_transform (PEFT rule)")
        ltt = self.layers_to_transform
        if ltt is not None:
            items = [ltt] if isinstance(ltt, int) and not isinstance(ltt, bool) else ltt
            if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                      for i in items):
                raise ValueError(f"LoraConfig: layers_to_transform must be an int or a list of non-negative "
                                 f"ints, got {ltt!r}")
        lp = self.layers_pattern
        if lp is not None and not (isinstance(lp, str)
                                   or (isinstance(lp, list) and all(isinstance(p, str) for p in lp))):
            raise ValueError(f"LoraConfig: layers_pattern must be a str or a list of str, got {lp!r}")
        ex = self.exclude_modules
        if isinstance(ex, (set, tuple)):
            ex = self.exclude_modules = sorted(ex)
        if isinstance(ex, str):
            _compile(ex, "exclude_modules regex")
        elif ex is not None and not (isinstance(ex, list) and all(isinstance(x, str) for x in ex)):
            raise ValueError(f"LoraConfig: exclude_modules must be None, a regex string or a list, got {ex!r}")

    # ------------------------------------------------------------------ matching (PEFT rules)
    def _effective_targets(self):
        t = self.target_modules
        if t is None:
            return list(DEFAULT_TARGETS)
        if isinstance(t, str) and t.lower() == ALL_LINEAR:
            return list(PROJECTIONS)
        return t

    def _excluded(self, key: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, key) is not None
        return key in ex or any(key.endswith(f".{e}") for e in ex)

    def _targets(self, key: str) -> bool:
        """PEFT's check_target_module_exists for one module path (exclusions included)."""
        if self._excluded(key):
            return False
        t = self._effective_targets()
        if isinstance(t, str):
            return re.fullmatch(t, key) is not None
        if key in t:
            return True  # an exact path is not filtered by layers_to_transform (PEFT)
        if not any(key.endswith(f".{x}") for x in t):
            return False
        ltt = self.layers_to_transform
        if ltt is None or (isinstance(ltt, list) and not ltt):
            return True
        m = None
        if not self.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for p in [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern:
                m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if m is not None:
                    break
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == ltt if isinstance(ltt, int) else idx in ltt

    def rank_alpha(self, key: str) -> tuple[int, float]:
        """(r, alpha) of the module at path `key` from rank_pattern/alpha_pattern (PEFT's get_pattern_key)."""
        return (_pattern_value(self.rank_pattern, key, self.r),
                _pattern_value(self.alpha_pattern, key, self.lora_alpha))

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def resolve(self, num_layers: int) -> list[tuple[int, str, int, float, float]]:
        """Every adapted projection of a num_layers-layer Llama model, in layer then PROJECTIONS order:
        a list of (layer_index, module_name, r, alpha, scaling)."""
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"resolve: num_layers must be a positive int, got {num_layers!r}")
        t = self.target_modules
        if isinstance(t, str) and t.lower() != ALL_LINEAR:
            others = list(_OTHER_GLOBAL) + [f"model.layers.{i}{s}" for i in range(num_layers) for s in _OTHER_PER_LAYER]
            bad = [k for k in others if self._targets(k)]
            if bad:
                raise ValueError(f"LoraConfig: target_modules regex {t!r} matches {bad[0]!r}, which is not one "
                                 f"of the projections {', '.join(PROJECTIONS)}; qlora_native cannot adapt it")
        out = []
        for i in range(num_layers):
            for name in PROJECTIONS:
                key = module_path(i, name)
                if self._targets(key):
                    r, alpha = self.rank_alpha(key)
                    out.append((i, name, r, alpha, self.scaling_for(r, alpha)))
        if not out:
            raise ValueError(f"LoraConfig: target_modules={self.target_modules!r} (layers_to_transform="
                             f"{self.layers_to_transform!r}, exclude_modules={self.exclude_modules!r}) matches no "
                             f"projection of a {num_layers}-layer Llama model")
        return out

    # ------------------------------------------------------------------ init
    def init_weights(self, in_features: int, out_features: int, r: int, rng: np.random.Generator):
        """Fresh (A [r, in], B [out, r]) float32 factors following init_lora_weights (PEFT's
        reset_lora_parameters; nn.Linear's default init is kaiming_uniform(a=sqrt(5)), i.e.
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
        for n, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"init_weights: {n} must be a positive int, got {v!r}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError("init_weights: rng must be a numpy.random.Generator")
        init = self.init_lora_weights
        if isinstance(init, str):  # "gaussian" (validated)
            a = rng.normal(0.0, 1.0 / r, size=(r, in_features))
        else:
            bound = 1.0 / math.sqrt(in_features)
            a = rng.uniform(-bound, bound, size=(r, in_features))
        if init is False:
            bound = 1.0 / math.sqrt(r)  # lora_B is nn.Linear(r, out): fan_in = r
            b = rng.uniform(-bound, bound, size=(out_features, r))
        else:
            b = np.zeros((out_features, r))
        return a.astype(np.float32), b.astype(np.float32)

    # ------------------------------------------------------------------ PEFT dict
    def to_peft_dict(self) -> dict[str, Any]:
        """adapter_config.json content PEFT (and vLLM) read; target_modules None is written as
        PEFT's resolved Llama default ["q_proj", "v_proj"]."""
        t = self.target_modules
        t = sorted(DEFAULT_TARGETS) if t is None else (t if isinstance(t, str) else sorted(t))
        ex = self.exclude_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": True,
            "r": int(self.r),
            "lora_alpha": _num(self.lora_alpha),
            "lora_dropout": float(self.lora_dropout),
            "target_modules": t,
            "exclude_modules": ex if (ex is None or isinstance(ex, str)) else sorted(ex),
            "use_rslora": bool(self.use_rslora),
            "init_lora_weights": self.init_lora_weights,
            "rank_pattern": {k: int(v) for k, v in self.rank_pattern.items()},
            "alpha_pattern": {k: _num(v) for k, v in self.alpha_pattern.items()},
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "bias": "none",
            "use_dora": False,
            "modules_to_save": None,
            "fan_in_fan_out": False,
            "lora_bias": False,
            "revision": None,
            "auto_mapping": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoraConfig":
        """Parse a PEFT adapter_config.json dict (any 0.x version). Rejects peft_type != LORA,
        task_type other than CAUSAL_LM/None and unimplemented features; ignores bookkeeping keys."""
        if not isinstance(d, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(d).__name__}")
        pt = d.get("peft_type")
        if pt != "LORA":
            raise ValueError(f"adapter config: peft_type must be 'LORA', got {pt!r} (only LoRA adapters are supported)")
        tt = d.get("task_type")
        if tt not in (None, "CAUSAL_LM"):
            raise ValueError(f"adapter config: task_type {tt!r} is not supported (expected 'CAUSAL_LM' or null)")
        for key, off in _UNSUPPORTED_KEYS.items():
            if key in d and not _is_off(d[key], off):
                raise ValueError(f"adapter config: {_FEATURE_NAMES[key]} is not supported by qlora_native "
                                 f"(got {key}={d[key]!r})")
        fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights",
                  "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules",
                  "base_model_name_or_path")
        unknown = sorted(k for k in d if k not in fields and k not in _IGNORED_KEYS and k not in _UNSUPPORTED_KEYS
                         and not _is_off(d[k], None) and d[k] is not False)
        if unknown:
            warnings.warn(f"adapter config: ignoring unknown keys {unknown}", RuntimeWarning, stacklevel=2)
        # PEFT's own defaults for keys an older/minimal config leaves out
        kw = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0}
        kw.update({k: d[k] for k in fields if k in d})
        for k in ("rank_pattern", "alpha_pattern"):
            if kw.get(k) is None:
                kw[k] = {}
        if kw.get("init_lora_weights") is None:
            kw["init_lora_weights"] = True
        if kw.get("use_rslora") is None:
            kw["use_rslora"] = False
        return cls(**kw)


def _num(v):
    """int stays int in JSON (PEFT writes lora_alpha as given)."""
    return int(v) if isinstance(v, (int, np.integer)) else float(v)


def _check_rank(what, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"LoraConfig: {what} must be a positive int, got {v!r}")


def _check_alpha(what, v):
    if (not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool)
            or not math.isfinite(v) or v <= 0):
        raise ValueError(f"LoraConfig: {what} must be a positive finite number, got {v!r}")


def _compile(pattern: str, what: str):
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"LoraConfig: invalid {what} {pattern!r}: {exc}") from exc


def _pattern_value(patterns: dict, key: str, default):
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", key):
            return patterns[k]
    return default
