"""Op kernels that no GPU has run yet, on the CPU under the fiber emulator (tests/cuda_emu/emu.hpp,
driver tests/cuda_emu/ops_driver.cpp), because CI has no GPU:
- cuda/ops_lora_sgmv.cu (Backend::lora_segments_many for segments of <= 64 rows): the shrink and
  the expand launch over mixed-adapter batches (ranks 1..64, rows 1..64, empty segments, rows of
  no adapter, several problems with their own in / out / strides, > 256 inputs and outputs, more
  than 40 entries: two batches), against float64;
- cuda/ops_rmsnorm.cu and ops_rmsnorm_backward.cu (with dx aliasing dy / out aliasing x),
  ops_swiglu_backward.cu (strided, outputs over inputs), ops_cross_entropy.cu (ignored rows,
  the loss and the gradient written over the logits), against float64 with fp32 bounds;
- cuda/ops_adamw.cu bit for bit against the CPU optimizer's loop (numpy float32, and the engine's
  cpu:scalar adamw_update op where qlora_native._core imports), its ieee_ops.cuh PTX instructions as
  the plain C++ operations; cuda/ops_grad_norm.cu: the double chunk sums (within double rounding of
  the exact sums and of the CPU op), their in-order total, scale_inplace bit for bit, find_nonfinite.
- cuda/ops_sample.cu (greedy and sampling kernels, the repetition penalty): the tokens of the
  engine's host rule (cpu:scalar sample_rows) over temperature, top-k (one chunk and above), top-p,
  ties, -inf and NaN rows, V = 3000 (radix select over several 1024-token chunks, bitonic sort);
- cuda/ops_lora_dropout.cu forward and backward: bit for bit the engine's CPU op (Philox stream
  offsets not a multiple of 4, strides, subnormal inputs);
- cuda/ops_rope.cu (forward and inverse) against the CPU op within fp32 rounding, cuda/ops_kv_write.cu
  (fp32 and bf16 caches) bit for bit as the CPU op; the row gathers of ops_half_rows.cu (fp16 / bf16),
  ops_q8_0_rows.cu and ops_embedding.cu, ops_add_bias.cu and ops_add_inplace.cu bit for bit, and
  ops_swiglu.cu within fp32 rounding of the CPU ops.
Each source is compiled as host C++ with its static __shared__ arrays as per-block NaN storage and
its <<<>>> launches rewritten; each op runs twice, the threads of a block scheduled in opposite orders, and
must give the same bytes (a missing barrier shows). Skipped when no C++17 compiler is present.
"""
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
EPS = 2.0 ** -24  # fp32 unit roundoff
LAUNCH = re.compile(r"(\w+(?:<[\w, ]+>)?)<<<(.*?), stream>>>\((.*?)\);", re.S)
SHARED = re.compile(r"__shared__ (\w+) (\w+)((?:\[[^\]]+\])+);")
SOURCES = {"ops_lora_sgmv.cu": 2, "ops_rmsnorm.cu": 1, "ops_rmsnorm_backward.cu": 1, "ops_swiglu_backward.cu": 1,
           "ops_cross_entropy.cu": 1, "ops_adamw.cu": 1, "ops_grad_norm.cu": 4,
           "ops_sample.cu": 3, "ops_lora_dropout.cu": 2,
           "ops_rope.cu": 1, "ops_kv_write.cu": 2,
           "ops_half_rows.cu": 2, "ops_q8_0_rows.cu": 1, "ops_embedding.cu": 1, "ops_swiglu.cu": 1, "ops_add_bias.cu": 1,
           "ops_add_inplace.cu": 1}  # name -> kernel launches
IEEE_ASM = re.compile(r'asm\("(add|sub|mul|div|sqrt)\.rn\.f32 [^;]*;"[^;]*\);')
IEEE_OP = {"add": "r = a + b;", "sub": "r = a - b;", "mul": "r = a * b;", "div": "r = a / b;", "sqrt": "r = std::sqrt(a);"}


def emu_source(name, text=None):
    text = (ROOT / "cuda" / name).read_text() if text is None else text
    text = SHARED.sub(r"auto& \2 = emu::shared_static<\1\3, __COUNTER__>();", text)
    text = text.replace("__shared__ Shared S;", "auto& S = emu::shared_static<Shared, __COUNTER__>();")  # ops_sample.cu
    text, k = LAUNCH.subn(r"emu::launch(\2, [&]() { \1(\3); });", text)
    assert k == SOURCES[name], f"{name}: expected {SOURCES[name]} kernel launches, rewrote {k}"
    assert "<<<" not in text and "__shared__" not in text, f"{name}: left unrewritten"
    return text


def build(d, texts=None):
    """The driver over the rewritten sources (texts: name -> replacement source, for planted bugs)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    for name in SOURCES:
        (d / name.replace(".cu", ".cpp")).write_text(emu_source(name, (texts or {}).get(name)))
    ieee, k = IEEE_ASM.subn(lambda m: IEEE_OP[m.group(1)], (ROOT / "cuda" / "ieee_ops.cuh").read_text())
    assert k == 5 and "asm" not in ieee, f"ieee_ops.cuh: rewrote {k} of its 5 PTX instructions"
    (d / "ieee_ops.cuh").write_text("#include <cmath>\n" + ieee)
    exe = d / "ops_driver"
    r = subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", f"-I{d}", f"-I{EMU}", f"-I{ROOT / 'cuda'}", f"-I{ROOT / 'cpp' / 'src'}",
                        "-o", str(exe), str(EMU / "ops_driver.cpp")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_emu_ops"))


def call(exe, tmp_path, mode, arrays, args):
    """Runs one op: arrays (float32 / int32) concatenated into the input file; the flat float32 output.
    Runs it twice, the block's threads scheduled first to last and last to first (EMU_REVERSE): a race
    that a missing barrier leaves open shows as a difference (the kernels here are deterministic)."""
    src = tmp_path / f"{mode}.in"
    src.write_bytes(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    outs = []
    for rev in ("0", "1"):
        dst = tmp_path / f"{mode}.{rev}.out"
        r = subprocess.run([str(exe), mode, str(src), str(dst), *map(str, args)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "EMU_REVERSE": rev})
        assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
        outs.append(np.fromfile(dst, np.float32))
    assert outs[0].tobytes() == outs[1].tobytes(), f"{mode}: the result depends on the threads' order (a race)"
    return outs[0]


def within(got, ref, tol, what):
    err = np.abs(got.astype(np.float64) - ref)
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} wrong, first at {np.argwhere(bad)[0]}: "
                           f"got {got[bad][0]} want {ref[bad][0]} (max err/tol {np.nanmax(err / tol):.3g})")


# ---- SGMV: problems (in, out, ldx pad, ldy pad, M, segments (row0, rows, r, alpha)); rows of no
# segment are "__base__" rows (no adapter): y stays bit for bit.
SGMV_CASES = {
    "decode-mixed": [(300, 300, 3, 1, 12, [(0, 3, 8, 0.5), (3, 1, 16, 2.0), (5, 0, 4, 1.0), (5, 4, 1, -1.0),
                                             (10, 2, 64, 0.25)])],
    "qkv-three-problems": [(70, 40, 0, 0, 20, [(0, 13, 4, 1.0), (13, 7, 0, 1.0), (15, 5, 8, 0.0)]),
                           (70, 520, 2, 0, 20, [(0, 13, 4, 1.0), (16, 4, 2, 0.5)]),
                           (70, 17, 0, 5, 20, [(1, 9, 3, 1.5)])],
    "long-rows-and-big-tile": [(40, 33, 0, 0, 64, [(0, 64, 64, 1.0)])],  # rows * r = 4096: the whole tile
    "two-batches": [(20, 9, 0, 0, 45, [(i, 1, 1 + i % 5, 1.0 + i / 8) for i in range(45)])],  # 45 > 40 entries
}


@pytest.mark.parametrize("name", list(SGMV_CASES))
def test_lora_sgmv_under_emulator(driver, tmp_path, name):
    probs = SGMV_CASES[name]
    rng = np.random.default_rng(len(name))
    arrays, args, refs = [], [len(probs)], []
    for nin, nout, px, py, M, segs in probs:
        ldx, ldy = nin + px, nout + py
        x = np.full((M, ldx), np.nan, np.float32); x[:, :nin] = rng.standard_normal((M, nin))
        y = np.full((M, ldy), np.nan, np.float32); y[:, :nout] = rng.standard_normal((M, nout))
        arrays += [x, y]
        args += [nin, nout, ldx, ldy, M, len(segs)]
        ref, tol = y.astype(np.float64), np.zeros((M, ldy))
        for row0, rows, r, alpha in segs:
            A = rng.standard_normal((r, nin)).astype(np.float32)
            B = rng.standard_normal((nout, r)).astype(np.float32)
            arrays += [A, B]
            args += [row0, rows, r, alpha]
            if rows == 0 or r == 0 or alpha == 0:
                continue
            xs = x[row0:row0 + rows, :nin].astype(np.float64)
            ref[row0:row0 + rows, :nout] += alpha * (xs @ A.T.astype(np.float64)) @ B.T.astype(np.float64)
            # t: in fp32 sums (<= in / 256 + 8 + 8 roundings deep), rounded once; the expand: r + 1 more
            mag = abs(alpha) * (np.abs(xs) @ np.abs(A.T)) @ np.abs(B.T)
            tol[row0:row0 + rows, :nout] += (nin + r + 24) * EPS * mag
        refs.append((ref, tol + 2 * EPS * np.abs(y.astype(np.float64)) + 1e-30, y))
    out = call(driver, tmp_path, "sgmv", arrays, args)
    off = 0
    for q, (ref, tol, y0) in enumerate(refs):
        got = out[off:off + y0.size].reshape(y0.shape)
        off += y0.size
        nout = probs[q][1]
        assert np.array_equal(got[:, nout:], y0[:, nout:], equal_nan=True), f"problem {q}: wrote past a row"
        touched = tol[:, :nout] > 2 * EPS * np.abs(y0[:, :nout]) + 1e-30
        assert np.array_equal(got[:, :nout][~touched], y0[:, :nout][~touched]), f"problem {q}: a base row changed"
        within(got[:, :nout], ref[:, :nout], tol[:, :nout], f"sgmv problem {q}")
    assert off == out.size


# ---- RMSNorm forward / backward: one block per row (D < 256: idle threads; D > 256: the stride loop)
@pytest.mark.parametrize("M,D,alias", [(3, 7, False), (5, 300, True), (2, 1000, False)])
def test_rmsnorm_under_emulator(driver, tmp_path, M, D, alias):
    rng = np.random.default_rng(M * 31 + D)
    x = rng.standard_normal((M, D)).astype(np.float32)
    x[0] *= 1e-3  # a small row: eps matters
    w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    eps = 1e-5
    got = call(driver, tmp_path, "rmsnorm", [x, w], [M, D, eps, int(alias)]).reshape(M, D)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    r = 1.0 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + np.float64(np.float32(eps)))
    ref = w64 * x64 * r
    within(got, ref, (D + 8) * EPS * np.abs(ref) + 1e-30, "rmsnorm")


@pytest.mark.parametrize("M,D,alias", [(1, 7, False), (13, 64, True), (5, 1000, True), (2, 257, False)])
def test_rmsnorm_backward_under_emulator(driver, tmp_path, M, D, alias):
    rng = np.random.default_rng(M * 17 + D)
    x = rng.standard_normal((M, D)).astype(np.float32)
    x[0] *= 1e-3
    w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    dy = rng.standard_normal((M, D)).astype(np.float32)
    eps = 1e-5
    got = call(driver, tmp_path, "rmsnorm_backward", [x, w, dy], [M, D, eps, int(alias)]).reshape(M, D)
    x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    r = 1.0 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + np.float64(np.float32(eps)))
    c = (w64 * g64 * x64).mean(axis=1, keepdims=True) * r ** 3
    ref = r * w64 * g64 - c * x64
    # sums in double; r, c and the result in fp32: a few roundings of each term
    mag = r * np.abs(w64 * g64) + (np.abs(w64 * g64 * x64).mean(axis=1, keepdims=True) * r ** 3) * np.abs(x64)
    within(got, ref, 16 * EPS * mag + 1e-30, "rmsnorm_backward")


# ---- SwiGLU backward: grid-stride, strided operands, outputs in padded buffers (padding kept)
@pytest.mark.parametrize("M,N", [(9, 131), (3, 700)])
def test_swiglu_backward_under_emulator(driver, tmp_path, M, N):
    rng = np.random.default_rng(M + N)
    lds = (N + 3, N + 1, N + 5, N + 2, N + 4)
    gate, up, dout = (np.full((M, ld), np.nan, np.float32) for ld in lds[:3])
    gate[:, :N] = rng.standard_normal((M, N)) * 2.0
    gate[0, :4] = [0.0, -30.0, 30.0, 88.0]  # sigmoid's flat ends
    up[:, :N] = rng.standard_normal((M, N))
    dout[:, :N] = rng.standard_normal((M, N))
    dg0, du0 = np.full((M, lds[3]), 7.0, np.float32), np.full((M, lds[4]), 7.0, np.float32)
    out = call(driver, tmp_path, "swiglu_backward", [gate, up, dout, dg0, du0], [M, N, *lds])
    dg, du = out[:dg0.size].reshape(dg0.shape), out[dg0.size:].reshape(du0.shape)
    g, u, d = (a[:, :N].astype(np.float64) for a in (gate, up, dout))
    s = 1.0 / (1.0 + np.exp(-g))
    # expf within a few ulp; every term bounded by (1 + |g|)
    within(du[:, :N], d * g * s, 16 * EPS * np.abs(d) * (1.0 + np.abs(g)) + 1e-30, "swiglu_backward dup")
    within(dg[:, :N], d * u * s * (1.0 + g * (1.0 - s)), 16 * EPS * np.abs(d * u) * (1.0 + np.abs(g)) + 1e-30,
           "swiglu_backward dgate")
    assert (du[:, N:] == 7.0).all() and (dg[:, N:] == 7.0).all(), "padding columns written"


# ---- cross-entropy rows: loss and the gradient over the logits, ignored (-100) rows
@pytest.mark.parametrize("want_grad", [False, True])
@pytest.mark.parametrize("M,V,ldl", [(5, 1003, 1010), (3, 40, 40)])
def test_cross_entropy_under_emulator(driver, tmp_path, want_grad, M, V, ldl):
    rng = np.random.default_rng(V + want_grad)
    logits = (rng.standard_normal((M, ldl)) * 4).astype(np.float32)
    labels = rng.integers(0, V, size=M).astype(np.int32)
    labels[1] = -100
    labels[-1] = V - 1  # the last column
    gs = 0.25
    out = call(driver, tmp_path, "cross_entropy", [logits, labels], [M, V, ldl, int(want_grad), gs])
    g, loss = out[:logits.size].reshape(M, ldl), out[logits.size:]
    l64 = logits[:, :V].astype(np.float64)
    mx = l64.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(l64 - mx).sum(axis=1))
    ref = np.where(labels == -100, 0.0, lse - l64[np.arange(M), np.maximum(labels, 0)])
    within(loss, ref, 16 * EPS * (np.abs(lse) + np.abs(l64).max(axis=1)), "cross_entropy loss")
    if want_grad:
        p = np.exp(l64 - lse[:, None])
        gref = gs * p
        gref[np.arange(M), np.maximum(labels, 0)] -= gs
        gref[labels == -100] = 0.0
        tol = gs * (4 + 2 * (np.abs(lse)[:, None] + np.abs(l64))) * EPS * p + EPS * np.abs(gref) + 1e-30
        within(g[:, :V], gref, tol, "cross_entropy grad")
    else:
        assert np.array_equal(g, logits), "logits changed without want_grad"
    assert np.array_equal(g[:, V:], logits[:, V:]), "wrote past V"


def cpu_op(op, arrays, ints, floats):
    """The engine's CPU op (qlora_native._core.backend_op on cpu:scalar), or None without the module."""
    try:
        from qlora_native import _core
    except ImportError:
        return None
    run = getattr(_core, "backend_op", None)  # an installed older build may lack the op harness
    return None if run is None else run("cpu:scalar", op, arrays, ints, floats)


# ---- AdamW: bit for bit as the CPU optimizer (ieee_ops.cuh keeps every op IEEE-rounded, unfused)
@pytest.mark.parametrize("n,t,wd", [(1000, 1, 0.0), (70001, 7, 0.01)])
def test_adamw_bit_identical_under_emulator(driver, tmp_path, n, t, wd):
    rng = np.random.default_rng(n + t)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    g[:3] = [0.0, 1e-30, -3e-39]  # zero, tiny, subnormal gradients: no flush
    m = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    v = (rng.random(n) * 1e-6).astype(np.float32)
    v[3] = 0.0
    lr, b1, b2, eps = 2e-4, 0.9, 0.999, 1e-8
    out = call(driver, tmp_path, "adamw", [p, g, m, v], [n, t, repr(lr), repr(b1), repr(b2), repr(eps), repr(wd)])
    gp, gm, gv = out[:n], out[n:2 * n], out[2 * n:]
    # the CPU loop (train::adamw_update) in numpy float32: each operation rounded once, as in C++
    f = np.float32
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    decay = f(1.0 - lr * wd) if wd != 0 else f(1.0)
    mi = m + f(1.0 - b1) * (g - m)
    vi = v * f(b2) + f(1.0 - b2) * g * g
    denom = np.sqrt(vi) / f(bc2 ** 0.5) + f(eps)
    pi = p * decay + f(-(lr / bc1)) * mi / denom
    for what, got, ref in (("p", gp, pi), ("m", gm, mi), ("v", gv, vi)):
        assert got.tobytes() == ref.astype(np.float32).tobytes(), f"adamw {what}: not bit for bit the CPU loop"
    cpu = cpu_op("adamw_update", {"p": p, "g": g, "m": m, "v": v}, {"n": n, "t": t},
                 {"lr": lr, "beta1": b1, "beta2": b2, "eps": eps, "weight_decay": wd})
    if cpu is not None:
        for what, got in (("p", gp), ("m", gm), ("v", gv)):
            assert got.tobytes() == cpu[what].tobytes(), f"adamw {what}: not bit for bit the CPU op"


# ---- gradient norm: chunk sums of squares (double), their in-order total, x * s, first non-finite
@pytest.mark.parametrize("sizes,bad", [([1000, 3, 70000], 69999), ([5], -1), ([], -1), ([300, 0, 513], 2)])
def test_grad_norm_under_emulator(driver, tmp_path, sizes, bad):
    K = 1 << 15  # train::kNormChunk: each tensor split from its start
    bounds = [0]
    for sz in sizes:
        for c0 in range(0, sz, K):
            bounds.append(bounds[-1] + min(K, sz - c0))
    n, nc = bounds[-1], len(bounds) - 1
    rng = np.random.default_rng(n + nc)
    x = rng.standard_normal(n).astype(np.float32)
    if bad >= 0:
        x[bad] = np.inf
        x[-1] = np.nan  # a later hit: the first one wins
    s = np.float32(0.3)
    out = call(driver, tmp_path, "grad_norm", [np.array(bounds, np.int64), x], [nc, n, repr(float(s))])
    part = out[:2 * nc].view(np.float64)
    total = out[2 * nc:2 * nc + 2].view(np.float64)[0]
    first = out[2 * nc + 2:2 * nc + 4].view(np.int64)[0]
    assert first == bad, f"find_nonfinite: {first}, want {bad}"
    assert out[2 * nc + 4:].tobytes() == (x * s).tobytes(), "scale_inplace: not bit for bit x * s"
    acc = 0.0
    for c in range(nc):  # the partials summed in chunk order, exactly
        acc += float(part[c])
    assert total.tobytes() == np.float64(acc).tobytes(), "sum_squares: the total is not the in-order sum"
    x64 = x.astype(np.float64) ** 2  # exact squares
    ref = np.array([math.fsum(x64[bounds[c]:bounds[c + 1]]) for c in range(nc)])
    fin = np.isfinite(ref)  # chunks holding the inf / nan: not compared
    err = np.abs(part[fin] - ref[fin])
    assert np.all(err <= (np.diff(bounds)[fin] + 8) * 2.0 ** -53 * ref[fin]), "sum_squares: a chunk's sum"
    if bad < 0:
        cpu = cpu_op("sum_squares", {"bounds": np.array(bounds, np.int64), "x": x, "partial": np.zeros(nc),
                                     "out": np.zeros(1)}, {"n_chunks": nc}, {})
        if cpu is not None:  # the CPU sums in another order: equal within double rounding
            assert abs(cpu["out"][0] - total) <= (n + 8) * 2.0 ** -53 * abs(total), "sum_squares vs the CPU op"


# ---- sampling (cuda/ops_sample.cu): the tokens of the engine's host rule (cpu:scalar sample_rows)
# temperature, top_k, top_p, repetition penalty; V 3000: three 1024-token chunks of the radix select
SAMPLE_CASES = [(0.0, 0, 1.0, 1.0), (0.8, 0, 1.0, 1.0), (1.0, 50, 0.9, 1.3), (0.7, 2000, 0.95, 1.0),
                (1.2, 0, 0.5, 1.1)]


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sample_rows_under_emulator(driver, tmp_path, case):
    T, top_k, top_p, pen = case
    n, V, ldl = 5, 3000, 3003
    rng = np.random.default_rng(int(T * 10) + top_k)
    logits = (rng.standard_normal((n, ldl)) * 2).astype(np.float32)
    logits[0, 7] = logits[0, 1900] = logits[0].max() + 1  # a tie at the top: the lower id first
    logits[1, :V] = np.round(logits[1, :V] * 2) / 2  # many ties
    logits[2, 13] = np.nan  # -1 for this row
    logits[3, :2000] = -np.inf
    u = rng.random(n)
    hists = [rng.choice(V, size=k, replace=False).astype(np.int32) for k in (0, 5, 3, 40, 1)]
    pen_off = np.cumsum([0] + [len(h) for h in hists]).astype(np.int32)
    out = call(driver, tmp_path, "sample", [logits, u, pen_off, np.concatenate(hists)],
               [n, V, ldl, repr(T), top_k, repr(top_p), repr(pen)])
    got = out.view(np.int32)
    assert got[2] == -1, "a NaN row gives -1"
    assert np.all((got == -1) == np.isnan(logits[:, :V]).any(axis=1))
    try:
        from qlora_native import _core
    except ImportError:
        pytest.skip("no qlora_native._core")
    if not hasattr(_core, "backend_op"):
        pytest.skip("qlora_native._core without the op harness")
    ok = ~np.isnan(logits[:, :V]).any(axis=1)  # the CPU op raises on NaN rows
    rows = np.flatnonzero(ok).astype(np.int32)
    ho = np.cumsum([0] + [len(hists[r]) for r in rows]).astype(np.int64)
    ref = _core.backend_op("cpu:scalar", "sample_rows",
                           {"logits": logits, "rows": rows, "hist": np.concatenate([hists[r] for r in rows]),
                            "hist_off": ho, "u": u[rows]},
                           {"n": len(rows), "V": V, "ldl": ldl, "R": n, "top_k": top_k},
                           {"temperature": T, "top_p": top_p, "repetition_penalty": pen})["tokens"]
    assert np.array_equal(got[rows], ref), f"tokens {got[rows]} want {ref} (the host rule)"


# ---- LoRA dropout (Philox mask): bit for bit the CPU op, forward and backward
@pytest.mark.parametrize("M,nin,pad,offset,p", [(3, 37, 2, 5, 0.1), (8, 300, 0, 1 << 33 | 3, 0.5), (1, 1, 1, 0, 0.0)])
def test_lora_dropout_under_emulator(driver, tmp_path, M, nin, pad, offset, p):
    try:
        from qlora_native import _core
    except ImportError:
        pytest.skip("no qlora_native._core")
    if not hasattr(_core, "backend_op"):
        pytest.skip("qlora_native._core without the op harness")
    rng = np.random.default_rng(M * nin)
    ld, seed = nin + pad, 0x9E3779B97F4A7C15
    x = rng.standard_normal((M, ld)).astype(np.float32)
    x[0, 0] = 3e-39  # subnormal: kept
    g = rng.standard_normal((M, nin)).astype(np.float32)
    dx = rng.standard_normal((M, ld)).astype(np.float32)
    ints = {"M": M, "in": nin, "ld": ld, "seed_lo": seed & 0xFFFFFFFF, "seed_hi": seed >> 32, "offset": offset}
    args = [M, nin, ld, seed, offset, repr(p)]
    got = call(driver, tmp_path, "dropout", [x], args)
    ref = _core.backend_op("cpu:scalar", "lora_dropout", {"x": x, "out": np.zeros((M, nin), np.float32)}, ints,
                           {"p": p})["out"]
    assert got.tobytes() == ref.tobytes(), "lora_dropout: not bit for bit the CPU op"
    if p > 0:
        assert 0 < np.count_nonzero(got == 0) < got.size, "the mask drops some, keeps some"
    got = call(driver, tmp_path, "dropout_backward", [g, dx], args)
    ref = _core.backend_op("cpu:scalar", "lora_dropout_backward", {"g": g, "dx": dx}, ints, {"p": p})["dx"]
    assert got.tobytes() == ref.tobytes(), "lora_dropout_backward: not bit for bit the CPU op"


def core_or_skip():
    try:
        from qlora_native import _core
    except ImportError:
        pytest.skip("no qlora_native._core")
    if not hasattr(_core, "backend_op"):
        pytest.skip("qlora_native._core without the op harness")
    return _core


# ---- RoPE forward / inverse (rope_backward) and the KV-cache write, against the CPU ops
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_under_emulator(driver, tmp_path, inverse):
    core = core_or_skip()
    M, H, hd, ldx = 7, 3, 64, 3 * 64 + 5
    rng = np.random.default_rng(5 + inverse)
    x = rng.standard_normal((M, ldx)).astype(np.float32)
    pos = np.array([0, 1, 2, 100, 4095, 70000, 3], np.int32)
    inv = (10000.0 ** (-np.arange(0, hd, 2) / hd)).astype(np.float32)
    got = call(driver, tmp_path, "rope", [x, pos, inv], [M, H, hd, ldx, int(inverse)]).reshape(M, ldx)
    ref = core.backend_op("cpu:scalar", "rope_backward" if inverse else "rope", {"x": x, "pos": pos, "inv_freq": inv},
                          {"M": M, "n_heads": H, "head_dim": hd, "ldx": ldx}, {})["x"]
    assert np.array_equal(got[:, H * hd:], x[:, H * hd:]), "rope wrote the padding"
    v = x[:, :H * hd].reshape(M, H, 2, hd // 2)
    mag = np.repeat((np.abs(v[:, :, 0]) + np.abs(v[:, :, 1]))[:, :, None], 2, axis=2).reshape(M, H * hd)
    within(got[:, :H * hd], ref[:, :H * hd].astype(np.float64), 4 * EPS * mag + 1e-30, "rope vs the CPU op")


@pytest.mark.parametrize("b16", [False, True])
def test_kv_write_under_emulator(driver, tmp_path, b16):
    core = core_or_skip()
    B, T, H, hd, S, start = 2, 3, 2, 8, 9, 4
    ldx = H * hd + 3
    rng = np.random.default_rng(9 + b16)
    x = rng.standard_normal((B * T, ldx)).astype(np.float32)
    x[0, 0], x[0, 1] = 1.00390625, 3e-39  # a bf16 tie (round to even), a subnormal
    cache = (rng.integers(0, 1 << 16, B * H * S * hd).astype(np.uint16) if b16
             else rng.standard_normal(B * H * S * hd).astype(np.float32))
    ints = {"B": B, "T": T, "H": H, "hd": hd, "ldx": ldx, "S_cap": S, "start": start}
    got = call(driver, tmp_path, "kv_write", [x, cache], [B, T, H, hd, ldx, S, start, int(b16)])
    ref = core.backend_op("cpu:scalar", "kv_write_bf16" if b16 else "kv_write", {"x": x, "cache": cache}, ints,
                          {})["cache"]
    assert got.tobytes() == ref.tobytes(), "kv_write: not bit for bit the CPU op"
    assert got.tobytes() != cache.tobytes()


# ---- row gathers (lm_head / embedding tables), SwiGLU forward, the bias and residual adds
@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "f32"])
def test_row_gathers_under_emulator(driver, tmp_path, kind):
    core = core_or_skip()
    M, K, N = 5, 96, 11
    rng = np.random.default_rng(len(kind))
    ids = np.array([0, 10, 3, 3, 7], np.int32)
    if kind == "f16":
        W = rng.standard_normal((N, K)).astype(np.float16).view(np.uint16)
        W[1, :3] = [0x0001, 0x83FF, 0x7C00]  # subnormals, +inf
    elif kind == "bf16":
        W = (rng.standard_normal((N, K)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    elif kind == "q8_0":
        W = rng.integers(0, 256, (N, K // 32 * 34)).astype(np.uint8)
        W.reshape(N, K // 32, 34)[:, :, 1] &= 0x3B  # finite fp16 scales
    else:
        W = rng.standard_normal((N, K)).astype(np.float32)
    raw = W.tobytes()
    raw += b"\0" * (-len(raw) % 4)
    got = call(driver, tmp_path, "rows", [np.frombuffer(raw, np.uint8), ids],
               [("f16", "bf16", "q8_0", "f32").index(kind), M, K, N])
    if kind == "f32":
        ref = core.backend_op("cpu:scalar", "embedding", {"table": W, "ids": ids, "out": np.zeros((M, K), np.float32)},
                              {"M": M, "D": K, "V": N}, {})["out"]
    elif kind == "q8_0":
        ref = core.backend_op("cpu:scalar", "q8_0_rows", {"W": W, "ids": ids, "out": np.zeros((M, K), np.float32)},
                              {"M": M, "K": K, "N": N}, {})["out"]
    else:
        ref = core.backend_op("cpu:scalar", "half_rows", {"W": W, "ids": ids, "out": np.zeros((M, K), np.float32)},
                              {"M": M, "K": K, "N": N, "bf16": int(kind == "bf16")}, {})["out"]
    assert got.tobytes() == ref.tobytes(), f"{kind} rows: not bit for bit the CPU op"


def test_swiglu_and_adds_under_emulator(driver, tmp_path):
    core = core_or_skip()
    M, N = 6, 301
    ldg, ldu, ldo = N + 1, N + 4, N + 2
    rng = np.random.default_rng(77)
    gate = (rng.standard_normal((M, ldg)) * 3).astype(np.float32)
    gate[0, :3] = [-100.0, 100.0, 0.0]
    up = rng.standard_normal((M, ldu)).astype(np.float32)
    out0 = np.full((M, ldo), 7.0, np.float32)
    got = call(driver, tmp_path, "swiglu", [gate, up, out0], [M, N, ldg, ldu, ldo]).reshape(M, ldo)
    ref = core.backend_op("cpu:scalar", "swiglu", {"gate": gate, "up": up, "out": out0},
                          {"M": M, "N": N, "ldg": ldg, "ldu": ldu, "ldo": ldo}, {})["out"]
    assert (got[:, N:] == 7.0).all(), "swiglu wrote the padding"
    g = gate[:, :N].astype(np.float64)
    within(got[:, :N], ref[:, :N].astype(np.float64),
           8 * EPS * np.abs(g * up[:, :N]) + 1e-37, "swiglu vs the CPU op")  # expf: a few ulp
    bias = rng.standard_normal(N).astype(np.float32)
    y = rng.standard_normal((M, ldo)).astype(np.float32)
    x = rng.standard_normal(M * ldo).astype(np.float32)
    out = call(driver, tmp_path, "add", [bias, y, x], [M, N, ldo])
    yb = core.backend_op("cpu:scalar", "add_bias", {"bias": bias, "y": y}, {"M": M, "N": N, "ldy": ldo}, {})["y"]
    assert out[:y.size].tobytes() == yb.tobytes(), "add_bias: not bit for bit the CPU op"
    ya = core.backend_op("cpu:scalar", "add_inplace", {"x": x, "y": yb.reshape(-1)}, {"n": M * ldo}, {})["y"]
    assert out[y.size:].tobytes() == ya.tobytes(), "add_inplace: not bit for bit the CPU op"
