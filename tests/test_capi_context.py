"""C API contexts and loaded adapters (issue 8, qlora.h "Contexts and loaded adapters") through ctypes
on _core's shared object, against Python's Model on the same tiny model and the same PEFT adapter
directories: qlora_adapter_load + qlora_context_set_adapters + qlora_context_forward / _generate give
the logits (bit for bit) and tokens of model(ids, adapter_name=...) / Model.generate(adapter_name=...),
with runtime scales (set_adapter_scale), f32 and bf16 adapter files, rsLoRA, rank/alpha patterns, on
fp32 and NF4 bases; two contexts in two threads give their single-thread tokens; several adapters
equal Python's add_weighted_adapter("cat") sum; bad adapters are refused by both loaders."""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig, adapter_io

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_tiny import build_tiny  # noqa: E402
from helpers_capi import CALLBACK, ERR_INVALID_ARGUMENT, ERR_IO, F32P, I32P, OK, P, load_context_lib  # noqa: E402

QUANT = {None: 0, "nf4": 1}
PROMPT = [3, 17, 42, 5, 23, 9]
ADAPTERS = {  # name -> config (random non-zero factors are set below)
    "r2": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "r4": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "rs": LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"]),
    "pat": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
                      rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 3}),
}


@pytest.fixture(scope="module")
def lib():
    return load_context_lib()


class CError(RuntimeError):
    def __init__(self, code, msg):
        super().__init__(code, msg)
        self.code, self.msg = code, msg


class CModel:
    def __init__(self, lib, path, quantize):
        self.lib = lib
        p = lib.qlora_model_default_params()
        p.quantize = QUANT[quantize]
        self.h = lib.qlora_model_load(os.fspath(path).encode(), ctypes.byref(p))
        if not self.h:
            raise CError(lib.qlora_last_status(), lib.qlora_last_error().decode())
        self.V = lib.qlora_model_n_vocab(self.h)

    def adapter(self, directory):
        a = self.lib.qlora_adapter_load(self.h, os.fspath(directory).encode())
        if not a:
            raise CError(self.lib.qlora_last_status(), self.lib.qlora_last_error().decode())
        return a

    def context(self):
        c = self.lib.qlora_context_new(self.h, self.lib.qlora_context_default_params())
        assert c, self.lib.qlora_last_error()
        return CContext(self, c)

    def close(self):
        self.lib.qlora_model_free(self.h)


class CContext:
    def __init__(self, model, h):
        self.m, self.lib, self.h = model, model.lib, h

    def _check(self, rc):
        if rc != OK:
            raise CError(rc, self.lib.qlora_last_error().decode())

    def set_adapters(self, adapters, scales=None):
        arr = (P * max(len(adapters), 1))(*adapters)
        sc = None if scales is None else (ctypes.c_float * len(scales))(*scales)
        self._check(self.lib.qlora_context_set_adapters(self.h, arr, sc, len(adapters)))

    def forward(self, ids):
        ids = np.ascontiguousarray(ids, np.int32)
        out = np.full((len(ids), self.m.V), np.nan, np.float32)
        self._check(self.lib.qlora_context_forward(self.h, ids.ctypes.data_as(I32P), len(ids),
                                                   out.ctypes.data_as(F32P)))
        return out

    def generate(self, prompt, max_new, temperature=0.0, top_k=0, top_p=1.0, seed=0):
        prompt = np.ascontiguousarray(prompt, np.int32)
        sp = self.lib.qlora_sampling_default_params()
        sp.temperature, sp.top_k, sp.top_p, sp.seed = temperature, top_k, top_p, seed
        out = np.full(max_new, -1, np.int32)
        n = ctypes.c_int64(-1)
        self._check(self.lib.qlora_context_generate(self.h, prompt.ctypes.data_as(I32P), len(prompt), ctypes.byref(sp),
                                                    out.ctypes.data_as(I32P), max_new, ctypes.byref(n),
                                                    CALLBACK(lambda t, u: 0), None))
        return out[: n.value].tolist()

    def close(self):
        self.lib.qlora_context_free(self.h)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model and one PEFT directory per adapter (r4 also as a bf16 file)."""
    root = tmp_path_factory.mktemp("capi_ctx")
    tiny = build_tiny(str(root / "tiny"))
    m = qlora_native.Model.from_pretrained(tiny, quantize=None, tokenizer=None)
    dirs = {}
    for seed, (name, cfg) in enumerate(ADAPTERS.items(), 1):
        m.add_adapter(name, cfg, seed=seed)
        rng = np.random.default_rng(seed)
        sd = {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
              for k, v in m.get_adapter_state_dict(name).items()}
        m.set_adapter_state_dict(name, sd)
        dirs[name] = str(root / name)
        m.save_adapter(dirs[name], name)
        if name == "r4":  # the same adapter stored in bfloat16 (read by both loaders)
            dirs["r4_bf16"] = str(root / "r4_bf16")
            adapter_io.save_adapter(dirs["r4_bf16"], cfg, {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()})
    return tiny, dirs


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_parity_with_python(lib, files, quantize):
    tiny, dirs = files
    py = qlora_native.Model.from_pretrained(tiny, quantize=quantize, tokenizer=None)
    for name, d in dirs.items():
        py.load_adapter(d, name)
    cm = CModel(lib, tiny, quantize)
    try:
        ads = {name: cm.adapter(d) for name, d in dirs.items()}
        ctx = cm.context()
        ids = np.array(PROMPT)
        base = py(ids[None], adapter_name="__base__")[0]
        assert np.array_equal(ctx.forward(ids), base)  # a new context: the base model
        for name in dirs:
            for scale in (1.0, 0.5, 0.0):
                py.set_adapter_scale(name, scale)
                ctx.set_adapters([ads[name]], [scale])
                ref = py(ids[None], adapter_name=name)[0]
                got = ctx.forward(ids)
                assert np.array_equal(got, ref), (name, scale, np.abs(got - ref).max())
                if scale == 0.0:
                    assert np.array_equal(got, base)
                elif scale == 1.0:
                    assert np.abs(got - base).max() > 1e-2, name  # the adapter matters
                greedy = ctx.generate(PROMPT, 12)
                assert greedy == py.generate(PROMPT, max_new_tokens=12, eos_token_id=None, adapter_name=name)[0]
            py.set_adapter_scale(name, 1.0)
            kw = dict(temperature=0.9, top_k=20, top_p=0.95, seed=1234)
            ctx.set_adapters([ads[name]])  # scales NULL: 1
            assert ctx.generate(PROMPT, 12, **kw) == py.generate(PROMPT, max_new_tokens=12, eos_token_id=None,
                                                                 adapter_name=name, **kw)[0]
        # the bf16 file is the f32 adapter rounded: the same within bf16 rounding, not identical
        ctx.set_adapters([ads["r4_bf16"]])
        b16 = ctx.forward(ids)
        ctx.set_adapters([ads["r4"]])
        f32 = ctx.forward(ids)
        assert 0 < np.abs(b16 - f32).max() < 0.05 * np.abs(f32 - base).max()
        ctx.set_adapters([])
        assert np.array_equal(ctx.forward(ids), base)
        ctx.close()
    finally:
        cm.close()


def test_several_adapters_equal_cat_combination(lib, files):
    tiny, dirs = files
    py = qlora_native.Model.from_pretrained(tiny, quantize=None, tokenizer=None)
    for name in ("r2", "rs", "pat"):
        py.load_adapter(dirs[name], name)
    weights = [0.7, -0.4, 1.3]
    py.add_weighted_adapter(["r2", "rs", "pat"], weights, "combo", combination_type="cat")
    ids = np.array(PROMPT)
    ref = py(ids[None], adapter_name="combo")[0]
    cm = CModel(lib, tiny, None)
    try:
        ctx = cm.context()
        ctx.set_adapters([cm.adapter(dirs[n]) for n in ("r2", "rs", "pat")], weights)
        got = ctx.forward(ids)
        base = py(ids[None], adapter_name="__base__")[0]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref - base).max() + 1e-5
        ctx.close()
    finally:
        cm.close()


def test_two_threads_two_contexts(lib, files):
    """ctypes releases the GIL in foreign calls: two contexts generate at the same time."""
    tiny, dirs = files
    py = qlora_native.Model.from_pretrained(tiny, quantize="nf4", tokenizer=None)
    for name in ("r4", "rs"):
        py.load_adapter(dirs[name], name)
    want = {n: py.generate(PROMPT, max_new_tokens=20, eos_token_id=None, adapter_name=n)[0] for n in ("r4", "rs")}
    assert want["r4"] != want["rs"]
    cm = CModel(lib, tiny, "nf4")
    try:
        ctxs = {}
        for n in ("r4", "rs"):
            ctxs[n] = cm.context()
            ctxs[n].set_adapters([cm.adapter(dirs[n])])
        got = {n: [] for n in ctxs}
        barrier = threading.Barrier(2)

        def run(n):
            barrier.wait()
            for _ in range(4):
                got[n].append(ctxs[n].generate(PROMPT, 20))

        ts = [threading.Thread(target=run, args=(n,)) for n in ctxs]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in ts)
        for n in ctxs:
            assert got[n] == [want[n]] * 4, n
            ctxs[n].close()
    finally:
        cm.close()


def test_bad_adapters_refused_by_both_loaders(lib, files, tmp_path):
    tiny, dirs = files
    cm = CModel(lib, tiny, None)
    py = qlora_native.Model.from_pretrained(tiny, quantize=None, tokenizer=None)
    try:
        # an adapter made for another base: hidden 48 instead of 32
        other = build_tiny(str(tmp_path / "other"), hidden_size=48)
        om = qlora_native.Model.from_pretrained(other, quantize=None, tokenizer=None)
        om.add_adapter("x", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), seed=1)
        om.save_adapter(tmp_path / "other_adapter", "x")
        with pytest.raises(CError) as e:
            cm.adapter(tmp_path / "other_adapter")
        assert e.value.code == ERR_INVALID_ARGUMENT
        assert "layer 0 q_proj" in e.value.msg and "[4, 48]" in e.value.msg and "[out 32, in 32]" in e.value.msg
        with pytest.raises(ValueError):
            py.load_adapter(tmp_path / "other_adapter", "x")
        # NaN in a tensor; a finite value too large for float32 (lora_check.hpp: NaN logits before)
        for bad, match in ((np.nan, "NaN or Inf"), (1e30, "too large for float32")):
            cfg, ts = adapter_io.load_adapter(dirs["r2"])
            k = sorted(ts)[1]
            ts[k] = ts[k].copy()
            ts[k][0, 0] = bad
            nan_dir = tmp_path / f"bad_{match[:3]}"
            nan_dir.mkdir()
            qlora_native.io.save_safetensors(str(nan_dir / adapter_io.WEIGHTS_NAME), ts)
            with open(os.path.join(dirs["r2"], adapter_io.CONFIG_NAME)) as f:
                (nan_dir / adapter_io.CONFIG_NAME).write_text(f.read())
            with pytest.raises(CError) as e:
                cm.adapter(nan_dir)
            assert e.value.code == ERR_INVALID_ARGUMENT and k in e.value.msg and match in e.value.msg
            with pytest.raises(ValueError, match=match):
                py.load_adapter(nan_dir, "nan")
        with pytest.raises(CError) as e:
            cm.adapter(tmp_path / "missing")
        assert e.value.code == ERR_IO
        # a regex target the C loader does not read is refused with a pointer to Python's loader
        rx = LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.(q|v)_proj")
        py.add_adapter("rx", rx, seed=3)
        py.save_adapter(tmp_path / "rx", "rx")
        with pytest.raises(CError) as e:
            cm.adapter(tmp_path / "rx")
        assert e.value.code == ERR_INVALID_ARGUMENT and "regular expression" in e.value.msg
        assert "load_adapter" in e.value.msg
    finally:
        cm.close()


# adapter_config.json variants the C loader must read exactly as Python's (found by a probe of 2000
# random mutations; kept here as regressions): accepted ones give identical logits, refused ones are
# refused by both loaders.
CONFIG_CASES = [
    ({"layers_to_transform": [1], "layers_pattern": "layers"}, True),
    ({"layers_to_transform": 0, "layers_pattern": ""}, True),  # "" acts as no layers_pattern (PEFT tests truth)
    ({"layers_to_transform": [0], "layers_pattern": "lay.rs"}, True),  # '.' = any character
    ({"exclude_modules": ["model.layers.0.self_attn.q_proj"]}, True),
    ({"target_modules": "model.layers..\\.self_attn\\.v_proj"}, True),
    ({"target_modules": ["model.layers.1.self_attn.q_proj"]}, True),
    ({"rank_pattern": {"layers.0.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}}, True),
    ({"lora_alpha": 1e300}, False),  # scaling overflows float32
    ({"layers_pattern": "layers"}, False),  # needs layers_to_transform
    ({"target_modules": "model.layers.1.mlp"}, False),  # a regex reaching a non-projection module
    ({"rank_pattern": {"q_proj": 0}}, False),
    ({"use_dora": 0, "fan_in_fan_out": 0.0, "bias": "none", "modules_to_save": []}, True),  # "off" spellings
    ({"use_dora": None}, False),
]


@pytest.mark.parametrize("extra,ok", CONFIG_CASES)
def test_config_rules_match_python(lib, files, tmp_path, extra, ok):
    tiny, _ = files
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
           "target_modules": ["q_proj", "v_proj"], **extra}
    py = qlora_native.Model.from_pretrained(tiny, quantize=None, tokenizer=None)
    try:  # the tensors Python's rules ask for (else a plain q/v set)
        mods = [(layer, p, r) for layer, p, r, _, _ in LoraConfig.from_peft_dict(dict(cfg)).resolve(2)]
    except ValueError:
        mods = [(layer, p, 4) for layer in range(2) for p in ("q_proj", "v_proj")]
    shapes, rng = py._module_shapes(), np.random.default_rng(5)
    ts = {}
    for layer, p, r in mods:
        out_f, in_f = shapes[p]
        ts[adapter_io.peft_tensor_name(layer, p, "A")] = rng.standard_normal((r, in_f)).astype(np.float32) / 6
        ts[adapter_io.peft_tensor_name(layer, p, "B")] = rng.standard_normal((out_f, r)).astype(np.float32) / 2
    tmp_path.joinpath("a").mkdir()
    qlora_native.io.save_safetensors(str(tmp_path / "a" / adapter_io.WEIGHTS_NAME), ts)
    (tmp_path / "a" / adapter_io.CONFIG_NAME).write_text(json.dumps(cfg))
    cm = CModel(lib, tiny, None)
    try:
        if not ok:
            with pytest.raises(ValueError):
                py.load_adapter(tmp_path / "a", "a")
            with pytest.raises(CError) as e:
                cm.adapter(tmp_path / "a")
            assert e.value.code == ERR_INVALID_ARGUMENT
            return
        py.load_adapter(tmp_path / "a", "a")
        ctx = cm.context()
        ctx.set_adapters([cm.adapter(tmp_path / "a")])
        ids = np.array(PROMPT)
        got = ctx.forward(ids)
        assert np.array_equal(got, py(ids[None], adapter_name="a")[0])
        assert not np.array_equal(got, py(ids[None], adapter_name="__base__")[0])
        ctx.close()
    finally:
        cm.close()
