"""Issue 15: the training forward's LoRA expand y += s t·Bᵀ runs inside the base NF4 GEMM
(Backend::nf4_gemm_nt_expand; CPU: cpu/gemm_small.hpp LoraTail), on each C panel right after the base
micro-kernel wrote it, instead of gemm_nt(beta = 1) re-reading the whole output. The tail is that
gemm_nt's micro-kernel over one depth block of r with alpha s, beta 1, so every element sees the same
operations: QLORA_LORA_FUSE=0 (the two calls) must give the same bits. Checked on whole training steps
(losses, every adapter gradient, the adapter after AdamW steps), fp32 compute at AVX-512 and AVX2 and
bf16 compute (AMX / AVX512-BF16 base GEMMs, fp32 expand), 1 and 2 threads, grouped and ungrouped LoRA,
with dropout, and with the shared-A / task-grid drivers; the profile shows the fused op ran."""
import os
import subprocess
import sys

import numpy as np
import pytest

from qlora_native import _core, ops

HERE = os.path.dirname(os.path.abspath(__file__))
HAS = _core.supported_simd_levels()

SCRIPT = r"""
import os, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import qlora_native
from qlora_native import _core
from helpers_tiny import build_tiny
level, dtype = sys.argv[4], sys.argv[5]
# q 160 wide, k/v 32 (the direct-kernel width), gate/up 320; M = 2 x 80 rows: the blocked NF4 driver.
d = build_tiny(sys.argv[3], hidden_size=160, intermediate_size=320, num_attention_heads=5, num_key_value_heads=1)
out, names = {}, {}
for fuse in ("1", "0"):
    os.environ["QLORA_LORA_FUSE"] = fuse
    for group, drop in (("1", 0.0), ("0", 0.0), ("1", 0.1)):
        os.environ["QLORA_LORA_GROUP"] = group
        m = qlora_native.Model.from_pretrained(d, quantize="nf4", tokenizer=None, backend="cpu:" + level,
                                               compute_dtype=dtype)
        m.add_adapter("a", qlora_native.LoraConfig(r=16, lora_alpha=32, lora_dropout=drop,
                                                   target_modules="all-linear"), seed=0)
        m.set_active_adapter("a")
        m.configure_optimizer(lr=1e-2)
        m.train()
        ids = np.random.default_rng(5).integers(0, 64, (2, 80)).astype(np.int32)
        tag = f"g{group}_d{drop}"
        _core.profile_reset()
        _core.profile_enable(True)
        for step in range(3):  # steps 2 and 3 have nonzero B: every expand adds something
            m.zero_grad()
            out[f"{fuse}_{tag}_loss{step}"] = np.array(m.forward_backward(ids, ids, np.ones_like(ids)))
            for k, v in m.get_adapter_gradients("a").items():
                out[f"{fuse}_{tag}_{step}_{k}"] = np.array(v)
            m.optimizer_step()
        _core.profile_enable(False)
        names[f"{fuse}_{tag}"] = sorted({o["op"] for o in _core.profile_report()})
        for k, v in m.get_adapter_state_dict("a").items():
            out[f"{fuse}_{tag}_final_{k}"] = np.array(v)
np.savez(sys.argv[1], **out)
print(repr(names))
"""

CASES = [("avx512", "float32"), ("avx2", "float32"), ("avx512", "bfloat16")]


@pytest.mark.parametrize("level,dtype", [pytest.param(lv, dt, marks=pytest.mark.skipif(
    lv not in HAS or (dt == "bfloat16" and not ops.bf16_compute_available("cpu")), reason=f"no {lv} / bf16 here"))
    for lv, dt in CASES])
@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("driver", ["auto", "tasks"])
def test_fused_expand_bit_identical(tmp_path, level, dtype, threads, driver):
    env = dict(os.environ, QLORA_NUM_THREADS=threads)
    for k in ("QLORA_LORA_FUSE", "QLORA_LORA_BF16", "QLORA_GEMM_DRIVER", "QLORA_BF16_GEMM"):
        env.pop(k, None)
    if driver == "tasks":  # the task-grid drivers (the default takes shared-A from 2 threads / 4 MFLOP)
        env["QLORA_GEMM_DRIVER"] = env["QLORA_BF16_GEMM"] = "tasks"
    path = str(tmp_path / "out.npz")
    r = subprocess.run([sys.executable, "-c", SCRIPT, path, HERE, str(tmp_path / "m"), level, dtype], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    names = eval(r.stdout.strip().splitlines()[-1])
    op = "nf4_gemm_nt_expand_bf16" if dtype == "bfloat16" else "nf4_gemm_nt_expand"
    for tag, ops in names.items():
        assert (op in ops) == tag.startswith("1_"), (tag, ops)
    a = np.load(path)
    on = [k for k in a.files if k.startswith("1_")]
    assert len(on) > 20
    for k in on:
        np.testing.assert_array_equal(a[k], a["0_" + k[2:]], err_msg=k)
    assert any(np.abs(a[k]).max() > 0 for k in on if "_2_" in k and "lora_A" in k)  # live gradients
