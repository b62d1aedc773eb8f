// AVX2 fp32 GEMV kernel (compiled with AVX2/FMA flags only; plain function, see cpu/README.md).
#include <immintrin.h>

#include <cstdint>

namespace qlora::cpu {

namespace {
float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
}  // namespace

void gemv_nt_f32_avx2(int64_t M, int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* b = B + n * ldb;  // [K]
    __m256 acc0[4], acc1[4];
    for (int m = 0; m < 4; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256 b0 = _mm256_loadu_ps(b + k), b1 = _mm256_loadu_ps(b + k + 8);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(A + m * lda + k), b0, acc0[m]);
        acc1[m] = _mm256_fmadd_ps(_mm256_loadu_ps(A + m * lda + k + 8), b1, acc1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(_mm256_add_ps(acc0[m], acc1[m]));
      for (int64_t kk = k; kk < K; ++kk) s += A[m * lda + kk] * b[kk];
      float* c = C + m * ldc + n;
      *c = beta == 0.0f ? alpha * s : alpha * s + beta * *c;
    }
  }
}

}  // namespace qlora::cpu
