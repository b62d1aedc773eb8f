// AVX-512 fp32 GEMV kernel (compiled with AVX-512 flags only; plain function, see cpu/README.md).
// GCC 12's AVX-512 intrinsics seed results with _mm512_undefined_*: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemv_tiles.hpp"
#include "cpu/simd_reduce_avx512.hpp"

namespace qlora::cpu {

namespace {


// J columns of C (rows of B) [n, n+J) for all M rows of A into out[j * P + m]: v[j * P + m]
// accumulates A row m times B row n+j over K (the K % 16 tail with masked loads, which never fault),
// and one tree reduction (hsum16) turns the 16 accumulators into 16 dot products. Every dot
// product takes the same path whatever M and J are, so a row's result does not depend on M.
template <int M, int P, int J>
inline __attribute__((always_inline)) void dots(int64_t n, int64_t K, const float* A, int64_t lda, const float* B,
                                                int64_t ldb, float* out) {
  static_assert(J * P <= 16 && M <= P, "16 accumulators");
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_setzero_ps();
  const float* b = B + n * ldb;  // [J, ldb]
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 bv[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      // With few rows of B in flight (M = 8: two) the hardware prefetchers alone left the loop
      // waiting on memory (22 GB/s at M = 8 against 55 at M = 1): the next J rows into L1 and
      // rows 8J ahead into L2 bring M = 8 to M = 1's rate. M = 1 (16 streams) is faster without.
      if constexpr (J <= 4) {
        _mm_prefetch(reinterpret_cast<const char*>(b + (J + j) * ldb + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + (8 * J + j) * ldb + k), _MM_HINT_T1);
      }
      bv[j] = _mm512_loadu_ps(b + j * ldb + k);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m512 a = _mm512_loadu_ps(A + m * lda + k);
      // Keep a in a register: GCC otherwise folds the load into each of the J FMAs, and the loop
      // becomes bound by loads (J + J * M per step instead of J + M).
      if (J > 1) asm("" : "+v"(a));
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) v[j * P + m] = _mm512_fmadd_ps(a, bv[j], v[j * P + m]);
    }
  }
  if (k < K) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1);
    for (int m = 0; m < M; ++m) {
      const __m512 a = _mm512_maskz_loadu_ps(tail, A + m * lda + k);
      for (int j = 0; j < J; ++j)
        v[j * P + m] = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(tail, b + j * ldb + k), v[j * P + m]);
    }
  }
  _mm512_store_ps(out, hsum16(v));
}

// M is a template parameter so the accumulators live in registers. Columns go J at a time
// (J * P = 16 accumulators: 16 columns at M = 1, 2 at M = 8), so B rows stream once per call.
template <int M>
void gemv_rows(int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int P = pow2_at_least(M), J = 16 / P;
  alignas(64) float out[16];
  gemv_tiles<M, P, J>(
      n0, n1, out, [&](int64_t n, float* o) { dots<M, P, J>(n, K, A, lda, B, ldb, o); },
      [&](int64_t n, float* o) { dots<M, P, 1>(n, K, A, lda, B, ldb, o); },
      [&](int m, int64_t nt, const float* row, int64_t nn) {
        float* c = C + m * ldc + nt;
        for (int64_t jj = 0; jj < nn; ++jj) c[jj] = beta == 0.0f ? alpha * row[jj] : alpha * row[jj] + beta * c[jj];
      });
}
}  // namespace

void gemv_nt_f32_avx512(int64_t M, int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  switch (M) {  // 1 <= M <= 8
    case 1: return gemv_rows<1>(n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case 2: return gemv_rows<2>(n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case 3: return gemv_rows<3>(n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case 4: return gemv_rows<4>(n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case 5: return gemv_rows<5>(n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case 6: return gemv_rows<6>(n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case 7: return gemv_rows<7>(n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
    default: return gemv_rows<8>(n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

}  // namespace qlora::cpu
