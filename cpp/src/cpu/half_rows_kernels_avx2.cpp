// AVX2 GEMV over 16-bit rows (compiled with AVX2/FMA/F16C flags only; plain functions, see
// cpu/README.md). Structure of q8_0_kernels_avx2.cpp, each 8 weights widened in registers (fp16:
// vcvtph2ps; bf16: zero-extend and shift), exact in fp32, then FMA with X. The last K % 8 weights
// go through zero-padded copies, so any K is one path.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/gemv_tiles.hpp"
#include "cpu/simd_reduce_avx2.hpp"

namespace qlora::cpu {

namespace {

template <bool BF>
inline __attribute__((always_inline)) __m256 widen8(__m128i h) {
  if (BF) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <bool BF, int M, int P, int J>
inline __attribute__((always_inline)) void dots(int64_t n, int64_t K, const float* X, int64_t ldx,
                                                const uint16_t* W, float* out) {
  static_assert(J * P <= 8 && M <= P, "8 accumulators");
  __m256 v[8];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_setzero_ps();
  const uint16_t* w = W + n * K;  // [J, K]
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    if ((k & 31) == 0) {
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {  // the next J rows into L1, rows 8J ahead into L2
        _mm_prefetch(reinterpret_cast<const char*>(w + (J + j) * K + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + (8 * J + j) * K + k), _MM_HINT_T1);
      }
    }
    __m256 a[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      a[m] = _mm256_loadu_ps(X + m * ldx + k);
      if (J > 1) asm("" : "+x"(a[m]));  // one load of a for its J FMAs
    }
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      const __m256 wv = widen8<BF>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)));
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) v[j * P + m] = _mm256_fmadd_ps(a[m], wv, v[j * P + m]);
    }
  }
  if (K8 < K) {  // the tail through zero-padded copies
    const int r = static_cast<int>(K - K8);
    alignas(32) float xt[M][8];
    alignas(16) uint16_t wt[J][8];
    std::memset(xt, 0, sizeof(xt));
    std::memset(wt, 0, sizeof(wt));
    for (int m = 0; m < M; ++m) std::memcpy(xt[m], X + m * ldx + K8, r * sizeof(float));
    for (int j = 0; j < J; ++j) std::memcpy(wt[j], w + j * K + K8, r * sizeof(uint16_t));
    for (int j = 0; j < J; ++j) {
      const __m256 wv = widen8<BF>(_mm_load_si128(reinterpret_cast<const __m128i*>(wt[j])));
      for (int m = 0; m < M; ++m) v[j * P + m] = _mm256_fmadd_ps(_mm256_load_ps(xt[m]), wv, v[j * P + m]);
    }
  }
  _mm256_store_ps(out, hsum8(v));
}

// Rows of W go J at a time: 8 at M = 1, 4 at M = 2, 2 at M <= 4, 1 from M = 5 (P * J <= 8).
template <bool BF, int M>
void gemv_rows(int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx, const uint16_t* W, float* Y,
               int64_t ldy) {
  constexpr int P = pow2_at_least(M), J = 8 / P;
  alignas(32) float out[8];
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

void half_gemv_avx2(int bf16, int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                    const uint16_t* W, float* Y, int64_t ldy) {
  if (bf16) gemv_m<true>(M, n0, n1, K, X, ldx, W, Y, ldy);
  else gemv_m<false>(M, n0, n1, K, X, ldx, W, Y, ldy);
}

void half_widen_avx2(int bf16, const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i));
    _mm256_storeu_ps(out + i, bf16 ? widen8<true>(x) : widen8<false>(x));
  }
  for (; i < n; ++i) out[i] = bf16 ? [&] { const uint32_t b = static_cast<uint32_t>(h[i]) << 16; float f; std::memcpy(&f, &b, 4); return f; }()
                                   : _cvtsh_ss(h[i]);
}

}  // namespace qlora::cpu
