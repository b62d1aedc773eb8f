// AVX-512 Q8_0 GEMV and decode kernels (compiled with AVX-512 flags only; plain function, see cpu/README.md).
// Structure of gemv_f32_avx512.cpp, with each 16 weights decoded in registers: int8 -> int32 ->
// fp32, times the block's fp16 scale (exact in fp32), then FMA with X.
// GCC 12's AVX-512 intrinsics seed results with _mm512_undefined_*: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/gemv_tiles.hpp"
#include "cpu/simd_reduce_avx512.hpp"

namespace qlora::cpu {

namespace {

constexpr int64_t kBlock = 32, kBlockBytes = 34;


// J rows of W [n, n+J) against all M rows of X into out[j * P + m]: v[j * P + m] accumulates X row m
// times W row n+j over K (per block: the first 16 weights, then the last 16), and one tree reduction
// (hsum16) turns the 16 accumulators into 16 dot products. Every dot product takes the same path
// whatever M and J are, so a result does not depend on M or on how rows are split across threads.
template <int M, int P, int J>
inline __attribute__((always_inline)) void dots(int64_t n, int64_t nb, const float* X, int64_t ldx,
                                                const uint8_t* W, int64_t row_bytes, float* out) {
  static_assert(J * P <= 16 && M <= P, "16 accumulators");
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_setzero_ps();
  const uint8_t* w = W + n * row_bytes;  // [J, row_bytes]
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBlockBytes;
    float sc[J];  // the J blocks' scales
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      // The next J rows into L1 and rows 8J ahead into L2 at every J (unlike the fp32 GEMV, M = 1
      // too): without it M = 1 ran at 27 GB/s of Q8_0, with it at 75 ([49152, 576], 2 threads).
      _mm_prefetch(reinterpret_cast<const char*>(blk + (J + j) * row_bytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + (8 * J + j) * row_bytes), _MM_HINT_T1);
      uint16_t dh;
      std::memcpy(&dh, blk + j * row_bytes, 2);
      sc[j] = _cvtsh_ss(dh);
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m512 a[M];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_loadu_ps(X + m * ldx + b * kBlock + 16 * h);
        // Keep a in a register: GCC otherwise folds the load into each of the J FMAs.
        if (J > 1) asm("" : "+v"(a[m]));
      }
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) {
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + j * row_bytes + 2 + 16 * h));
        const __m512 wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(sc[j]));
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) v[j * P + m] = _mm512_fmadd_ps(a[m], wv, v[j * P + m]);
      }
    }
  }
  _mm512_store_ps(out, hsum16(v));
}

// M is a template parameter so the accumulators live in registers. Rows of W go J at a time
// (J * P <= 16 accumulators: 8 rows at M = 1 and 2, 2 at M = 8), so W streams once per call.
// M = 1 uses 8 rows, not 16: 16 rows' scales and decodes spilled (0.47 ms against 0.39).
template <int M>
void gemv_rows(int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx, const uint8_t* W, float* Y,
               int64_t ldy) {
  constexpr int P = pow2_at_least(M), J = M == 1 ? 8 : 16 / P;
  const int64_t nb = K / kBlock, row_bytes = nb * kBlockBytes;
  alignas(64) float out[16];
  gemv_tiles<M, P, J>(
      n0, n1, out, [&](int64_t n, float* o) { dots<M, P, J>(n, nb, X, ldx, W, row_bytes, o); },
      [&](int64_t n, float* o) { dots<M, P, 1>(n, nb, X, ldx, W, row_bytes, o); },
      [&](int m, int64_t nt, const float* row, int64_t nn) {
        std::memcpy(Y + m * ldy + nt, row, static_cast<size_t>(nn) * sizeof(float));
      });
}

}  // namespace

void q8_0_decode_tile_avx512(const uint8_t* E, int64_t D, int64_t r0, int64_t rows, int64_t c0, int64_t n,
                             int64_t width, float* out, int64_t ldo) {
  const int64_t row_bytes = D / kBlock * kBlockBytes;
  if (c0 % kBlock == 0 && n == kBlock && width == kBlock) {  // a whole block per row (dh's 32-wide panels)
    const uint8_t* blk = E + r0 * row_bytes + c0 / kBlock * kBlockBytes;
    for (int64_t r = 0; r < rows; ++r, blk += row_bytes) {
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const __m512 d = _mm512_set1_ps(_cvtsh_ss(dh));
      for (int t = 0; t < 2; ++t) {
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2 + 16 * t));
        _mm512_storeu_ps(out + r * ldo + 16 * t, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d));
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = E + (r0 + r) * row_bytes;
    float* o = out + r * ldo;
    for (int64_t j = 0; j < n;) {  // one block's run of columns, 16 at a time (masked at the ends)
      const int64_t c = c0 + j, off = c % kBlock, len = std::min(kBlock - off, n - j);
      const uint8_t* blk = row + c / kBlock * kBlockBytes;
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const __m512 d = _mm512_set1_ps(_cvtsh_ss(dh));
      for (int64_t t = 0; t < len; t += 16) {
        const __mmask16 m = static_cast<__mmask16>(len - t >= 16 ? 0xffff : (1u << (len - t)) - 1);
        const __m128i q = _mm_maskz_loadu_epi8(m, blk + 2 + off + t);
        _mm512_mask_storeu_ps(o + j + t, m, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d));
      }
      j += len;
    }
    for (int64_t j = n; j < width; j += 16) {
      const __mmask16 m = static_cast<__mmask16>(width - j >= 16 ? 0xffff : (1u << (width - j)) - 1);
      _mm512_mask_storeu_ps(o + j, m, _mm512_setzero_ps());
    }
  }
}

void q8_0_gemv_avx512(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx,
                      const uint8_t* W, float* Y, int64_t ldy) {
  switch (M) {  // 1 <= M <= 8
    case 1: return gemv_rows<1>(n0, n1, K, X, ldx, W, Y, ldy);
    case 2: return gemv_rows<2>(n0, n1, K, X, ldx, W, Y, ldy);
    case 3: return gemv_rows<3>(n0, n1, K, X, ldx, W, Y, ldy);
    case 4: return gemv_rows<4>(n0, n1, K, X, ldx, W, Y, ldy);
    case 5: return gemv_rows<5>(n0, n1, K, X, ldx, W, Y, ldy);
    case 6: return gemv_rows<6>(n0, n1, K, X, ldx, W, Y, ldy);
    case 7: return gemv_rows<7>(n0, n1, K, X, ldx, W, Y, ldy);
    default: return gemv_rows<8>(n0, n1, K, X, ldx, W, Y, ldy);
  }
}

}  // namespace qlora::cpu
