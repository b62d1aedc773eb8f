#include "cpu/half_rows.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "cpu/gemm.hpp"
#include "cpu/half_rows_kernels.hpp"
#include "cpu/q8_0.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

float half_to_f32(bool bf16, uint16_t h) {
  if (!bf16) return q8_0_half_to_float(h);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_half(bool bf16, float f) {
  if (!bf16) return q8_0_float_to_half(f);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);  // NaN stays (quiet) NaN
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);                 // round to nearest even
}

void f32_to_half_rows(bool bf16, const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = f32_to_half(bf16, x[i]);
}

namespace {

// out[K] = wide(row): vcvtph2ps / shifts on AVX2 and AVX-512, else a plain loop (the oracle's).
void widen_row(SimdLevel level, bool bf16, const uint16_t* row, int64_t K, float* out) {
#ifdef QLORA_X86
  if (level == SimdLevel::AVX512) return half_widen_avx512(bf16 ? 1 : 0, row, K, out);
  if (level == SimdLevel::AVX2) return half_widen_avx2(bf16 ? 1 : 0, row, K, out);
#else
  (void)level;
#endif
  if (bf16) {
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t bits = static_cast<uint32_t>(row[k]) << 16;
      std::memcpy(out + k, &bits, 4);
    }
  } else {
    for (int64_t k = 0; k < K; ++k) out[k] = q8_0_half_to_float(row[k]);
  }
}

void validate(int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t ldy) {
  check_arg(K >= 1, "half_gemm_nt: K must be >= 1, got " + std::to_string(K));
  check_arg(N >= 1, "half_gemm_nt: N must be >= 1, got " + std::to_string(N));
  check_arg(M >= 0, "half_gemm_nt: M must be >= 0, got " + std::to_string(M));
  check_arg(ldx >= K, "half_gemm_nt: ldx (" + std::to_string(ldx) + ") < K (" + std::to_string(K) + ")");
  check_arg(ldy >= N, "half_gemm_nt: ldy (" + std::to_string(ldy) + ") < N (" + std::to_string(N) + ")");
}

// The oracle: one fp32 dot product per output, weights widened on the fly, in k order.
void gemm_scalar(bool bf16, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const uint16_t* W,
                 float* Y, int64_t ldy) {
  std::vector<float> w(static_cast<size_t>(K));  // [K] one widened row
  for (int64_t n = 0; n < N; ++n) {
    widen_row(SimdLevel::Scalar, bf16, W + n * K, K, w.data());
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += X[m * ldx + k] * w[k];
      Y[m * ldy + n] = s;
    }
  }
}

constexpr int64_t kGemvMaxM = 16;

void gemv(SimdLevel level, bool bf16, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx,
          const uint16_t* W, float* Y, int64_t ldy) {
#ifdef QLORA_X86  // the AVX files are compiled on x86 only
  auto kern = level == SimdLevel::AVX512 ? half_gemv_avx512
              : level == SimdLevel::AVX2 ? half_gemv_avx2
                                         : half_gemv_generic;
#else
  auto kern = half_gemv_generic;
  (void)level;
#endif
  const int64_t group = kern == half_gemv_generic ? 4 : 8;  // rows of X per pass over W
  // At least ~64 KiB of W per task so small matrices stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (2 * K));
  parallel_range(N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += group)
      kern(bf16 ? 1 : 0, std::min(group, M - m0), n0, n1, K, X + m0 * ldx, ldx, W, Y + m0 * ldy, ldy);
  });
}

// M > 16: W a chunk of rows at a time widened into fp32 scratch [chunk, K], then the fp32 GEMM into
// the matching columns of Y (as q8_0.cpp: the chunk stays in L2 for the GEMM).
void gemm_chunked(SimdLevel level, bool bf16, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx,
                  const uint16_t* W, float* Y, int64_t ldy) {
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(512, (1 << 20) / (K * 4)));
  std::vector<float> scratch(static_cast<size_t>(std::min(chunk, N) * K));  // [chunk, K]
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nc = std::min(chunk, N - n0);
    parallel_range(nc, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) widen_row(level, bf16, W + (n0 + r) * K, K, scratch.data() + r * K);
    });
    gemm_nt(level, M, nc, K, 1.0f, X, ldx, scratch.data(), K, 0.0f, Y + n0, ldy);
  }
}

}  // namespace

void half_gemm_nt(SimdLevel level, bool bf16, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx,
                  const void* W, float* Y, int64_t ldy) {
  validate(M, N, K, ldx, ldy);
  if (M == 0) return;
  const uint16_t* w = static_cast<const uint16_t*>(W);
  if (level == SimdLevel::Scalar) return gemm_scalar(bf16, M, N, K, X, ldx, w, Y, ldy);
  if (M <= kGemvMaxM) return gemv(level, bf16, M, N, K, X, ldx, w, Y, ldy);
  gemm_chunked(level, bf16, M, N, K, X, ldx, w, Y, ldy);
}

void half_rows(SimdLevel level, bool bf16, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) {
  check_arg(K >= 1, "half_rows: K must be >= 1, got " + std::to_string(K));
  check_arg(M >= 0, "half_rows: M must be >= 0, got " + std::to_string(M));
  const uint16_t* w = static_cast<const uint16_t*>(W);
  // Threads only for many rows (the chunked lm_head backward widens 2048 at a time).
  const int64_t grain = level == SimdLevel::Scalar ? std::max<int64_t>(M, 1) : std::max<int64_t>(1, (64 << 10) / (2 * K));
  parallel_range(M, grain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) widen_row(level, bf16, w + static_cast<int64_t>(ids[m]) * K, K, out + m * K);
  });
}

}  // namespace qlora::cpu
