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

namespace {
// M is a template parameter so the 2*M accumulators live in registers (with a run-time M the
// compiler keeps the arrays on the stack and the M=8 GEMV becomes load/store bound).
template <int M>
void gemv_rows(int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) {
  // Results go through a [M, 16] tile written out a cache line per row: storing one float per row
  // per n hits M lines that often share an L1 set (ldc = vocab size, a multiple of 4 KiB), and the
  // streamed B evicts them.
  constexpr int64_t kTile = 16;
  alignas(64) float tile[M][kTile];
  for (int64_t nt = n0; nt < n1; nt += kTile) {
    const int64_t nn = n1 - nt < kTile ? n1 - nt : kTile;
    for (int64_t j = 0; j < nn; ++j) {
      const float* b = B + (nt + j) * ldb;  // [K]
      __m512 acc0[M], acc1[M];              // two chains per row of A hide the FMA latency
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        const __m512 b0 = _mm512_loadu_ps(b + k), b1 = _mm512_loadu_ps(b + k + 16);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          acc0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k), b0, acc0[m]);
          acc1[m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k + 16), b1, acc1[m]);
        }
      }
      for (; k + 16 <= K; k += 16) {
        const __m512 b0 = _mm512_loadu_ps(b + k);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k), b0, acc0[m]);
      }
      for (int m = 0; m < M; ++m) {
        float s = hsum(_mm512_add_ps(acc0[m], acc1[m]));
        for (int64_t kk = k; kk < K; ++kk) s += A[m * lda + kk] * b[kk];
        tile[m][j] = s;
      }
    }
    for (int m = 0; m < M; ++m) {
      float* c = C + m * ldc + nt;
      for (int64_t j = 0; j < nn; ++j) c[j] = beta == 0.0f ? alpha * tile[m][j] : alpha * tile[m][j] + beta * c[j];
    }
  }
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
