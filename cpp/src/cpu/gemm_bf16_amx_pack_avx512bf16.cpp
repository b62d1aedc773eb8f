// The AMX A panel straight from a row-major fp32 source (bf16_amx::pack_a_rows_amx): per 16-pair chunk
// each row's 32 k converted in order is one 64-byte tile row, so no transpose (pack_rows) and no
// re-layout (relayout_a) are needed. The same rounding as the AVX512-BF16 packers (vcvtne2ps2bf16 on the
// same values): the panel equals pack_rows_avx512bf16(W = rows) followed by relayout_a. Compiled with
// AVX512-BF16 flags; called only where the bf16 GEMM runs (bf16_compute_available). Rules: cpu/README.md.
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm_bf16_amx.hpp"

namespace qlora::cpu::bf16_amx {

namespace {
__mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}
}  // namespace

void pack_a_rows_amx(const float* src, int64_t ld, int n, int64_t kc, int rows, uint32_t* P) {
  const int64_t kp = (kc + 1) / 2;
  for (int64_t c0 = 0; c0 < kp; c0 += 16) {
    const int64_t w = kp - c0 < 16 ? kp - c0 : 16;  // pairs in this chunk (the tile row width)
    const int64_t k0 = 2 * c0, rem = kc - k0;        // rem <= 32 valid k in the chunk
    const __mmask16 mlo = lanes(rem), mhi = lanes(rem - 16), keep = lanes(w);
    uint32_t* d = P + c0 * rows;
    for (int i = 0; i < rows; ++i) {
      __m512i v = _mm512_setzero_si512();
      if (i < n) {
        const float* s = src + i * ld + k0;
        const __m512 lo = _mm512_maskz_loadu_ps(mlo, s), hi = _mm512_maskz_loadu_ps(mhi, s + 16);
        v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // bf16 of k0 .. k0 + 31 in order: 16 pairs
      }
      _mm512_mask_storeu_epi32(d + i * w, keep, v);
    }
  }
}

}  // namespace qlora::cpu::bf16_amx
