"""bf16-compute decode with adapters through the fused op (Backend::nf4_gemm_nt_many_lora_bf16, issue 8):
at decode shapes (<= 8 rows, compute_dtype="bfloat16", AVX512-BF16) the LoRA terms ride the bf16 NF4 GEMV's
thread-pool job (its GemvTail: the factors prefetched while the GEMV streams the base weights, shrinks and
expands as the job's tasks) instead of a second job. It must give exactly the bits of the unfused bf16 path
(one nf4_gemm_nt_bf16 per projection, then lora_segments_many; QLORA_SGMV_FUSE_BF16=0, read per call), in
every form of the fused job (after: the default; first: QLORA_SGMV_AFTER=0; local: QLORA_SGMV_LOCAL=1), at
1 / 2 / 3 threads, with fp32 factors and bf16 copies, one shared adapter, two adapters of different ranks,
"__base__" rows, generate; at SmolLM2's widths (K = 576, gate/up 1536 rows, down K = 1536). And the fused op
must actually run (profiled op count), and the adapters must contribute."""
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_sgmv import AVX512, WIDE, run_child, two_adapter_child  # noqa: E402
from helpers_tiny import build_tiny  # noqa: E402

CHILD = two_adapter_child(r"""

def calls():
    rep = _core.profile_report()
    rows = rep if isinstance(rep, list) else rep.get("rows", [])
    return sum(r["calls"] for r in rows if r["op"] == "nf4_gemm_nt_many_lora_bf16")


res = {}
for threads in (1, 2, 3):
    qlora_native.set_num_threads(threads)
    for dt in ("float32", "bfloat16"):
        m.adapter_dtype = dt
        for fuse in ("1", "0"):  # read per call: both paths in one process
            os.environ["QLORA_SGMV_FUSE_BF16"] = fuse
            k = f"{dt}_{threads}_{fuse}"
            _core.profile_reset(); _core.profile_enable(True)
            res["shared_" + k] = m(ids, adapter_names=["a0"] * 8)
            res["two_" + k] = m(ids, adapter_names=["a0"] * 4 + ["a1"] * 4)
            res["mixed_" + k] = m(ids, adapter_names=["a1", "__base__", "a0", "a0", "a1", "__base__", "a0", "a1"])
            res["half_" + k] = m(ids[:3], adapter_names=["a1"] * 2 + ["__base__"])
            res["gen_" + k] = np.array(m.generate(prompts, max_new_tokens=4, temperature=0.0, eos_token_id=None,
                                                  adapter_name="a0"), np.int64)
            _core.profile_enable(False)
            res["calls_" + k] = np.array(calls())
m.adapter_dtype = "float32"
os.environ["QLORA_SGMV_FUSE_BF16"] = "1"
m.compute_dtype = "float32"  # the adapters contribute, and this really was a bf16-compute pass
res["f32"] = m(ids, adapter_names=["a0"] * 8)
np.savez(out, **res)
""", compute_dtype="bfloat16")


def _run(tiny, out, **env_over):
    return run_child(CHILD, tiny, out, drop=("QLORA_SGMV_FUSE_BF16",), **env_over)


@pytest.mark.skipif(not AVX512, reason="the bf16 NF4 GEMV runs at the AVX512 level (with AVX512-BF16)")
def test_bf16_fused_equals_unfused_in_every_form(tmp_path):
    tiny = build_tiny(str(tmp_path / "wide"), **WIDE)
    forms = {"after": _run(tiny, str(tmp_path / "a.npz")),
             "first": _run(tiny, str(tmp_path / "f.npz"), QLORA_SGMV_AFTER="0"),
             "local": _run(tiny, str(tmp_path / "l.npz"), QLORA_SGMV_LOCAL="1")}
    ref = forms["after"]
    if int(ref["calls_float32_1_1"]) == 0:
        pytest.skip("this CPU has no AVX512-BF16 units: bf16 compute runs the fp32 kernels")
    for form, res in forms.items():
        for key in res:
            if key.startswith("calls_"):
                # the fused op runs when on (per call), never when switched off
                assert (int(res[key]) > 0) == key.endswith("_1"), (form, key, int(res[key]))
                continue
            if key == "f32":
                continue
            np.testing.assert_array_equal(res[key], ref[key], err_msg=f"{form} {key}")
            if key.endswith("_1"):  # fused == unfused, bit for bit
                np.testing.assert_array_equal(res[key], res[key[:-1] + "0"], err_msg=f"{form} {key}")
            for t in ("2", "3"):  # the thread count changes nothing
                other = key.replace("_1_", f"_{t}_")
                np.testing.assert_array_equal(res[key], res[other], err_msg=f"{form} {key} vs {t} threads")
    # the adapters contribute: the shared adapter moves rows away from "__base__" ones
    assert not np.array_equal(ref["shared_float32_1_1"][1], ref["mixed_float32_1_1"][1])
    # bf16 copies and fp32 factors differ (the copies really are used), and fp32 compute differs
    assert not np.array_equal(ref["shared_float32_1_1"], ref["shared_bfloat16_1_1"])
    assert not np.array_equal(ref["shared_float32_1_1"], ref["f32"])
