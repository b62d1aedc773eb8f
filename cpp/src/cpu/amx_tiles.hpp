// The tile abstraction of the AMX-BF16 GEMM micro-kernel (cpu/gemm_bf16_amx_body.hpp): the kernel is
// written once against a backend T with
//   T::config(const TileConfig*)       ldtilecfg (tiles zeroed)
//   T::zero<t>()                       tilezero tmm<t>
//   T::load<t>(const void*, stride)    tileloadd tmm<t>, rows[t] rows of colsb[t] bytes at base + r * stride
//   T::store<t>(void*, stride)         tilestored
//   T::dp<c, a, b>()                   tdpbf16ps tmm<c> += tmm<a> · tmm<b>
//   T::release()                       tilerelease
//   T::fma(a, b, c)                    fp32 a * b + c, one rounding (the epilogue's, as the AVX512-BF16 kernel)
// and compiled twice: with the AMX intrinsics (AmxTiles, cpu/amx_tiles_real.hpp) and with EmulatedTiles
// below (plain C++, gemm_bf16_amx_emu.cpp), so the packing, tile order and edge handling of the one
// kernel source are tested on CPUs without AMX. Internal linkage (anonymous namespace): each TU keeps
// its own copy, compiled with its own flags (cpu/README.md). EmulatedTiles includes <cmath> / <cstring>,
// so only level-neutral TUs (and tests) include this file with it; the AMX TU defines AMX_TILES_NO_EMULATION.
#pragma once
#include <cstdint>
#include <cstring>

#ifndef AMX_TILES_NO_EMULATION
#include <cmath>
#include <cstdio>
#include <cstdlib>
#endif

namespace qlora::cpu::amx {
namespace {

// The 64-byte operand of ldtilecfg (palette 1): Intel SDM vol. 2, LDTILECFG.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row, tiles 0..7 (8..15 reserved, zero)
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

#ifndef AMX_TILES_NO_EMULATION
// The eight 16 x 64-byte tile registers and their configuration as plain arrays, per thread, each
// instruction as the Intel SDM (vol. 2, "TDPBF16PS", "TILELOADD", "TILESTORED", "TILEZERO",
// "LDTILECFG") pseudo-code defines it. An invalid configuration or shape (#UD / #GP on hardware)
// aborts with a message.
struct EmulatedTiles {
  struct State {
    TileConfig cfg;
    bool valid = false;
    alignas(64) uint8_t t[8][16][64];
  };
  static State& st() {
    static thread_local State s;
    return s;
  }
  [[noreturn]] static void fault(const char* what) {
    std::fprintf(stderr, "emulated AMX: %s\n", what);
    std::abort();
  }
  static void need(int t) {
    const State& s = st();
    if (!s.valid) fault("tile instruction without a valid tile configuration (#UD)");
    if (s.cfg.rows[t] == 0 || s.cfg.colsb[t] == 0) fault("tile not configured (#UD)");
  }
  // fp32 with DAZ on inputs and FTZ on results (tdpbf16ps ignores MXCSR: always RNE, DAZ, FTZ, SAE).
  static float daz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
  static float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
  static float make_fp32(uint16_t bf) {  // bf16 in the upper half of an fp32 word (exact)
    const uint32_t w = static_cast<uint32_t>(bf) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }

  static void config(const TileConfig* c) {
    State& s = st();
    if (c->palette_id != 1) fault("palette_id != 1 (#GP)");
    for (int t = 0; t < 8; ++t)
      if (c->colsb[t] > 64 || c->rows[t] > 16 || (c->colsb[t] == 0) != (c->rows[t] == 0))
        fault("tile shape beyond palette 1 (#GP)");
    s.cfg = *c;
    s.valid = true;
    std::memset(s.t, 0, sizeof(s.t));  // LDTILECFG zeroes all tile data
  }
  static void release() {
    State& s = st();
    s.valid = false;
    std::memset(s.t, 0, sizeof(s.t));
  }
  template <int T>
  static void zero() {
    need(T);
    std::memset(st().t[T], 0, sizeof(st().t[T]));
  }
  template <int T>
  static void load(const void* base, int64_t stride) {
    need(T);
    State& s = st();
    std::memset(s.t[T], 0, sizeof(s.t[T]));  // write_row_and_zero + zero_upper_rows
    for (int r = 0; r < s.cfg.rows[T]; ++r)
      std::memcpy(s.t[T][r], static_cast<const uint8_t*>(base) + r * stride, s.cfg.colsb[T]);
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    need(T);
    const State& s = st();
    for (int r = 0; r < s.cfg.rows[T]; ++r)
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.t[T][r], s.cfg.colsb[T]);
  }
  // TDPBF16PS tsrcdest(C), tsrc1(A), tsrc2(B): per row m of C, two fp32 temporaries per column n (even
  // and odd bf16 of the pairs) accumulate A's pair k times B's row k with an FMA each (DAZ, FTZ, RNE),
  // k = 0 .. A.colsb/4 - 1 in order, starting from 0; then C[m][n] += (even + odd), each add RNE + FTZ.
  template <int Cd, int A, int B>
  static void dp() {
    need(Cd), need(A), need(B);
    State& s = st();
    const TileConfig& c = s.cfg;
    // SDM #UD conditions: A's K (colsb / 4) = B's rows, C.rows = A.rows, C.colsb = B.colsb
    if (c.colsb[A] / 4 != c.rows[B] || c.rows[Cd] != c.rows[A] || c.colsb[Cd] != c.colsb[B] || c.colsb[A] % 4)
      fault("tdpbf16ps operand shapes do not match (#UD)");
    const int K = c.colsb[A] / 4, N = c.colsb[Cd] / 4;
    for (int m = 0; m < c.rows[Cd]; ++m) {
      float temp[32] = {};
      for (int k = 0; k < K; ++k) {
        uint16_t a[2], b[32];
        std::memcpy(a, &s.t[A][m][4 * k], 4);
        std::memcpy(b, s.t[B][k], 4 * N);
        for (int n = 0; n < N; ++n)
          for (int h = 0; h < 2; ++h)
            temp[2 * n + h] = ftz(std::fma(daz(make_fp32(a[h])), daz(make_fp32(b[2 * n + h])), temp[2 * n + h]));
      }
      float* crow = reinterpret_cast<float*>(s.t[Cd][m]);
      for (int n = 0; n < N; ++n) {
        float cv;
        std::memcpy(&cv, &crow[n], 4);
        const float tmp = ftz(daz(temp[2 * n]) + daz(temp[2 * n + 1]));
        cv = ftz(daz(cv) + tmp);
        std::memcpy(&crow[n], &cv, 4);
      }
      std::memset(s.t[Cd][m] + 4 * N, 0, 64 - 4 * N);  // write_row_and_zero
    }
    for (int m = c.rows[Cd]; m < 16; ++m) std::memset(s.t[Cd][m], 0, 64);  // zero_upper_rows
  }
  static float fma(float a, float b, float c) { return std::fma(a, b, c); }
};
#endif

}  // namespace
}  // namespace qlora::cpu::amx
