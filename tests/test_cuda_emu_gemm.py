"""The tensor-core GEMM kernels run on the CPU under the fiber emulator (tests/cuda_emu/emu.hpp),
because CI has no GPU:
- cuda/gemm_tc.cu (Backend::gemm_*_bf16: fp32 weights, LoRA factors) in its three layouts, through
  the float4 and the element loaders, both tile configurations, ragged M, N, K, strides, alpha / beta;
- cuda/nf4_gemm_tc.cu (Backend::nf4_gemm_*_bf16) on weights from the project's own NF4 quantizer:
  the packed-word loader and the element decoder, with and without double quantization;
- the fp32 SIMT GEMMs of cuda/gemm.cu and cuda/nf4_gemm.cu (tile_gemm.cuh) on the same cases;
- cuda/nf4_dequant.cu, bit for bit against the engine's own NF4 dequantize;
- the fp32 decode GEMVs of cuda/nf4_gemv.cu (M <= 4) and the 16-bit-row lm_head GEMM of
  cuda/ops_half_gemm.cu (fp16 / bf16 weights) and of cuda/ops_q8_0_gemm.cu (Q8_0 rows), checked
  against float64 with fp32 bounds.

The real cuda/mma_tile.cuh is compiled as host C++ with its mma.sync asm block replaced by the
emulator's warp-collective m16n8k16 (PTX ISA fragment layout), its static __shared__ arrays
replaced by per-block storage filled with NaN, and its <<<>>> launches rewritten. Each element is
checked against float64 of the bf16-rounded operands (fp32 accumulation: (K + 4) * 2^-24 of the
sum of |products|), and, looser, against float64 of the unrounded operands (2 * 2^-8 more). Not
checked: GPU timing, the memory model, nvcc's code. Skipped when no C++17 compiler is present.
"""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
LAUNCH = re.compile(r"(\w+(?:<[\w, ]+>)?)<<<(.*?), stream>>>\((.*?)\);", re.S)
SHARED = re.compile(r"__shared__ (?:__align__\(\d+\) )?(\w+) (\w+)((?:\[[\w +]+\])+);")
MMA_ASM = re.compile(r"asm volatile\(\s*\"mma\.sync.*?\);", re.S)


def rewrite_launches(text, n, name):
    text, k = LAUNCH.subn(r"emu::launch(\2, [&]() { \1(\3); });", text)
    assert k == n, f"{name}: expected {n} kernel launches, rewrote {k}"
    return text


def mma_tile_source(text=None):
    """cuda/mma_tile.cuh for the emulator: mma asm -> emu::mma, __shared__ arrays -> per-block NaN storage."""
    text = (ROOT / "cuda" / "mma_tile.cuh").read_text() if text is None else text
    text, n = MMA_ASM.subn("emu::mma(c, a, b);", text)
    assert n == 1, "mma_tile.cuh: the mma.sync asm block changed"
    text, n = SHARED.subn(r"auto& \2 = emu::shared_static<\1\3, __LINE__>();", text)
    assert n == 3, f"mma_tile.cuh: expected 3 __shared__ arrays, rewrote {n}"
    return rewrite_launches(text, 2, "mma_tile.cuh")


def build(d, mma_tile=None, gemv=None, tile_gemm=None):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (d / "mma_tile.cuh").write_text(mma_tile_source(mma_tile))
    tile = SHARED.sub(r"auto& \2 = emu::shared_static<\1\3, __LINE__>();", (ROOT / "cuda" / "tile_gemm.cuh").read_text() if tile_gemm is None else tile_gemm)
    (d / "tile_gemm.cuh").write_text(rewrite_launches(tile, 2, "tile_gemm.cuh"))  # included, its kernel unused
    for name in ("gemm_tc.cu", "nf4_gemm_tc.cu", "gemm.cu", "nf4_gemm.cu"):  # copied: they include the rewritten headers
        text = (ROOT / "cuda" / name).read_text()
        assert "<<<" not in text, f"{name}: launches now need rewriting"
        (d / name).write_text(text)
    gemv = SHARED.sub(r"auto& \2 = emu::shared_static<\1\3, __LINE__>();", (ROOT / "cuda" / "nf4_gemv.cu").read_text() if gemv is None else gemv)
    (d / "nf4_gemv.cu").write_text(rewrite_launches(gemv, 2, "nf4_gemv.cu"))
    half = rewrite_launches((ROOT / "cuda" / "ops_half_gemm.cu").read_text(), 2, "ops_half_gemm.cu")
    (d / "ops_half_gemm.cpp").write_text(half)  # its own unit: its anonymous-namespace names clash with nf4_gemv.cu's
    q8 = rewrite_launches((ROOT / "cuda" / "ops_q8_0_gemm.cu").read_text(), 1, "ops_q8_0_gemm.cu")
    (d / "ops_q8_0_gemm.cpp").write_text(q8)
    deq = SHARED.sub(r"auto& \2 = emu::shared_static<\1\3, __LINE__>();", (ROOT / "cuda" / "nf4_dequant.cu").read_text())
    (d / "nf4_dequant.cpp").write_text(rewrite_launches(deq, 1, "nf4_dequant.cu"))
    exe = d / "gemm_driver"
    r = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{d}", f"-I{EMU}", f"-I{ROOT / 'cuda'}", f"-I{ROOT / 'cpp' / 'src'}",
                        "-o", str(exe), str(EMU / "gemm_driver.cpp"), str(d / "ops_half_gemm.cpp"), str(d / "ops_q8_0_gemm.cpp"),
                        str(d / "nf4_dequant.cpp")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_emu_gemm"))


def bf16(x):
    """x (float32) rounded to bf16, round to nearest even, as float64."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return u.view(np.float32).astype(np.float64)


def check(out, a, b, alpha, beta, c0, rows, cols, ldc, what, fp32=False):
    """out (flat C after the call) against alpha * a @ b.T + beta * C over [rows, cols]; the rest of C untouched.
    fp32: operands used unrounded (the fp32 GEMV)."""
    K = a.shape[1]
    c0m = c0.reshape(-1, ldc)[:rows, :cols].astype(np.float64)
    got = out.reshape(-1, ldc)[:rows, :cols].astype(np.float64)
    keep = np.ones(out.size, bool).reshape(-1, ldc)
    keep[:rows, :cols] = False
    assert np.array_equal(out.reshape(-1, ldc)[keep], c0.reshape(-1, ldc)[keep], equal_nan=True), \
        f"{what}: wrote outside C"
    bc = 0.0 if beta == 0 else beta * c0m  # beta == 0: C is not read (it holds NaN here)
    ra, rb = (a.astype(np.float64), b.astype(np.float64)) if fp32 else (bf16(a), bf16(b))
    ref = alpha * (ra @ rb.T) + bc
    mag = abs(alpha) * (np.abs(ra) @ np.abs(rb).T) + np.abs(bc)
    err = np.abs(got - ref)
    # fp32: the GEMV decodes code * scale in its own order (x * code summed over 8, then * scale)
    tol = (K + (16 if fp32 else 4)) * 2.0 ** -24 * mag + 1e-30
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} wrong, first at {np.argwhere(bad)[0]}: "
                           f"got {got[bad][0]} want {ref[bad][0]} (max err/tol {np.max(err / tol):.3g})")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = alpha * (a64 @ b64.T) + bc
    mag = abs(alpha) * (np.abs(a64) @ np.abs(b64).T) + np.abs(bc)
    assert np.all(np.abs(got - ref) <= (2 * 2.0 ** -8 + (K + 4) * 2.0 ** -24) * mag + 1e-30), what


def run(exe, args):
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# layout, M, N, K, alpha, beta, lda pad, ldb pad, ldc pad, sm_count (1: the 128 x 128 tiles; 1000:
# 64 x 64), offsets of A, B, C in elements (nonzero: misaligned, the element loaders)
GEMM_CASES = [
    ("nt", 37, 70, 48, 1.0, 0.0, 0, 4, 0, 1000, 0, 0, 0),     # float4 loaders both, ragged M, N
    ("nt", 37, 70, 45, 0.5, 0.75, 3, 1, 1, 1000, 0, 0, 1),    # K % 4 != 0: element loaders; odd ldc
    ("nt", 130, 20, 36, -1.5, 1.0, 0, 0, 2, 1, 1, 0, 0),      # big tiles, misaligned A, float4 B
    ("nn", 29, 75, 72, 1.0, 0.0, 4, 2, 0, 1000, 0, 0, 0),     # float4 A
    ("nn", 140, 9, 17, 2.0, -0.5, 0, 3, 1, 1, 0, 1, 0),
    ("tn", 21, 66, 40, 1.0, 0.25, 1, 0, 0, 1000, 0, 0, 0),
    ("tn", 9, 130, 3, 1.0, 0.0, 2, 5, 3, 1, 0, 0, 0),
    ("nt", 70, 135, 40, 1.0, 0.0, 0, 0, 0, 1000, 0, 0, 0),    # 2 x 3 blocks of 64 x 64
    ("tn", 130, 135, 300, 1.0, 0.5, 0, 0, 0, 1, 0, 0, 0),     # 2 x 2 blocks of 128 x 128, 10 k steps
    ("nt", 5, 6, 1, 1.0, 0.0, 0, 0, 0, 1000, 0, 0, 0),        # K = 1
    ("nn", 7, 5, 0, 1.0, 0.5, 0, 0, 0, 1000, 0, 0, 0),        # K = 0: C = beta * C
]


@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "-".join(map(str, c[:4])))
def test_gemm_bf16_tc_under_emulator(driver, tmp_path, case, mode="gemm"):
    layout, M, N, K, alpha, beta, pa, pb, pc, sms, oa, ob, oc = case
    rng = np.random.default_rng(M * 7 + N * 3 + K)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((N, K)).astype(np.float32)
    if layout in ("nt", "nn"):
        lda = K + pa
        A = np.full((M, lda), np.nan, np.float32); A[:, :K] = a
    else:
        lda = M + pa
        A = np.full((K, lda), np.nan, np.float32); A[:, :M] = a.T
    if layout == "nt":
        ldb = K + pb
        B = np.full((N, ldb), np.nan, np.float32); B[:, :K] = b
    else:
        ldb = N + pb
        B = np.full((K, ldb), np.nan, np.float32); B[:, :N] = b.T
    ldc = N + pc
    C = rng.standard_normal(M * ldc).astype(np.float32)
    if beta == 0:
        C.reshape(M, ldc)[:, :N] = np.nan  # must not be read
    A.tofile(tmp_path / "A.f32"), B.tofile(tmp_path / "B.f32"), C.tofile(tmp_path / "C.f32")
    run(driver, [mode, tmp_path, layout, M, N, K, alpha, beta, max(lda, 1), max(ldb, 1), ldc, sms, oa, ob, oc])
    out = np.fromfile(tmp_path / "out.f32", np.float32)
    check(out, a, b, alpha, beta, C, M, N, ldc, f"{mode} {case}", fp32=mode == "gemm32")


@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "-".join(map(str, c[:4])))
def test_gemm_f32_under_emulator(driver, tmp_path, case):
    """The fp32 SIMT GEMM (cuda/gemm.cu over tile_gemm.cuh: sm_75 and the fp32 path) on the same cases."""
    test_gemm_bf16_tc_under_emulator(driver, tmp_path, case, mode="gemm32")


def quantize(rows, cols, blocksize, dq, seed):
    from qlora_native import nf4
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    return nf4.quantize(w, blocksize=blocksize, double_quant=dq)


# op, M, rows, cols, blocksize, double quant, alpha, beta, ldx pad, ldc pad, sm_count, X offset,
# packed offset (bytes; 1: misaligned, the element decoder)
NF4_CASES = [
    ("nt", 5, 96, 200, 64, True, 1.0, 0.0, 0, 0, 1000, 0, 0),     # packed-word loader, 300 blocks: 2 nested
    ("nt", 19, 40, 72, 128, False, 0.5, 1.0, 3, 1, 1000, 1, 0),   # fp32 absmax, blocks straddle rows
    ("nt", 7, 33, 50, 64, True, 1.0, 0.0, 0, 2, 1, 0, 0),         # cols % 8 != 0: element decoder, big tiles
    ("nt", 6, 24, 64, 64, True, 1.0, 0.5, 0, 0, 1000, 0, 1),      # misaligned packed: element decoder
    ("nn", 9, 70, 36, 64, True, -1.0, 0.25, 2, 0, 1000, 0, 0),
    ("nn", 4, 45, 130, 32, False, 1.0, 0.0, 0, 3, 1, 0, 0),
    ("nn", 3, 200, 96, 64, True, 1.0, 0.0, 0, 0, 1000, 0, 0),     # transposed decode over two nested scales
]


@pytest.mark.parametrize("case", NF4_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_nf4_gemm_bf16_tc_under_emulator(driver, tmp_path, case, mode="nf4"):
    op, M, rows, cols, bs, dq, alpha, beta, px, pc, sms, ox, op_ = case
    t = quantize(rows, cols, bs, dq, M * 11 + rows)
    w = t.dequantize().astype(np.float32)  # the engine's own decode: the kernel must match it
    K, N = (cols, rows) if op == "nt" else (rows, cols)
    rng = np.random.default_rng(rows + cols)
    x = rng.standard_normal((M, K)).astype(np.float32)
    ldx = K + px
    X = np.full((M, ldx), np.nan, np.float32); X[:, :K] = x
    ldc = N + pc
    C = rng.standard_normal(M * ldc).astype(np.float32)
    if beta == 0:
        C.reshape(M, ldc)[:, :N] = np.nan
    X.tofile(tmp_path / "X.f32"), C.tofile(tmp_path / "C.f32")
    t.packed.tofile(tmp_path / "packed.u8")
    np.asarray(t.absmax).tofile(tmp_path / "absmax.bin")
    np.asarray(t.nested_absmax if dq else np.zeros(1), np.float32).tofile(tmp_path / "nested.f32")
    np.asarray(t.nested_map if dq else np.zeros(1), np.float32).tofile(tmp_path / "map.f32")
    run(driver, [mode, tmp_path, op, M, alpha, beta, ldx, ldc, sms, ox, op_, rows, cols, bs, int(dq),
                 repr(float(np.float32(t.offset)))])
    out = np.fromfile(tmp_path / "out.f32", np.float32)
    check(out, x, w if op == "nt" else w.T, alpha, beta, C, M, N, ldc, f"{mode} {case}", fp32=mode != "nf4")


@pytest.mark.parametrize("case", NF4_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_nf4_gemm_f32_under_emulator(driver, tmp_path, case):
    """The fp32 SIMT NF4 GEMM (cuda/nf4_gemm.cu: tile_gemm.cuh with tile::Nf4Src) on the same cases."""
    test_nf4_gemm_bf16_tc_under_emulator(driver, tmp_path, case, mode="nf4f32")


# the decode GEMVs (M <= kNf4GemvMaxM = 4, fp32): the same case layout (sm_count unused); nt rows
# not multiples of the 8 warps of a block, 8-element groups straddling rows (cols % 8 != 0)
GEMV_CASES = [
    ("nt", 1, 13, 200, 64, True, 1.0, 0.0, 0, 0, 0, 0, 0),
    ("nt", 4, 20, 37, 32, False, 0.5, 1.0, 3, 1, 0, 1, 0),
    ("nt", 3, 96, 200, 64, True, -1.0, 0.5, 1, 2, 0, 0, 0),      # 300 blocks: two nested scales
    ("nn", 1, 40, 70, 64, True, 1.0, 0.0, 0, 0, 0, 0, 0),
    ("nn", 4, 23, 33, 128, False, 2.0, -0.25, 2, 1, 0, 0, 0),
]


@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_nf4_gemv_under_emulator(driver, tmp_path, case):
    test_nf4_gemm_bf16_tc_under_emulator(driver, tmp_path, case, mode="gemv")


# rows, cols, blocksize, double quant, sm_count (1: 16 blocks at most, a grid-stride loop)
DEQ_CASES = [(96, 200, 64, True, 1), (7, 33, 32, False, 1000), (45, 13, 128, True, 2)]


@pytest.mark.parametrize("case", DEQ_CASES, ids=lambda c: "-".join(map(str, c)))
def test_nf4_dequantize_under_emulator(driver, tmp_path, case):
    """cuda/nf4_dequant.cu decodes bit for bit as the engine's own dequantize (odd element counts too)."""
    rows, cols, bs, dq, sms = case
    t = quantize(rows, cols, bs, dq, rows + cols)
    np.zeros(1, np.float32).tofile(tmp_path / "X.f32")
    np.full(rows * cols, np.nan, np.float32).tofile(tmp_path / "C.f32")
    t.packed.tofile(tmp_path / "packed.u8")
    np.asarray(t.absmax).tofile(tmp_path / "absmax.bin")
    np.asarray(t.nested_absmax if dq else np.zeros(1), np.float32).tofile(tmp_path / "nested.f32")
    np.asarray(t.nested_map if dq else np.zeros(1), np.float32).tofile(tmp_path / "map.f32")
    run(driver, ["deq", tmp_path, "nt", 1, 1.0, 0.0, 1, 1, sms, 0, 0, rows, cols, bs, int(dq),
                 repr(float(np.float32(t.offset)))])
    out = np.fromfile(tmp_path / "out.f32", np.float32)
    want = t.dequantize().reshape(-1)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), \
        f"{np.sum(out != want)} of {out.size} differ, first at {np.argmax(out != want)}"


# fp16 / bf16 rows (the 16-bit lm_head): bf16, M, N, K, ldx pad, ldy pad, X offset, W offset (elements;
# nonzero, or K % 4 != 0: the one-weight-a-lane loop); M > 8: several row groups
HALF_CASES = [(0, 3, 13, 200, 0, 1, 0, 0), (1, 3, 13, 200, 4, 0, 0, 0), (0, 9, 10, 37, 1, 0, 0, 0),
              (1, 17, 9, 64, 0, 2, 1, 0), (0, 2, 11, 48, 0, 0, 0, 1)]


@pytest.mark.parametrize("case", HALF_CASES, ids=lambda c: "-".join(map(str, c[:4])))
def test_half_gemm_nt_under_emulator(driver, tmp_path, case):
    bf, M, N, K, px, py, ox, ow = case
    rng = np.random.default_rng(M * 5 + N + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w32 = rng.standard_normal((N, K)).astype(np.float32)
    if bf:
        wb = (bf16(w32).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        w = (wb.astype(np.uint32) << 16).view(np.float32)
    else:
        w16 = w32.astype(np.float16)
        w16[0] = (w32[0] * 3e-6).astype(np.float16)  # a row of fp16 subnormals (and zeros) of both signs
        wb, w = w16.view(np.uint16), w16.astype(np.float32)
    ldx, ldy = K + px, N + py
    X = np.full((M, ldx), np.nan, np.float32); X[:, :K] = x
    C = np.full(M * ldy, 7.0, np.float32)
    C.reshape(M, ldy)[:, :N] = np.nan  # Y is write-only
    X.tofile(tmp_path / "X.f32"), wb.tofile(tmp_path / "W.u16"), C.tofile(tmp_path / "C.f32")
    run(driver, ["half", tmp_path, bf, M, N, K, ldx, ldy, ox, ow])
    out = np.fromfile(tmp_path / "out.f32", np.float32)
    check(out, x, w, 1.0, 0.0, C, M, N, ldy, f"half {case}", fp32=True)


# Q8_0 rows (the lm_head of a GGUF with a Q8_0 tied embedding): M, N, K, ldx pad, ldy pad, X offset
Q8_CASES = [(1, 13, 64, 0, 0, 0), (9, 10, 96, 3, 1, 1), (17, 20, 32, 0, 2, 0)]


@pytest.mark.parametrize("case", Q8_CASES, ids=lambda c: "-".join(map(str, c[:3])))
def test_q8_0_gemm_nt_under_emulator(driver, tmp_path, case):
    M, N, K, px, py, ox = case
    rng = np.random.default_rng(M + N * 3 + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    q = rng.integers(-127, 128, (N, K // 32, 32), dtype=np.int8)
    d = (rng.uniform(0.5, 2.0, (N, K // 32)) * 1e-2).astype(np.float16)
    d[0] = np.float16(3e-6)  # fp16 subnormal scales: row 0 of Y depends on them alone
    blocks = np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)], axis=-1)  # [d fp16 LE][32 x int8]
    raw = blocks.reshape(-1)
    w = d.astype(np.float32)[..., None] * q.astype(np.float32)  # exact in fp32
    ldx, ldy = K + px, N + py
    X = np.full((M, ldx), np.nan, np.float32); X[:, :K] = x
    C = np.full(M * ldy, 7.0, np.float32)
    C.reshape(M, ldy)[:, :N] = np.nan  # Y is write-only
    X.tofile(tmp_path / "X.f32"), raw.tofile(tmp_path / "W.u16"), C.tofile(tmp_path / "C.f32")
    run(driver, ["q8", tmp_path, 0, M, N, K, ldx, ldy, ox, 0])
    out = np.fromfile(tmp_path / "out.f32", np.float32)
    check(out, x, w.reshape(N, K), 1.0, 0.0, C, M, N, ldy, f"q8_0 {case}", fp32=True)


# (what, original, planted bug, a case it must fail)
PLANTED = [
    ("A fragments a1 / a2 swapped", "fa[i][1] = lds32(r8);\n        fa[i][2] = lds32(r0 + 8);",
     "fa[i][1] = lds32(r0 + 8);\n        fa[i][2] = lds32(r8);", ("gemm", GEMM_CASES[0])),
    ("packed-word NF4 decode with the nibbles of a byte swapped", "v[2 * b] = lut[byte >> 4] * scale;\n"
     "        v[2 * b + 1] = lut[byte & 15u] * scale;", "v[2 * b] = lut[byte & 15u] * scale;\n"
     "        v[2 * b + 1] = lut[byte >> 4] * scale;", ("nf4", NF4_CASES[0])),
    ("the epilogue's second column written past N", "if (col + 1 < N) c[1] = beta == 0.0f ? v1 : fmaf(beta, c[1], v1);",
     "if (col < N) c[1] = beta == 0.0f ? v1 : fmaf(beta, c[1], v1);", ("gemm", GEMM_CASES[4])),
]


PLANTED_GEMV = ("the nt GEMV dropping a row's first element when the row starts mid-byte",
                "if (j + 1 < j0 || j >= j1) continue;", "if (j < j0 || j >= j1) continue;", ("gemv", GEMV_CASES[1]))
PLANTED_TILE = ("the SIMT tile's columns of a thread mirrored", "acc[i][j] = fmaf(fa[i], fb[j], acc[i][j]);",
                "acc[i][j] = fmaf(fa[i], fb[TN - 1 - j], acc[i][j]);", ("gemm32", GEMM_CASES[2]))
ALL_PLANTED = PLANTED + [PLANTED_GEMV, PLANTED_TILE]
FILE_OF = {PLANTED_GEMV[0]: "nf4_gemv.cu", PLANTED_TILE[0]: "tile_gemm.cuh"}


@pytest.fixture(scope="module")
def planted_driver(tmp_path_factory):
    """One build with every planted bug behind `if (emu::plant == i)` (EMU_PLANT=i at run time)."""
    texts = {name: (ROOT / "cuda" / name).read_text() for name in ("mma_tile.cuh", "nf4_gemv.cu", "tile_gemm.cuh")}
    for i, (what, old, new, _) in enumerate(ALL_PLANTED, 1):
        name = FILE_OF.get(what, "mma_tile.cuh")
        assert texts[name].count(old) == 1, what
        texts[name] = texts[name].replace(old, f"if (emu::plant == {i}) {{ {new} }} else {{ {old} }}")
    return build(tmp_path_factory.mktemp("cuda_emu_gemm_planted"), texts["mma_tile.cuh"], texts["nf4_gemv.cu"],
                 texts["tile_gemm.cuh"])


@pytest.mark.parametrize("i", range(1, len(ALL_PLANTED) + 1), ids=lambda i: ALL_PLANTED[i - 1][0])
def test_emulator_catches_a_broken_kernel(planted_driver, tmp_path, monkeypatch, i):
    """The checks can fail: mma_tile.cuh, nf4_gemv.cu or tile_gemm.cuh with one planted bug gives wrong results."""
    kind, args = ALL_PLANTED[i - 1][3]
    test = {"gemm": test_gemm_bf16_tc_under_emulator, "nf4": test_nf4_gemm_bf16_tc_under_emulator,
            "gemv": test_nf4_gemv_under_emulator, "gemm32": test_gemm_f32_under_emulator}[kind]
    test(planted_driver, tmp_path, args)  # the same build passes with no bug planted
    monkeypatch.setenv("EMU_PLANT", str(i))
    with pytest.raises(AssertionError, match="wrong|outside C"):
        test(planted_driver, tmp_path, args)
