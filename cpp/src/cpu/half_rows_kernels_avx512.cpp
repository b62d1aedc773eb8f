// AVX-512 GEMV over 16-bit rows (compiled with AVX-512 flags only; plain functions, see cpu/README.md).
// Structure of q8_0_kernels_avx512.cpp, each 16 weights widened in registers (fp16: vcvtph2ps;
// bf16: zero-extend and shift into the high half), exact in fp32, then FMA with X. The last K % 16
// weights go through masked loads (zeros beyond K), so any K is one path.
// GCC 12's AVX-512 intrinsics seed results with _mm512_undefined_*: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/gemv_tiles.hpp"
#include "cpu/simd_reduce_avx512.hpp"

namespace qlora::cpu {

namespace {

template <bool BF>
inline __attribute__((always_inline)) __m512 widen16(__m256i h) {
  if (BF) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// J rows of W [n, n+J) against all M rows of X into out[j * P + m] (as q8_0_kernels_avx512.cpp):
// every dot product takes the same path whatever M and J are (and however rows split over threads).
template <bool BF, int M, int P, int J>
inline __attribute__((always_inline)) void dots(int64_t n, int64_t K, const float* X, int64_t ldx,
                                                const uint16_t* W, float* out) {
  static_assert(J * P <= 16 && M <= P, "16 accumulators");
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_setzero_ps();
  const uint16_t* w = W + n * K;  // [J, K]
  for (int64_t k = 0; k < K; k += 16) {
    const bool tail = K - k < 16;
    const __mmask16 mk = tail ? static_cast<__mmask16>((1u << (K - k)) - 1u) : static_cast<__mmask16>(0xffff);
    if ((k & 31) == 0) {
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) {  // the next J rows into L1, rows 8J ahead into L2
        _mm_prefetch(reinterpret_cast<const char*>(w + (J + j) * K + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + (8 * J + j) * K + k), _MM_HINT_T1);
      }
    }
    __m512 a[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      a[m] = _mm512_maskz_loadu_ps(mk, X + m * ldx + k);
      if (J > 1) asm("" : "+v"(a[m]));  // one load of a for its J FMAs
    }
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      const __m512 wv = widen16<BF>(_mm256_maskz_loadu_epi16(mk, w + j * K + k));
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) v[j * P + m] = _mm512_fmadd_ps(a[m], wv, v[j * P + m]);
    }
  }
  _mm512_store_ps(out, hsum16(v));
}

template <bool BF, int M>
void gemv_rows(int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx, const uint16_t* W, float* Y,
               int64_t ldy) {
  constexpr int P = pow2_at_least(M), J = M == 1 ? 8 : 16 / P;
  alignas(64) float out[16];
  gemv_tiles<M, P, J>(
      n0, n1, out, [&](int64_t n, float* o) { dots<BF, M, P, J>(n, K, X, ldx, W, o); },
      [&](int64_t n, float* o) { dots<BF, M, P, 1>(n, K, X, ldx, W, o); },
      [&](int m, int64_t nt, const float* row, int64_t nn) {
        std::memcpy(Y + m * ldy + nt, row, static_cast<size_t>(nn) * sizeof(float));
      });
}

template <bool BF>
void gemv_m(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx, const uint16_t* W, float* Y,
            int64_t ldy) {
  switch (M) {  // 1 <= M <= 8
    case 1: return gemv_rows<BF, 1>(n0, n1, K, X, ldx, W, Y, ldy);
    case 2: return gemv_rows<BF, 2>(n0, n1, K, X, ldx, W, Y, ldy);
    case 3: return gemv_rows<BF, 3>(n0, n1, K, X, ldx, W, Y, ldy);
    case 4: return gemv_rows<BF, 4>(n0, n1, K, X, ldx, W, Y, ldy);
    case 5: return gemv_rows<BF, 5>(n0, n1, K, X, ldx, W, Y, ldy);
    case 6: return gemv_rows<BF, 6>(n0, n1, K, X, ldx, W, Y, ldy);
    case 7: return gemv_rows<BF, 7>(n0, n1, K, X, ldx, W, Y, ldy);
    default: return gemv_rows<BF, 8>(n0, n1, K, X, ldx, W, Y, ldy);
  }
}

}  // namespace

void half_gemv_avx512(int bf16, int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                      const uint16_t* W, float* Y, int64_t ldy) {
  if (bf16) gemv_m<true>(M, n0, n1, K, X, ldx, W, Y, ldy);
  else gemv_m<false>(M, n0, n1, K, X, ldx, W, Y, ldy);
}

void half_widen_avx512(int bf16, const uint16_t* h, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = n - i < 16 ? static_cast<__mmask16>((1u << (n - i)) - 1u) : static_cast<__mmask16>(0xffff);
    const __m256i x = _mm256_maskz_loadu_epi16(mk, h + i);
    _mm512_mask_storeu_ps(out + i, mk, bf16 ? widen16<true>(x) : widen16<false>(x));
  }
}

}  // namespace qlora::cpu
