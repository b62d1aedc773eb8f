// The AMX-BF16 micro-kernel of the bf16 GEMM (one source, two tile backends: cpu/amx_tiles.hpp).
// Included by gemm_bf16_amx.cpp (real tiles, AMX flags) and gemm_bf16_amx_emu.cpp (emulated tiles);
// internal linkage, so each TU keeps its own copy (cpu/README.md).
//
// C[mr, nr] (ld ldc) = alpha * A·B + beta * C over kp pairs of k, mr <= 2 * R, nr <= kNR; beta == 0
// never reads C; R = kR = 16 rows per A panel (the driver's AMX panels: whole tiles).
// Operands (gemm_bf16_amx.hpp):
//   A: ceil(mr / R) A panels in the AMX layout (bf16_amx::relayout_a), panel 1 at Ap + kp * R:
//      per 16-pair chunk c, [R rows][16 pairs] (64-byte rows: an A tile, R rows x 32 bf16);
//      the last chunk [R][kp % 16] when kp % 16 != 0.
//   B: one B panel as the AVX512-BF16 kernel reads it (Bp[p * kNR + j]): 16 pair rows of 16 columns
//      is a B tile in the pair-interleaved (VNNI) order tdpbf16ps wants, row stride 128 bytes.
// Tiles: C00 C01 C10 C11 = tmm0..3 (R x 16 fp32), A0 A1 = tmm4, 5 (R x 16 pairs), B0 B1 = tmm6, 7
// (16 pairs x 16 columns): 2 x 2 C tiles per 32-k step, each A tile used twice, each B tile twice.
// A ragged last chunk (kp % 16) is copied, zero-padded, into stack tiles (reading 16 rows of the
// panel there would run past it). Per element: tdpbf16ps chains from 0 (per 32 k: even and odd
// products in two fp32 sums, then added; SDM order, see amx_tiles.hpp), then alpha * acc, or
// fma(beta, C, alpha * acc): the AVX512-BF16 kernel's epilogue; the k order inside differs from it.
// Whole tiles with alpha 1, beta 0 are stored straight into C (the same bits). The row count of a
// call changes no element's bits (each element's k order is the same).
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/amx_tiles.hpp"
#include "cpu/gemm_bf16_kernels.hpp"

namespace qlora::cpu::amx {
namespace {

constexpr int kNR = bf16_k::kNR;
constexpr int kR = 16;  // rows of an A panel / C tile (bf16_amx::kMR16): whole tiles
static_assert(kNR == 32, "two B tiles of 16 columns");

template <class T>
void configure() {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = kR, c.colsb[t] = 64;   // C: R x 16 fp32
  for (int t = 4; t < 6; ++t) c.rows[t] = kR, c.colsb[t] = 64;   // A: R x 16 pairs
  for (int t = 6; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;  // B: 16 pairs x 16 columns
  T::config(&c);
}

// Whether a tile scope (scope_begin .. scope_end) holds this thread's tiles, configured: ldtilecfg +
// tilerelease once per driver task instead of once per call (they were ~15% of a 28 x 32 x 576 call).
// Per thread and per compilation (each TU its own copy).
inline bool& scoped() {
  static thread_local bool s = false;
  return s;
}
// Opens a scope; false (nothing done) if one is open already on this thread.
template <class T>
bool scope_begin() {
  if (scoped()) return false;
  configure<T>();
  scoped() = true;
  return true;
}
template <class T>
void scope_end() {
  T::release();
  scoped() = false;
}

// A chunks ahead to prefetch (A streams from L2). Emerald Rapids, 1 thread, the kernel alone on
// 32 x 32 x 576 calls: +0-5%, within the loaded machine's noise (distances 1-4 alike, 8 slower).
constexpr int64_t kPrefetchChunks = 2;

template <class T, bool Two>
void ukernel_tiles(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                   float beta, int mr, int nr) {
  const bool own = !scoped();  // outside a scope: configure here, then release
  if (own) configure<T>();
  T::template zero<0>();
  T::template zero<1>();
  if (Two) {
    T::template zero<2>();
    T::template zero<3>();
  }
  const uint32_t* A1 = Ap + static_cast<int64_t>(kR) * kp;
  const int64_t nfull = kp / 16, kr = kp % 16;
  constexpr int64_t kBStride = kNR * 4, kAStride = 64;
  for (int64_t c = 0; c < nfull; ++c) {
    const uint32_t* b = Bp + c * 16 * kNR;
    const char* pa = reinterpret_cast<const char*>(Ap + (c + kPrefetchChunks) * 16 * kR);
    for (int l = 0; l < kR; ++l) __builtin_prefetch(pa + 64 * l, 0, 3);
    if (Two) {
      const char* pa1 = reinterpret_cast<const char*>(A1 + (c + kPrefetchChunks) * 16 * kR);
      for (int l = 0; l < kR; ++l) __builtin_prefetch(pa1 + 64 * l, 0, 3);
    }
    T::template load<4>(Ap + c * 16 * kR, kAStride);
    T::template load<6>(b, kBStride);
    T::template load<7>(b + 16, kBStride);
    T::template dp<0, 4, 6>();
    T::template dp<1, 4, 7>();
    if (Two) {
      T::template load<5>(A1 + c * 16 * kR, kAStride);
      T::template dp<2, 5, 6>();
      T::template dp<3, 5, 7>();
    }
  }
  if (kr > 0) {  // ragged last chunk: zero-padded copies (zero pairs add exact zeros)
    alignas(64) uint32_t at[2][kR][16];
    alignas(64) uint32_t bt[16][kNR];
    std::memset(at, 0, sizeof(at));
    std::memset(bt, 0, sizeof(bt));
    const int64_t off = nfull * 16 * kR;
    for (int i = 0; i < kR; ++i) {
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
  const auto done = [&] {
    if (own) T::release();
  };
  if (alpha == 1.0f && beta == 0.0f && nr == kNR && mr == (Two ? 2 * kR : kR)) {
    // whole tiles, C = 1 * acc: the tiles' bits straight into C (1 * x == x, acc is never denormal)
    const int64_t ldb = ldc * 4;
    T::template store<0>(C, ldb);
    T::template store<1>(C + 16, ldb);
    if (Two) {
      T::template store<2>(C + kR * ldc, ldb);
      T::template store<3>(C + kR * ldc + 16, ldb);
    }
    done();
    return;
  }
  alignas(64) float acc[2 * kR][kNR];
  T::template store<0>(&acc[0][0], kBStride);
  T::template store<1>(&acc[0][16], kBStride);
  if (Two) {
    T::template store<2>(&acc[kR][0], kBStride);
    T::template store<3>(&acc[kR][16], kBStride);
  }
  done();
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
  if (mr > kR) return ukernel_tiles<T, true>(kp, Ap, Bp, C, ldc, alpha, beta, mr, nr);
  ukernel_tiles<T, false>(kp, Ap, Bp, C, ldc, alpha, beta, mr, nr);
}

}  // namespace
}  // namespace qlora::cpu::amx
