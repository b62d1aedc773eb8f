"""The fused NF4+LoRA decode op's "after" form (cpu/lora_sgmv.hpp, the default at the AVX512 level):
the AVX-512 NF4 GEMV prefetches the LoRA factors while it streams the base weight, and the shrinks and
expands run as the job's last tasks. It must give exactly the bits of the earlier form
(QLORA_SGMV_AFTER=0: shrinks first, expands after each GEMV task) and of the unfused path
(QLORA_SGMV_FUSE=0), with fp32 factors and bf16 inference copies, 8 different adapters in one batch
(more factor ranges than one GEMV task's prefetch takes), a shared adapter, "__base__" rows, 1, 2 and 3
threads, decode steps of 8 and 3 rows; and with and without the piece tasks that let several threads
share a problem's expand pieces (QLORA_SGMV_PIECE_TASKS=0: none; QLORA_SGMV_LOCAL_SPIN=0: a piece task
whose piece is not ready at once leaves it to the call that meets its last dependency)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import qlora_native

HERE = os.path.dirname(os.path.abspath(__file__))
AVX512 = "cpu:avx512" in qlora_native._core.available_backends()

CHILD = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import qlora_native
from qlora_native import LoraConfig

tiny, out = sys.argv[2], sys.argv[3]
res = {}
m = qlora_native.Model.from_pretrained(tiny, quantize="nf4", tokenizer=None, backend="cpu:avx512")
names = [f"a{i}" for i in range(8)]
for i, name in enumerate(names):
    cfg = LoraConfig(r=16 if i % 2 else 4 + i, lora_alpha=16, target_modules="all-linear")
    m.add_adapter(name, cfg, seed=i + 1)
    rng = np.random.default_rng(i + 1)
    m.set_adapter_state_dict(name, {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
                                    for k, v in m.get_adapter_state_dict(name).items()})
prompts = [[5 + i, 6, 7 + i] for i in range(8)]
for threads in (1, 2, 3):
    qlora_native.set_num_threads(threads)
    for dt in ("float32", "bfloat16"):
        m.adapter_dtype = dt
        k = f"{dt}_{threads}"
        res["mixed_" + k] = np.array(m.generate(prompts, max_new_tokens=5, temperature=0.0, eos_token_id=None,
                                                adapter_names=names), np.int64)
        res["shared_" + k] = np.array(m.generate(prompts[:3], max_new_tokens=5, temperature=0.0,
                                                 eos_token_id=None, adapter_names=["a1"] * 3), np.int64)
        ids = np.array([[3 + i] for i in range(8)], np.int32)
        res["logits_" + k] = m(ids, adapter_names=names[:6] + ["__base__", "a3"])
np.savez(out, **res)
"""


def _run(tiny, out, **env_over):
    env = dict(os.environ, **env_over)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", CHILD, HERE, tiny, out], check=True, env=env, timeout=300)
    return dict(np.load(out))


@pytest.mark.skipif(not AVX512, reason="the after form runs at the AVX512 level")
def test_after_form_equals_the_earlier_form_and_unfused(tmp_path):
    sys.path.insert(0, HERE)
    from helpers_tiny import build_tiny
    tiny = build_tiny(str(tmp_path / "k128"), hidden_size=128, intermediate_size=256)  # the SIMD NF4 kernels
    after = _run(tiny, str(tmp_path / "a.npz"), QLORA_SGMV_AFTER="1")
    first = _run(tiny, str(tmp_path / "f.npz"), QLORA_SGMV_AFTER="0")
    plain = _run(tiny, str(tmp_path / "p.npz"), QLORA_SGMV_FUSE="0")
    nopiece = _run(tiny, str(tmp_path / "n.npz"), QLORA_SGMV_PIECE_TASKS="0")
    nospin = _run(tiny, str(tmp_path / "s.npz"), QLORA_SGMV_LOCAL_SPIN="0")
    for key in after:
        np.testing.assert_array_equal(after[key], first[key], err_msg=key)
        np.testing.assert_array_equal(after[key], plain[key], err_msg=key)
        np.testing.assert_array_equal(after[key], nopiece[key], err_msg=key)
        np.testing.assert_array_equal(after[key], nospin[key], err_msg=key)
    for key in after:  # the thread count changes nothing
        if key.endswith("_1"):
            for t in ("2", "3"):
                np.testing.assert_array_equal(after[key], after[key[:-1] + t], err_msg=key)
