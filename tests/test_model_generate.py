"""KV-cache generation: greedy parity with transformers' generate (left padding), sampling options,
stopping, streaming and the memory footprint."""
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qlora_native  # noqa: E402

from helpers_model import make_checkpoint, reference_model  # noqa: E402


def hf_generate(cfg, state, prompts, n, **kw):
    """transformers' greedy generate (fp32) on left-padded prompts -> (new tokens, per-step scores)."""
    import torch

    ref = reference_model(cfg, state, "float32")
    P = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), P), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True,
                           **kw)
    new = out.sequences[:, P:].numpy()
    scores = np.stack([s.numpy() for s in out.scores], axis=1)  # [B, n, V]
    return new, scores


def assert_same_greedy(ours, ref_tokens, ref_scores):
    """Token sequences are equal, except that a divergence is accepted only at a near-tie of
    transformers' own scores (fp32 rounding can flip an argmax between logits ~1e-5 apart)."""
    for b, row in enumerate(ours):
        ref = ref_tokens[b].tolist()
        assert len(row) == len(ref)
        for t, (a, r) in enumerate(zip(row, ref)):
            if a != r:
                s = ref_scores[b, t]
                gap = abs(float(s[r]) - float(s[a]))
                assert gap < 1e-4 * float(np.abs(s).max()), f"row {b} step {t}: {a} vs {r}, score gap {gap}"
                break  # after a tie-flip the continuations legitimately differ


@pytest.fixture
def small(tmp_path, rng):
    return make_checkpoint(tmp_path, rng, hidden=64, inter=128, heads=4, kv_heads=2, vocab=100)


GEN_CONFIGS = {
    "qwen2-gqa2": dict(arch="qwen2", hidden=72, inter=136, heads=4, kv_heads=2, vocab=120),
    "llama3-gqa4-tied": dict(hidden=64, inter=128, heads=8, kv_heads=2, head_dim=16, vocab=120, tie=True,
                             rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("name", list(GEN_CONFIGS))
def test_greedy_matches_transformers(tmp_path, rng, quantize, name):
    path, cfg, state = make_checkpoint(tmp_path, rng, **GEN_CONFIGS[name])
    model = qlora_native.Model.from_pretrained(path, quantize=quantize)
    if quantize == "nf4":
        from test_model_nf4 import nf4_state

        state = nf4_state(model, cfg, state)
    prompts = [rng.integers(3, 120, size=n).tolist() for n in (7, 3, 12)]
    ours = model.generate(prompts, max_new_tokens=32, eos_token_id=None)
    ref, scores = hf_generate(cfg, state, prompts, 32)
    assert_same_greedy(ours, ref, scores)


def test_generate_accepts_padded_array_and_single_prompt(small, rng):
    path, cfg, state = small
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    p0, p1 = rng.integers(3, 100, size=6).tolist(), rng.integers(3, 100, size=4).tolist()
    ids = np.zeros((2, 6), np.int64)
    mask = np.zeros((2, 6), np.int64)
    ids[0], mask[0] = p0, 1
    ids[1, :4], mask[1, :4] = p1, 1  # right padded: padding is removed, prompts re-padded left
    a = model.generate(ids, 8, attention_mask=mask, eos_token_id=None)
    assert a == model.generate([p0, p1], 8, eos_token_id=None)
    assert model.generate(p1, 8, eos_token_id=None) == [a[1]]


def test_repetition_penalty_matches_transformers(small, rng):
    path, cfg, state = small
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    # Equal lengths: transformers also penalizes pad tokens inside left-padded input_ids.
    prompts = [rng.integers(3, 100, size=5).tolist() for _ in range(2)]
    ours = model.generate(prompts, 20, repetition_penalty=1.8, eos_token_id=None)
    ref, scores = hf_generate(cfg, state, prompts, 20, repetition_penalty=1.8)
    assert_same_greedy(ours, ref, scores)
    plain = model.generate(prompts, 20, eos_token_id=None)
    assert plain != ours  # the penalty changed something


def test_sampling_seeded_and_top_k1_is_greedy(small, rng):
    path, _, _ = small
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    prompts = [rng.integers(3, 100, size=4).tolist(), rng.integers(3, 100, size=7).tolist()]
    kw = dict(max_new_tokens=24, temperature=1.0, eos_token_id=None)
    a = model.generate(prompts, seed=123, **kw)
    assert a == model.generate(prompts, seed=123, **kw)
    assert a != model.generate(prompts, seed=124, **kw)
    greedy = model.generate(prompts, 24, eos_token_id=None)
    assert model.generate(prompts, seed=5, top_k=1, **kw) == greedy
    assert model.generate(prompts, seed=5, top_p=1e-6, **kw) == greedy


def test_sampler_distribution_top_k_top_p(rng):
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    V = 12
    logits = rng.standard_normal(V).astype(np.float32) * 2
    s = qlora_native._core.model.Sampler(int(rng.integers(1 << 62)))
    hist = np.zeros(0, np.int32)
    N = 20000

    def freqs(**kw):
        c = np.bincount([s.sample(logits, hist, **kw) for _ in range(N)], minlength=V)
        return c / N

    def check(f, p):
        # each frequency within 5 binomial standard deviations (+1/N) of its probability
        sd = np.sqrt(p * (1 - p) / N)
        assert np.all(np.abs(f - p) <= 5 * sd + 1.0 / N), (f, p)

    # A tiny temperature concentrates on the argmax without overflowing to NaN.
    assert all(s.sample(logits, hist, temperature=1e-30) == int(logits.argmax()) for _ in range(20))
    t = 0.7
    p = np.exp((logits - logits.max()) / t)
    check(freqs(temperature=t), p / p.sum())
    top3 = np.argsort(-logits)[:3]
    p3 = np.zeros(V)
    p3[top3] = np.exp(logits[top3] - logits.max())
    check(freqs(temperature=1.0, top_k=3), p3 / p3.sum())
    warped = TopPLogitsWarper(0.6)(None, torch.from_numpy(logits[None].copy()))[0].numpy()
    pp = np.where(np.isfinite(warped), np.exp(logits - logits.max()), 0.0)
    check(freqs(temperature=1.0, top_p=0.6), pp / pp.sum())


@pytest.mark.parametrize("kw", [dict(), dict(repetition_penalty=1.7), dict(temperature=0.8, top_k=20, top_p=0.9),
                                dict(temperature=1.3, repetition_penalty=1.2)])
def test_sampler_sample_rows_matches_row_by_row(rng, kw):
    """sample_rows (one call per decode step) gives the tokens of sample() called row after row
    with the same seed, leaves the logits intact, and rejects NaN rows and bad row indices."""
    B, V = 7, 300
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    keep = logits.copy()
    rows = np.array([0, 2, 3, 6], np.int32)
    hists = [rng.integers(0, V, size=int(rng.integers(0, 40))).astype(np.int32) for _ in rows]
    seed = int(rng.integers(1 << 62))
    a = qlora_native._core.model.Sampler(seed)
    b = qlora_native._core.model.Sampler(seed)
    for _ in range(3):  # the generator state advances the same way too
        got = a.sample_rows(logits, rows, hists, **kw)
        want = [b.sample(logits[r], h, **kw) for r, h in zip(rows, hists)]
        assert got.tolist() == want
    np.testing.assert_array_equal(logits, keep)
    bad = logits.copy()
    bad[2, 17] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        a.sample_rows(bad, rows, hists, **kw)
    with pytest.raises(ValueError, match="row index"):
        a.sample_rows(logits, np.array([B], np.int32), hists[:1], **kw)
    with pytest.raises(ValueError, match="one history per row"):
        a.sample_rows(logits, rows, hists[:2], **kw)


def test_sampler_rejects_bad_options(small):
    path, _, _ = small
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    for kw, msg in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                    (dict(repetition_penalty=0.0), "repetition_penalty")]:
        with pytest.raises(ValueError, match=msg):
            model.generate([[5, 6]], 4, **kw)
    with pytest.raises(ValueError, match="out of range"):
        model.generate([[5, 100]], 4)
    with pytest.raises(ValueError, match="empty"):
        model.generate([[5], []], 4)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate([[5]], 4, stop="x")


def test_eos_stop_strings_and_stream(small, rng):
    path, _, _ = small
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    prompts = [rng.integers(3, 100, size=5).tolist(), rng.integers(3, 100, size=3).tolist()]
    full = model.generate(prompts, 12, eos_token_id=None)
    # EOS: row 0 stops at (and keeps) the first occurrence of its 4th token; row 1 runs on unless it meets it.
    eos = full[0][3]
    out = model.generate(prompts, 12, eos_token_id=eos)
    first = full[0].index(eos)
    assert out[0] == full[0][:first + 1]
    r1 = full[1][:full[1].index(eos) + 1] if eos in full[1] else full[1]
    assert out[1] == r1

    class CharTok:  # token i decodes to chr(0x100 + i): every token is one distinct character
        def decode(self, ids):
            return "".join(chr(0x100 + i) for i in ids)

        def encode(self, text):
            return [ord(c) - 0x100 for c in text]

    model.tokenizer = CharTok()
    stop = CharTok().decode(full[1][5:7])
    out = model.generate(prompts, 12, eos_token_id=None, stop=stop)
    k = next(i for i in range(1, len(full[1])) if full[1][i - 1:i + 1] == full[1][5:7])
    assert out[1] == full[1][:k + 1]
    assert out[0] == full[0] or stop in CharTok().decode(out[0])
    # Text prompts go through the tokenizer.
    assert model.generate(CharTok().decode(prompts[1]), 12, eos_token_id=None) == [full[1]]

    seen = []
    out = model.generate(prompts, 12, eos_token_id=None, stream=lambda row, tok: seen.append((row, tok)))
    assert out == full
    assert [t for r, t in seen if r == 0] == full[0] and [t for r, t in seen if r == 1] == full[1]


def test_memory_footprint(tmp_path, rng):
    kw = dict(hidden=72, inter=200, heads=4, kv_heads=2, vocab=130, layers=2)
    path, cfg, _ = make_checkpoint(tmp_path, rng, **kw)
    D, I, V, L, hd, Hkv = 72, 200, 130, 2, 18, 2
    shapes = [(4 * hd, D), (Hkv * hd, D), (Hkv * hd, D), (D, 4 * hd), (I, D), (I, D), (D, I)]
    fp = qlora_native.Model.from_pretrained(path, quantize=None).memory_footprint()
    n_proj = L * sum(o * i for o, i in shapes)
    other = 4 * (2 * V * D + (2 * L + 1) * D + hd // 2)  # embed + lm_head, norms, inv_freq
    assert fp["nf4_weights"] == 0 and fp["quant_constants"] == 0 and fp["kv_cache"] == 0
    assert fp["other_weights"] == other + 4 * n_proj

    model = qlora_native.Model.from_pretrained(path, quantize="nf4", blocksize=64, double_quant=True)
    fp = model.memory_footprint()
    blocks = [-(-o * i // 64) for o, i in shapes]
    assert fp["nf4_weights"] == L * sum(-(-o * i // 2) for o, i in shapes)
    assert fp["quant_constants"] == L * sum(nb + 4 * -(-nb // 256) + 4 * 256 for nb in blocks)
    assert fp["other_weights"] == other
    assert fp["total"] == fp["nf4_weights"] + fp["quant_constants"] + fp["other_weights"]
    seen = []
    model.generate([[5, 6, 7], [8]], 4, eos_token_id=None,
                   stream=lambda r, t: seen.append(model.memory_footprint()["kv_cache"]))
    cap = 3 + 4
    assert seen[0] == 2 * L * 2 * Hkv * cap * hd * 4 + 4 * 2 * cap
    assert model.memory_footprint()["kv_cache"] == 0  # released after generate
