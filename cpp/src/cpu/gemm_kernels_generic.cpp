// Portable GEMM building blocks (SimdLevel::Generic): plain loops over fixed-size tiles that the
// compiler vectorizes for the baseline ISA (SSE2 on x86-64, NEON on arm64). Same rules as the
// SIMD kernel files (cpu/README.md), so the layout code is identical across levels.
#include <cstdint>
#include <cstring>

#include "cpu/gemm_kernels.hpp"

namespace qlora::cpu::gemm_k {

namespace {
constexpr int MR = kGenericMR, NR = kGenericNR;
}  // namespace

void ukernel_generic(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha, float beta,
                     int mr, int nr) {
  float acc[MR][NR] = {};  // the register tile
  for (int64_t k = 0; k < kc; ++k) {
    const float* a = Ap + k * MR;  // [MR]
    const float* b = Bp + k * NR;  // [NR]
    // Fully unrolled: the SLP vectorizer turns each row into NR/4 (or NR/8) vector FMAs.
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float ai = a[i];
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[j];
    }
  }
  for (int i = 0; i < mr; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.0f) {
      for (int j = 0; j < nr; ++j) c[j] = alpha * acc[i][j];
    } else {
      for (int j = 0; j < nr; ++j) c[j] = alpha * acc[i][j] + beta * c[j];
    }
  }
}

void pack_b_t_generic(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp) {
  for (int64_t k = 0; k < kc; ++k) {
    float* dst = Bp + k * NR;
    for (int j = 0; j < nr; ++j) dst[j] = B[j * ldb + k];
    for (int j = nr; j < NR; ++j) dst[j] = 0.0f;
  }
}

void pack_b_n_generic(const float* B, int64_t ldb, int nr, int64_t kc, float* Bp) {
  for (int64_t k = 0; k < kc; ++k) {
    float* dst = Bp + k * NR;
    std::memcpy(dst, B + k * ldb, sizeof(float) * nr);
    for (int j = nr; j < NR; ++j) dst[j] = 0.0f;
  }
}

void nf4_decode_generic(const uint8_t* packed, int64_t j0, int64_t len, const float* scale, int bs_log2,
                        const float* codes, float* out) {
  const int64_t b0 = j0 >> bs_log2;
  for (int64_t t = 0; t < len; ++t) {
    const int64_t j = j0 + t;
    const uint8_t byte = packed[j >> 1];
    const int q = (j & 1) ? (byte & 0x0F) : (byte >> 4);  // first element of a pair: high nibble
    out[t] = codes[q] * scale[(j >> bs_log2) - b0];
  }
}

}  // namespace qlora::cpu::gemm_k
