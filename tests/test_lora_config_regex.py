"""Adapter-config regexes come from strangers: matching them is bounded in time and memory
(issue 14, "Hangs"), and stays PEFT's (Python re's) answer for sane patterns."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from qlora_native import lora_config
from qlora_native.lora_config import LoraConfig, PROJECTIONS, module_path

EVIL = [
    r"(a+)+$", r"(.*.*)*X", r"(x+x+)+y", r"((.*)*)*X", r"((((.*)*)*)*)*Q", r"(\w|\w)*X",
    r"(.|..)*\d\d\d", r"(?:.|..|...)*Z", r"(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)!", r"(?:(.|.)){30}Z",
    r"(?:(?:.*\.)*)*proj!", r"((.*)\.(.*))*\d{3}", r"(.*a){20}",
]
FIELDS = ["target_modules", "rank_pattern", "alpha_pattern", "exclude_modules", "layers_pattern"]

_PROBE = r"""
import json, sys, time
from qlora_native.lora_config import LoraConfig
out = []
for field, p in json.loads(sys.stdin.read()):
    kw = {"target_modules": ["q_proj", "v_proj"]}
    if field == "target_modules":
        kw = {"target_modules": p}
    elif field in ("rank_pattern", "alpha_pattern"):
        kw[field] = {p: 4}
    elif field == "exclude_modules":
        kw[field] = p
    else:
        kw.update(layers_to_transform=[1, 2], layers_pattern=p)
    t = time.perf_counter()
    try:
        LoraConfig(**kw).resolve(32)
        res = "ok"
    except ValueError as e:
        res = "ValueError"
    except BaseException as e:
        res = f"{type(e).__name__}: {e}"
    out.append([field, p, res, time.perf_counter() - t])
print(json.dumps(out))
"""


def _run_probe(cases, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", _PROBE], input=json.dumps(cases), capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_evil_patterns_finish_or_fail_cleanly():
    # A subprocess with a wall-clock bound: the code before the fix ran for minutes here.
    results = _run_probe([[f, p] for p in EVIL for f in FIELDS])
    assert len(results) == len(EVIL) * len(FIELDS)
    for field, p, res, secs in results:
        assert res in ("ok", "ValueError"), (field, p, res)
        assert secs < 2.0, (field, p, secs)  # generous: the bound is ~0.25 s per pattern


def test_timeout_error_names_field_and_pattern():
    with pytest.raises(ValueError, match=r"rank_pattern key .*\(\.\|\.\.\).*catastrophic backtracking"):
        LoraConfig(target_modules=["q_proj"], rank_pattern={r"(.|..)*\d\d\d": 4}).resolve(2)
    with pytest.raises(ValueError, match=r"target_modules regex"):
        LoraConfig(target_modules=r"(.|..)*\d\d\d").resolve(2)


@pytest.mark.parametrize("pattern, why", [
    ("((x{1000}){1000}){1000}", "counted repeats are too large"),  # the regex compiler would expand it
    ("(?:a{300}){300}", "counted repeats are too large"),
    ("q_proj{e<=1}", "literal '{'"),  # fuzzy matching in the regex package, literal text in re
    ("[[:alpha:]]+_proj", "ambiguous"),  # a POSIX class in the regex package, a plain set in re
    ("(" * 5000 + ")" * 5000, "invalid"),  # RecursionError inside re's parser
    ("x" * 70000, "characters long"),
    ("(?P<idx>q)_proj", None),  # fine as a target, but not as a layers_pattern (group name clash)
])
def test_unsafe_or_ambiguous_patterns_are_refused(pattern, why):
    if why is None:
        LoraConfig(target_modules=pattern)
        with pytest.raises(ValueError, match="layers_pattern"):
            LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=pattern)
        return
    t = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(why)):
        LoraConfig(target_modules=pattern)
    with pytest.raises(ValueError, match=re.escape(why)):
        LoraConfig(target_modules=["q_proj"], rank_pattern={pattern: 2})
    assert time.perf_counter() - t < 5.0


def test_pattern_count_and_size_limits():
    with pytest.raises(ValueError, match="entries"):
        LoraConfig(rank_pattern={f"k{i}": 2 for i in range(lora_config._MAX_PATTERN_KEYS + 1)})
    with pytest.raises(ValueError, match="total"):
        LoraConfig(alpha_pattern={f"{i}" + "x" * 60000: 2 for i in range(20)})


def _paths(layers):
    return [module_path(i, n) for i in range(layers) for n in PROJECTIONS]


SANE = [
    r".*\.(q_proj|v_proj)", r"model\.layers\.(1[0-9]|2[0-3])\.self_attn\..*", r".*(?<!mlp)\.(q|k)_proj",
    r"^(?!.*layers\.0\.).*proj$", r".*layers\.\d{1,2}\.mlp\.(gate|up)_proj", r"(?i).*Q_PROJ", r".*\.(?:o|down)_proj",
    r".*[13579]\.self_attn\.[qk]_proj", r"(model\.layers\.)?\d+\.mlp\.\w+_proj", r".*\.(\w)_proj",
]


@pytest.mark.parametrize("pattern", SANE)
def test_sane_patterns_keep_re_semantics(pattern):
    """target_modules (fullmatch), exclude_modules and rank_pattern give re's (PEFT's) answer."""
    layers = 24
    paths = _paths(layers)
    want = [p for p in paths if re.fullmatch(pattern, p)]
    if want:
        got = LoraConfig(target_modules=pattern).resolve(layers)
        assert [module_path(i, n) for i, n, *_ in got] == want
    kept = [p for p in paths if p.endswith(("q_proj", "v_proj")) and not re.fullmatch(pattern, p)]
    if kept:
        got = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=pattern).resolve(layers)
        assert [module_path(i, n) for i, n, *_ in got] == kept
    try:
        re.compile(rf"(.*\.)?({pattern})$")
    except re.error:  # PEFT's get_pattern_key fails on it too ("(?i)" inside its wrapper)
        with pytest.raises(ValueError, match="rank_pattern key"):
            LoraConfig(target_modules="all-linear", rank_pattern={pattern: 4})
        return
    cfg = LoraConfig(target_modules="all-linear", r=8, rank_pattern={pattern: 4}, alpha_pattern={pattern: 3})
    for i, n, r, alpha, _ in cfg.resolve(layers):
        hit = re.match(rf"(.*\.)?({pattern})$", module_path(i, n)) is not None
        assert (r, alpha) == ((4, 3) if hit else (8, 32)), (pattern, i, n)


def test_large_sane_config_resolves():
    # One rank/alpha key per module (as some tools write them) on an 80-layer model: ~300k matches.
    layers = 80
    paths = _paths(layers)
    rank = {p.replace(".", r"\."): 1 + i % 7 for i, p in enumerate(paths)}
    alpha = {p: 2 + i % 5 for i, p in enumerate(paths)}
    cfg = LoraConfig(target_modules="all-linear", rank_pattern=rank, alpha_pattern=alpha)
    t = time.perf_counter()
    out = cfg.resolve(layers)
    assert time.perf_counter() - t < 30  # generous; ~1 s here
    assert [(r, a) for _, _, r, a, _ in out] == [(1 + i % 7, 2 + i % 5) for i in range(len(paths))]
    # Non-plain keys go through the bounded engine: the per-match allowance keeps a sane config loading.
    rank2 = {rf"(?:model\.)?layers\.{i}\.(?:self_attn|mlp)\.{n}": 3 for i in range(layers) for n in PROJECTIONS}
    out = LoraConfig(target_modules="all-linear", rank_pattern=rank2).resolve(layers)
    assert all(r == 3 for _, _, r, _, _ in out)


def test_match_budget_bounds_total_time(monkeypatch):
    # Many slow-but-finite matches are cut off by the CPU budget (shrunk here to trigger it). Plain
    # names are matched by the engine (linear in the path, no budget needed); regexes by the budget.
    monkeypatch.setattr(lora_config, "_MATCH_BUDGET_S", 0.0)
    monkeypatch.setattr(lora_config, "_MATCH_CALL_ALLOWANCE_S", 0.0)
    cfg = LoraConfig(target_modules="all-linear", rank_pattern={rf"layers\.{i}\.mlp\.(up)_proj": 2 for i in range(64)})
    with pytest.raises(ValueError, match="took more than"):
        cfg.resolve(64)


_LOAD_PROBE = r"""
import json, sys, time
from qlora_native import adapter_io
t = time.perf_counter()
try:
    adapter_io.load_adapter(sys.argv[1], num_layers=2)
    res = "ok"
except ValueError as e:
    res = "ValueError: " + str(e)
print(json.dumps([res, time.perf_counter() - t]))
"""


@pytest.mark.parametrize("field, pattern", [("rank_pattern", r"(.|..)*\d\d\d"), ("alpha_pattern", r"(?:.|..)*\d\d\d"),
                                            ("target_modules", r"(.|..)*\d\d\dq_proj")])
def test_load_adapter_with_a_hostile_config_fails_fast(tmp_path, field, pattern):
    """End to end: adapter_config.json from a stranger, loaded by adapter_io.load_adapter."""
    import numpy as np

    from qlora_native import io
    from qlora_native.lora_config import peft_tensor_name

    cfg = LoraConfig(r=2, target_modules=["q_proj"])
    tensors = {}
    for layer in range(2):
        tensors[peft_tensor_name(layer, "q_proj", "A")] = np.zeros((2, 8), np.float32)
        tensors[peft_tensor_name(layer, "q_proj", "B")] = np.zeros((8, 2), np.float32)
    io.save_safetensors(str(tmp_path / "adapter_model.safetensors"), tensors)
    d = cfg.to_peft_dict()
    d[field] = pattern if field == "target_modules" else {pattern: 2}
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    res, secs = json.loads(r.stdout)
    assert res.startswith("ValueError") and "catastrophic backtracking" in res, res
    assert secs < 3.0
