// The AMX-BF16 kernels of the training attention's bf16 products (declared in cpu/attention_amx.hpp):
// one source on a tile backend T (cpu/amx_tiles.hpp: EmulatedTiles, or the real tiles of
// attention_amx.cpp), included by attention_amx.cpp and attention_amx_select.cpp; internal linkage, so
// each TU keeps its own copy compiled with its own flags (cpu/README.md).
// Tiles as the bf16 GEMM's: C00 C01 C10 C11 = tmm0..3 (<= 16 rows x 16 fp32), A0 A1 = tmm4, 5
// (<= 16 rows x 16 pairs), B0 B1 = tmm6, 7 (16 pairs x 16 columns); per 16-pair chunk 2 x 2 tdpbf16ps.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/amx_tiles.hpp"

namespace qlora::cpu::attn_amx {
namespace {

using amx::TileConfig;

// Tiles 0, 1, 4 with r0 rows, 2, 3, 5 with r1 (0: unconfigured), B tiles 16 pair rows; 64-byte rows.
inline TileConfig attn_config(int r0, int r1) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    const int r = (t == 2 || t == 3 || t == 5) ? r1 : (t >= 6 ? 16 : r0);
    c.rows[t] = static_cast<uint8_t>(r);
    c.colsb[t] = r > 0 ? 64 : 0;
  }
  return c;
}

template <class T>
void rows_kernel(int64_t kp, const uint32_t* A, int64_t lda, int mr, const uint32_t* Bp, int64_t bstride, int64_t ncols,
                 float* C, int64_t ldc) {
  if (mr <= 0 || ncols <= 0) return;
  const int r0 = mr < 16 ? mr : 16, r1 = mr - r0;
  const TileConfig cfg = attn_config(r0, r1);
  T::config(&cfg);
  const uint32_t* A1 = A + 16 * lda;
  const int64_t nfull = kp / 16, kr = kp % 16, sa = lda * 4, sc = ldc * 4;
  constexpr int64_t kBStride = 32 * 4;
  alignas(64) uint32_t at[2][16][16];  // a ragged last chunk, zero-padded
  alignas(64) uint32_t bt[16][32];
  alignas(64) float acc[32][32];  // a ragged last panel's C
  if (kr > 0) {
    std::memset(at, 0, sizeof(at));
    for (int i = 0; i < mr; ++i) std::memcpy(at[i / 16][i % 16], A + i * lda + nfull * 16, 4 * kr);
  }
  for (int64_t j = 0; j < ncols; j += 32) {
    const uint32_t* B = Bp + (j / 32) * bstride;
    const bool two = ncols - j > 16;  // the panel's second 16 columns hold any output
    T::template zero<0>();
    if (two) T::template zero<1>();
    if (r1) {
      T::template zero<2>();
      if (two) T::template zero<3>();
    }
    for (int64_t c = 0; c < nfull; ++c) {
      const uint32_t* b = B + c * 16 * 32;
      T::template load<4>(A + c * 16, sa);
      T::template load<6>(b, kBStride);
      T::template dp<0, 4, 6>();
      if (two) {
        T::template load<7>(b + 16, kBStride);
        T::template dp<1, 4, 7>();
      }
      if (r1) {
        T::template load<5>(A1 + c * 16, sa);
        T::template dp<2, 5, 6>();
        if (two) T::template dp<3, 5, 7>();
      }
    }
    if (kr > 0) {  // zero pairs add exact zeros
      std::memset(bt, 0, sizeof(bt));
      std::memcpy(bt, B + nfull * 16 * 32, 4 * 32 * kr);
      T::template load<4>(at[0], 64);
      T::template load<6>(bt, kBStride);
      T::template dp<0, 4, 6>();
      if (two) {
        T::template load<7>(&bt[0][16], kBStride);
        T::template dp<1, 4, 7>();
      }
      if (r1) {
        T::template load<5>(at[1], 64);
        T::template dp<2, 5, 6>();
        if (two) T::template dp<3, 5, 7>();
      }
    }
    if (ncols - j >= 32) {  // whole panel: straight to C
      T::template store<0>(C + j, sc);
      T::template store<1>(C + j + 16, sc);
      if (r1) {
        T::template store<2>(C + 16 * ldc + j, sc);
        T::template store<3>(C + 16 * ldc + j + 16, sc);
      }
      continue;
    }
    T::template store<0>(&acc[0][0], kBStride);
    if (two) T::template store<1>(&acc[0][16], kBStride);
    if (r1) {
      T::template store<2>(&acc[16][0], kBStride);
      if (two) T::template store<3>(&acc[16][16], kBStride);
    }
    for (int i = 0; i < mr; ++i) std::memcpy(C + i * ldc + j, acc[i], 4 * (ncols - j));
  }
  T::release();
}

template <class T>
void acc_t_kernel(int64_t kp, const uint32_t* At, int64_t lda, int64_t m, const uint32_t* Bk, int64_t ldb,
                  int64_t ncols, float* Ct, int64_t ldc, int64_t q0) {
  if (m <= 0 || ncols <= 0 || kp <= 0) return;
  const TileConfig cfg = attn_config(16, 16);
  T::config(&cfg);
  const int64_t sa = lda * 4, sb = ldb * 4, sc = ldc * 4;
  for (int64_t j = 0; j < ncols; j += 32) {
    const int64_t p0 = (j > q0 ? (j - q0) / 2 : 0) & ~int64_t{15};  // earlier query pairs see none of these keys
    if (p0 >= kp) break;
    for (int64_t i = 0; i < m; i += 32) {
      float* c = Ct + i * ldc + j;
      T::template load<0>(c, sc);
      T::template load<1>(c + 16, sc);
      T::template load<2>(c + 16 * ldc, sc);
      T::template load<3>(c + 16 * ldc + 16, sc);
      for (int64_t p = p0; p < kp; p += 16) {
        const uint32_t* b = Bk + p * ldb + j;
        T::template load<4>(At + i * lda + p, sa);
        T::template load<6>(b, sb);
        T::template load<7>(b + 16, sb);
        T::template dp<0, 4, 6>();
        T::template dp<1, 4, 7>();
        T::template load<5>(At + (i + 16) * lda + p, sa);
        T::template dp<2, 5, 6>();
        T::template dp<3, 5, 7>();
      }
      T::template store<0>(c, sc);
      T::template store<1>(c + 16, sc);
      T::template store<2>(c + 16 * ldc, sc);
      T::template store<3>(c + 16 * ldc + 16, sc);
    }
  }
  T::release();
}

}  // namespace
}  // namespace qlora::cpu::attn_amx
