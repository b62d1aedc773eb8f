"""PEFT adapter directories: our save/load against real PEFT (torch/transformers/peft are test-only)."""
import copy
import json
import math

import ml_dtypes
import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig
from qlora_native.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from qlora_native.lora_config import peft_tensor_name

HIDDEN, INTER, N_HEADS, N_KV, N_LAYERS = 64, 96, 4, 2, 2
HEAD_DIM = HIDDEN // N_HEADS
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (N_KV * HEAD_DIM, HIDDEN), "v_proj": (N_KV * HEAD_DIM, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
          "down_proj": (HIDDEN, INTER)}  # [out, in]

# The same kwargs build peft.LoraConfig and ours (names are shared).
CONFIGS = {
    "list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(r=8, lora_alpha=16, target_modules="all-linear",
                     rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"v_proj": 3}),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj"]),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj"),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "layers": dict(r=4, lora_alpha=4, target_modules=["k_proj", "gate_proj"], layers_to_transform=[1]),
    "layers_pattern": dict(r=4, lora_alpha=8, target_modules=["o_proj"], layers_to_transform=0,
                           layers_pattern="layers"),
    "exclude": dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["down_proj"]),
    "default": dict(r=4, lora_alpha=12),
}


@pytest.fixture(scope="module")
def base_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                                   num_key_value_heads=N_KV, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _lora_layers(pm):
    """{module path: LoRA layer} of a PEFT model (path without the base_model.model. prefix)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def _peft_state(pm):
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().numpy() for k, v in get_peft_model_state_dict(pm).items()}


def _peft_model(base_model, kwargs, rng):
    import peft
    import torch

    pm = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    with torch.no_grad():
        for layer in _lora_layers(pm).values():  # non-zero B so the adapter is not a no-op
            w = layer.lora_B["default"].weight
            w.copy_(torch.from_numpy(rng.standard_normal(tuple(w.shape)).astype(np.float32)))
    return pm


def _resolved(cfg):
    return {f"model.layers.{i}.{'self_attn' if n in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{n}":
            (r, s) for i, n, r, _, s in cfg.resolve(N_LAYERS)}


def _random_tensors(cfg, rng, dtype=np.float32):
    t = {}
    for i, name, r, _, _ in cfg.resolve(N_LAYERS):
        out_f, in_f = SHAPES[name]
        t[peft_tensor_name(i, name, "A")] = rng.standard_normal((r, in_f)).astype(dtype)
        t[peft_tensor_name(i, name, "B")] = rng.standard_normal((out_f, r)).astype(dtype)
    return t


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_resolve_matches_peft_wrapping(base_model, case, rng):
    pm = _peft_model(base_model, CONFIGS[case], rng)
    peft_mods = {p: (m.r["default"], m.scaling["default"]) for p, m in _lora_layers(pm).items()}
    ours = _resolved(LoraConfig(**CONFIGS[case]))
    assert set(ours) == set(peft_mods)
    for p, (r, s) in ours.items():
        assert r == peft_mods[p][0], p
        assert s == pytest.approx(peft_mods[p][1], rel=1e-15), p


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_load_peft_saved_adapter(base_model, case, rng, tmp_path):
    pm = _peft_model(base_model, CONFIGS[case], rng)
    pm.save_pretrained(tmp_path)
    cfg, tensors = load_adapter(tmp_path, num_layers=N_LAYERS, module_shapes=SHAPES)
    assert cfg.resolve(N_LAYERS) == LoraConfig(**CONFIGS[case]).resolve(N_LAYERS)
    ref = _peft_state(pm)
    assert set(tensors) == set(ref)
    for k, v in ref.items():
        assert tensors[k].dtype == np.float32
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_peft_loads_our_adapter(base_model, case, rng, tmp_path):
    import peft

    cfg = LoraConfig(**CONFIGS[case])
    tensors = _random_tensors(cfg, rng)
    base_dir, out = tmp_path / "base", tmp_path / "adapter"
    base_model.config.save_pretrained(base_dir)  # a local base path: PEFT looks for its config.json
    save_adapter(out, cfg, tensors, base_model_name_or_path=base_dir)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    assert json.loads((out / CONFIG_NAME).read_text())["base_model_name_or_path"] == str(base_dir)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), out)
    got = _peft_state(pm)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    peft_mods = {p: (m.r["default"], m.scaling["default"]) for p, m in _lora_layers(pm).items()}
    ours = _resolved(cfg)
    assert set(peft_mods) == set(ours)
    for p, (r, s) in ours.items():
        assert peft_mods[p][0] == r and peft_mods[p][1] == pytest.approx(s, rel=1e-15), p


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_adapters(base_model, dtype, rng, tmp_path):
    import peft

    cfg = LoraConfig(**CONFIGS["patterns"])
    tensors = _random_tensors(cfg, rng, dtype)
    save_adapter(tmp_path, cfg, tensors)
    assert qlora_native.io.safe_open(tmp_path / WEIGHTS_NAME).dtype(next(iter(tensors))) == np.dtype(dtype)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path)
    got_peft = _peft_state(pm)
    _, got = load_adapter(tmp_path)
    for k, v in tensors.items():
        exact = v.astype(np.float32)  # widening is exact
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], exact, err_msg=k)
        np.testing.assert_array_equal(got_peft[k], exact, err_msg=k)


def _saved(tmp_path, rng, case="list"):
    cfg = LoraConfig(**CONFIGS[case])
    tensors = _random_tensors(cfg, rng)
    save_adapter(tmp_path, cfg, tensors)
    return cfg, tensors


def test_roundtrip_without_peft(rng, tmp_path):
    cfg, tensors = _saved(tmp_path, rng, "patterns")
    cfg2, got = load_adapter(tmp_path)
    assert cfg2.resolve(N_LAYERS) == cfg.resolve(N_LAYERS)
    assert set(got) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k])
        assert got[k].flags.writeable


def test_load_errors_missing_files(rng, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    _saved(tmp_path, rng)
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_adapter(tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(tmp_path)


def _rewrite(tmp_path, tensors=None, cfg_update=None):
    if tensors is not None:
        qlora_native.io.save_safetensors(tmp_path / WEIGHTS_NAME, tensors)
    if cfg_update is not None:
        d = json.loads((tmp_path / CONFIG_NAME).read_text())
        d.update(cfg_update)
        (tmp_path / CONFIG_NAME).write_text(json.dumps(d))


def test_load_errors_tensors(rng, tmp_path):
    cfg, tensors = _saved(tmp_path, rng)
    a0 = peft_tensor_name(0, "q_proj", "A")
    cases = [
        ({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
          np.ones(HIDDEN, np.float32)}, "DoRA"),
        ({k: v for k, v in tensors.items() if k != a0}, "missing"),
        ({**tensors, peft_tensor_name(0, "k_proj", "A"): tensors[a0]}, "does not target"),
        ({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": tensors[a0]},
         "unexpected adapter tensor"),
        ({**tensors, "base_model.model.lm_head.weight": np.ones((4, 4), np.float32)}, "modules_to_save"),
        ({**tensors, a0: tensors[a0][:3]}, "shape"),
        ({**tensors, a0: tensors[a0][:, :10]}, "inconsistent"),
        ({**tensors, a0: tensors[a0].astype(np.int32)}, "dtype"),
        ({**tensors, a0: np.full_like(tensors[a0], np.nan)}, "NaN"),
    ]
    for bad, match in cases:
        _rewrite(tmp_path, tensors=bad)
        with pytest.raises(ValueError, match=match):
            load_adapter(tmp_path)
    _rewrite(tmp_path, tensors=tensors)
    load_adapter(tmp_path)  # restored: loads again
    with pytest.raises(ValueError, match="layers"):
        load_adapter(tmp_path, num_layers=1)
    with pytest.raises(ValueError, match="missing"):
        load_adapter(tmp_path, num_layers=3)  # layer 2 has no tensors
    with pytest.raises(ValueError, match="inconsistent"):
        load_adapter(tmp_path, module_shapes={"q_proj": (HIDDEN, HIDDEN + 1)})


def test_load_errors_config(rng, tmp_path):
    _saved(tmp_path, rng)
    _rewrite(tmp_path, cfg_update={"use_dora": True})
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter(tmp_path)
    _rewrite(tmp_path, cfg_update={"use_dora": False, "peft_type": "LOHA"})
    with pytest.raises(ValueError, match="peft_type"):
        load_adapter(tmp_path)
    _rewrite(tmp_path, cfg_update={"peft_type": "LORA", "r": 5})  # tensors have r=4
    with pytest.raises(ValueError, match="r=5"):
        load_adapter(tmp_path)
    # config errors name the file; deep nesting is a FormatError, not RecursionError (engine's parser)
    _rewrite(tmp_path, cfg_update={"peft_type": "LOHA"})
    with pytest.raises(ValueError, match=r"adapter_config\.json: adapter config: peft_type"):
        load_adapter(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(qlora_native.FormatError, match="not valid JSON"):
        load_adapter(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"r": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(qlora_native.FormatError, match="adapter_config.json"):
        load_adapter(tmp_path)


def test_corrupt_safetensors(rng, tmp_path):
    _saved(tmp_path, rng)
    p = tmp_path / WEIGHTS_NAME
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(qlora_native.FormatError):
        load_adapter(tmp_path)


def test_save_errors(rng, tmp_path):
    cfg = LoraConfig(**CONFIGS["list"])
    tensors = _random_tensors(cfg, rng)
    with pytest.raises(ValueError, match="missing"):
        save_adapter(tmp_path, cfg, {k: v for k, v in list(tensors.items())[1:]})
    with pytest.raises(ValueError, match="shape"):
        save_adapter(tmp_path, cfg, {**tensors, peft_tensor_name(0, "q_proj", "B"): np.ones((HIDDEN, 5), np.float32)})
    with pytest.raises(ValueError, match="config must be a LoraConfig"):
        save_adapter(tmp_path, cfg.to_peft_dict(), tensors)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written on error


def test_save_replaces_atomically(rng, tmp_path):
    _saved(tmp_path, rng)
    cfg2, t2 = _saved(tmp_path, rng, "rslora")
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    c, got = load_adapter(tmp_path)
    assert c.use_rslora and set(got) == set(t2)
    assert math.isclose(c.resolve(N_LAYERS)[0][4], 16 / 2)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_statistics_match_peft(base_model, init, rng):
    """Our init_weights draws from the distributions PEFT's own init produces (pooled over modules)."""
    import peft
    import torch

    torch.manual_seed(int(rng.integers(2**31)))
    kwargs = dict(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    pm = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    cfg = LoraConfig(**kwargs)
    # normalized by the expected scale so modules with different fan-in pool together
    theirs = {"A": [], "B": []}
    ours = {"A": [], "B": []}
    for path, layer in _lora_layers(pm).items():
        a = layer.lora_A["default"].weight.detach().numpy().astype(np.float64)
        b = layer.lora_B["default"].weight.detach().numpy().astype(np.float64)
        oa, ob = cfg.init_weights(a.shape[1], b.shape[0], a.shape[0], rng)
        a_scale = 1 / 8 if init == "gaussian" else 1 / math.sqrt(a.shape[1])
        theirs["A"].append(a.ravel() / a_scale)
        ours["A"].append(oa.astype(np.float64).ravel() / a_scale)
        theirs["B"].append(b.ravel() * math.sqrt(8))
        ours["B"].append(ob.astype(np.float64).ravel() * math.sqrt(8))
    for k in "AB":
        t, o = np.concatenate(theirs[k]), np.concatenate(ours[k])
        if init is not False and k == "B":
            assert not t.any() and not o.any()
            continue
        assert np.abs(t).max() <= 1 + 1e-6 or init == "gaussian"
        # same second moment within 6 standard errors of the difference
        se = math.sqrt(np.var(t ** 2) / t.size + np.var(o ** 2) / o.size)
        assert abs(np.mean(t ** 2) - np.mean(o ** 2)) < 6 * se, (k, np.mean(t ** 2), np.mean(o ** 2))
        assert abs(t.mean() - o.mean()) < 6 * math.sqrt(t.var() / t.size + o.var() / o.size)


def test_one_reader_for_both_faces(rng, tmp_path, monkeypatch):
    """load_adapter and Model.load_adapter read through the engine's PEFT reader (the C API's
    qlora_adapter_load): no Python copy of the rules. Regex targets need the Python face's matcher."""
    from qlora_native import _core
    from helpers_model import make_checkpoint

    calls = []
    real = _core.io.read_peft_adapter
    monkeypatch.setattr(_core.io, "read_peft_adapter", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg, tensors = _saved(tmp_path / "rx", rng, "regex")
    got_cfg, got = load_adapter(tmp_path / "rx")
    assert len(calls) == 1 and got_cfg.resolve(N_LAYERS) == cfg.resolve(N_LAYERS)
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k])
    with pytest.raises(ValueError, match="regular expression"):  # the C API's reader: plain names only
        real(str(tmp_path / "rx"))
    raw, mods = real(str(tmp_path / "rx"), matcher=qlora_native.lora_config.matcher())
    assert [(m[0], m[1], m[2]) for m in mods] == [(1, "q_proj", 3), (1, "k_proj", 3)]
    assert mods[0][3] == np.float32(5 / 3) and raw["target_modules"] == cfg.target_modules
    # Model.load_adapter: an adapter for another base names the module and says so
    ckpt, _, _ = make_checkpoint(tmp_path / "m", rng, num_hidden_layers=2, hidden_size=32)
    m = qlora_native.Model.from_pretrained(ckpt, quantize=None, tokenizer=None)
    calls.clear()
    with pytest.raises(ValueError, match=r"q_proj.*another base model"):
        m.load_adapter(tmp_path / "rx", "x")
    assert len(calls) == 1
