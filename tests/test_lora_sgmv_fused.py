"""The LoRA terms fused into the NF4 projections' thread-pool job (Backend::nf4_gemm_nt_many_lora,
issue 8): at decode shapes (<= 8 rows) the CPU runs the shrinks as the first tasks of the NF4 GEMV's
job and each GEMV task adds the expand of its own output columns. The fused form must give exactly
the bits of the unfused one (base GEMV job, then the SGMV job; QLORA_SGMV_FUSE=0), which
test_lora_sgmv.py / test_mixed_batch.py check against float64 and against each row run alone:
on every CPU SIMD level, mixed batches, a shared adapter, "__base__" rows, a zero scale, decode
steps through a context, two thread counts; and it must actually run (profiled op counts)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import qlora_native

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = [b for b in qlora_native._core.available_backends() if b.startswith("cpu:") and b != "cpu:scalar"]

CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import qlora_native
from qlora_native import LoraConfig, _core
from helpers_tiny import build_tiny

tiny, backend, out = sys.argv[2], sys.argv[3], sys.argv[4]
res = {}
for threads in (1, 2):
    qlora_native.set_num_threads(threads)
    m = qlora_native.Model.from_pretrained(tiny, quantize="nf4", tokenizer=None, backend=backend)
    cfgs = {"r2": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
            "r16": LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
            "rs": LoraConfig(r=5, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"])}
    for seed, (name, cfg) in enumerate(cfgs.items(), 1):
        m.add_adapter(name, cfg, seed=seed)
        rng = np.random.default_rng(seed)
        m.set_adapter_state_dict(name, {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
                                        for k, v in m.get_adapter_state_dict(name).items()})
    m.set_adapter_scale("rs", 0.5)
    rng = np.random.default_rng(7)
    ids = rng.integers(3, 60, size=(8, 1)).astype(np.int32)
    _core.profile_reset(); _core.profile_enable(True)
    names = ["r2", "__base__", "r16", "r16", "rs", "r2", "r16", "__base__"]
    res[f"mixed{threads}"] = m(ids, adapter_names=names)
    res[f"shared{threads}"] = m(ids[:5], adapter_names=["r16"] * 5)
    res[f"one{threads}"] = m(ids[:1], adapter_names=["rs"])
    m.set_adapter_scale("rs", 0.0)
    res[f"zero{threads}"] = m(ids[:3], adapter_names=["rs", "r2", "rs"])
    m.set_adapter_scale("rs", 0.5)
    # decode steps of batch 6 (M = 6 per step) through a context, and a prompt of 2 x 4 = 8 rows
    toks = m.generate([[5, 6, 7], [8], [9, 10], [11, 12, 13], [14], [15, 16]], max_new_tokens=6,
                      temperature=0.0, eos_token_id=None, adapter_names=["r16", "r2", "rs", "r16", "__base__", "r2"])
    res[f"gen{threads}"] = np.array(toks, np.int64)
    res[f"prompt{threads}"] = m(ids.reshape(2, 4), adapter_names=["r16", "rs"])
    _core.profile_enable(False)
    rep = _core.profile_report()
    rows = rep if isinstance(rep, list) else rep.get("rows", [])
    res[f"fused_calls{threads}"] = np.array(sum(r["calls"] for r in rows if r["op"] == "nf4_gemm_nt_many_lora"))
np.savez(out, **res)
"""


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from helpers_tiny import build_tiny  # noqa: E402
    sys.path.insert(0, HERE)
    base = tmp_path_factory.mktemp("fused")
    # hidden 32 takes the generic NF4 kernel; 128 the SIMD kernels (K a whole number of groups)
    return [build_tiny(str(base / "k32")),
            build_tiny(str(base / "k128"), hidden_size=128, intermediate_size=256)]


def _run(tiny, backend, out, fuse):
    env = dict(os.environ, QLORA_SGMV_FUSE=fuse)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", CHILD, HERE, tiny, backend, out], check=True, env=env, timeout=300)
    return dict(np.load(out))


sys.path.insert(0, HERE)


@pytest.mark.parametrize("backend", LEVELS)
def test_fused_equals_unfused_bitwise(tiny_dirs, tmp_path, backend):
    for k, tiny in enumerate(tiny_dirs):
        fused = _run(tiny, backend, str(tmp_path / f"f{k}.npz"), "1")
        plain = _run(tiny, backend, str(tmp_path / f"p{k}.npz"), "0")
        for t in (1, 2):
            assert fused[f"fused_calls{t}"] > 0, "the fused op did not run"
            assert plain[f"fused_calls{t}"] == 0, "QLORA_SGMV_FUSE=0 still fused"
        for key in fused:
            if key.startswith("fused_calls"):
                continue
            np.testing.assert_array_equal(fused[key], plain[key], err_msg=f"{backend} {tiny} {key}")
        # the thread count changes neither form (a row's result does not depend on the task split)
        for key in ("mixed", "shared", "one", "zero", "gen", "prompt"):
            np.testing.assert_array_equal(fused[key + "1"], fused[key + "2"], err_msg=f"{backend} {key}")
        # the adapters matter (else equality would prove nothing)
        assert not np.array_equal(fused["mixed1"][0], fused["mixed1"][1])
