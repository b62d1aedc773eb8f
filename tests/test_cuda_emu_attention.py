"""The CUDA tiled attention backward (cuda/ops_attention_train_backward_tiled.cu) run on the CPU
under a fiber emulator (tests/cuda_emu/emu.hpp), because CI has no GPU.

The kernel source is compiled as host C++ after two rewrites the emulator needs: the dynamic
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
SOURCE = ROOT / "cuda" / "ops_attention_train_backward_tiled.cu"
# B, T, Hq, Hkv, hd, pad (masked leading keys of batch row 1): T off every tile size, GQA groups of
# 1-4 (3: SmolLM2, 4: Llama-3), hd below / at the 64- and 128-dim tiles, a fully padded row, T = 1,
# and sequences spanning many tiles of both kernels.
CASES = [(2, 37, 4, 2, 16, 3), (1, 1, 2, 1, 8, 0), (2, 20, 6, 2, 40, 20), (2, 83, 8, 2, 64, 5),
         (1, 50, 8, 2, 128, 0), (2, 33, 3, 1, 96, 33), (2, 130, 9, 3, 64, 40), (1, 160, 8, 2, 128, 0)]
SMEM_DECL = "extern __shared__ __align__(16) float smem[];"
LAUNCH = re.compile(r"(\w+<\w+>)<<<(.*?), stream>>>\((.*?)\);")


def emu_source(text):
    """The kernel source with its shared-memory declarations and launches rewritten for emu.hpp."""
    assert text.count(SMEM_DECL) == 4, "four kernels, each with one dynamic shared-memory block"
    text = text.replace(SMEM_DECL, "float* smem = emu::smem();")
    text, n = LAUNCH.subn(r"emu::launch(\2, [&]() { \1(\3); });", text)
    assert n == 4, f"expected four kernel launches, rewrote {n}"
    return text


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("cuda_emu")
    (d / "tiled_emu.cpp").write_text(emu_source(SOURCE.read_text()))
    exe = d / "attention_bwd_driver"
    r = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{d}", f"-I{EMU}", f"-I{ROOT / 'cuda'}", "-o", str(exe),
                        str(EMU / "attention_bwd_driver.cpp")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_tiled_attention_backward_under_emulator(driver, mode):
    args = [",".join(map(str, c + (int(mode == "bf16"),))) for c in CASES]
    r = subprocess.run([str(driver)] + args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-6000:] + r.stderr[-2000:]


def test_emulator_catches_a_broken_kernel(driver, tmp_path):
    """The check can fail: the same source with the dK/dV kernel's causal start one row tile late
    (its first visible rows skipped) gives wrong gradients."""
    text = emu_source(SOURCE.read_text())
    start = "(static_cast<int>(s0) * a.G / C::R) * C::R"
    assert start in text
    (tmp_path / "tiled_emu.cpp").write_text(text.replace(start, start + " + C::R"))
    exe = tmp_path / "broken"
    cxx = shutil.which("g++") or shutil.which("c++")
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{tmp_path}", f"-I{EMU}", f"-I{ROOT / 'cuda'}", "-o", str(exe),
                    str(EMU / "attention_bwd_driver.cpp")], check=True, capture_output=True, timeout=600)
    r = subprocess.run([str(exe), "2,37,4,2,16,3,0", "2,37,4,2,16,3,1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "FAILURES" in r.stdout, r.stdout[-4000:]
