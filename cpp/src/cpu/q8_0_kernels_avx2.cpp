// AVX2 Q8_0 GEMV and decode kernels (compiled with AVX2/FMA/F16C flags only; plain function, see cpu/README.md).
// Structure of gemv_f32_avx2.cpp, with each 8 weights decoded in registers: int8 -> int32 -> fp32,
// times the block's fp16 scale (exact in fp32), then FMA with X.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/gemv_tiles.hpp"
#include "cpu/simd_reduce_avx2.hpp"

namespace qlora::cpu {

namespace {

constexpr int64_t kBlock = 32, kBlockBytes = 34;


// J rows of W [n, n+J) against all M rows of X into out[j * P + m]: v[j * P + m] accumulates X row m
// times W row n+j over K, 8 weights a step, and one tree reduction (hsum8) turns the 8 accumulators
// into 8 dot products (P * J <= 8 of the 16 ymm registers hold sums). Every dot product takes the
// same path whatever M and J are, so a result does not depend on M or on the thread split.
template <int M, int P, int J>
inline __attribute__((always_inline)) void dots(int64_t n, int64_t nb, const float* X, int64_t ldx,
                                                const uint8_t* W, int64_t row_bytes, float* out) {
  static_assert(J * P <= 8 && M <= P, "8 accumulators");
  __m256 v[8];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_setzero_ps();
  const uint8_t* w = W + n * row_bytes;  // [J, row_bytes]
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBlockBytes;
    float sc[J];  // the J blocks' scales
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      // The next J rows into L1 and rows 8J ahead into L2 at every J (as q8_0_kernels_avx512.cpp).
      _mm_prefetch(reinterpret_cast<const char*>(blk + (J + j) * row_bytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + (8 * J + j) * row_bytes), _MM_HINT_T1);
      uint16_t dh;
      std::memcpy(&dh, blk + j * row_bytes, 2);
      sc[j] = _cvtsh_ss(dh);
    }
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      __m256 a[M];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        a[m] = _mm256_loadu_ps(X + m * ldx + b * kBlock + 8 * h);
        if (J > 1) asm("" : "+x"(a[m]));  // one load of a for its J FMAs (GCC would fold it into each)
      }
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + j * row_bytes + 2 + 8 * h));
        const __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(sc[j]));
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) v[j * P + m] = _mm256_fmadd_ps(a[m], wv, v[j * P + m]);
      }
    }
  }
  _mm256_store_ps(out, hsum8(v));
}

// M is a template parameter so the accumulators live in registers. Rows of W go J at a time:
// 8 at M = 1, 4 at M = 2, 2 at M <= 4, 1 from M = 5 (P * J <= 8), so W streams once per call.
template <int M>
void gemv_rows(int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx, const uint8_t* W, float* Y,
               int64_t ldy) {
  constexpr int P = pow2_at_least(M), J = 8 / P;
  const int64_t nb = K / kBlock, row_bytes = nb * kBlockBytes;
  alignas(32) float out[8];
  gemv_tiles<M, P, J>(
      n0, n1, out, [&](int64_t n, float* o) { dots<M, P, J>(n, nb, X, ldx, W, row_bytes, o); },
      [&](int64_t n, float* o) { dots<M, P, 1>(n, nb, X, ldx, W, row_bytes, o); },
      [&](int m, int64_t nt, const float* row, int64_t nn) {
        std::memcpy(Y + m * ldy + nt, row, static_cast<size_t>(nn) * sizeof(float));
      });
}

}  // namespace

void q8_0_decode_tile_avx2(const uint8_t* E, int64_t D, int64_t r0, int64_t rows, int64_t c0, int64_t n,
                           int64_t width, float* out, int64_t ldo) {
  const int64_t row_bytes = D / kBlock * kBlockBytes;
  if (c0 % 16 == 0 && n == 16 && width == 16) {  // half a block per row (dh's 16-wide panels)
    const uint8_t* blk = E + r0 * row_bytes + c0 / kBlock * kBlockBytes;
    const int64_t off = c0 % kBlock;
    for (int64_t r = 0; r < rows; ++r, blk += row_bytes) {
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
      for (int t = 0; t < 2; ++t) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + off + 8 * t));
        _mm256_storeu_ps(out + r * ldo + 8 * t, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = E + (r0 + r) * row_bytes;
    float* o = out + r * ldo;
    for (int64_t j = 0; j < n;) {  // one block's run of columns, 8 at a time (the rest one by one)
      const int64_t c = c0 + j, off = c % kBlock, len = std::min(kBlock - off, n - j);
      const uint8_t* blk = row + c / kBlock * kBlockBytes;
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const float ds = _cvtsh_ss(dh);
      const __m256 d = _mm256_set1_ps(ds);
      int64_t t = 0;
      for (; t + 8 <= len; t += 8) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + off + t));
        _mm256_storeu_ps(o + j + t, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
      }
      for (; t < len; ++t) o[j + t] = ds * static_cast<float>(static_cast<int8_t>(blk[2 + off + t]));
      j += len;
    }
    for (int64_t j = n; j < width; ++j) o[j] = 0.0f;
  }
}

void q8_0_gemv_avx2(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* X, int64_t ldx, const uint8_t* W,
                    float* Y, int64_t ldy) {
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
