"""Replays the bf16 training contract in float64 on the test model of tests/test_bf16.py, with each
rounding point switchable, to find which roundings an ill-conditioned seed's gradient error comes from.

The contract (README "bf16 compute"): every base GEMM (NF4 projections, lm_head) rounds both operands
to bf16, forward (x, W) and backward (dy, W); the training attention rounds the operands of P·v,
dout·vᵀ, dS·k, dSᵀ·q and Pᵀ·dout; the scores, softmax, delta, RoPE, RMSNorm and the LoRA branch stay
exact here (fp32 in the engine). Everything else is float64, so the replay's error is the contract's
(the engine's fp32 accumulation moves it in the 4th digit: seed 142617787 replays 0.3349, engine 0.3346).

  PYTHONPATH=python:build/dev:tests python tools/bf16_contract_replay.py SEED [SEED ...]
  env VARIANTS=ours,attn_off,... (names in VARIANTS below); prints the relative Frobenius error of all
  LoRA gradients vs transformers + PEFT in float64, PEFT autocast's error, and autocast's distance from
  each variant (relative to the float64 gradient norm).
"""
import os
import pathlib
import sys
import tempfile
import warnings

import numpy as np
import torch
import transformers.models.llama.modeling_llama as llama
from transformers import AttentionInterface

import test_bf16 as tb
from helpers_train import padded_batch
from test_lora_model import build, peft_reference, random_adapter
from test_train_parity import peft_grads, torch_loss

ATTN = ("pv", "dp", "dq", "dk", "dv")  # the five tile products' operand roundings
VARIANTS = {
    "ours": {},
    "base_off": {"base": False},
    "attn_off": {k: False for k in ATTN},
    "base_fwd_off": {"base_fwd": False},
    "base_bwd_off": {"base_bwd": False},
    "x_off": {"rx": False},  # the activation / gradient operand of the base GEMMs exact
    "w_off": {"rw": False},  # the weight operand exact
    "only_qk": {"mods": ["q_proj", "k_proj"]},  # base roundings only in these modules (attention's kept)
    "only_layer0": {"mods": ["layers.0."]},
    "only_layer0_qk_fwd": {"mods": ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"], "base_bwd": False,
                           **{k: False for k in ATTN}},
    "delta_PdP": {"delta": "PdP"},  # delta = rowsum(P ∘ dP) (autocast's softmax backward) instead of dout·out
    "none": {"base": False, **{k: False for k in ATTN}},
}
CFG = {}
MASK = None  # [B, T] key padding mask of the batch


def r(x):
    return x.float().bfloat16().double()


def rb(x, key):
    return r(x) if CFG.get(key, True) else x


def base_on(name, direction):
    if not CFG.get("base", True) or not CFG.get("base_" + direction, True):
        return False
    return CFG.get("mods") is None or any(m in name for m in CFG["mods"])


class BaseLinear(torch.autograd.Function):
    """y = r(x) r(W)ᵀ, dx = r(dy) r(W) (W frozen)."""

    @staticmethod
    def forward(ctx, x, w, name):
        ctx.save_for_backward(w)
        ctx.name = name
        if base_on(name, "fwd"):
            x, w = rb(x, "rx"), rb(w, "rw")
        return x @ w.T

    @staticmethod
    def backward(ctx, dy):
        (w,) = ctx.saved_tensors
        if base_on(ctx.name, "bwd"):
            dy, w = rb(dy, "rx"), rb(w, "rw")
        return dy @ w, None, None


class Attention(torch.autograd.Function):
    """q, k, v [B, H, T, hd] (k, v repeated per query head), allowed [B, 1, T, T] bool."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, scale):
        s = (scale * q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1))  # padded query rows see no key: P = 0
        out = rb(p, "pv") @ rb(v, "pv")
        ctx.save_for_backward(q, k, v, p, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p, out = ctx.saved_tensors
        dp = rb(dout, "dp") @ rb(v, "dp").transpose(-1, -2)
        if CFG.get("delta") == "PdP":
            delta = (p * dp).sum(-1, keepdim=True)
        else:
            delta = (dout * out).sum(-1, keepdim=True)
        ds = p * (dp - delta) * ctx.scale
        dq = rb(ds, "dq") @ rb(k, "dq")
        dk = rb(ds, "dk").transpose(-1, -2) @ rb(q, "dk")
        dv = rb(p, "dv").transpose(-1, -2) @ rb(dout, "dv")
        return dq, dk, dv, None, None


def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    group = query.shape[1] // key.shape[1]
    key, value = llama.repeat_kv(key, group), llama.repeat_kv(value, group)
    n = key.shape[-2]
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None] & torch.from_numpy(MASK[:, None, None, :] != 0)
    return Attention.apply(query, key, value, allowed, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register("bf16_contract_replay", attention)


def replay(pm):
    """Routes pm's base Linear layers and attention through the contract above."""
    for name, mod in pm.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lora_" not in name:
            mod.forward = (lambda m, n: (lambda x: BaseLinear.apply(x, m.weight, n)))(mod, name)
        if hasattr(mod, "config"):
            mod.config._attn_implementation = "bf16_contract_replay"


def main():
    global MASK
    warnings.filterwarnings("ignore")
    names = os.environ.get("VARIANTS", "ours,base_off,attn_off,only_layer0_qk_fwd").split(",")
    for seed in map(int, sys.argv[1:]):
        rng = np.random.default_rng(seed)  # the draws of tests/test_bf16.py with QLORA_TEST_SEED=seed
        tmp = pathlib.Path(tempfile.mkdtemp())
        model, cfg, ref = build(tmp, rng, **tb.TINY)
        random_adapter(model, "a", rng, **tb.LORA)
        ids, MASK, labels = padded_batch(rng, cfg["vocab_size"], B=3, T=16)
        _, g64, g_ac = tb.peft_references(model, cfg, ref, tmp, ids, MASK, labels)
        norm64 = np.sqrt(sum(float((v ** 2).sum()) for v in g64.values()))
        cols = []
        for i, name in enumerate(names):
            CFG.clear()
            CFG.update(VARIANTS[name])
            pm = peft_reference(model, cfg, ref, "a", tmp / f"replay{i}")
            replay(pm)
            torch_loss(pm, ids, MASK, labels).backward()
            g = peft_grads(pm)
            dist_ac = np.sqrt(sum(float(((g_ac[k] - g[k]) ** 2).sum()) for k in g)) / norm64
            cols.append(f"{name} {tb.global_rel(g, g64):.4f} (autocast at {dist_ac:.4f})")
        print(seed, f"autocast {tb.global_rel(g_ac, g64):.4f} |", " | ".join(cols), flush=True)


if __name__ == "__main__":
    main()
