"""Op kernels that no GPU has run yet, on the CPU under the fiber emulator (tests/cuda_emu/emu.hpp,
driver tests/cuda_emu/ops_driver.cpp), because CI has no GPU:
- cuda/ops_lora_sgmv.cu (Backend::lora_segments_many for segments of <= 64 rows): the shrink and
  the expand launch over mixed-adapter batches (ranks 1..64, rows 1..64, empty segments, rows of
  no adapter, several problems with their own in / out / strides, > 256 inputs and outputs, more
  than 40 entries: two batches), against float64;
- cuda/ops_rmsnorm.cu and ops_rmsnorm_backward.cu (with dx aliasing dy / out aliasing x),
  ops_swiglu_backward.cu (strided, outputs over inputs), ops_cross_entropy.cu (ignored rows,
  the loss and the gradient written over the logits), against float64 with fp32 bounds.
Each source is compiled as host C++ with its static __shared__ arrays as per-block NaN storage and
its <<<>>> launches rewritten. Skipped when no C++17 compiler is present.
"""
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
           "ops_cross_entropy.cu": 1}  # name -> kernel launches


def emu_source(name, text=None):
    text = (ROOT / "cuda" / name).read_text() if text is None else text
    text = SHARED.sub(r"auto& \2 = emu::shared_static<\1\3, __COUNTER__>();", text)
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
    exe = d / "ops_driver"
    r = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{d}", f"-I{EMU}", f"-I{ROOT / 'cuda'}", f"-I{ROOT / 'cpp' / 'src'}",
                        "-o", str(exe), str(EMU / "ops_driver.cpp")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_emu_ops"))


def call(exe, tmp_path, mode, arrays, args):
    """Runs one op: arrays (float32 / int32) concatenated into the input file; the flat float32 output."""
    src, dst = tmp_path / f"{mode}.in", tmp_path / f"{mode}.out"
    src.write_bytes(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    r = subprocess.run([str(exe), mode, str(src), str(dst), *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    return np.fromfile(dst, np.float32)


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
