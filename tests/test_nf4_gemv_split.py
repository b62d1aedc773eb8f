"""NF4 decode GEMV at SmolLM2's widths (K = 576, gate/up 1536 rows): a row's bits must not depend on how
the rows are split into tasks (thread count) or into pieces (the fused LoRA's prefetch ranges). Before,
the double-quant scale sub-ranges had an odd length (455 rows at K = 576), so one row per sub-range went
through the single-row kernel (another summation order) at positions that moved with the split: 1 and 2
threads gave different logits."""
import os
import subprocess
import sys

import numpy as np

import qlora_native

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_tiny import build_tiny  # noqa: E402

WIDE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)


def test_decode_rows_do_not_depend_on_the_thread_count(tmp_path):
    tiny = build_tiny(str(tmp_path / "wide"), **WIDE)
    m = qlora_native.Model.from_pretrained(tiny, quantize="nf4", tokenizer=None)
    ids = np.arange(3, 11, dtype=np.int32)[:, None]  # 8 rows of one token: the decode GEMV (M = 8)
    out, before = {}, qlora_native.num_threads()
    try:
        for t in (1, 2, 3):
            qlora_native.set_num_threads(t)
            out[t] = m(ids)
    finally:
        qlora_native.set_num_threads(before)
    np.testing.assert_array_equal(out[1], out[2])
    np.testing.assert_array_equal(out[1], out[3])


CHILD = r"""
import sys
import numpy as np
import qlora_native
from qlora_native import LoraConfig
tiny, out = sys.argv[1], sys.argv[2]
qlora_native.set_num_threads(1)
m = qlora_native.Model.from_pretrained(tiny, quantize="nf4", tokenizer=None)
res = {}
for i in range(3):
    m.add_adapter(f"a{i}", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), seed=i + 1)
    rng = np.random.default_rng(i)
    m.set_adapter_state_dict(f"a{i}", {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                                       for k, v in m.get_adapter_state_dict(f"a{i}").items()})
ids = np.arange(3, 11, dtype=np.int32)[:, None]
for dt in ("float32", "bfloat16"):
    m.adapter_dtype = dt
    res["shared_" + dt] = m(ids, adapter_names=["a0"] * 8)
    res["mixed_" + dt] = m(ids, adapter_names=["a0", "a1", "a2", "__base__", "a1", "a0", "a2", "a2"])
np.savez(out, **res)
"""


def test_fused_lora_at_smollm_widths_equals_unfused(tmp_path):
    """The fused op's prefetch splits a GEMV task into pieces at factor-range edges: same bits."""
    tiny = build_tiny(str(tmp_path / "wide"), **WIDE)
    got = {}
    for name, env in (("after", {"QLORA_SGMV_AFTER": "1"}), ("first", {"QLORA_SGMV_AFTER": "0"}),
                      ("plain", {"QLORA_SGMV_FUSE": "0"})):
        e = dict(os.environ, **env)
        e["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p) + os.pathsep + e.get("PYTHONPATH", "")
        out = str(tmp_path / f"{name}.npz")
        subprocess.run([sys.executable, "-c", CHILD, tiny, out], check=True, env=e, timeout=300)
        got[name] = dict(np.load(out))
    for key in got["after"]:
        np.testing.assert_array_equal(got["after"][key], got["first"][key], err_msg=key)
        np.testing.assert_array_equal(got["after"][key], got["plain"][key], err_msg=key)
