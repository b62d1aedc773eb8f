// AVX512-BF16 28x16 micro-kernel of the few-column bf16 GEMM (cpu/gemm_bf16_skinny.hpp): one zmm
// of 16 fp32 columns per row, 28 rows, one broadcast A pair per vdpbf16ps. Compiled with
// -mavx512bf16 (CMake: *_avx512bf16.cpp); called only after cpu_has_avx512_bf16().
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm_bf16_skinny_kernels.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qlora::cpu::bf16_k {

namespace {
constexpr int MR = kSkinnyMR;

__mmask16 lane_mask(int n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u); }

template <int R>
void ukr(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha, float beta, int nr) {
  __m512 c[R];
#pragma GCC unroll 28
  for (int i = 0; i < R; ++i) c[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b = (__m512bh)_mm512_load_si512(Bp);
#pragma GCC unroll 28
    for (int i = 0; i < R; ++i)
      c[i] = _mm512_dpbf16_ps(c[i], (__m512bh)_mm512_set1_epi32(static_cast<int>(Ap[i])), b);
    Ap += MR;
    Bp += 16;
  }
  const __mmask16 m = lane_mask(nr);
  const __m512 va = _mm512_set1_ps(alpha);
  if (beta == 0.0f) {
#pragma GCC unroll 28
    for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(C + i * ldc, m, _mm512_mul_ps(va, c[i]));
  } else {
    const __m512 vb = _mm512_set1_ps(beta);
#pragma GCC unroll 28
    for (int i = 0; i < R; ++i) {
      float* ci = C + i * ldc;
      _mm512_mask_storeu_ps(ci, m, _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, ci), _mm512_mul_ps(va, c[i])));
    }
  }
}

using Fn = void (*)(int64_t, const uint32_t*, const uint32_t*, float*, int64_t, float, float, int);
template <int... R>
struct Table {
  static constexpr Fn fn[sizeof...(R)] = {&ukr<R + 1>...};
};
template <int... R>
constexpr Fn Table<R...>::fn[sizeof...(R)];
using Kernels = Table<0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
                      26, 27>;
static_assert(sizeof(Kernels::fn) / sizeof(Fn) == MR, "one kernel per row count");
}  // namespace

void ukernel16_avx512bf16(int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
                          float beta, int mr, int nr) {
  if (mr >= 1 && mr <= MR && nr >= 1) Kernels::fn[mr - 1](kp, Ap, Bp, C, ldc, alpha, beta, nr);
}

}  // namespace qlora::cpu::bf16_k
