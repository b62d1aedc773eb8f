"""Tiny random Hugging Face Llama-family checkpoints for model tests (torch/transformers: test-only).

make_checkpoint() builds a transformers model with well-scaled random weights from the test's
numpy rng, saves it as an HF directory (safetensors, optionally sharded / f16 / bf16) and returns
the path plus the float64 state dict actually stored (after any dtype rounding), which reference
models are built from.
"""
from __future__ import annotations

import json
import os

import numpy as np

ARCH_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def hf_config_dict(arch="llama", vocab=100, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, head_dim=None,
                   tie=False, rope_scaling=None, rope_theta=10000.0, **extra) -> dict:
    d = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie, rms_norm_eps=1e-5,
             rope_theta=rope_theta, max_position_embeddings=256, hidden_act="silu", bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
    if head_dim is not None:
        d["head_dim"] = head_dim
    if rope_scaling is not None:
        d["rope_scaling"] = rope_scaling
    d.update(extra)
    return d


def build_hf_model(cfg: dict, torch_dtype="float32"):
    import torch
    import transformers

    arch = cfg.get("model_type_arch", "llama")
    cfg = {k: v for k, v in cfg.items() if k != "model_type_arch"}
    conf_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                "mistral": transformers.MistralConfig}[arch]
    model_cls = getattr(transformers, ARCH_CLASSES[arch])
    conf = conf_cls(**cfg)
    conf._attn_implementation = "eager"
    model = model_cls(conf).to(getattr(torch, torch_dtype))
    model.eval()
    return model


def random_state(model, rng) -> dict[str, np.ndarray]:
    """Well-scaled random weights (float64) for every parameter of `model`, set into it."""
    import torch

    state = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("norm.weight"):
                w = 1.0 + 0.2 * rng.standard_normal(shape)
            elif name.endswith("embed_tokens.weight"):
                w = rng.standard_normal(shape)
            elif name.endswith(".bias"):
                w = 0.5 * rng.standard_normal(shape)
            else:  # [out, in]: unit-variance outputs for unit-variance inputs
                w = rng.standard_normal(shape) / np.sqrt(shape[1])
            p.copy_(torch.from_numpy(w))
            state[name] = w
    return state


def make_checkpoint(tmp_path, rng, arch="llama", dtype="float32", max_shard_size=None, **cfg_kwargs):
    """Returns (path, cfg dict, state float64 as stored). dtype: float32 | float16 | bfloat16."""
    import torch

    cfg = hf_config_dict(arch=arch, **cfg_kwargs)
    model = build_hf_model(dict(cfg, model_type_arch=arch), "float32")
    random_state(model, rng)
    model = model.to(getattr(torch, dtype))
    path = os.path.join(str(tmp_path), f"ckpt_{arch}_{dtype}")
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    stored = {n: p.detach().to(torch.float64).numpy().copy() for n, p in model.named_parameters()}
    with open(os.path.join(path, "config.json")) as f:
        saved_cfg = json.load(f)
    return path, dict(cfg, model_type_arch=arch, saved=saved_cfg), stored


def reference_model(cfg: dict, state: dict[str, np.ndarray], torch_dtype="float64"):
    """A transformers model holding `state` (e.g. NF4-dequantized weights) in torch_dtype."""
    import torch

    model = build_hf_model({k: v for k, v in cfg.items() if k != "saved"}, torch_dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(state[name], dtype=np.float64)))
    return model


def reference_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """HF logits [B, T, V] as float64 with positions = cumsum(mask) - 1 (as generate computes them).

    With padding, use a float32 model: transformers in float64 turns padded rows into NaN."""
    import torch

    ids_t = torch.from_numpy(np.asarray(ids, np.int64))
    if mask is None:
        mask = np.ones_like(ids)
    m = torch.from_numpy(np.asarray(mask, np.int64))
    pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=m, position_ids=pos)
    return out.logits.to(torch.float64).numpy()


NF4_CODES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)


def dequantize_nf4_numpy(w: dict) -> np.ndarray:
    """Independent numpy decoding of the bitsandbytes NF4 layout (shared/reference/nf4-format.md)."""
    rows, cols = w["shape"]
    n = rows * cols
    packed = np.asarray(w["packed"], np.uint8).reshape(-1)
    codes = np.empty(2 * packed.size, np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    codes = codes[:n]
    bs = w["blocksize"]
    if w["double_quant"]:
        nested = np.asarray(w["nested_absmax"], np.float32)
        amap = np.asarray(w["nested_map"], np.float32)
        idx = np.arange(len(w["absmax"])) // 256
        absmax = (amap[np.asarray(w["absmax"])] * nested[idx]).astype(np.float32) + np.float32(w["offset"])
    else:
        absmax = np.asarray(w["absmax"], np.float32)
    vals = NF4_CODES[codes] * absmax[np.arange(n) // bs]
    return vals.astype(np.float32).reshape(rows, cols)


PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def save_bnb_checkpoint(src_path, out_dir):
    """Quantizes the HF checkpoint at src_path with transformers + bitsandbytes (NF4, double
    quant, CPU) and saves it to out_dir, as a user of that stack would. Returns out_dir."""
    import torch
    import transformers

    q = transformers.LlamaForCausalLM.from_pretrained(
        src_path, device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True,
                                                            bnb_4bit_compute_dtype=torch.float32))
    q.save_pretrained(out_dir)
    return out_dir
