// AVX2 NF4 GEMV kernel. Per 8 packed bytes (16 weights): a 64-bit broadcast load (no shuffle
// uop) and a variable shift by 8*(q/2) put byte 4*(q%2) + q/2 into bits 0..7 of dword q; the
// low nibble (odd column) is then index bits 0..3, the high one (even column) after 4 more bits
// of shift (higher bits are ignored by the lookup). The 16 codes pre-scaled by the block's absmax live in two 8-entry register tables
// (vpermps reads index bits 0..2), and index bit 3, shifted into the sign bit, blends the two.
// X comes regrouped in that order (nf4_gemv.cpp): per group, 8 even then 8 odd columns. Rules: cpp/src/cpu/README.md.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/nf4_gemv_kernels.hpp"

namespace qlora::cpu::nf4_gemv_detail {

namespace {

// Decodes 8 of the 16 nibbles of bytes p[0..8) (sh selects which: sh_lo or sh_hi); index bit
// 3, shifted to the sign bit, picks the table half.
inline __m256 decode(const uint8_t* p, __m256i sh, __m256 t_lo, __m256 t_hi) {
  long long q;
  std::memcpy(&q, p, 8);
  const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi64x(q), sh);
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx), _mm256_permutevar8x32_ps(t_hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

#define QLORA_AI inline __attribute__((always_inline))

// Accumulates 16 columns (8 packed bytes at p) into acc[u] (even) and acc[u+1] (odd) per row of X.
template <int M, int NA>
QLORA_AI void group16(__m256 (&acc)[NA][M], int u, const uint8_t* p, const float* x, int64_t ldx, __m256 t_lo,
                      __m256 t_hi, __m256i sh_lo, __m256i sh_hi) {
  const __m256 we = decode(p, sh_hi, t_lo, t_hi);
  const __m256 wo = decode(p, sh_lo, t_lo, t_hi);
  for (int m = 0; m < M; ++m) {  // x regrouped: [8 even | 8 odd]
    acc[u][m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + m * ldx), acc[u][m]);
    acc[u + 1][m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + m * ldx + 8), acc[u + 1][m]);
  }
}

// U groups of 16 columns per step in whole blocks (2*U accumulators per row of X).
template <int M, int U>
void rows_m(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K, ldx = a.ldx;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s;
  const float* x = a.x;  // [M, ldx] regrouped
  const __m256 c_lo = _mm256_loadu_ps(a.codes), c_hi = _mm256_loadu_ps(a.codes + 8);
  const __m256i sh_lo = _mm256_set_epi32(24, 24, 16, 16, 8, 8, 0, 0);  // dword q: 8*(q/2)
  const __m256i sh_hi = _mm256_add_epi32(sh_lo, _mm256_set1_epi32(4));
  for (int64_t n = r0; n < r1; ++n) {
    const int64_t j0 = n * K;              // flat index of W[n, 0] (even: K % 16 == 0)
    const uint8_t* p = a.packed + j0 / 2;  // [K/2] bytes of row n
    const float* am = a.absmax + ((j0 >> s) - a.block0);  // scale of the block holding W[n, 0]
    __m256 acc[2 * U][M];                  // [group-in-step x (even, odd)][m]
    for (int u = 0; u < 2 * U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
    // Block edges fall on 16-column groups: a head up to the first edge, whole blocks, a tail.
    int64_t k = 0;
    const int64_t head = (j0 & (bs - 1)) ? bs - (j0 & (bs - 1)) : 0;
    for (int part = 0; part < 2; ++part) {  // 0: head, 1: tail (partial blocks, 16 columns a step)
      if (part == 1) {
        for (; k + bs <= K; k += bs) {  // whole blocks (bs is a multiple of 32 >= 16 * U)
          const __m256 scale = _mm256_set1_ps(*am++);
          const __m256 t_lo = _mm256_mul_ps(c_lo, scale), t_hi = _mm256_mul_ps(c_hi, scale);
          for (int64_t i = 0; i < bs; i += 16 * U)
            for (int u = 0; u < U; ++u)
              group16<M, 2 * U>(acc, 2 * u, p + (k + i + 16 * u) / 2, x + k + i + 16 * u, ldx, t_lo, t_hi, sh_lo, sh_hi);
        }
      }
      const int64_t end = part == 0 ? (head < K ? head : K) : K;
      if (k < end) {
        const __m256 scale = _mm256_set1_ps(part == 0 ? *am++ : *am);
        const __m256 t_lo = _mm256_mul_ps(c_lo, scale), t_hi = _mm256_mul_ps(c_hi, scale);
        for (; k < end; k += 16) group16<M, 2 * U>(acc, 0, p + k / 2, x + k, ldx, t_lo, t_hi, sh_lo, sh_hi);
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 sum = acc[0][m];
      for (int u = 1; u < 2 * U; ++u) sum = _mm256_add_ps(sum, acc[u][m]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      const float dot = _mm_cvtss_f32(h);
      float* y = a.y + m * a.ldy + n;
      *y = a.beta == 0.0f ? a.alpha * dot : a.alpha * dot + a.beta * *y;  // beta == 0: Y not read
    }
  }
}

}  // namespace

void rows_avx2(const Args& a, int64_t r0, int64_t r1) {
  switch (a.M) {
    case 1: rows_m<1, 2>(a, r0, r1); break;
    case 2: rows_m<2, 2>(a, r0, r1); break;
    case 3: rows_m<3, 1>(a, r0, r1); break;
    default: rows_m<4, 1>(a, r0, r1); break;
  }
}

}  // namespace qlora::cpu::nf4_gemv_detail
