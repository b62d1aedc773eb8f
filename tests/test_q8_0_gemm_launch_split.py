"""cuda/ops_q8_0_gemm.cu put (M + 7) / 8 row groups on grid.y, which CUDA caps at 65535: an lm_head
GEMM over more than 65535 * 8 rows failed at launch although cuda_backend.cpp let it through. The
launcher now splits the rows over several launches, as ops_half_gemm.cu does. No GPU here and the
fiber emulator is far too slow for 524k rows (tests/test_cuda_emu_gemm.py runs the kernel itself on
one-chunk cases), so this test compiles the real launcher with g++ against the emulator headers, with
the launch rewritten to record its grid and arguments instead of running: every grid.y <= 65535, the
chunks cover each row once, with X / Y offset by the chunk's first row, all on the caller's stream."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
LAUNCH = re.compile(r"(\w+(?:<[\w, ]+>)?)<<<(.*?), stream>>>\((.*?)\);", re.S)

PRELUDE = r"""
#include <cstdint>
#include <cstdio>
#include "cuda_runtime.h"
#include "emu.hpp"
// Records a launch (grid, stream, the kernel's arguments) instead of running it.
template <class S>
void record_launch(dim3 g, int, int, S stream, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx,
                   const uint8_t* W, float* Y, int64_t ldy);
"""

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "ops_q8_0_gemm.cuh"
static const float* g_x;
static float* g_y;
static const void* g_w;
template <class S>
void record_launch(dim3 g, int threads, int smem, S stream, int64_t M, int64_t N, int64_t K, const float* X,
                   int64_t ldx, const uint8_t* W, float* Y, int64_t ldy) {
  std::printf("%u %u %d %d %p %lld %lld %lld %lld %lld %d %lld %lld\n", g.x, g.y, threads, smem, (void*)stream,
              (long long)M, (long long)N, (long long)K, (long long)(X - g_x), (long long)ldx,
              (const void*)W == g_w, (long long)(Y - g_y), (long long)ldy);
}
int main(int argc, char** argv) {
  const long long M = std::atoll(argv[1]), N = 3, K = 64, ldx = 70, ldy = 5;
  std::vector<float> x(M * ldx), y(M * ldy);
  std::vector<unsigned char> w(N * K / 32 * 34);
  g_x = x.data(), g_y = y.data(), g_w = w.data();
  qlora::cuda::q8_0_gemm_nt(reinterpret_cast<cudaStream_t>(0x5a0), M, N, K, x.data(), ldx, w.data(), y.data(), ldy);
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("q8split")
    src = (ROOT / "cuda" / "ops_q8_0_gemm.cu").read_text()
    src, n = LAUNCH.subn(r"::record_launch(\2, stream, \3);", src)
    assert n == 1, f"ops_q8_0_gemm.cu: expected 1 kernel launch, rewrote {n}"
    (d / "ops_q8_0_gemm.cpp").write_text(PRELUDE + src + "\n#include \"driver_impl.inc\"\n")
    (d / "driver_impl.inc").write_text(DRIVER)
    exe = d / "q8split"
    r = subprocess.run([cxx, "-std=c++17", "-O0", f"-I{d}", f"-I{EMU}", f"-I{ROOT / 'cuda'}",
                        f"-I{ROOT / 'cpp' / 'src'}", "-o", str(exe), str(d / "ops_q8_0_gemm.cpp")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


@pytest.mark.parametrize("M", [1, 8 * 65535, 8 * 65535 + 1, 2 * 8 * 65535 + 17])
def test_q8_0_gemm_rows_split_under_grid_y_limit(driver, M):
    out = subprocess.run([str(driver), str(M)], capture_output=True, text=True, timeout=120, check=True).stdout
    launches = [line.split() for line in out.splitlines()]
    assert launches
    row = 0
    for gx, gy, threads, smem, stream, m, n, k, xoff, ldx, w_same, yoff, ldy in launches:
        assert int(gy) <= 65535 and int(gy) == (int(m) + 7) // 8, (gy, m)
        assert (int(gx), int(n), int(k), int(ldx), int(ldy), w_same) == (1, 3, 64, 70, 5, "1")
        assert stream in ("0x5a0", "0x00000000000005a0"), stream  # the caller's stream
        assert (int(xoff), int(yoff)) == (row * 70, row * 5)
        row += int(m)
    assert row == M
    assert len(launches) == -(-M // (8 * 65535))
