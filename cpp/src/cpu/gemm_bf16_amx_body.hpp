// The AMX-BF16 micro-kernel of the bf16 GEMM (one source, two tile backends: cpu/amx_tiles.hpp).
// Included by gemm_bf16_amx.cpp (real tiles, AMX flags) and gemm_bf16_amx_emu.cpp (emulated tiles);
// internal linkage, so each TU keeps its own copy (cpu/README.md).
//
// C[mr, nr] (ld ldc) = alpha * A·B + beta * C over kp pairs of k, mr <= 2 * kMR, nr <= kNR; beta == 0
// never reads C. Operands (gemm_bf16_amx.hpp):
//   A: ceil(mr / kMR) A panels in the AMX layout (bf16_amx::relayout_a), panel 1 at Ap + kp * kMR:
//      per 16-pair chunk c, [kMR rows][16 pairs] (64-byte rows: an A tile, 14 rows x 32 bf16);
//      the last chunk [kMR][kp % 16] when kp % 16 != 0.
//   B: one B panel as the AVX512-BF16 kernel reads it (Bp[p * kNR + j]): 16 pair rows of 16 columns
//      is a B tile in the pair-interleaved (VNNI) order tdpbf16ps wants, row stride 128 bytes.
// Tiles: C00 C01 C10 C11 = tmm0..3 (14 x 16 fp32), A0 A1 = tmm4, 5 (14 x 16 pairs), B0 B1 = tmm6, 7
// (16 pairs x 16 columns): 2 x 2 C tiles per 32-k step, each A tile used twice, each B tile twice.
// A ragged last chunk (kp % 16) is copied, zero-padded, into stack tiles (reading 16 rows of the
// panel there would run past it). Per element: tdpbf16ps chains from 0 (per 32 k: even and odd
// products in two fp32 sums, then added; SDM order, see amx_tiles.hpp), then alpha * acc, or
// fma(beta, C, alpha * acc): the AVX512-BF16 kernel's epilogue; the k order inside differs from it.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/amx_tiles.hpp"
#include "cpu/gemm_bf16_kernels.hpp"

namespace qlora::cpu::amx {
namespace {

constexpr int kMR = bf16_k::kMR, kNR = bf16_k::kNR;
static_assert(kMR <= 16 && kNR == 32, "A tiles of <= 16 rows, two B tiles of 16 columns");

inline TileConfig ukernel_config() {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = kMR, c.colsb[t] = 64;  // C: kMR x 16 fp32
  for (int t = 4; t < 6; ++t) c.rows[t] = kMR, c.colsb[t] = 64;  // A: kMR x 16 pairs
  for (int t = 6; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;   // B: 16 pairs x 16 columns
  return c;
}

// Set while a tile scope (scope_begin .. scope_end) holds this thread's tiles configured for the kernel:
// ldtilecfg + tilerelease once per driver task instead of once per call (where they were ~15% of a
// 28 x 32 x 576 call's time). Per thread and per compilation (each TU its own copy).
inline bool& scoped() {
  static thread_local bool s = false;
  return s;
}
// Opens a scope; false (nothing done) if one is open already on this thread.
template <class T>
bool scope_begin() {
  if (scoped()) return false;
  const TileConfig cfg = ukernel_config();
  T::config(&cfg);
  scoped() = true;
  return true;
}
template <class T>
void scope_end() {
  T::release();
  scoped() = false;
}

template <class T, bool Two>
void ukernel_tiles(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                   float beta, int mr, int nr) {
  const bool own = !scoped();  // outside a scope: configure and release here
  if (own) {
    const TileConfig cfg = ukernel_config();
    T::config(&cfg);
  }
  T::template zero<0>();
  T::template zero<1>();
  if (Two) {
    T::template zero<2>();
    T::template zero<3>();
  }
  const uint32_t* A1 = Ap + static_cast<int64_t>(kMR) * kp;
  const int64_t nfull = kp / 16, kr = kp % 16;
  constexpr int64_t kBStride = kNR * 4, kAStride = 64;
  for (int64_t c = 0; c < nfull; ++c) {
    const uint32_t* b = Bp + c * 16 * kNR;
    T::template load<4>(Ap + c * 16 * kMR, kAStride);
    T::template load<6>(b, kBStride);
    T::template load<7>(b + 16, kBStride);
    T::template dp<0, 4, 6>();
    T::template dp<1, 4, 7>();
    if (Two) {
      T::template load<5>(A1 + c * 16 * kMR, kAStride);
      T::template dp<2, 5, 6>();
      T::template dp<3, 5, 7>();
    }
  }
  if (kr > 0) {  // ragged last chunk: zero-padded copies (zero pairs add exact zeros)
    alignas(64) uint32_t at[2][kMR][16];
    alignas(64) uint32_t bt[16][kNR];
    std::memset(at, 0, sizeof(at));
    std::memset(bt, 0, sizeof(bt));
    const int64_t off = nfull * 16 * kMR;
    for (int i = 0; i < kMR; ++i) {
      std::memcpy(at[0][i], Ap + off + i * kr, 4 * kr);
      if (Two) std::memcpy(at[1][i], A1 + off + i * kr, 4 * kr);
    }
    std::memcpy(bt, Bp + nfull * 16 * kNR, 4 * kNR * kr);
    T::template load<4>(at[0], kAStride);
    T::template load<6>(bt, kBStride);
    T::template load<7>(&bt[0][16], kBStride);
    T::template dp<0, 4, 6>();
    T::template dp<1, 4, 7>();
    if (Two) {
      T::template load<5>(at[1], kAStride);
      T::template dp<2, 5, 6>();
      T::template dp<3, 5, 7>();
    }
  }
  if (alpha == 1.0f && beta == 0.0f && nr == kNR && mr == (Two ? 2 * kMR : kMR)) {
    // whole tiles, C = 1 * acc: the tiles' bits straight into C (1 * x == x, acc is never denormal)
    const int64_t ldb = ldc * 4;
    T::template store<0>(C, ldb);
    T::template store<1>(C + 16, ldb);
    if (Two) {
      T::template store<2>(C + kMR * ldc, ldb);
      T::template store<3>(C + kMR * ldc + 16, ldb);
    }
    if (own) T::release();
    return;
  }
  alignas(64) float acc[2 * kMR][kNR];
  T::template store<0>(&acc[0][0], kBStride);
  T::template store<1>(&acc[0][16], kBStride);
  if (Two) {
    T::template store<2>(&acc[kMR][0], kBStride);
    T::template store<3>(&acc[kMR][16], kBStride);
  }
  if (own) T::release();
  for (int i = 0; i < mr; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.0f) {
      for (int j = 0; j < nr; ++j) c[j] = alpha * acc[i][j];
    } else {
      for (int j = 0; j < nr; ++j) c[j] = T::fma(beta, c[j], alpha * acc[i][j]);
    }
  }
}

template <class T>
void ukernel(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha, float beta,
             int mr, int nr) {
  if (mr <= 0 || nr <= 0) return;
  if (mr > kMR) return ukernel_tiles<T, true>(kp, Ap, Bp, C, ldc, alpha, beta, mr, nr);
  ukernel_tiles<T, false>(kp, Ap, Bp, C, ldc, alpha, beta, mr, nr);
}

}  // namespace
}  // namespace qlora::cpu::amx
