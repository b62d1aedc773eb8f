"""The fused NF4+LoRA decode op's "local" form (cpu/lora_sgmv.hpp, opt-in with QLORA_SGMV_LOCAL=1 at the
AVX512 level when every projection has at most 2 adapter segments, all with bf16 copies; fp32 factors take the after form,
checked here too): each GEMV task adds the LoRA terms of its own output
columns right after computing them, with a t (x·Aᵀ) and a bf16-rounded x shared between the threads, or
computed by a task itself while another thread is still computing the shared one. It must give exactly
the bits of the after form (QLORA_SGMV_LOCAL=0), of the unfused path (QLORA_SGMV_FUSE=0), and of its own
never-shared path (QLORA_SGMV_LOCAL=own, every task its own t and x), at SmolLM2's widths (K = 576, gate/up
1536 rows: 2 threads split q's columns in the middle of a 16-column block), fp32 factors and bf16 copies,
one shared adapter (1 segment), two adapters (2 segments), a "__base__" half, and 1, 2 and 3 threads; and
the shared t and rounded x in one part (QLORA_SGMV_LOCAL_SPLIT=0) instead of two halves of the rows (the
default: two threads that need one t at once compute half of it each; the halves split 8 rows 4 + 4, the
two adapters' rows one segment each, 3 rows 2 + 1)."""
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_sgmv import AVX512, WIDE, child_env, run_child, two_adapter_child  # noqa: E402
from helpers_tiny import build_tiny  # noqa: E402

CHILD = two_adapter_child(r"""res = {}
for threads in (1, 2, 3):
    qlora_native.set_num_threads(threads)
    for dt in ("float32", "bfloat16"):
        m.adapter_dtype = dt
        k = f"{dt}_{threads}"
        res["shared_" + k] = m(ids, adapter_names=["a0"] * 8)
        res["two_" + k] = m(ids, adapter_names=["a0"] * 4 + ["a1"] * 4)
        res["half_" + k] = m(ids, adapter_names=["a1"] * 3 + ["__base__"] * 5)
        res["gen_" + k] = np.array(m.generate(prompts, max_new_tokens=4, temperature=0.0, eos_token_id=None,
                                              adapter_name="a0"), np.int64)
np.savez(out, **res)
""")


def _run(tiny, out, **env_over):
    return run_child(CHILD, tiny, out, **env_over)


@pytest.mark.skipif(not AVX512, reason="the local form runs at the AVX512 level")
def test_local_form_equals_after_unfused_and_its_own_copies(tmp_path):
    tiny = build_tiny(str(tmp_path / "wide"), **WIDE)
    local = _run(tiny, str(tmp_path / "l.npz"), QLORA_SGMV_LOCAL="1")
    own = _run(tiny, str(tmp_path / "o.npz"), QLORA_SGMV_LOCAL="own")
    after = _run(tiny, str(tmp_path / "a.npz"), QLORA_SGMV_LOCAL="0")
    plain = _run(tiny, str(tmp_path / "p.npz"), QLORA_SGMV_FUSE="0")
    nowait = _run(tiny, str(tmp_path / "n.npz"), QLORA_SGMV_LOCAL="1", QLORA_SGMV_LOCAL_SPIN="0")  # no bounded wait for a shared t
    whole = _run(tiny, str(tmp_path / "w.npz"), QLORA_SGMV_LOCAL="1", QLORA_SGMV_LOCAL_SPLIT="0")  # t in one part
    for key in local:
        np.testing.assert_array_equal(local[key], whole[key], err_msg=key)
        np.testing.assert_array_equal(local[key], nowait[key], err_msg=key)
        np.testing.assert_array_equal(local[key], own[key], err_msg=key)
        np.testing.assert_array_equal(local[key], after[key], err_msg=key)
        np.testing.assert_array_equal(local[key], plain[key], err_msg=key)
        if key.endswith("_1"):  # the thread count changes nothing
            for t in ("2", "3"):
                np.testing.assert_array_equal(local[key], local[key[:-1] + t], err_msg=key)
    # the adapters do contribute (a fused path that dropped the LoRA terms would still agree with
    # itself): the shared adapter moves the logits away from the base rows of "half"
    assert not np.array_equal(local["shared_float32_1"][3:], local["half_float32_1"][3:])


@pytest.mark.skipif(not AVX512, reason="the local form runs at the AVX512 level")
def test_bad_spin_value_is_a_clear_error(tmp_path):
    tiny = build_tiny(str(tmp_path / "wide"), **WIDE)
    env = child_env(QLORA_SGMV_LOCAL="1", QLORA_SGMV_LOCAL_SPIN="lots")
    r = subprocess.run([sys.executable, "-c", CHILD, tiny, str(tmp_path / "x.npz")], env=env, timeout=300,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "QLORA_SGMV_LOCAL_SPIN must be an integer" in r.stderr, r.stderr[-2000:]
