// AVX2 fp32 GEMV kernel (compiled with AVX2/FMA flags only; plain function, see cpu/README.md).
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemv_tiles.hpp"
#include "cpu/simd_reduce_avx2.hpp"

namespace qlora::cpu {

namespace {


// Lane mask of the first r < 8 floats (maskload never touches the masked-out lanes).
inline __m256i tail_mask(int64_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// J columns of C (rows of B) [n, n+J) for all M rows of A into out[j * P + m]: v[j * P + m]
// accumulates A row m times B row n+j over K, 8 columns a step (the K % 8 tail with masked loads),
// and one tree reduction (hsum8) turns the 8 accumulators into 8 dot products (P * J <= 8 of the
// 16 ymm registers hold sums). Every dot product takes the same path whatever M and J are, so a row's
// result does not depend on M.
template <int M, int P, int J>
inline __attribute__((always_inline)) void dots(int64_t n, int64_t K, const float* A, int64_t lda, const float* B,
                                                int64_t ldb, float* out) {
  static_assert(J * P <= 8 && M <= P, "8 accumulators");
  __m256 v[8];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_setzero_ps();
  const float* b = B + n * ldb;  // [J, ldb]
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    // Few rows of B in flight (M >= 3: one) leave the hardware prefetchers behind DRAM: the next J
    // rows into L1 and rows 8J ahead into L2 (as gemv_f32_avx512.cpp), once per cache line.
    if constexpr (J <= 2) {
      if ((k & 15) == 0) {
#pragma GCC unroll 8
        for (int j = 0; j < J; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(b + (J + j) * ldb + k), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(b + (8 * J + j) * ldb + k), _MM_HINT_T1);
        }
      }
    }
    __m256 bv[J];
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) bv[j] = _mm256_loadu_ps(b + j * ldb + k);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m256 a = _mm256_loadu_ps(A + m * lda + k);
      if (J > 1) asm("" : "+x"(a));  // one load of a for its J FMAs (GCC would fold it into each)
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) v[j * P + m] = _mm256_fmadd_ps(a, bv[j], v[j * P + m]);
    }
    // GCC 12 kept one of the 8 accumulators on the stack (a store and a reload per step, on the
    // FMA chain) although registers were free: pin them all to registers.
    asm("" : "+x"(v[0]), "+x"(v[1]), "+x"(v[2]), "+x"(v[3]), "+x"(v[4]), "+x"(v[5]), "+x"(v[6]), "+x"(v[7]));
  }
  if (k < K) {
    const __m256i tail = tail_mask(K - k);
    for (int m = 0; m < M; ++m) {
      const __m256 a = _mm256_maskload_ps(A + m * lda + k, tail);
      for (int j = 0; j < J; ++j)
        v[j * P + m] = _mm256_fmadd_ps(a, _mm256_maskload_ps(b + j * ldb + k, tail), v[j * P + m]);
    }
  }
  _mm256_store_ps(out, hsum8(v));
}

// M is a template parameter so the accumulators live in registers. Columns go J at a time, so
// B streams once per call. J (measured on the [49152, 576] lm_head): 8 at M = 1 (8 FMA chains),
// 2 at M = 2; 1 from M = 3, where more rows of B in flight ran slower than one sequential stream
// plus software prefetch (M = 8 twice as fast as two passes of 4 rows).
template <int M>
void gemv_rows(int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int P = pow2_at_least(M), J = M == 1 ? 8 : M == 2 ? 2 : 1;  // P * J <= 8
  alignas(32) float out[8];
  gemv_tiles<M, P, J>(
      n0, n1, out, [&](int64_t n, float* o) { dots<M, P, J>(n, K, A, lda, B, ldb, o); },
      [&](int64_t n, float* o) { dots<M, P, 1>(n, K, A, lda, B, ldb, o); },
      [&](int m, int64_t nt, const float* row, int64_t nn) {
        float* c = C + m * ldc + nt;
        for (int64_t jj = 0; jj < nn; ++jj) c[jj] = beta == 0.0f ? alpha * row[jj] : alpha * row[jj] + beta * c[jj];
      });
}

}  // namespace

void gemv_nt_f32_avx2(int64_t M, int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda,
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
