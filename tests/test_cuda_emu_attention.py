"""The CUDA attention kernels run on the CPU under a fiber emulator (tests/cuda_emu/emu.hpp),
because CI has no GPU. Covered:
- the tiled backward (cuda/ops_attention_train_backward_tiled.cu);
- the training op pair: attention_train with its warp merge, plus the attention_train_backward
  launcher with its delta kernel and its tiled, tensor-core and untiled reference paths;
- the KV-cache attention of inference (decode and flash kernels).

The kernel sources are compiled as host C++ after two rewrites the emulator needs: the dynamic
shared-memory declaration and the <<<>>> launches. Each gradient element is checked against
float64 in fp32 mode (SIMT) and bf16 mode (tensor-core fragments). This checks the kernels' index
math, tiling, causal skipping, padding masks, GQA rows, barriers (a thread missing one deadlocks;
shared memory starts as NaN) and the mma fragment layout from the PTX ISA. It does not check GPU
timing, the memory model or nvcc's code. Skipped when no C++17 compiler is present.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
# B, T, Hq, Hkv, hd, pad (masked leading keys of batch row 1): T off every tile size, GQA groups of
# 1-4 (3: SmolLM2, 4: Llama-3), hd below / at the 64- and 128-dim tiles, a fully padded row, T = 1,
# and sequences spanning many tiles of both kernels.
CASES = [(2, 37, 4, 2, 16, 3), (1, 1, 2, 1, 8, 0), (2, 20, 6, 2, 40, 20), (2, 83, 8, 2, 64, 5),
         (1, 50, 8, 2, 128, 0), (2, 33, 3, 1, 96, 33), (2, 70, 9, 3, 64, 40), (1, 100, 8, 2, 128, 0)]
SMEM_DECL = "extern __shared__ __align__(16) float smem[];"
LAUNCH = re.compile(r"(\w+(?:<[\w, ]+>)?)<<<(.*?), stream>>>\((.*?)\);", re.S)
# source -> (emulator file name, dynamic shared-memory declarations, launches)
SOURCES = {"ops_attention_train_backward_tiled.cu": ("tiled_emu.cpp", 4, 4),
           "ops_attention_train.cu": ("train_emu.cpp", 0, 1),
           "ops_attention_train_backward.cu": ("train_bwd_emu.cpp", 0, 3),
           "ops_attention.cu": ("attn_emu.cpp", 1, 2)}
TRAIN_SOURCES = ("ops_attention_train_backward_tiled.cu", "ops_attention_train.cu", "ops_attention_train_backward.cu")


def emu_source(name, text=None):
    """A kernel source with its shared-memory declarations and launches rewritten for emu.hpp."""
    _, n_smem, n_launch = SOURCES[name]
    text = (ROOT / "cuda" / name).read_text() if text is None else text
    assert text.count(SMEM_DECL) == n_smem, f"{name}: dynamic shared-memory declarations changed"
    text = text.replace(SMEM_DECL, "float* smem = emu::smem();")
    text, n = LAUNCH.subn(r"emu::launch(\2, [&]() { \1(\3); });", text)
    assert n == n_launch, f"{name}: expected {n_launch} kernel launches, rewrote {n}"
    return text


def build(d, main, sources, flags=()):
    """Compiles the driver `main` (in tests/cuda_emu) with the rewritten `sources` (dict name -> text) in d."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    units = []
    for name, text in sources.items():
        unit = d / SOURCES[name][0]
        unit.write_text(text)
        units.append(str(unit))
    exe = d / Path(main).stem
    # the tiled driver #includes its kernel source; the op-pair driver links the three units
    units = [] if main == "attention_bwd_driver.cpp" else units
    r = subprocess.run([cxx, "-std=c++17", "-O1", *flags, f"-I{d}", f"-I{EMU}", f"-I{ROOT / 'cuda'}", "-o", str(exe),
                        *units, str(EMU / main)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    name = "ops_attention_train_backward_tiled.cu"
    return build(tmp_path_factory.mktemp("cuda_emu"), "attention_bwd_driver.cpp", {name: emu_source(name)})


@pytest.fixture(scope="module")
def op_driver(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_emu_ops"), "attention_train_driver.cpp",
                 {name: emu_source(name) for name in TRAIN_SOURCES})


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_tiled_attention_backward_under_emulator(driver, mode):
    args = [",".join(map(str, c + (int(mode == "bf16"),))) for c in CASES]
    r = subprocess.run([str(driver)] + args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-6000:] + r.stderr[-2000:]


# B, T, Hq, Hkv, hd, pad, mode (0 fp32, 1 bf16, 2 fp32 QLORA_CUDA_ATTN_BACKWARD=reference, 3 bf16 =simt)
# (the untiled reference kernels are the slow ones to emulate: a block per query row)
OP_CASES = [(2, 37, 4, 2, 16, 3, 0), (2, 37, 4, 2, 16, 3, 1), (2, 21, 4, 2, 16, 3, 2), (2, 37, 4, 2, 16, 3, 3),
            (2, 12, 6, 2, 40, 12, 2), (1, 11, 2, 1, 160, 0, 1)]


def test_attention_train_op_pair_under_emulator(op_driver):
    """attention_train (forward, lse) and attention_train_backward through its launcher (delta, then
    the tiled / tensor-core / reference kernels by mode and environment; hd 160: the reference) against
    float64."""
    r = subprocess.run([str(op_driver)] + [",".join(map(str, c)) for c in OP_CASES], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-6000:] + r.stderr[-2000:]


# B, T, Hq, Hkv, hd, S_cap, start, bf16 cache: decode (T < 16) and flash (T >= 16) kernels, hd 40 (no
# vector loads), 64, 128, 200 (the 256-dim tiles), GQA, masked slots.
KV_CASES = [(2, 3, 4, 2, 64, 40, 20, 0), (2, 3, 4, 2, 64, 40, 20, 1), (1, 1, 2, 2, 8, 4, 3, 0),
            (2, 37, 4, 2, 64, 60, 10, 0), (2, 37, 4, 2, 64, 60, 10, 1), (1, 20, 2, 1, 128, 30, 3, 0),
            (1, 17, 3, 1, 40, 20, 0, 1), (1, 16, 2, 1, 200, 20, 2, 0)]


def test_kv_cache_attention_under_emulator(tmp_path):
    """The inference attention kernels (decode, with the warp merge shared with attention_train, and
    flash prefill) over fp32 and bf16 caches, emulated as an sm_75 build (no cp.async)."""
    name = "ops_attention.cu"
    exe = build(tmp_path, "attention_driver.cpp", {name: emu_source(name)}, flags=("-D__CUDA_ARCH__=750",))
    r = subprocess.run([str(exe)] + [",".join(map(str, c)) for c in KV_CASES], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-6000:] + r.stderr[-2000:]


def test_emulator_catches_a_broken_kernel(tmp_path):
    """The check can fail: the same source with the dK/dV kernel's causal start one row tile late
    (its first visible rows skipped) gives wrong gradients."""
    name = "ops_attention_train_backward_tiled.cu"
    text = emu_source(name)
    start = "(static_cast<int>(s0) * a.G / C::R) * C::R"
    assert start in text
    exe = build(tmp_path, "attention_bwd_driver.cpp", {name: text.replace(start, start + " + C::R")})
    r = subprocess.run([str(exe), "2,37,4,2,16,3,0", "2,37,4,2,16,3,1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "FAILURES" in r.stdout, r.stdout[-4000:]
