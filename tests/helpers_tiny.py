"""A tiny random fp32 Llama checkpoint written with numpy only (no torch import: fast to build),
and random LoRA adapters that visibly change its outputs."""
from __future__ import annotations

import json
import os

import numpy as np

import qlora_native
from qlora_native import LoraConfig

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
           max_position_embeddings=256, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0,
           architectures=["LlamaForCausalLM"], model_type="llama")


def build_tiny(d: str, **overrides) -> str:
    """A tiny random fp32 Llama checkpoint written with numpy only (no torch import: fast);
    overrides replace CFG fields (e.g. vocab_size=320)."""
    from qlora_native.config import ModelConfig

    cfg = dict(CFG, **overrides)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    core = qlora_native._core.model.LlamaModel(ModelConfig.from_dict(cfg).to_core())
    rng = np.random.default_rng(0)
    ts = {}
    for name, shape in core.expected_tensors():
        shape = tuple(shape)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        ts[name] = w.astype(np.float32)
    qlora_native.io.save_safetensors(os.path.join(d, "model.safetensors"), ts)
    return d


def add_random_adapter(m, name: str, seed: int) -> None:
    """An adapter whose B is not zero, so it visibly changes the outputs."""
    m.add_adapter(name, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"), seed=seed)
    rng = np.random.default_rng(seed)
    m.set_adapter_state_dict(name, {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
                                    for k, v in m.get_adapter_state_dict(name).items()})
