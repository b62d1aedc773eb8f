// AVX2+FMA SwiGLU forward (contract in cpu/swiglu_kernels.hpp). Rules: cpu/README.md.
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd_exp_avx2.hpp"
#include "cpu/swiglu_kernels.hpp"

namespace qlora::cpu::swiglu_k {

namespace {

inline __m256 swiglu(__m256 g, __m256 u) {
  const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(_mm256_mul_ps(g, u), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

}  // namespace

void rows_avx2(int64_t m0, int64_t m1, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
               float* out, int64_t ldo) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* g = gate + m * ldg;
    const float* u = up + m * ldu;
    float* o = out + m * ldo;
    int64_t i = 0;
    for (; i + 8 <= N; i += 8) _mm256_storeu_ps(o + i, swiglu(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < N) {  // tail through a small buffer
      alignas(32) float gb[8] = {0}, ub[8] = {0}, ob[8];
      for (int64_t j = i; j < N; ++j) gb[j - i] = g[j], ub[j - i] = u[j];
      _mm256_store_ps(ob, swiglu(_mm256_load_ps(gb), _mm256_load_ps(ub)));
      for (int64_t j = i; j < N; ++j) o[j] = ob[j - i];
    }
  }
}

}  // namespace qlora::cpu::swiglu_k
