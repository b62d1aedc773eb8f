"""The fused decode tests' shared setup (test_lora_sgmv_local.py, test_lora_sgmv_bf16_fused.py):
SmolLM2's widths, a child script's prelude (a cpu:avx512 model with adapters a0 (r16) and a1 (r8),
random factors, 8 one-token rows `ids` and 8 `prompts`) and the child run (argv: tiny, out; it
writes an .npz to out)."""
import os
import subprocess
import sys

import numpy as np

import qlora_native

AVX512 = "cpu:avx512" in qlora_native._core.available_backends()
WIDE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)

_PRELUDE = r"""
import os, sys
import numpy as np
import qlora_native
from qlora_native import LoraConfig, _core
tiny, out = sys.argv[1], sys.argv[2]
m = qlora_native.Model.from_pretrained(tiny, quantize="nf4", tokenizer=None, backend="cpu:avx512", **MODEL_KW)
for i in range(2):
    m.add_adapter(f"a{i}", LoraConfig(r=16 if i == 0 else 8, lora_alpha=32, target_modules="all-linear"),
                  seed=i + 1)
    rng = np.random.default_rng(i)
    m.set_adapter_state_dict(f"a{i}", {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                                       for k, v in m.get_adapter_state_dict(f"a{i}").items()})
ids = np.arange(3, 11, dtype=np.int32)[:, None]
prompts = [[5 + i, 6, 7 + i] for i in range(8)]
"""


def two_adapter_child(body, **model_kw):
    """The child script: the prelude (from_pretrained also gets model_kw), then `body`."""
    return f"MODEL_KW = {model_kw!r}\n" + _PRELUDE + body


def child_env(drop=(), **env_over):
    """os.environ with env_over set, the keys in `drop` removed, and this process's sys.path on PYTHONPATH."""
    env = dict(os.environ, **env_over)
    for k in drop:
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(child, tiny, out, drop=(), **env_over):
    """Runs the child script on (tiny, out) in child_env(drop, **env_over); returns the arrays it saved."""
    subprocess.run([sys.executable, "-c", child, tiny, out], check=True, env=child_env(drop, **env_over), timeout=300)
    return dict(np.load(out))
