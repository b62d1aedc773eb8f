// AVX-512 NF4 GEMV kernel. Per 16 packed bytes (32 weights): a broadcast load (no shuffle uop)
// puts the bytes in all four 128-bit lanes; a per-lane variable shift by 8*lane moves byte
// 4*t + lane into bits 0..7 of dword 4*lane + t. vpermps reads index bits 0..3 only, so over a
// register table of the 16 codes pre-scaled by the block's absmax it decodes the low nibbles
// (odd columns) directly and the high nibbles (even columns) after 4 more bits of shift; the
// other bits are ignored. X comes regrouped in that order (nf4_gemv.cpp), so no shuffle of
// decoded weights is needed; every decoded vector is used for all M rows of X.
// Rules for this file: cpp/src/cpu/README.md (intrinsics + raw pointers only).
// GCC 12's AVX-512 intrinsics seed results with _mm512_undefined_*: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/nf4_gemv_kernels.hpp"

namespace qlora::cpu::nf4_gemv_detail {

namespace {

#define QLORA_AI inline __attribute__((always_inline))

// Dword q = 4*lane + t of a 16-byte broadcast, shifted by 8*lane (+4 for the high nibble).
struct Shifts {
  __m512i lo, hi;
};

// Accumulates 32 columns [k, k+32) (16 packed bytes at p) into acc[u], acc[u+1] for every row of X.
template <int M>
QLORA_AI void group32(__m512 (&acc)[4][M], int u, const uint8_t* p, const float* x, int64_t ldx, __m512 t,
                      const Shifts& sh) {
  const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512 we = _mm512_permutexvar_ps(_mm512_srlv_epi32(b, sh.hi), t);  // even columns
  const __m512 wo = _mm512_permutexvar_ps(_mm512_srlv_epi32(b, sh.lo), t);  // odd columns
  for (int m = 0; m < M; ++m) {  // x regrouped: [16 even | 16 odd]
    acc[u][m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x + m * ldx), acc[u][m]);
    acc[u + 1][m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + m * ldx + 16), acc[u + 1][m]);
  }
}

// Columns [k, end) of one row, all in one block (scaled table t); a whole number of groups.
template <int M>
QLORA_AI void segment(__m512 (&acc)[4][M], const uint8_t* p, const float* x, int64_t ldx, int64_t k, int64_t end,
                      __m512 t, const Shifts& sh) {
  for (; k + 64 <= end; k += 64) {
    group32<M>(acc, 0, p + k / 2, x + k, ldx, t, sh);
    group32<M>(acc, 2, p + k / 2 + 16, x + k + 32, ldx, t, sh);
  }
  if (k < end) group32<M>(acc, 0, p + k / 2, x + k, ldx, t, sh);
}

template <int M>
void rows_m(const Args& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K, ldx = a.ldx;
  const int s = a.bs_shift;
  const int64_t bs = int64_t{1} << s;
  const float* x = a.x;  // [M, ldx] regrouped
  const __m512 codes = _mm512_loadu_ps(a.codes);
  Shifts sh;
  sh.lo = _mm512_set_epi32(24, 24, 24, 24, 16, 16, 16, 16, 8, 8, 8, 8, 0, 0, 0, 0);
  sh.hi = _mm512_add_epi32(sh.lo, _mm512_set1_epi32(4));
  for (int64_t n = r0; n < r1; ++n) {
    const int64_t j0 = n * K;              // flat index of W[n, 0] (even: K % 32 == 0)
    const uint8_t* p = a.packed + j0 / 2;  // [K/2] bytes of row n
    const float* am = a.absmax + ((j0 >> s) - a.block0);  // scale of the block holding W[n, 0]
    __m512 acc[4][M];                      // [2 groups x (even, odd)][m]
    for (int u = 0; u < 4; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
    // Block edges fall on 32-column groups: a head up to the first edge, whole blocks, a tail.
    int64_t k = 0;
    const int64_t head = (j0 & (bs - 1)) ? bs - (j0 & (bs - 1)) : 0;
    if (head) {
      k = head < K ? head : K;
      segment<M>(acc, p, x, ldx, 0, k, _mm512_mul_ps(codes, _mm512_set1_ps(*am++)), sh);
    }
    if (bs >= 64) {
      for (; k + bs <= K; k += bs) {
        const __m512 t = _mm512_mul_ps(codes, _mm512_set1_ps(*am++));  // [16] codes * absmax
        for (int64_t i = 0; i < bs; i += 64) {
          group32<M>(acc, 0, p + (k + i) / 2, x + k + i, ldx, t, sh);
          group32<M>(acc, 2, p + (k + i) / 2 + 16, x + k + i + 32, ldx, t, sh);
        }
      }
    } else {
      for (; k + 64 <= K; k += 64, am += 2) {  // blocksize 32: two blocks a step
        group32<M>(acc, 0, p + k / 2, x + k, ldx, _mm512_mul_ps(codes, _mm512_set1_ps(am[0])), sh);
        group32<M>(acc, 2, p + k / 2 + 16, x + k + 32, ldx, _mm512_mul_ps(codes, _mm512_set1_ps(am[1])), sh);
      }
      if (k + 32 <= K) {
        group32<M>(acc, 0, p + k / 2, x + k, ldx, _mm512_mul_ps(codes, _mm512_set1_ps(*am++)), sh);
        k += 32;
      }
    }
    if (k < K) segment<M>(acc, p, x, ldx, k, K, _mm512_mul_ps(codes, _mm512_set1_ps(*am)), sh);
    for (int m = 0; m < M; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]), _mm512_add_ps(acc[2][m], acc[3][m]));
      const float dot = _mm512_reduce_add_ps(sum);
      float* y = a.y + m * a.ldy + n;
      *y = a.beta == 0.0f ? a.alpha * dot : a.alpha * dot + a.beta * *y;  // beta == 0: Y not read
    }
  }
}

}  // namespace

void rows_avx512(const Args& a, int64_t r0, int64_t r1) {
  switch (a.M) {
    case 1: rows_m<1>(a, r0, r1); break;
    case 2: rows_m<2>(a, r0, r1); break;
    case 3: rows_m<3>(a, r0, r1); break;
    default: rows_m<4>(a, r0, r1); break;
  }
}

}  // namespace qlora::cpu::nf4_gemv_detail
