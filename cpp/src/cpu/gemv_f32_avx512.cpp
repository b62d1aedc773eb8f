// AVX-512 fp32 GEMV kernel (compiled with AVX-512 flags only; plain function, see cpu/README.md).
#include <immintrin.h>

#include <cstdint>

namespace qlora::cpu {

namespace {
// Horizontal sum through memory: once per output element, and GCC 12's reduce/extract
// intrinsics trip -Wmaybe-uninitialized.
float hsum(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  float s = 0.0f;
  for (float x : t) s += x;
  return s;
}
}  // namespace

void gemv_nt_f32_avx512(int64_t M, int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* b = B + n * ldb;  // [K]
    __m512 acc0[4], acc1[4];       // two chains per row of A hide the FMA latency
    for (int m = 0; m < 4; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512 b0 = _mm512_loadu_ps(b + k), b1 = _mm512_loadu_ps(b + k + 16);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k), b0, acc0[m]);
        acc1[m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k + 16), b1, acc1[m]);
      }
    }
    for (; k + 16 <= K; k += 16) {
      const __m512 b0 = _mm512_loadu_ps(b + k);
      for (int m = 0; m < M; ++m) acc0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k), b0, acc0[m]);
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(_mm512_add_ps(acc0[m], acc1[m]));
      for (int64_t kk = k; kk < K; ++kk) s += A[m * lda + kk] * b[kk];
      float* c = C + m * ldc + n;
      *c = beta == 0.0f ? alpha * s : alpha * s + beta * *c;
    }
  }
}

}  // namespace qlora::cpu
