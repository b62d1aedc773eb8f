"""Llama-family forward parity against transformers (float64 reference, same weights)."""
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qlora_native  # noqa: E402

from helpers_model import make_checkpoint, reference_logits, reference_model  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def fp32_tol(cfg):
    # fp32 accumulation over dot products of length K, a handful of them chained per layer.
    K = max(cfg["hidden_size"], cfg["intermediate_size"])
    return 16 * np.sqrt(K) * EPS32


CONFIGS = {
    "gqa1-tied": dict(hidden=64, inter=128, heads=4, kv_heads=4, tie=True, vocab=100),
    "gqa2-h72-v130": dict(hidden=72, inter=200, heads=4, kv_heads=2, vocab=130),
    "gqa4-headdim-linear": dict(hidden=96, inter=160, heads=8, kv_heads=2, head_dim=16, vocab=150,
                                rope_scaling={"rope_type": "linear", "factor": 2.5}),
    "llama3-rope": dict(hidden=64, inter=128, heads=2, kv_heads=1, vocab=97, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2-bias": dict(arch="qwen2", hidden=64, inter=200, heads=4, kv_heads=2, vocab=120),
    "mistral": dict(arch="mistral", hidden=64, inter=128, heads=4, kv_heads=1, vocab=100, sliding_window=None),
    "llama-attn-bias-h200": dict(hidden=200, inter=136, heads=5, kv_heads=5, vocab=110, attention_bias=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_transformers_fp32(tmp_path, rng, name):
    path, cfg, state = make_checkpoint(tmp_path, rng, **CONFIGS[name])
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    ids = rng.integers(0, cfg["vocab_size"], size=(2, 11))
    ours = model(ids)
    assert ours.dtype == np.float32 and ours.shape == (2, 11, cfg["vocab_size"])
    ref = reference_logits(reference_model(cfg, state, "float64"), ids)
    assert rel_err(ours, ref) < fp32_tol(cfg), rel_err(ours, ref)


def test_rope_inv_freq_matches_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qlora_native.config import ModelConfig

    for rs in ({"rope_type": "linear", "factor": 3.0},
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}):
        hf = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0, rope_scaling=dict(rs))
        ref, _ = ROPE_INIT_FUNCTIONS[rs["rope_type"]](hf, torch.device("cpu"))
        ours = ModelConfig.from_dict(dict(hf.to_dict(), architectures=["LlamaForCausalLM"])).to_core().rope_inv_freq()
        np.testing.assert_allclose(np.asarray(ours, np.float32), ref.numpy(), rtol=2 * EPS32, atol=0)


def test_padding_left_and_right_match_rows_alone(tmp_path, rng):
    path, cfg, state = make_checkpoint(tmp_path, rng, hidden=64, inter=128, heads=4, kv_heads=2, vocab=100)
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    ref_model = reference_model(cfg, state, "float64")
    T = 10
    lens = [10, 6, 4]
    rows = [rng.integers(3, 100, size=n) for n in lens]
    ids = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    ids[0], mask[0] = rows[0], 1
    ids[1, T - 6:], mask[1, T - 6:] = rows[1], 1  # left padding
    ids[2, :4], mask[2, :4] = rows[2], 1          # right padding
    ours = model(ids, attention_mask=mask)
    # transformers in float64 turns padded rows into NaN (fully masked pad queries poison later
    # layers), so the float64 reference is each row alone; the padded batch is checked against
    # transformers' own fp32 padded run (same positions convention: cumsum(mask) - 1).
    ref32_padded = reference_logits(reference_model(cfg, state, "float32"), ids, mask)
    tol = fp32_tol(cfg)
    for b, n in enumerate(lens):
        sel = mask[b] == 1
        ref_alone = reference_logits(ref_model, rows[b][None, :])[0]
        assert rel_err(ours[b][sel], ref_alone) < tol
        assert rel_err(ours[b][sel], ref32_padded[b][sel]) < 2 * tol
        alone = model(rows[b][None, :])[0]
        assert rel_err(ours[b][sel], alone) < tol


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint(tmp_path, rng, dtype):
    path, cfg, state = make_checkpoint(tmp_path, rng, dtype=dtype, hidden=64, inter=128, heads=4, kv_heads=2)
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    ids = rng.integers(0, cfg["vocab_size"], size=(1, 7))
    # state holds the stored (rounded) weights upcast exactly: the fp32 tolerance still applies.
    ref = reference_logits(reference_model(cfg, state, "float64"), ids)
    assert rel_err(model(ids), ref) < fp32_tol(cfg)


def test_sharded_checkpoint(tmp_path, rng):
    import os

    path, cfg, state = make_checkpoint(tmp_path, rng, max_shard_size="40KB", hidden=64, inter=128, heads=4,
                                       kv_heads=2)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    ids = rng.integers(0, cfg["vocab_size"], size=(1, 5))
    ref = reference_logits(reference_model(cfg, state, "float64"), ids)
    assert rel_err(model(ids), ref) < fp32_tol(cfg)
