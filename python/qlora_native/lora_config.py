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

import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

__all__ = ["LoraConfig", "PROJECTIONS", "module_path", "peft_tensor_name", "peft_tensors"]

# The seven Llama projections, in the order a decoder layer applies them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

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


def peft_tensors(rows) -> dict:
    """{PEFT tensor name: value} from rows (layer, projection, A's value, B's value)."""
    out = {}
    for layer, proj, a, b in rows:
        out[peft_tensor_name(layer, proj, "A")] = a
        out[peft_tensor_name(layer, proj, "B")] = b
    return out


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
            if len(pat) > _MAX_PATTERN_KEYS:
                raise ValueError(f"LoraConfig: {attr} has {len(pat)} entries (at most {_MAX_PATTERN_KEYS})")
            for k in pat:
                if not isinstance(k, str):
                    raise ValueError(f"LoraConfig: {attr} keys must be regex strings, got {k!r}")
            if sum(map(len, pat)) > _MAX_TOTAL_PATTERN_CHARS:  # before compiling them
                raise ValueError(f"LoraConfig: the keys of {attr} total {sum(map(len, pat))} characters "
                                 f"(at most {_MAX_TOTAL_PATTERN_CHARS})")
            for k, v in pat.items():
                _prepare(k, "pattern", f"{attr} key")
                check(f"{attr}[{k!r}]", v)
        self._validate_targets()

    def _validate_targets(self) -> None:
        t = self.target_modules
        if isinstance(t, (set, tuple)):
            t = self.target_modules = sorted(t)
        if isinstance(t, str):
            if t.lower() != ALL_LINEAR:
                _prepare(t, "fullmatch", "target_modules regex")
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
        for p in [lp] if isinstance(lp, str) else (lp or []):
            _prepare(p, "layers", "layers_pattern")
        ex = self.exclude_modules
        if isinstance(ex, (set, tuple)):
            ex = self.exclude_modules = sorted(ex)
        if isinstance(ex, str):
            _prepare(ex, "fullmatch", "exclude_modules regex")
        elif ex is not None and not (isinstance(ex, list) and all(isinstance(x, str) for x in ex)):
            raise ValueError(f"LoraConfig: exclude_modules must be None, a regex string or a list, got {ex!r}")
        total = sum(len(p) for p in self._patterns())
        if total > _MAX_TOTAL_PATTERN_CHARS:
            raise ValueError(f"LoraConfig: the regex patterns of this config total {total} characters "
                             f"(at most {_MAX_TOTAL_PATTERN_CHARS} are accepted)")

    def _patterns(self) -> list[str]:
        """Every user-supplied regex of the config (for the size limit)."""
        out = list(self.rank_pattern or ()) + list(self.alpha_pattern or ())
        for v in (self.target_modules, self.exclude_modules, self.layers_pattern):
            if isinstance(v, str):
                out.append(v)
        if isinstance(self.layers_pattern, list):
            out += self.layers_pattern
        return out

    # ------------------------------------------------------------------ matching (PEFT rules)
    def resolve(self, num_layers: int) -> list[tuple[int, str, int, float, float]]:
        """Every adapted projection of a num_layers-layer Llama model, in layer then PROJECTIONS order:
        a list of (layer_index, module_name, r, alpha, scaling).

        The engine applies PEFT's rules (cpp/src/api/peft_adapter.cpp resolve_peft_config, the same
        code the adapter reader and the C API use): check_target_module_exists, get_pattern_key,
        scaling alpha / r (alpha / sqrt(r) with use_rslora). Regexes that are not plain names are
        matched by this module's time-bounded matcher()."""
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"resolve: num_layers must be a positive int, got {num_layers!r}")
        from . import _core

        d = self.to_peft_dict()
        if self.target_modules is None:
            d["target_modules"] = None  # PEFT's Llama default, and the message says so
        return [(int(layer), proj, int(r), alpha, scaling)
                for layer, proj, r, alpha, scaling in _core.io.resolve_peft_config(d, num_layers, matcher())]

    # ------------------------------------------------------------------ init
    def _init_kind(self) -> str:
        init = self.init_lora_weights
        return "gaussian" if isinstance(init, str) else "linear_default" if init is False else "kaiming_uniform"

    def init_factors(self, seed: int, modules) -> list:
        """[(A [r, in], B [out, r])] float32 for modules [(r, in_features, out_features)], drawn in
        order from the init stream of adapter seed `seed` (the engine's init, lora_setup.cpp
        init_lora_factors: the C API's qlora_adapter_add draws the same numbers for the same seed)."""
        from . import _core

        return _core.train.lora_init_factors(int(seed), self._init_kind(), [tuple(int(v) for v in m) for m in modules])

    def init_weights(self, in_features: int, out_features: int, r: int, rng: np.random.Generator):
        """Fresh (A [r, in], B [out, r]) float32 factors following init_lora_weights (PEFT's
        reset_lora_parameters): True: A ~ U(+-1/sqrt(in)) (nn.Linear's kaiming_uniform(a=sqrt(5))),
        B = 0; "gaussian": A ~ N(0, std 1/r), B = 0; False: A and B keep nn.Linear's default init.
        Drawn by the engine (init_factors) from a seed taken from `rng`."""
        for n, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"init_weights: {n} must be a positive int, got {v!r}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError("init_weights: rng must be a numpy.random.Generator")
        return self.init_factors(int(rng.integers(0, 2**63)), [(r, in_features, out_features)])[0]

    # ------------------------------------------------------------------ PEFT dict
    def peft_config_json(self, base_model_name_or_path=None) -> str:
        """adapter_config.json text, built by the engine (cpp/src/model/peft_config.cpp, the C API's
        qlora_adapter_save builder): PEFT's full field set, sorted keys, indent 2. target_modules None
        is written as PEFT's resolved Llama default ["q_proj", "v_proj"]; base_model_name_or_path
        overrides the config's own when given."""
        from . import _core
        from .fspath import text_of_path

        t = self.target_modules
        ex = self.exclude_modules
        base = self.base_model_name_or_path
        if base_model_name_or_path is not None:  # a path as loaded: its non-UTF-8 bytes written \xNN
            b = base_model_name_or_path
            base = text_of_path(b) if isinstance(b, (str, bytes, os.PathLike)) else str(b)
        return _core.io.peft_config_json({
            "base_model_name_or_path": base,
            "r": int(self.r),
            "lora_alpha": _num(self.lora_alpha),
            "lora_dropout": float(self.lora_dropout),
            "target_modules": list(DEFAULT_TARGETS) if t is None else (t if isinstance(t, str) else list(t)),
            "exclude_modules": ex if (ex is None or isinstance(ex, str)) else list(ex),
            "use_rslora": bool(self.use_rslora),
            "init_lora_weights": self.init_lora_weights,
            "rank_pattern": {k: int(v) for k, v in self.rank_pattern.items()},
            "alpha_pattern": {k: _num(v) for k, v in self.alpha_pattern.items()},
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
        })

    def to_peft_dict(self) -> dict[str, Any]:
        """adapter_config.json content PEFT (and vLLM) read, as a dict (peft_config_json parsed)."""
        return json.loads(self.peft_config_json())

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


# ---------------------------------------------------------------- bounded regex matching
# Patterns in adapter_config.json come from strangers, and Python's re backtracks without limit:
# "(.*.*)*X" against a 32-character module path runs for minutes, and a running re match cannot be
# interrupted (no timeout; a thread cannot be killed). Module paths are short, but a match can be
# exponential in the path length all the same, and no syntactic "safe subset" short of plain names
# rules that out ("(.|..)*\d\d\d" has no nested quantifier). So:
#   * every pattern is compiled by re (with its PEFT wrapper) to accept exactly PEFT's syntax;
#   * plain names (letters, digits, "_", "-", "." and "\.", e.g. "q_proj" or
#     "model.layers.3.mlp.down_proj") are matched by re itself: without groups or quantifiers the
#     wrappers' cost is O(len(path) * len(pattern));
#   * everything else is matched by the `regex` package (re's syntax and semantics as its
#     VERSION0), which takes a timeout: one match is bounded by _MATCH_TIMEOUT_S (wall clock);
#   * all matching of one resolve() gets _MATCH_BUDGET_S plus _MATCH_CALL_ALLOWANCE_S per match
#     of the thread's CPU time (CPU time, so a loaded machine does not fail a sane config): this
#     stops many slow-but-finite matches within about a second, while a large sane config (one
#     rank_pattern key per module of an 80-layer model: ~300k matches of a few us) still loads.
# The constructs where regex reads re's syntax differently or its compiler expands the input are
# refused up front: a "{" that is not a repeat count (regex: fuzzy matching "{e<=1}"), what re
# warns about as a possible nested set or set operation (regex: POSIX classes "[[:alpha:]]"), and
# counted repeats whose product could blow up ("((x{1000}){1000}){1000}" exhausts memory).
_MAX_PATTERN_CHARS = 65536  # one pattern
_MAX_TOTAL_PATTERN_CHARS = 1 << 20  # all patterns of one config (bounds compile time)
_MAX_REPEAT_PRODUCT = 1 << 16  # product of the counts of all counted repeats of one pattern
_MAX_EXPANDED_CHARS = 1 << 20  # pattern length times that product
_MAX_PATTERN_KEYS = 4096  # rank_pattern / alpha_pattern entries (7 per layer of a 512-layer model)
_MATCH_TIMEOUT_S = 0.25
_MATCH_BUDGET_S = 1.0
_MATCH_CALL_ALLOWANCE_S = 20e-6  # a sane match of a short module path takes ~1-3 us
_PLAIN = re.compile(r"(?:[A-Za-z0-9_\-.]|\\\.)*")
_REPEAT = re.compile(r"\{(\d*)(?:(,)(\d*))?\}")
_WRAPPERS = {  # how PEFT applies each kind of pattern (kind -> (template, match method))
    "fullmatch": ("{}", "fullmatch"),  # target_modules / exclude_modules: re.fullmatch(p, key)
    "pattern": (r"(.*\.)?({})$", "match"),  # rank/alpha_pattern keys: get_pattern_key
    "layers": (r"(?:^|.*?\.){}\.(?P<idx>\d+)\.", "match"),  # layers_pattern
}


class _Pattern:
    __slots__ = ("source", "what", "plain", "fn")

    def __init__(self, source, what, plain, fn):
        self.source, self.what, self.plain, self.fn = source, what, plain, fn


class _Budget:
    """CPU time spent matching in one resolve() (see the comment above), and the patterns it
    compiled (a cache that lives as long as the call: no process-wide cache of big patterns)."""

    def __init__(self):
        self.start = time.thread_time()
        self.calls = 0
        self.compiled: dict = {}

    def pattern(self, pattern: str, kind: str, what: str) -> "_Pattern":
        p = self.compiled.get((pattern, kind))
        if p is None:
            p = self.compiled[(pattern, kind)] = _prepare(pattern, kind, what)
        return p

    def match(self, pat: _Pattern, key: str):
        if pat.plain:
            m = pat.fn(key)
        else:
            try:
                m = pat.fn(key, timeout=_MATCH_TIMEOUT_S)
            except TimeoutError:
                raise ValueError(f"LoraConfig: {pat.what} {pat.source!r} takes more than {_MATCH_TIMEOUT_S} s to "
                                 f"match the module path {key!r} (catastrophic backtracking); simplify it") from None
        self.calls += 1
        if ((not pat.plain or self.calls % 64 == 0)
                and time.thread_time() - self.start > _MATCH_BUDGET_S + self.calls * _MATCH_CALL_ALLOWANCE_S):
            raise ValueError(f"LoraConfig: matching the config's patterns against the model's module paths took "
                             f"more than {_MATCH_BUDGET_S} s (last: {pat.what} {pat.source!r}); simplify them")
        return m


def _check_repeats(pattern: str, what: str) -> None:
    """Refuses a "{" outside a character class that is not a repeat count, and counted repeats
    whose product is large (see the comment above)."""
    product, i, n = 1, 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # skip the class: "]" right after "[" or "[^" is a member
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
            continue
        if c == "{":
            m = _REPEAT.match(pattern, i)
            if not m or not (m.group(1) or m.group(3)):
                raise ValueError(f"LoraConfig: invalid {what} {pattern!r}: a literal '{{' (at {i}) is not supported "
                                 "(module paths never contain one); escape it as '\\{' if meant")
            product *= max(int(m.group(1) or 0), int(m.group(3) or 0), 1)
            if product > _MAX_REPEAT_PRODUCT or product * n > _MAX_EXPANDED_CHARS:
                raise ValueError(f"LoraConfig: invalid {what} {pattern!r}: its counted repeats are too large "
                                 "to match safely")
            i = m.end()
            continue
        i += 1


def _prepare(pattern: str, kind: str, what: str) -> _Pattern:
    """The validated, compiled form of one user pattern as PEFT applies it (kind: _WRAPPERS)."""
    if len(pattern) > _MAX_PATTERN_CHARS:
        raise ValueError(f"LoraConfig: {what} is {len(pattern)} characters long (at most {_MAX_PATTERN_CHARS})")
    template, method = _WRAPPERS[kind]
    full = template.format(pattern)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # "possible nested set" / set operations
            compiled = re.compile(full)
    except FutureWarning as exc:
        raise ValueError(f"LoraConfig: {what} {pattern!r} is ambiguous ({exc}); escape the '[' or the "
                         "repeated set operator") from None
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"LoraConfig: invalid {what} {pattern!r}: {exc}") from None
    if _PLAIN.fullmatch(pattern):
        return _Pattern(pattern, what, True, getattr(compiled, method))
    _check_repeats(pattern, what)
    try:
        import regex
    except ImportError as exc:  # a declared dependency; only a broken install gets here
        raise ValueError(f"LoraConfig: the 'regex' package is needed to match {what} {pattern!r} safely") from exc
    try:
        rx = regex.compile(full, flags=regex.VERSION0)
    except (regex.error, RecursionError, OverflowError, MemoryError) as exc:
        raise ValueError(f"LoraConfig: {what} {pattern!r} cannot be matched safely: {exc}") from None
    return _Pattern(pattern, what, False, getattr(rx, method))


def matcher():
    """The engine's PEFT reader calls this for the config regexes that are not plain names
    (cpp/src/api/peft_adapter.hpp PatternMatcher): (pattern, kind, what, key) -> -1 (no match),
    0, or for kind "layers" the captured layer index. One _Budget bounds all matching of a read."""
    budget = _Budget()

    def match(pattern: str, kind: str, what: str, key: str) -> int:
        m = budget.match(budget.pattern(pattern, kind, what), key)
        if m is None:
            return -1
        return min(int(m.group("idx")), 2**62) if kind == "layers" else 0

    return match
