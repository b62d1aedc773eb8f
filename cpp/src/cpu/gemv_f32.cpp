#include "cpu/gemv_f32.hpp"

#include <algorithm>

#include "cpu/threads.hpp"

namespace qlora::cpu {

namespace {
inline void store(float* c, float acc, float alpha, float beta) {
  *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;  // beta == 0 never reads C
}
}  // namespace

void gemv_nt_f32_generic(int64_t M, int64_t n0, int64_t n1, int64_t K, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int L = 8;  // independent partial sums the compiler can keep in one vector
  for (int64_t n = n0; n < n1; ++n) {
    const float* b = B + n * ldb;  // [K]
    for (int64_t m = 0; m < M; ++m) {
      const float* a = A + m * lda;  // [K]
      float acc[L] = {0};
      int64_t k = 0;
      for (; k + L <= K; k += L)
        for (int l = 0; l < L; ++l) acc[l] += a[k + l] * b[k + l];
      float s = 0.0f;
      for (; k < K; ++k) s += a[k] * b[k];
      for (int l = 0; l < L; ++l) s += acc[l];
      store(&C[m * ldc + n], s, alpha, beta);
    }
  }
}

void gemv_nt_f32(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
#if defined(QLORA_X86)
  auto kern = level == SimdLevel::AVX512 ? gemv_nt_f32_avx512
              : level == SimdLevel::AVX2 ? gemv_nt_f32_avx2
                                         : gemv_nt_f32_generic;
#else  // the *_avx2 / *_avx512 files are built on x86 only: do not name their symbols elsewhere
  auto kern = gemv_nt_f32_generic;
#endif
  const int64_t group = kern == gemv_nt_f32_generic ? 4 : 8;  // rows per kernel pass (registers)
  // At least ~64 KiB of B per task so small layers stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K * 4));
  parallel_range(N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += group)
      kern(std::min(group, M - m0), n0, n1, K, alpha, A + m0 * lda, lda, B, ldb, beta, C + m0 * ldc, ldc);
  });
}

}  // namespace qlora::cpu
