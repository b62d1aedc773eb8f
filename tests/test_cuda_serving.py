"""Serving ops of issue 10 on every backend: sample_rows (next-token choice where the logits are,
only token ids come back) and the mixed-adapter LoRA form lora_segments_many, through the op
harness (_core.backend_op, sentinel-guarded buffers) against exact references.

Backends: cpu:scalar, cpu, cpu:devsim (the CPU kernels behind CUDA's device face and op table:
sample_rows there runs the default, download + host rule) and cuda (skips without a GPU).
"""
import math
import os
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import _core

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers_ops import EPS32, HAVE_GPU, lora_case  # noqa: E402
from helpers_ops import HARNESS_BACKENDS as BACKENDS  # noqa: E402
from helpers_ops import be as _be  # noqa: E402


# ------------------------------------------------------------------ sample_rows


def _ref_token(row, hist, T, top_k, top_p, pen, u):
    """model/sampler.cpp sample_token, step for step: float32 penalties, double z, stable order,
    sequential double sums, glibc exp (math.exp)."""
    l = np.asarray(row, np.float32).copy()
    V = l.size
    if np.isnan(l).any():
        raise ValueError("NaN")
    if pen != 1.0:
        p32 = np.float32(pen)
        for t in sorted(set(int(h) for h in hist)):
            if 0 <= t < V:
                l[t] = l[t] * p32 if l[t] < 0 else l[t] / p32
    if T == 0.0:
        return int(np.argmax(l))
    z = l.astype(np.float64) / float(np.float32(T))
    order = np.argsort(-z, kind="stable")
    keep = min(top_k, V) if top_k > 0 else V
    mx = float(z[order[0]])
    if not math.isfinite(mx):
        return int(order[0])
    w = [math.exp(float(z[order[i]]) - mx) for i in range(keep)]
    total = 0.0
    for x in w:
        total += x
    if top_p < 1.0:
        cum, n = 0.0, 0
        while n < keep:
            cum += w[n] / total
            n += 1
            if cum >= float(np.float32(top_p)):
                break
        keep = max(n, 1)
        total = 0.0
        for i in range(keep):
            total += w[i]
    r = u * total
    for i in range(keep):
        if r < w[i]:
            return int(order[i])
        r -= w[i]
    return int(order[keep - 1])


def _sample_op(backend, logits, rows, hists, u, T=0.0, top_k=0, top_p=1.0, pen=1.0, ldl=None):
    R, V = logits.shape
    ldl = V if ldl is None else ldl
    lg = np.zeros((R, ldl), np.float32)
    lg[:, :V] = logits
    off = np.zeros(len(rows) + 1, np.int64)
    for i, h in enumerate(hists):
        off[i + 1] = off[i] + len(h)
    hist = np.concatenate([np.asarray(h, np.int32) for h in hists] + [np.zeros(1, np.int32)])
    res = _core.backend_op(
        backend, "sample_rows",
        {"logits": lg, "rows": np.asarray(rows, np.int32), "hist": hist, "hist_off": off,
         "u": np.asarray(u, np.float64)},
        {"n": len(rows), "V": V, "ldl": ldl, "R": R, "top_k": top_k},
        {"temperature": T, "top_p": top_p, "repetition_penalty": pen})
    np.testing.assert_array_equal(res["logits"], lg, err_msg="sample_rows changed the logits")
    return res["tokens"].tolist()


SAMPLE_CASES = {  # name: (V, temperature, top_k, top_p, penalty, logit scale)
    "greedy": (500, 0.0, 0, 1.0, 1.0, 3.0),
    "greedy_penalty": (500, 0.0, 0, 1.0, 1.3, 3.0),
    "temperature": (300, 0.7, 0, 1.0, 1.0, 3.0),
    # CUDA: top-k within one chunk of 1024, beyond it, and a walk over several chunks (flat logits)
    "top_k": (3000, 1.0, 40, 1.0, 1.0, 2.0),
    "top_k_large": (3000, 1.3, 1500, 1.0, 1.0, 0.5),
    "flat_full_vocab": (2600, 5.0, 0, 1.0, 1.0, 0.01),
    "top_p": (2000, 0.8, 0, 0.9, 1.0, 4.0),
    "top_p_flat": (2600, 1.0, 0, 0.95, 1.0, 0.05),
    "all": (1100, 0.9, 50, 0.8, 1.2, 3.0),
    "tiny_temperature": (200, 1e-30, 0, 1.0, 1.0, 3.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_op_sample_rows(backend, case):
    _be(backend)
    V, T, top_k, top_p, pen, scale = SAMPLE_CASES[case]
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    R, n = 5, 4
    logits = (rng.standard_normal((R, V)) * scale).astype(np.float32)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1  # a tie at the top: the lower id first
    logits[2, :] = np.round(logits[2, :])                # many ties everywhere
    logits[3, 5] = -0.0
    logits[3, 6] = 0.0
    rows = [3, 1, 0, 2]
    hists = [rng.integers(0, V, size=k).tolist() + [-1, V + 3] for k in (0, 5, 30, 2)]
    hists[2] += hists[2][:4]  # duplicates are penalized once
    u = rng.random(n)
    got = _sample_op(backend, logits, rows, hists, u, T, top_k, top_p, pen, ldl=V + 3)
    want = [_ref_token(logits[r], h, T, top_k, top_p, pen, ui) for r, h, ui in zip(rows, hists, u)]
    assert got == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_sample_rows_edges(backend):
    _be(backend)
    V = 40
    base = np.linspace(-3, 3, V).astype(np.float32)
    inf_row = base.copy()
    inf_row[[11, 17]] = np.inf                       # +inf: the first one, no draw
    ninf = np.full(V, -np.inf, np.float32)           # all -inf: token 0
    some_ninf = base.copy()
    some_ninf[::2] = -np.inf                         # never drawn
    logits = np.stack([inf_row, ninf, some_ninf])
    for T in (0.0, 1.0):
        for u in (0.0, 0.5, 1.0 - 2**-53):
            got = _sample_op(backend, logits, [0, 1, 2], [[], [], []], [u] * 3, T)
            want = [_ref_token(logits[r], [], T, 0, 1.0, 1.0, u) for r in range(3)]
            assert got == want and got[0] == 11 and got[1] == 0 and got[2] % 2 == 1
    # u -> 1 with top-p: the last kept token (the walk runs out); u = 0: the first
    assert _sample_op(backend, logits[2:], [0], [[]], [0.0], 1.0, 0, 0.5) == [V - 1]
    nan = base.copy()
    nan[13] = np.nan
    for T in (0.0, 0.7):
        with pytest.raises(ValueError, match="NaN"):
            _sample_op(backend, nan[None], [0], [[]], [0.3], T)
    assert _sample_op(backend, logits, [], [], [], 0.5) == []


def test_sampler_draws_match_the_former_distribution():
    """Sampler.sample with a seed draws u * total where the former code drew
    uniform_real_distribution(0, total)(mt19937_64): one engine call per sampling row, greedy rows
    none. The pinned tokens were printed by the former implementation (sampler.cpp before the draw
    moved to Sampler::draw), compiled on its own."""
    row = np.linspace(0, 1, 16).astype(np.float32)
    s = _core.model.Sampler(1234)
    toks = [int(s.sample(row, np.zeros(0, np.int32), temperature=0.5)) for _ in range(12)]
    assert toks == [2, 15, 1, 2, 14, 2, 4, 2, 15, 7, 2, 15], toks
    s = _core.model.Sampler(99)
    hist = np.array([3, 15, 15], np.int32)
    toks = [int(s.sample(row, hist, temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.2)) for _ in range(12)]
    assert toks == [15, 11, 12, 14, 12, 15, 12, 13, 14, 13, 13, 11], toks
    # sample_rows draws in row order, greedy rows take none
    s1, s2 = _core.model.Sampler(5), _core.model.Sampler(5)
    rows = np.stack([row, row[::-1].copy(), row])
    got = s1.sample_rows(rows, np.arange(3, dtype=np.int32), [np.zeros(0, np.int32)] * 3, temperature=0.7).tolist()
    assert got == [int(s2.sample(r, np.zeros(0, np.int32), temperature=0.7)) for r in rows]


def _gen_backends():
    return ["cpu", "cpu:devsim"] + (["cuda"] if HAVE_GPU else [])


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3),
                                dict(temperature=1.5)], ids=["greedy", "sampling", "full_vocab"])
def test_generate_same_tokens_on_every_backend(tmp_path, kw):
    """Model.generate picks tokens through the backend's sample_rows (GenerationContext.feed_sample):
    for one seed the same tokens on the CPU backend, on cpu:devsim (logits stay in 'device' memory,
    only ids come back) and on a GPU; and the same as the former loop feed() + Sampler.sample_rows."""
    from helpers_model import make_checkpoint

    rng = np.random.default_rng(5)
    path, cfg, _ = make_checkpoint(tmp_path, rng, vocab=97, hidden=64, inter=96, layers=2, heads=4, kv_heads=2)
    prompts = [[5, 9, 13, 2], [7, 1]]
    outs = {}
    for be in _gen_backends():
        m = qlora_native.Model.from_pretrained(path, backend=be, tokenizer=None, compute_dtype="float32")
        outs[be] = m.generate(prompts, 10, eos_token_id=None, seed=77, **kw)
    assert len({str(v) for v in outs.values()}) == 1, outs
    # the former loop: logits to the host, Sampler.sample_rows
    m = qlora_native.Model.from_pretrained(path, backend="cpu", tokenizer=None)
    args = dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    args.update(kw)
    s = _core.model.Sampler(77)
    s.sample(np.zeros(1, np.float32), np.zeros(0, np.int32), **args)  # generate's validation draw
    B, P = 2, 4
    ids = np.zeros((B, P), np.int32)
    mask = np.zeros((B, P), np.int32)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = p
        mask[b, P - len(p):] = 1
    hist = [list(p) for p in prompts]
    ctx = m._core.new_context(B, P + 10, None, None)
    out = [[], []]
    logits = ctx.feed(ids, mask)
    for step in range(10):
        toks = s.sample_rows(logits, np.arange(B, dtype=np.int32), [np.asarray(h, np.int32) for h in hist], **args)
        for b, t in enumerate(toks.tolist()):
            out[b].append(t)
            hist[b].append(t)
        logits = ctx.feed(np.asarray(toks, np.int32)[:, None], np.ones((B, 1), np.int32))
    ctx.close()
    assert out == outs["cpu"]


def test_feed_sample_refuses_bad_rows(tmp_path):
    from helpers_model import make_checkpoint

    rng = np.random.default_rng(6)
    path, *_ = make_checkpoint(tmp_path, rng, vocab=97, hidden=64, inter=96, layers=1, heads=4, kv_heads=2)
    m = qlora_native.Model.from_pretrained(path, backend="cpu:devsim", tokenizer=None)
    ctx = m._core.new_context(2, 8, None, None)
    s = _core.model.Sampler(1)
    ids = np.ones((2, 2), np.int32)
    with pytest.raises(ValueError, match="row index"):
        ctx.feed_sample(ids, None, s, np.array([0, 2], np.int32), [np.zeros(0, np.int32)] * 2)
    with pytest.raises(ValueError, match="one history per row"):
        ctx.feed_sample(ids, None, s, np.array([0], np.int32), [])
    with pytest.raises(ValueError, match="top_p"):
        ctx.feed_sample(ids, None, s, np.array([0], np.int32), [np.zeros(0, np.int32)], top_p=0.0)
    assert ctx.used == 0  # refused before any compute
    ctx.close()


# ------------------------------------------------------------------ lora_segments_many (SGMV)


def _segments(rows_per, ranks, M, alphas=None):
    segs, row = [], 0
    for i, (n, r) in enumerate(zip(rows_per, ranks)):
        if row + n > M:
            break
        segs.append((row, n, r, (alphas or [0.75, -1.5, 2.0, 0.25])[i % 4]))
        row += n
    return segs


SGMV_CASES = {
    # decode of a mixed batch: one row per adapter, ranks 1..64 (CUDA: one shrink warp per rank row)
    "decode_mixed": (16, [(64, 96, _segments([1] * 16, [1, 2, 4, 8, 16, 32, 64, 3, 5, 7, 9, 11, 13, 15, 17, 33], 16))]),
    # q/k/v-like problems sharing x, more than 40 segments (several CUDA launches), a zero alpha
    "many_segments": (45, [(48, 40, _segments([1] * 45, [4, 8] * 23, 45, [1.0, 0.0, -0.5, 2.0])),
                           (48, 16, _segments([1] * 45, [8] * 45, 45)),
                           (48, 16, _segments([3, 5, 7], [16, 16, 16], 45))]),
    # segments longer than 64 rows / rows * r beyond the expand tile: the GEMM path, beside short ones
    "long_and_short": (150, [(33, 300, [(0, 70, 8, 0.5), (70, 60, 80, -1.0), (130, 17, 12, 1.5)])]),
    # odd sizes: in not a multiple of 32, out not of 256, rows not of 8, an empty segment
    "odd": (23, [(37, 259, [(0, 9, 3, 1.0), (9, 0, 5, 1.0), (9, 13, 7, -0.25)])]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SGMV_CASES))
def test_op_lora_segments_many_sgmv(backend, case):
    _be(backend)
    M, problems = SGMV_CASES[case]
    rng = np.random.default_rng(len(case) * 7919)
    arrays, ints, floats, refs = lora_case(rng, problems, M)
    res = _core.backend_op(backend, "lora_segments_many", arrays, ints, floats)
    for p, inp, out, ref, bound, y, segs in refs:
        got = res[f"y_{p}"].astype(np.float64)
        rmax = max([s[2] for s in segs] + [1])
        tol = 2 * (inp + rmax + 8) * EPS32 * bound + 1e-30
        bad = np.abs(got[:, :out] - ref) > tol
        assert not bad.any(), f"{case} problem {p}: {bad.sum()} elements off"
        np.testing.assert_array_equal(res[f"y_{p}"][:, out:], y[:, out:])  # padding untouched
