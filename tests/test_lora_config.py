"""LoraConfig: PEFT-compatible target/rank/alpha resolution, validation, init and the PEFT dict."""
import math

import numpy as np
import pytest

from qlora_native import LoraConfig
from qlora_native.lora_config import PROJECTIONS, module_path, peft_tensor_name


def _modules(cfg, n):
    return [(i, name) for i, name, *_ in cfg.resolve(n)]


def test_paths_and_names():
    assert module_path(3, "q_proj") == "model.layers.3.self_attn.q_proj"
    assert module_path(0, "gate_proj") == "model.layers.0.mlp.gate_proj"
    assert peft_tensor_name(1, "down_proj", "B") == "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


def test_default_targets_are_peft_llama_default():
    assert _modules(LoraConfig(), 2) == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]


def test_all_linear_and_scaling():
    cfg = LoraConfig(r=8, lora_alpha=24, target_modules="ALL-LINEAR")
    res = cfg.resolve(3)
    assert [(i, n) for i, n, *_ in res] == [(i, p) for i in range(3) for p in PROJECTIONS]
    assert all(r == 8 and a == 24 and s == 3.0 for _, _, r, a, s in res)
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]).resolve(1)
    assert rs[0][4] == pytest.approx(8 / math.sqrt(16), rel=1e-15)


def test_rank_alpha_patterns_follow_get_pattern_key():
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                     rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2, "proj": 12},
                     alpha_pattern={r"model\.layers\.0\.self_attn\.v_proj": 5})
    got = {(i, n): (r, a, s) for i, n, r, a, s in cfg.resolve(2)}
    assert got[(0, "q_proj")] == (4, 16, 4.0)  # first matching key wins (dict order)
    assert got[(1, "down_proj")] == (2, 16, 8.0)
    # "proj" must match a whole dotted suffix: "(.*\.)?(proj)$" does not match "...q_proj"
    assert got[(0, "k_proj")] == (8, 16, 2.0)
    assert got[(0, "v_proj")] == (8, 5, 5 / 8)
    assert got[(1, "v_proj")] == (8, 16, 2.0)


def test_layers_to_transform_and_pattern():
    cfg = LoraConfig(target_modules=["k_proj", "up_proj"], layers_to_transform=[0, 2])
    assert _modules(cfg, 3) == [(0, "k_proj"), (0, "up_proj"), (2, "k_proj"), (2, "up_proj")]
    cfg = LoraConfig(target_modules=["o_proj"], layers_to_transform=1, layers_pattern="layers")
    assert _modules(cfg, 3) == [(1, "o_proj")]
    # a pattern that names no segment of the path matches nothing (PEFT): error, not silence
    with pytest.raises(ValueError, match="matches no projection"):
        LoraConfig(target_modules=["o_proj"], layers_to_transform=1, layers_pattern="h").resolve(3)
    # an exact module path is not filtered by layers_to_transform (PEFT's rule)
    cfg = LoraConfig(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    assert _modules(cfg, 2) == [(0, "q_proj"), (1, "v_proj")]


def test_regex_targets_and_exclude():
    cfg = LoraConfig(target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj")
    assert _modules(cfg, 3) == [(1, "q_proj"), (1, "k_proj")]
    cfg = LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"])
    got = _modules(cfg, 2)
    assert (0, "q_proj") not in got and (1, "q_proj") in got and not any(n == "down_proj" for _, n in got)
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*")
    assert _modules(cfg, 2) == [(1, "q_proj"), (1, "v_proj")]


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="all"), "bias"),
    (dict(bias="lora_only"), "bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
    (dict(target_modules=["embed_tokens"]), "embed_tokens"),
    (dict(target_modules=[]), "target_modules"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(r=0), "r must be"),
    (dict(r=2.5), "r must be"),
    (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(rank_pattern={"q_proj(": 4}), "invalid"),
    (dict(target_modules=".*proj", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern"),
    (dict(target_modules=["q_proj"], layers_to_transform=[-1]), "layers_to_transform"),
])
def test_invalid_or_unsupported(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("regex, bad", [(r".*", "model"), (r".*lm_head", "lm_head"),
                                        (r".*embed_tokens|.*q_proj", "embed_tokens"),
                                        (r".*\.mlp", "mlp")])
def test_regex_reaching_other_modules_is_refused(regex, bad):
    with pytest.raises(ValueError, match=bad):
        LoraConfig(target_modules=regex).resolve(2)


def test_resolve_bad_num_layers_and_no_match():
    with pytest.raises(ValueError, match="num_layers"):
        LoraConfig().resolve(0)
    with pytest.raises(ValueError, match="matches no projection"):
        LoraConfig(target_modules=r"model\.layers\.5\..*").resolve(2)


def _uniform_check(x, bound):
    """x ~ U(-bound, bound): range, and mean/variance within 6 standard errors."""
    n = x.size
    assert np.abs(x).max() <= bound
    assert abs(x.mean()) < 6 * bound / math.sqrt(3 * n)
    var = bound ** 2 / 3  # var of the sample variance of U(-b, b): (b^4/5 - b^4/9) / n
    assert abs(x.var() - var) < 6 * math.sqrt((bound ** 4 / 5 - var ** 2) / n)


def test_init_default_kaiming_uniform(rng):
    in_f, out_f, r = 384, 200, 16
    a, b = LoraConfig().init_weights(in_f, out_f, r, rng)
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == (r, in_f) and b.shape == (out_f, r)
    _uniform_check(a.astype(np.float64), 1 / math.sqrt(in_f))
    assert not b.any()


def test_init_gaussian_std_is_one_over_r(rng):
    in_f, out_f, r = 2048, 64, 8
    a, b = LoraConfig(init_lora_weights="gaussian").init_weights(in_f, out_f, r, rng)
    n, std = a.size, 1 / r  # PEFT: nn.init.normal_(A, std=1/r)
    assert abs(a.mean()) < 6 * std / math.sqrt(n)
    assert abs(a.std() - std) < 6 * std / math.sqrt(2 * n)
    assert not b.any()


def test_init_false_randomizes_both(rng):
    in_f, out_f, r = 256, 300, 8
    a, b = LoraConfig(init_lora_weights=False).init_weights(in_f, out_f, r, rng)
    _uniform_check(a.astype(np.float64), 1 / math.sqrt(in_f))
    _uniform_check(b.astype(np.float64), 1 / math.sqrt(r))  # lora_B = nn.Linear(r, out): fan_in = r


def test_init_bad_args(rng):
    with pytest.raises(ValueError, match="in_features"):
        LoraConfig().init_weights(0, 4, 2, rng)
    with pytest.raises(ValueError, match="rng"):
        LoraConfig().init_weights(4, 4, 2, 123)


def test_peft_dict_roundtrip():
    cfg = LoraConfig(r=8, lora_alpha=16.5, lora_dropout=0.1, target_modules=["v_proj", "q_proj"],
                     use_rslora=True, init_lora_weights="gaussian", rank_pattern={"q_proj": 4},
                     alpha_pattern={"v_proj": 3}, layers_to_transform=[0, 1], layers_pattern="layers",
                     base_model_name_or_path="some/model")
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM" and d["target_modules"] == ["q_proj", "v_proj"]
    back = LoraConfig.from_peft_dict(d)
    assert back.resolve(3) == cfg.resolve(3)
    assert back.to_peft_dict() == d
    # target_modules=None is written as PEFT's resolved default
    assert LoraConfig().to_peft_dict()["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("change, match", [
    (dict(peft_type="IA3"), "peft_type"),
    (dict(peft_type=None), "peft_type"),
    (dict(task_type="SEQ_CLS"), "task_type"),
    (dict(use_dora=True), "DoRA"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(trainable_token_indices=[1, 2]), "trainable_token_indices"),
    (dict(layer_replication=[[0, 1]]), "layer_replication"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    (dict(init_lora_weights="olora"), "init_lora_weights"),
])
def test_from_peft_dict_rejects(change, match):
    d = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    d.update(change)
    with pytest.raises(ValueError, match=match):
        LoraConfig.from_peft_dict(d)


def test_from_peft_dict_defaults_and_unknown_keys():
    cfg = LoraConfig.from_peft_dict({"peft_type": "LORA", "target_modules": ["q_proj"], "some_future_flag": None})
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 8, 0.0)  # PEFT's defaults
    with pytest.warns(RuntimeWarning, match="some_future_key"):
        LoraConfig.from_peft_dict({"peft_type": "LORA", "some_future_key": "x"})


def test_real_peft_dump_and_peft_accepts_ours():
    peft = pytest.importorskip("peft")
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM",
                         rank_pattern={"down_proj": 2}, use_rslora=True, layers_to_transform=[1])
    d = pc.to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    assert len(d) > 35  # the full 0.21-style dump
    cfg = LoraConfig.from_peft_dict(d)
    assert cfg.resolve(2) == [(1, "q_proj", 4, 8, 4.0), (1, "down_proj", 2, 8, 8 / math.sqrt(2))]
    # and PEFT builds an equal config from ours
    back = peft.LoraConfig(**{k: v for k, v in cfg.to_peft_dict().items() if k != "peft_type"})
    for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "use_rslora", "layers_to_transform"):
        assert getattr(back, k) == getattr(pc, k), k


@pytest.mark.parametrize("ex", [5, ["q_proj", 3], {"q_proj": 1}, "(unclosed"])
def test_exclude_modules_validated(ex):
    with pytest.raises(ValueError, match="exclude_modules"):
        LoraConfig(target_modules="all-linear", exclude_modules=ex)


def test_exclude_modules_tuple_normalized():
    assert LoraConfig(exclude_modules=("v_proj", "q_proj")).exclude_modules == ["q_proj", "v_proj"]


def test_resolve_is_the_engine_rule(monkeypatch):
    """resolve() runs the engine's rules (peft_adapter.cpp resolve_peft_config, also behind the C API's
    adapter loader): no Python copy of the targeting / pattern / scaling rules; the message of a
    config that adapts nothing quotes its fields."""
    from qlora_native import _core

    calls = []
    real = _core.io.resolve_peft_config
    monkeypatch.setattr(_core.io, "resolve_peft_config", lambda *a: calls.append(a) or real(*a))
    cfg = LoraConfig(r=9, lora_alpha=7, use_rslora=True, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 4})
    assert cfg.resolve(2) == [(0, "q_proj", 9, 7, 7 / 3), (1, "q_proj", 4, 7, 3.5)]
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] \(layers_to_transform=\[5\], "
                                         r"exclude_modules=None\) matches no projection of a 2-layer"):
        LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]).resolve(2)
