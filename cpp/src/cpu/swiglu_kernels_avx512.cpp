// AVX-512 SwiGLU forward (contract in cpu/swiglu_kernels.hpp). Rules: cpu/README.md.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd_exp_avx512.hpp"
#include "cpu/swiglu_kernels.hpp"

namespace qlora::cpu::swiglu_k {

namespace {

inline __m512 swiglu(__m512 g, __m512 u) {
  const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

}  // namespace

void rows_avx512(int64_t m0, int64_t m1, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
                 float* out, int64_t ldo) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* g = gate + m * ldg;
    const float* u = up + m * ldu;
    float* o = out + m * ldo;
    int64_t i = 0;
    for (; i + 16 <= N; i += 16) _mm512_storeu_ps(o + i, swiglu(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
    if (i < N) {  // masked tail: loads of masked-off lanes never fault
      const __mmask16 k = static_cast<__mmask16>((1u << (N - i)) - 1);
      _mm512_mask_storeu_ps(o + i, k, swiglu(_mm512_maskz_loadu_ps(k, g + i), _mm512_maskz_loadu_ps(k, u + i)));
    }
  }
}

}  // namespace qlora::cpu::swiglu_k
